"""The install a new user runs (``make venv``) stays clean: today's packaging metadata, no warning about it, and torch's
check only after NumPy is there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This machine's own pip configuration names package folders that may be missing; that is not the project's warning.
MACHINE_PIP_NOISE = re.compile(r"^WARNING: Location '.*' is ignored")


def test_the_package_builds_with_an_spdx_license_and_no_warning(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info/ next to the sources
    shutil.copytree(REPO / "platform", source / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    output = [line for line in (build.stdout + build.stderr).splitlines() if not MACHINE_PIP_NOISE.match(line)]
    assert not [line for line in output if re.search(r"deprecat|warning", line, re.IGNORECASE)], "\n".join(output)
    (wheel,) = tmp_path.glob("pprl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata


def test_make_venv_imports_torch_only_after_numpy_is_installed():
    plan = subprocess.run(["make", "-n", "-B", "venv", "VENV=/nonexistent/venv"], cwd=REPO, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    commands = plan.stdout
    first_import = commands.index("import torch")
    installs = [m.group(0) for m in re.finditer(r"pip install[^;\n]*", commands[:first_import])]
    assert any("torch==" in line and "numpy" in line for line in installs), installs
