"""``pprl demo``: the README's main job, end to end on the embedded synthetic default.

data (synthetic FERG-like set) -> a local Ray head (if none runs) -> ``ray job submit jobs/train.py --preset cpu-quick``
with its logs followed -> evaluation of the trained bundle (the paper's attacks, Table-1 style) -> where everything is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import typer

from pprl import storage
from pprl.data.generate import SynthSpec, generate

REPO = Path(__file__).resolve().parents[3]


def _dashboard_status(url: str) -> int | None:
    """HTTP status of the Ray dashboard's version endpoint at ``url``; None when nothing answers there.

    401 means the cluster uses Ray's token authentication (``ray start`` turns it on by default)."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def _use_token_auth() -> None:
    """Make ``ray job submit`` and ``ray.init`` send the token that ``ray start`` wrote to ~/.ray/auth_token."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def _ray_bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _env_with_this_python() -> dict[str, str]:
    """This environment with this interpreter's bin/ first on PATH: a job's ``python`` entrypoint then runs in the
    virtualenv pprl is installed in (``make demo`` does not activate .venv)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def _start_ray_head(dashboard_port: int, num_cpus: int) -> None:
    typer.echo(f"starting a local Ray head (dashboard on 127.0.0.1:{dashboard_port})")
    subprocess.run(
        [
            _ray_bin("ray"), "start", "--head", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--num-cpus={num_cpus}", "--disable-usage-stats",
        ],
        check=True,
        env=_env_with_this_python(),
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 90
    while _dashboard_status(url) is None:
        if time.time() > deadline:
            raise RuntimeError(f"the Ray dashboard did not answer at {url}")
        time.sleep(1)


def demo(
    out: str = typer.Option("runs/demo", "--out", help="Folder for the dataset, training run, model bundle and report."),
    workers: int = typer.Option(2, "--workers", help="Ray Train workers (DDP ranks) for training."),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the cpu-quick preset's)."),
    seed: int = typer.Option(0, help="Seed of the synthetic dataset."),
    dashboard_port: int = typer.Option(8265, help="Dashboard port of the local Ray head (started if nothing answers there)."),
) -> None:
    """Synthetic data -> Ray Train job (cpu-quick) -> privacy/utility evaluation; prints the report and where outputs are."""
    root = os.path.abspath(out) if not storage.is_s3(out) else out
    data_uri = storage.join(root, "data")
    if storage.exists(storage.join(data_uri, "manifest.parquet")):
        typer.echo(f"[1/3] dataset already at {data_uri}")
    else:
        typer.echo(f"[1/3] generating the synthetic FERG-like dataset at {data_uri}")
        generate(data_uri, SynthSpec(seed=seed))

    address = os.environ.get("RAY_ADDRESS", "")
    dashboard = address if address.startswith("http") else f"http://127.0.0.1:{dashboard_port}"
    started_here = False
    status = _dashboard_status(dashboard)
    if status is None:
        _start_ray_head(dashboard_port, num_cpus=max(2, os.cpu_count() or 2))
        dashboard, started_here = f"http://127.0.0.1:{dashboard_port}", True
    if started_here or status == 401:
        _use_token_auth()
    try:
        _train(dashboard, data_uri, root, workers, epochs)
        _evaluate(data_uri, root)
    finally:
        if started_here:
            typer.echo("stopping the Ray head this demo started")
            subprocess.run([_ray_bin("ray"), "stop"], check=False, capture_output=True)


def _train(dashboard: str, data_uri: str, root: str, workers: int, epochs: int | None) -> None:
    typer.echo(f"[2/3] ray job submit jobs/train.py --preset cpu-quick ({workers} workers); following its logs")
    cmd = [
        _ray_bin("ray"), "job", "submit", f"--address={dashboard}", "--working-dir", str(REPO), "--",
        "python", "jobs/train.py", "--preset", "cpu-quick", "--data", data_uri, "--storage", storage.join(root, "runs"),
        "--name", "demo", "--num-workers", str(workers), "--max-failures", "1",
    ]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise typer.Exit(f"the training job failed (exit {result.returncode}); its logs are above") from None


def _evaluate(data_uri: str, root: str) -> None:
    from pprl.cli import app

    model = storage.join(root, "runs", "demo", "model")
    report = storage.join(root, "report")
    typer.echo(f"[3/3] evaluating {model}: the paper's attack scenarios on the test split, as parallel Ray tasks")
    if not os.environ.get("RAY_ADDRESS", "").startswith(("ray://", "127.", "localhost")):
        os.environ["RAY_ADDRESS"] = "auto"  # the head started above (or the one already running here)
    app(["evaluate", "--model", model, "--data", data_uri, "--out", report, "--profile", "quick"], standalone_mode=False)
    typer.echo("outputs:")
    typer.echo(f"  dataset       {data_uri}")
    typer.echo(f"  model bundle  {model}")
    typer.echo(f"  sample grids  {storage.join(root, 'runs', 'demo', 'samples')}")
    typer.echo(f"  report        {report} (report.md, report.json, predictions.parquet, privacy_utility.png, morph.png, completion.png)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
