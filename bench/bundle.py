"""The model the serving and footage benchmarks run: a ``cpu-quick`` bundle trained for a few iterations.

The benchmarks measure speed, not quality: a briefly trained network does exactly the same arithmetic as a good one
of the same preset. It is trained once with ``pprl train-local`` and cached in the bench work folder; pass
``--model`` to ``bench/run.py`` to use your own bundle instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from harness import REPO

log = logging.getLogger("bench.bundle")
PRESET = "cpu-quick"
STEPS = 10


def ensure_model(data: str, run_dir: Path) -> str:
    """``run_dir/model`` if it already holds a bundle, else train ``cpu-quick`` for ``STEPS`` iterations on ``data``."""
    from pprl.train.export import INFO

    bundle = run_dir / "model"
    if (bundle / INFO).exists():
        return str(bundle)
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt
    log.info("training a %s bundle for %d iterations with pprl train-local (speed benchmarks only) into %s", PRESET, STEPS, run_dir)
    cmd = [
        sys.executable, "-m", "pprl", "train-local", "--data", data, "--out", str(run_dir), "--preset", PRESET,
        "--epochs", "1", "--set", f"train.steps_per_epoch={STEPS}", "--device", "cpu", "--threads", "1", "--no-resume",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "platform"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or not (bundle / INFO).exists():
        raise RuntimeError(f"pprl train-local failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return str(bundle)
