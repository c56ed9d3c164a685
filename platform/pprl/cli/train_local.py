"""``pprl train-local``: train PPRL-VGAN in this process (CPU or one GPU, no Ray), for debugging and small runs;
``pprl domain-stats``: give a bundle exported before the domain check the statistics of its training faces."""

from __future__ import annotations

import typer

from pprl.config import list_presets, load_config


def train_local_cmd(
    data: str = typer.Option(..., "--data", help="Dataset folder (path or s3://) with manifest.parquet."),
    out: str = typer.Option(..., "--out", help="Run folder: checkpoint, metrics, samples/ and the bundle in model/."),
    preset: str = typer.Option("cpu-quick", "--preset", help=f"Named configuration: {', '.join(list_presets())}."),
    config: str = typer.Option(None, "--config", help="YAML file applied on top of the preset."),
    epochs: int = typer.Option(None, "--epochs", help="Shortcut for --set train.epochs=N."),
    overrides: list[str] = typer.Option(None, "--set", help="Override any field: section.field=value (repeatable)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0 = torch's default)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt when it exists."),
) -> None:
    """Train a preset on a dataset; writes grids to OUT/samples/ and the bundle to OUT/model/."""
    from pprl.train.local import set_threads, train_local

    items = list(overrides or [])
    if epochs is not None:
        items.append(f"train.epochs={epochs}")
    try:
        cfg = load_config(preset, config, items)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    set_threads(threads)
    bundle = train_local(cfg, data, out, device=device, resume=resume)
    typer.echo(f"model bundle: {bundle}")


def domain_stats_cmd(
    model: str = typer.Option(..., "--model", help="Model bundle folder (local or s3://) to add domain.npz (and eraser.npz) to."),
    data: str = typer.Option(..., "--data", help="The dataset the bundle was trained on (its training split is sampled)."),
) -> None:
    """Write the statistics of the bundle's training faces in latent space (domain.npz), for the out-of-domain score,
    and, when the bundle's config sets model.erase_identity, its identity eraser (eraser.npz)."""
    from pprl.train.export import attach_training_statistics

    try:
        entries = attach_training_statistics(model, data)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    domain = entries["domain"]
    typer.echo(f"{model}: domain statistics of {domain['faces']} training faces (median distance {domain['distance_median']:.2f}, "
               f"99th percentile {domain['distance_p99']:.2f})")
    if "eraser" in entries:
        ranks = ", ".join(f"{part} {rank}" for part, rank in entries["eraser"]["rank"].items())
        typer.echo(f"{model}: identity erasers fitted (ranks: {ranks}); audit the bundle again (`pprl evaluate`)")


def register(app: typer.Typer) -> None:
    app.command("train-local")(train_local_cmd)
    app.command("domain-stats")(domain_stats_cmd)
