"""``pprl demo``: the README's main job, end to end on the embedded synthetic default.

data (synthetic FERG-like set) -> a Ray cluster (a running one on the dashboard port is joined, else a private head is
started with token authentication and stopped at the end) -> ``ray job submit jobs/train.py --preset cpu-quick`` ->
``ray job submit jobs/evaluate.py`` (the paper's attacks, Table-1 style, and the attack suite, whose verdict is attached
to the bundle) -> where everything is, and the privacy audit's verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import typer

from pprl import cluster, storage
from pprl.data.generate import SynthSpec, generate

REPO = Path(__file__).resolve().parents[3]


def demo(
    out: str = typer.Option("runs/demo", "--out", help="Folder for the dataset, training run, model bundle and report."),
    workers: int = typer.Option(2, "--workers", help="Ray Train workers (DDP ranks) for training."),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the cpu-quick preset's)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a training config field: --set section.field=value."),
    seed: int = typer.Option(0, help="Seed of the synthetic dataset."),
    images_per_cell: int = typer.Option(SynthSpec.images_per_cell, help="Synthetic images per (identity, expression)."),
    dashboard_port: int = typer.Option(8265, help="Dashboard port: a Ray cluster answering there is used, else one is started."),
) -> None:
    """Synthetic data -> Ray Train job (cpu-quick) -> privacy/utility evaluation job; prints where the outputs are."""
    root = os.path.abspath(out) if not storage.is_s3(out) else out
    data_uri = storage.join(root, "data")
    if storage.exists(storage.join(data_uri, "manifest.parquet")):
        typer.echo(f"[1/3] dataset already at {data_uri}")
    else:
        typer.echo(f"[1/3] generating the synthetic FERG-like dataset at {data_uri}")
        generate(data_uri, SynthSpec(seed=seed, images_per_cell=images_per_cell))
    with _cluster(dashboard_port) as dashboard:
        _submit(dashboard, "train", _train_args(data_uri, root, workers, epochs, overrides))
        report = storage.join(root, "report")
        _submit(dashboard, "evaluate", ["--model", _model(root), "--data", data_uri, "--out", report, "--profile", "quick"])
    _summary(data_uri, root, report)


@contextlib.contextmanager
def _cluster(dashboard_port: int) -> Iterator[str]:
    """The dashboard URL of the cluster the jobs go to: ``RAY_ADDRESS`` when it is one, a cluster that answers on
    ``dashboard_port``, else a head started here (token auth, free ports) and stopped, with all it started, at the end."""
    address = os.environ.get("RAY_ADDRESS", "")
    cluster.use_token_if_available()  # for `ray job submit` to a running cluster
    url = address if address.startswith("http") else f"http://{cluster.LOOPBACK}:{dashboard_port}"
    status = cluster.dashboard_status(url)
    if status == 401:
        raise typer.Exit(f"the Ray cluster at {url} wants a token: {cluster.TOKEN_HINT}") from None
    if status is not None:
        typer.echo(f"using the Ray cluster that answers at {url}")
        yield url
        return
    typer.echo("starting a private Ray head for this demo (token auth, loopback); it is stopped at the end")
    with cluster.LocalHead(num_cpus=max(2, os.cpu_count() or 2), dashboard_port=dashboard_port) as head:
        typer.echo(f"  dashboard {head.dashboard}")
        yield head.dashboard
        typer.echo("stopping the Ray head this demo started")


def _train_args(data_uri: str, root: str, workers: int, epochs: int | None, overrides: list[str]) -> list[str]:
    args = [
        "--preset", "cpu-quick", "--data", data_uri, "--storage", storage.join(root, "runs"), "--name", "demo",
        "--num-workers", str(workers), "--max-failures", "1",
    ]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    return args + [arg for value in overrides for arg in ("--set", value)]


def _model(root: str) -> str:
    return storage.join(root, "runs", "demo", "model")


def _submit(dashboard: str, job: str, args: list[str]) -> None:
    """``ray job submit --working-dir <repo> -- python jobs/<job>.py ...``, its logs followed; exits on failure."""
    step = {"train": "[2/3]", "evaluate": "[3/3]"}[job]
    typer.echo(f"{step} ray job submit jobs/{job}.py; following its logs")
    cmd = [
        cluster.ray_executable("ray"), "job", "submit", f"--address={dashboard}", "--working-dir", str(REPO), "--",
        "python", f"jobs/{job}.py", *args,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=cluster.env_with_this_python())
    if result.returncode != 0:
        raise typer.Exit(f"the {job} job failed (exit {result.returncode}); its logs are above") from None


def _summary(data_uri: str, root: str, report: str) -> None:
    typer.echo("outputs:")
    typer.echo(f"  dataset       {data_uri}")
    typer.echo(f"  model bundle  {_model(root)}")
    typer.echo(f"  sample grids  {storage.join(root, 'runs', 'demo', 'samples')}")
    files = "report.md, report.json, predictions.parquet, privacy_utility.png, morph.png, completion.png"
    typer.echo(f"  report        {report} ({files})")
    _verdict(report)


def _verdict(report: str) -> None:
    """The privacy audit's verdict, last: it decides whether serving, batch jobs and footage may export the latent."""
    from pprl.evaluate.attacks import verdict_lines

    for line in verdict_lines(json.loads(storage.read_text(storage.join(report, "report.json")))):
        typer.echo(line)
    typer.echo("  (attached to the bundle as privacy_audit.json; serving, batch jobs and footage export the latent only "
               "when it passed: docs/evaluation.md, \"The privacy gate\")")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
