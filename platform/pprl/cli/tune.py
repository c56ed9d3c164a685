"""``pprl tune``: Ray Tune search over the generator's loss weights (also what ``jobs/tune.py`` runs)."""

from __future__ import annotations

import time

import typer

from pprl.config import load_config


def tune(
    data: str = typer.Option(..., "--data", help="Dataset folder (local, file:// or s3://) with manifest.parquet."),
    storage_uri: str = typer.Option("runs/tune", "--storage", help="Results root: a local path or s3://bucket/prefix."),
    name: str = typer.Option("", "--name", help="Search name; rerunning an existing name resumes it. Default: tune-<preset>-<time>."),
    num_samples: int = typer.Option(8, "--num-samples", help="Trials in total, the base config's (paper) weights included."),
    max_concurrent: int = typer.Option(2, "--max-concurrent", help="Trials running at the same time."),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", help="GPUs per trial; a fraction shares one GPU between trials."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="CPUs per trial (torch threads)."),
    preset: str = typer.Option(None, "--preset", help="Base preset: cpu-quick, paper-ferg, paper-mug (default paper-ferg unless --config)."),
    config_file: str = typer.Option(None, "--config", help="Base YAML config (applied on top of --preset)."),
    search_space: str = typer.Option(None, "--search-space", help="Search-space YAML; default: pprl/tune/search_space.yaml (loss weights)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a base config field: --set section.field=value (repeatable)."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs per trial (shortcut for --set train.epochs=N); ASHA's max_t."),
    privacy_weight: float = typer.Option(1.0, "--privacy-weight", help="w in score = expression_acc - w * max(0, privacy_leak): the worst attack's identity accuracy above chance."),
    grace_period: int = typer.Option(2, "--grace-period", help="ASHA: epochs before a trial can be stopped."),
    reduction_factor: float = typer.Option(3.0, "--reduction-factor", help="ASHA: keep the top 1/rf of trials at each rung."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of the train split held out as validation images."),
    val_limit: int = typer.Option(1000, "--val-limit", help="At most this many validation images (0 = no cap)."),
    judge_epochs: int = typer.Option(10, "--judge-epochs", help="Epochs of the frozen identity/expression judges (trained once)."),
    judge_limit: int = typer.Option(0, "--judge-limit", help="Train the judges on at most this many images (0 = all)."),
    judge_batch_size: int = typer.Option(256, "--judge-batch-size", help="Batch size of the judges' training."),
    include_base: bool = typer.Option(True, "--include-base/--no-include-base", help="Run the base config's own weights as the first trial."),
    max_failures: int = typer.Option(1, "--max-failures", help="Retries of a failed trial from its last checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split, targets, judges and the sampling of the space."),
    address: str = typer.Option(None, "--address", help="Ray cluster address; default RAY_ADDRESS, else a local Ray."),
) -> None:
    """Search the loss weights for the privacy-utility trade-off (ASHA); writes trials.parquet, pareto.png, best.yaml, tune_report.md."""
    from pprl.tune.search import TuneJob, run_search
    from pprl.tune.space import read_space

    if preset is None and config_file is None:
        preset = "paper-ferg"
    cfg = load_config(preset, config_file, [*overrides, *([f"train.epochs={epochs}"] if epochs is not None else [])])
    job = TuneJob(
        config=cfg.to_dict(),
        space=read_space(search_space),
        data=data,
        storage=storage_uri,
        name=name or f"tune-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
        num_samples=num_samples,
        max_concurrent=max_concurrent,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial,
        privacy_weight=privacy_weight,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        val_fraction=val_fraction,
        val_limit=val_limit,
        judge_epochs=judge_epochs,
        judge_limit=judge_limit,
        judge_batch_size=judge_batch_size,
        include_base=include_base,
        max_failures=max_failures,
        seed=seed,
    )
    out = run_search(job, address=address)
    typer.echo(f"search {job.name}: {out.trials} trials, {out.stopped_early} stopped early by ASHA, {out.errors} failed")
    if out.best_trial:
        verdict = f"FAILS the audit's bars: {'; '.join(out.best_failed)}" if out.best_failed else "passes the audit's bars"
        typer.echo(f"  best       trial {out.best_trial} (score {out.best_score:.3f}) {verdict}; Pareto front: {', '.join(out.front)}")
    for key, uri in out.files.items():
        typer.echo(f"  {key:<16} {uri}")
    if not out.finished:
        typer.echo(f"search {job.name} is unfinished: run the same command again to continue it", err=True)
        raise typer.Exit(code=1)
    if not out.best_trial:
        typer.echo(f"search {job.name}: no trial reported a result; see error.txt in its trial folders", err=True)
        raise typer.Exit(code=1)
    if out.best_failed:
        typer.echo(f"search {job.name}: no trial passes the audit's bars, so there is no best.yaml; the best by score is in "
                   f"best_failing.yaml", err=True)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
