"""The README's main job as a new user runs it: ``pprl demo`` with a fresh HOME, no RAY_* variable, a free dashboard
port, beside a Ray head that is not the demo's. It must reach the report, leave no process of its own behind and leave
the other head running. A tiny budget (a small synthetic set, one short epoch) keeps it to a few minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pprl import cluster

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING = ["train.steps_per_epoch=4", "train.batch_size=16", "train.d_warmup_steps=0", "train.log_every=0",
                 "train.sample_rows=2"]  # fmt: skip

pytestmark = pytest.mark.slow


def processes_with_home(home: Path) -> list[str]:
    """Live processes whose environment has ``HOME=home``: everything the demo started inherits it."""
    found = []
    needle = f"HOME={home}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            alive = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and needle in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {cmdline[:120]}")
        except (OSError, IndexError):
            continue
    return found


def test_demo_on_a_fresh_machine_reaches_the_report_and_cleans_up(ray_head, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "demo"
    cmd = [str(Path(sys.executable).parent / "pprl"), "demo", "--out", str(out), "--epochs", "1", "--images-per-cell", "12",
           "--dashboard-port", str(cluster.free_port()), *(arg for item in TINY_TRAINING for arg in ("--set", item))]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (tmp_path / "demo.log").write_text(log)
    assert proc.returncode == 0, f"pprl demo failed ({proc.returncode}):\n{log[-6000:]}"

    report = json.loads((out / "report" / "report.json").read_text())
    assert report["rows"], "the report has no attack scenario"
    assert (out / "runs" / "demo" / "model" / "bundle.json").is_file()
    verdict = "PASSED" if report["audit"]["passed"] else "FAILED"
    assert f"privacy audit: {verdict}" in proc.stdout.rsplit("outputs:", 1)[-1], "the demo does not end with the verdict"
    assert (out / "runs" / "demo" / "model" / "privacy_audit.json").is_file(), "the audit is not attached to the bundle"
    assert "starting a private Ray head" in log and "stopping the Ray head this demo started" in log
    assert not (home / ".ray" / "auth_token").exists(), "the demo's token belongs in a private 0600 file, not ~/.ray"
    assert processes_with_home(home) == [], "the demo left processes behind"
    assert cluster.dashboard_status(ray_head["dashboard"]) == 200, "the demo stopped a Ray head it did not start"
