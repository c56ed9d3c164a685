"""Shared fixtures: a real S3 server on loopback, the synthetic dataset, and (lazily) a trained cpu-quick model.

Expensive things are built once per test session and reused by every test that asks for them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Ray 2.60 turns token auth on for every cluster once any local ray.init() has written ~/.ray/auth_token; the test
# clusters (and the plain HTTP checks against their dashboards) run without it, whatever ran before in the session.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# torch's OpenMP threads otherwise spin between ops: on 2 cores shared with a Ray head they slow training down ~2x
# (bench/README.md). Read when torch loads, which is after this file.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on a free loopback port: s3fs, boto and pyarrow's own S3 client all reach it over HTTP."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def reset_s3(endpoint: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> str:
    """The embedded default: 6 identities x 7 expressions, 64x64, seed 0 (about 10k images, ~15 s on 2 cores)."""
    from pprl.data.generate import SynthSpec, generate

    out = str(tmp_path_factory.mktemp("synth") / "ferg-like")
    generate(out, SynthSpec(seed=0), progress=False)
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A small dataset for plumbing tests: 6 identities x 7 expressions x 12 images, 64x64."""
    from pprl.data.generate import SynthSpec, generate

    out = str(tmp_path_factory.mktemp("synth-small") / "small")
    generate(out, SynthSpec(images_per_cell=12, seed=1), progress=False)
    return out


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real ``ray start --head`` on free ports, shared by the tests that need a cluster.

    Yields ``{"address": "127.0.0.1:PORT", "dashboard": "http://127.0.0.1:PORT"}``. The head runs with
    ``--block`` in its own process group so that stopping it stops this head only, never another Ray on the machine.
    """
    import signal
    import subprocess
    import time

    ports = {name: free_port() for name in ("port", "dashboard", "client", "node", "object", "metrics", "agent_grpc", "agent_http", "runtime_env")}
    temp_dir = Path(f"/tmp/ray-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths must stay under 107 chars
    cmd = [
        str(Path(os.sys.executable).parent / "ray"), "start", "--head", "--block",
        f"--port={ports['port']}", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}", f"--node-manager-port={ports['node']}",
        f"--object-manager-port={ports['object']}", f"--metrics-export-port={ports['metrics']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        "--num-cpus=4", f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
    ]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")  # noqa: SIM115 (lives as long as the head)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    address = f"127.0.0.1:{ports['port']}"
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}; see {log.name}") from None
            time.sleep(1)
    else:
        raise RuntimeError(f"Ray dashboard did not come up at {dashboard}; see {log.name}")
    yield {"address": address, "dashboard": dashboard, "temp_dir": str(temp_dir)}
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: GCS, raylet, dashboard, workers of this head
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def judges(synth_data, trained_model):
    """Identity and expression judges (the authors' CNN) trained once on the synthetic originals at the model's size.

    Shared by the tests that check what an anonymised face shows (serving, footage).
    """
    from pprl.evaluate.judges import train_judges
    from pprl.serve.batch import bundle_info

    # The whole training split, batch 32 (the default 256 gives too few SGD steps for a reliable expression judge).
    return train_judges(synth_data, int(bundle_info(trained_model)["image_size"]), epochs=6, batch_size=32, processes=2)


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory) -> str:
    """A cpu-quick bundle with freshly initialised (seeded) weights: a real bundle in a second, for plumbing tests."""
    import torch

    from pprl.config import load_config
    from pprl.models.networks import build_networks
    from pprl.train.export import NETWORKS, write_bundle

    torch.manual_seed(0)
    config = load_config("cpu-quick")
    out = str(tmp_path_factory.mktemp("untrained") / "bundle")
    write_bundle(out, config, dict(zip(NETWORKS, build_networks(config.model), strict=True)))
    return out


def train_quick_model(data: str, out: str) -> str:
    """Train the cpu-quick preset on ``data`` in this process and export its bundle to ``out``; returns ``out``.

    The run folder (sample grids, metrics.csv, checkpoint) is ``out``'s sibling ``run/``.
    """
    import torch

    from pprl.config import load_config
    from pprl.train.local import train_local

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return train_local(load_config("cpu-quick"), data, str(Path(out).parent / "run"), device="cpu", resume=False, bundle=out)


@pytest.fixture(scope="session")
def trained_model(synth_data, tmp_path_factory) -> str:
    """A cpu-quick bundle trained once per session on the synthetic default.

    Set ``PPRL_TEST_MODEL_CACHE=DIR`` to reuse (or create once) a bundle across sessions while developing; CI trains it.
    """
    cache = os.environ.get("PPRL_TEST_MODEL_CACHE")
    if cache and (Path(cache) / "bundle.json").exists():
        return cache
    return train_quick_model(synth_data, cache or str(tmp_path_factory.mktemp("model") / "bundle"))
