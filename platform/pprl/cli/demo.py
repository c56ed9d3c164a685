"""``pprl demo``: the README's main job on the embedded synthetic default."""

from __future__ import annotations

import typer

from pprl import storage
from pprl.data.generate import SynthSpec, generate


def demo(
    out: str = typer.Option("runs/demo", "--out", help="Folder for the dataset, model, samples and report."),
    seed: int = typer.Option(0, help="Seed for data and training."),
) -> None:
    """Generate the synthetic dataset (then train cpu-quick, evaluate it, and print the report)."""
    data_uri = storage.join(out, "data")
    info = generate(data_uri, SynthSpec(seed=seed))
    typer.echo(f"dataset: {data_uri} ({info['num_images']} images)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
