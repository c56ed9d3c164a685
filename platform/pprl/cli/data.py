"""``pprl data``: make, import and inspect datasets."""

from __future__ import annotations

import json

import typer

from pprl.data import importers
from pprl.data.dataset import load_dataset
from pprl.data.generate import SynthSpec, generate

data_app = typer.Typer(help="Create, import and inspect datasets (PNG folder + manifest.parquet + dataset.json).", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: str = typer.Option(..., "--out", help="Dataset folder: a path, file:// or s3://bucket/prefix."),
    identities: int = typer.Option(6, help="Number of synthetic people (FERG has 6; 100+ works)."),
    images_per_cell: int = typer.Option(240, help="Still images per (identity, expression) pair."),
    size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Generator seed: the same seed gives the same dataset."),
    sequences: int = typer.Option(0, "--sequences", help="MUG-like clips (neutral -> apex -> neutral) per pair."),
    frames: int = typer.Option(16, help="Frames per clip."),
    workers: int = typer.Option(0, help="Render processes (0 = all cores)."),
) -> None:
    """Generate the FERG-like synthetic face dataset: identity and expression are independent, labelled factors."""
    spec = SynthSpec(identities, images_per_cell, size, seed, sequences, frames)
    info = generate(out, spec, workers=workers or None)
    typer.echo(f"dataset written to {out}: {info['num_images']} images {info['counts']}")


@data_app.command("import-ferg")
def import_ferg(
    src: str = typer.Argument(..., help="FERG_DB_256 folder: <Character>/<character>_<expression>/*.png"),
    out: str = typer.Option(..., "--out", help="Dataset folder to write."),
    size: int = typer.Option(64, help="Resize images to this side."),
    seed: int = typer.Option(0, help="Seed of the stratified 85/15 split."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
) -> None:
    """Import FERG-DB (RGBA composited on white, split 85/15 stratified by character and expression)."""
    _report(importers.import_ferg(src, out, size=size, seed=seed, strict=strict), out)


@data_app.command("import-mug")
def import_mug(
    src: str = typer.Argument(..., help="MUG folder: <subject>/<expression>/<take>/*.jpg"),
    out: str = typer.Option(..., "--out", help="Dataset folder to write."),
    size: int = typer.Option(64, help="Resize images to this side."),
    seed: int = typer.Option(0, help="Seed of the split (whole takes go to one side)."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
) -> None:
    """Import MUG: each take becomes a sequence; takes, not frames, are split 85/15."""
    _report(importers.import_mug(src, out, size=size, seed=seed, strict=strict), out)


@data_app.command("import-csv")
def import_csv(
    src: str = typer.Argument(..., help="Folder of images."),
    labels: str = typer.Option(..., "--labels", help="CSV with columns path,identity,expression[,split]; expression as index or name."),
    out: str = typer.Option(..., "--out", help="Dataset folder to write."),
    size: int = typer.Option(64, help="Resize images to this side."),
    seed: int = typer.Option(0, help="Seed of the split when the CSV has no split column."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
) -> None:
    """Import any folder of face images with a labels CSV."""
    _report(importers.import_csv(src, labels, out, size=size, seed=seed, strict=strict), out)


@data_app.command("info")
def info(root: str = typer.Argument(..., help="Dataset folder.")) -> None:
    """Validate a dataset and print its summary."""
    ds = load_dataset(root)
    summary = {**ds.info, "rows": len(ds.manifest), "columns": list(ds.manifest.columns)}
    typer.echo(json.dumps(summary, indent=2))


def _report(result: importers.ImportResult, out: str) -> None:
    typer.echo(f"imported {result.imported} images to {out}; skipped {len(result.skipped)}")
    for path, reason in result.skipped:
        typer.echo(f"  skipped {path}: {reason}", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
