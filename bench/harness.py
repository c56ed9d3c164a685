"""What every benchmark shares: the figures it reports, the run context (cached dataset and model), the report.

A benchmark module defines ``run(ctx: Context) -> list[Figure]``. A :class:`Figure` is one measured number; when it
is compared with a baseline measured in the same invocation, the figure carries the baseline's name and value and
its ``ratio`` is the speed-up over the baseline (> 1: better than the baseline, whatever the unit's direction).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from pprl import storage  # noqa: E402

log = logging.getLogger("bench")


@dataclass
class Figure:
    """One measured number, optionally against a baseline measured in the same run."""

    bench: str  # benchmark module name, e.g. "data_loading"
    name: str  # what was measured, e.g. "DALI CPU pipeline (4 threads)"
    value: float
    unit: str  # "images/s", "ms", "%", ...
    higher_is_better: bool = True
    baseline: str | None = None  # the baseline's name
    baseline_value: float | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # raw numbers, for the JSON only

    @property
    def ratio(self) -> float | None:
        """Speed-up over the baseline: value/baseline for throughputs, baseline/value for latencies and times."""
        if self.baseline_value is None or not self.value or not self.baseline_value:
            return None
        return self.value / self.baseline_value if self.higher_is_better else self.baseline_value / self.value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Context:
    """Options and shared, cached inputs of one ``bench/run.py`` invocation."""

    quick: bool = True
    workdir: Path = REPO / "bench" / ".cache"  # cached dataset, model bundle, clips (ignored by git)
    seconds: float | None = None  # time per measurement; None = the benchmark's default for quick/full
    rounds: int | None = None  # interleaved repeats of each measured setting, where a benchmark repeats; None = its default
    data_uri: str | None = None  # use this dataset instead of generating one
    model_uri: str | None = None  # use this model bundle instead of training one

    def duration(self, quick_default: float, full_default: float) -> float:
        if self.seconds is not None:
            return self.seconds
        return quick_default if self.quick else full_default

    def dataset(self) -> str:
        """A synthetic FERG-like dataset (6 identities x 7 expressions, 64 px); generated once and cached."""
        if self.data_uri:
            return self.data_uri
        from pprl.data.generate import SynthSpec, generate

        per_cell = 60 if self.quick else 240
        out = self.workdir / f"synth-{per_cell}"
        if not (out / "manifest.parquet").exists():
            log.info("generating the benchmark dataset in %s", out)
            generate(str(out), SynthSpec(images_per_cell=per_cell, seed=0), progress=False)
        self.data_uri = str(out)
        return self.data_uri

    def model(self) -> str:
        """A ``cpu-quick`` model bundle: ``--model``, else one trained briefly here and cached (speed, not quality)."""
        if self.model_uri:
            return self.model_uri
        from bundle import ensure_model  # lazy: only serving and footage need a model

        self.model_uri = ensure_model(self.dataset(), self.workdir / "train-cpu-quick")
        return self.model_uri


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """Where the numbers came from: CPU model and cores (lscpu), GPU if any, library versions."""
    info: dict[str, Any] = {"host": socket.gethostname(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cores"] = int(fields.get("CPU(s)", info["cores"]).strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        info["cpu"] = platform.processor() or "?"
    import torch

    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for key, dists in {"ray": ["ray"], "dali": ["nvidia-dali-cuda120", "nvidia-dali-cuda130"], "av": ["av"], "onnxruntime": ["onnxruntime"]}.items():
        info[key] = next((version for d in dists if (version := _installed(d))), None)
    return info


def _installed(dist: str) -> str | None:
    """A package's version from its metadata (importing Ray just to ask takes seconds)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------- report


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def markdown_table(figures: list[Figure]) -> str:
    """One table: every figure, its baseline and the speed-up over it."""
    lines = [
        "| benchmark | measurement | value | baseline (same run) | baseline value | speed-up vs baseline | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        base = f"{_number(f.baseline_value)} {f.unit}" if f.baseline_value is not None else ""
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        lines.append(f"| {f.bench} | {f.name} | {_number(f.value)} {f.unit} | {f.baseline or ''} | {base} | {ratio} | {f.note} |")
    return "\n".join(lines)


def report(figures: list[Figure], info: dict[str, Any], args: dict[str, Any], timings: dict[str, float],
           errors: dict[str, str], out_dir: Path) -> dict[str, Any]:
    """Write ``<date>-<host>.json``, ``latest.json`` and ``latest.md`` under ``out_dir`` (atomically); return the document."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc = {
        "date": stamp,
        "machine": info,
        "args": args,
        "bench_seconds": timings,
        "errors": errors,
        "figures": [f.to_dict() for f in figures],
    }
    text = json.dumps(doc, indent=2, default=float)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{info['host']}.json"
    storage.write_text(str(out_dir / name), text)
    storage.write_text(str(out_dir / "latest.json"), text)
    storage.write_text(str(out_dir / "latest.md"), markdown_document(doc, figures))
    return doc


def markdown_document(doc: dict[str, Any], figures: list[Figure]) -> str:
    m = doc["machine"]
    head = (
        f"Benchmarks of {doc['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, ray {m['ray']}, DALI {m['dali']}; load average (1/5/15 min) at start {m.get('loadavg_at_start')}, "
        f"at end {m.get('loadavg_at_end')}. Mode: {'quick' if doc['args'].get('quick') else 'full'}; "
        f"time per benchmark (s): {', '.join(f'{k} {v:.0f}' for k, v in doc['bench_seconds'].items())}."
    )
    parts = [head, "", markdown_table(figures)]
    if doc["errors"]:
        parts += ["", "Failed benchmarks:", *(f"- {k}: {v}" for k, v in doc["errors"].items())]
    return "\n".join(parts) + "\n"
