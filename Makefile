# Two entry points: `make demo` (the main job end to end) and `make test` (the whole suite).
# Both create/refresh .venv themselves. Where there is no NVIDIA GPU, torch's CPU build is installed first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra pip options for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
OUT ?= runs/demo

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch 2.13.0 with CUDA and DALI"; \
		$(PY) -m pip install -q "torch==2.13.0" numpy $(TORCH_PIP_ARGS); \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch 2.13.0"; \
		$(PY) -m pip install -q "torch==2.13.0" numpy $(TORCH_PIP_ARGS); \
		$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 'a CUDA build of torch was installed on a machine without a GPU: set TORCH_PIP_ARGS=\"--index-url https://download.pytorch.org/whl/cpu\"')"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pprl demo --out $(OUT)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs
