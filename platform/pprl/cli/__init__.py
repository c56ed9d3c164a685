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
COMMAND_MODULES = ("data", "demo", "train_local", "train", "tune", "evaluate", "footage", "serve")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pprl.cli.{name}").register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Console entry point; ``argv`` lets the thin ``jobs/*.py`` scripts (and tests) call a sub-command.

    Click ends every standalone run with ``sys.exit``; a successful one returns here instead, so that a caller can
    run several sub-commands in one process. Failures still exit with their code and click's formatted message.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="pprl")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise


def parse_only(argv: list[str]) -> None:
    """Parse ``pprl <argv>`` without running it (raises a click/typer UsageError on bad arguments): used to check manifests.

    Typer >= 0.29 vendors its own click (``typer._click``): its groups are not ``click.Group``s, so walk any command
    that resolves sub-commands, and read the pending arguments under either click's old or new attribute name.
    """
    command = typer.main.get_command(app)
    ctx = command.make_context("pprl", list(argv))
    while hasattr(command, "resolve_command"):  # a group: descend into the named sub-command
        pending = [*(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args), *ctx.args]
        if not pending:
            ctx.fail("Missing command.")
        name, command, rest = command.resolve_command(ctx, pending)
        ctx = command.make_context(name, rest, parent=ctx)
