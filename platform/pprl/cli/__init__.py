"""The ``pprl`` command. Each module in this package adds its own sub-commands through ``register(app)``."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

app = typer.Typer(
    name="pprl",
    help="Privacy-preserving face analytics: train PPRL-VGAN, evaluate privacy vs utility, anonymise images and footage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines register(app); the order here is the order of `pprl --help`.
COMMAND_MODULES = ("data", "demo")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pprl.cli.{name}").register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Console entry point; ``argv`` lets the thin ``jobs/*.py`` scripts call a sub-command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app(args=argv if argv is not None else sys.argv[1:], prog_name="pprl")


def parse_only(argv: list[str]) -> None:
    """Parse ``pprl <argv>`` without running it (raises click.UsageError on bad arguments): used to check manifests."""
    import click

    group = typer.main.get_command(app)
    ctx = group.make_context("pprl", list(argv), resilient_parsing=False)
    with ctx:
        name, cmd, rest = group.resolve_command(ctx, ctx.protected_args + ctx.args)
        while isinstance(cmd, click.Group):
            sub_ctx = cmd.make_context(name, rest, parent=ctx)
            name, cmd, rest = cmd.resolve_command(sub_ctx, sub_ctx.protected_args + sub_ctx.args)
            ctx = sub_ctx
        cmd.make_context(name, rest, parent=ctx)
