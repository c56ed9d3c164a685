"""``pprl train``: distributed PPRL-VGAN training on Ray Train (also what ``jobs/train.py`` runs)."""

from __future__ import annotations

import time

import typer

from pprl.config import load_config


def train(
    data: str = typer.Option(..., "--data", help="Dataset folder (local, file:// or s3://) with manifest.parquet."),
    storage_uri: str = typer.Option("runs", "--storage", help="Run storage root: a local path or s3://bucket/prefix."),
    name: str = typer.Option("", "--name", help="Run name; starting a run with an existing name resumes it. Default: <preset>-<time>."),
    preset: str = typer.Option(None, "--preset", help="Named preset: cpu-quick, paper-ferg, paper-mug (default paper-ferg unless --config)."),
    config_file: str = typer.Option(None, "--config", help="YAML config file (applied on top of --preset)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config field: --set section.field=value (repeatable)."),
    epochs: int = typer.Option(None, "--epochs", help="Total epochs (shortcut for --set train.epochs=N)."),
    num_workers: int = typer.Option(2, "--num-workers", help="Ray Train workers (DDP ranks); 0 runs one process without a cluster."),
    use_gpu: bool = typer.Option(False, "--use-gpu", help="One GPU per worker (NCCL); otherwise CPU (gloo)."),
    loader: str = typer.Option("auto", "--loader", help="Input pipeline: auto (DALI if installed), dali or torch."),
    max_failures: int = typer.Option(2, "--max-failures", help="Worker-group restarts from the last checkpoint before the run fails."),
    keep: int = typer.Option(2, "--keep-checkpoints", help="Checkpoints kept in storage (newest first)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address; default RAY_ADDRESS, else a local Ray."),
) -> None:
    """Train on Ray Train (DDP, DALI input); checkpoints every epoch, exports the model bundle to <storage>/<name>/model/."""
    from pprl.train.distributed import TrainJob, launch

    if preset is None and config_file is None:
        preset = "paper-ferg"
    cfg = load_config(preset, config_file, [*overrides, *([f"train.epochs={epochs}"] if epochs is not None else [])])
    job = TrainJob(
        config=cfg.to_dict(),
        data=data,
        storage=storage_uri,
        name=name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
        num_workers=num_workers,
        use_gpu=use_gpu,
        loader=loader,
        max_failures=max_failures,
        keep_checkpoints=keep,
    )
    out = launch(job, address=address)
    typer.echo(f"run {job.name}: epoch {out['epoch']}, step {out['step']}")
    for key in ("model", "samples", "metrics", "checkpoint"):
        typer.echo(f"  {key:<10} {out[key]}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
