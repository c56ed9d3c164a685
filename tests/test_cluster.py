"""pprl's one Ray layer (``pprl.cluster``) as users meet it, on a machine like a user's.

Each command runs in its own process with a fresh ``HOME`` and no ``RAY_*`` variable, beside a user's own
``ray start --head`` (default temp folder, so it writes Ray's ``ray_current_cluster`` pointer), and again after that head
was killed with SIGKILL (the pointer then names a dead cluster). Ray's own ``ray.init(num_cpus=...)`` crashes in both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pprl import cluster
from pprl.footage.testclips import ClipSpec, synthetic_clip

REPO = Path(__file__).resolve().parents[1]
POINTER = Path("/tmp/ray/ray_current_cluster")  # where a plain `ray start --head` says where it is
TUNE_TINY = [
    "--preset", "cpu-quick", "--set", "model.image_size=16", "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=8",
    "--set", "train.log_every=0", "--set", "train.d_warmup_steps=0", "--epochs", "1", "--num-samples", "1",
    "--judge-epochs", "1", "--judge-batch-size", "16", "--val-limit", "40",
]  # fmt: skip

pytestmark = pytest.mark.slow


def user_env(home: Path) -> dict[str, str]:
    """This environment as a new user has it: a fresh HOME, no RAY_* variable (so no token, no address)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def users_head(tmp_path):
    """A user's ``ray start --head --block`` with Ray's defaults (its own process group, so a SIGKILL takes all of it)."""
    home = tmp_path / "home"
    home.mkdir()
    port, dashboard = cluster.free_port(), cluster.free_port()
    cmd = [cluster.ray_executable("ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
           "--num-cpus=1", "--disable-usage-stats"]  # fmt: skip
    with open(tmp_path / "users-head.log", "w") as log:
        proc = subprocess.Popen(cmd, env=user_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"{cluster.LOOPBACK}:{port}"
    deadline = time.time() + 90
    while not (POINTER.is_file() and POINTER.read_text().strip().endswith(f":{port}")):
        assert proc.poll() is None and time.time() < deadline, f"the user's head did not start; see {log.name}"
        time.sleep(0.5)
    yield {"address": address, "pgid": proc.pid, "proc": proc, "home": home}
    kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()


def run_all(commands: dict[str, list[str]], env: dict[str, str], logs: Path) -> dict[str, str]:
    """Run the commands one after another (each starts a Ray node: side by side, 2 cores overload Ray's 30 s start-up
    wait); returns each one's output, asserting it succeeded."""
    outputs = {}
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        outputs[name] = proc.stdout + proc.stderr
        (logs / f"{name}.log").write_text(outputs[name])
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{outputs[name][-4000:]}"
    return outputs


def test_commands_start_a_private_ray_beside_a_running_head_and_after_it_was_killed(
    users_head, tiny_bundle, small_data, tmp_path
):
    clip = tmp_path / "clip.mp4"
    synthetic_clip(str(clip), ClipSpec(faces=1, frames=6, width=160, height=96, audio=None), sidecar=str(tmp_path / "boxes.parquet"))
    for state in ("running", "killed"):
        if state == "killed":
            kill_group(users_head["proc"])
            port = users_head["address"].rsplit(":", 1)[1]
            assert POINTER.read_text().strip().endswith(f":{port}"), "the stale pointer this test is about is gone"
        out = tmp_path / state
        out.mkdir()
        commands = {
            "evaluate": ["jobs/evaluate.py", "--model", tiny_bundle, "--data", small_data, "--out", str(out / "report"),
                         "--profile", "quick", "--epochs", "1", "--no-strong", "--no-attack-suite", "--no-applications", "--train-limit", "84"],
            "tune": ["jobs/tune.py", "--data", small_data, "--storage", str(out / "tune"), "--name", "t", *TUNE_TINY],
            "footage": ["jobs/anonymize.py", "--input", str(clip), "--output", str(out / "footage"), "--model", tiny_bundle,
                        "--detector", f"sidecar:{tmp_path / 'boxes.parquet'}", "--num-workers", "1", "--no-progress"],
        }  # fmt: skip
        outputs = run_all(commands, user_env(users_head["home"]), out)
        for name, text in outputs.items():
            assert "started a private local Ray" in text, f"{name} ({state} head) did not say which Ray it used:\n{text[-3000:]}"
        assert (out / "report" / "report.json").is_file()
        assert (out / "footage" / "index.parquet").is_file()
        if state == "running":
            assert users_head["proc"].poll() is None, "a command stopped the user's own Ray head"


def test_joining_a_token_cluster_needs_its_token_and_says_where_to_put_it(ray_head, tmp_path):
    probe = "from pprl import cluster; cluster.connect({address!r}, purpose='the probe'); print('JOINED')"
    script = probe.format(address=ray_head["address"])
    with_token = {**user_env(tmp_path), cluster.TOKEN_PATH_ENV: os.environ[cluster.TOKEN_PATH_ENV]}
    joined = subprocess.run([sys.executable, "-c", script], env=with_token, capture_output=True, text=True, timeout=180)
    assert joined.returncode == 0 and "JOINED" in joined.stdout, joined.stderr[-3000:]

    refused = subprocess.run([sys.executable, "-c", script], env=user_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0
    assert "ClusterError" in refused.stderr and ray_head["address"] in refused.stderr
    assert "~/.ray/auth_token" in refused.stderr and cluster.TOKEN_PATH_ENV in refused.stderr
