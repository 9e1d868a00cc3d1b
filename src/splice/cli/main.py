"""Entry point of the `splice` command: one typer app, one module per command group."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import typer

import splice

app = typer.Typer(
    name="splice",
    help="Parameter-efficient fine-tuning: attach adapters, train, inspect, merge, share (HF PEFT format).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    """`splice --version`: splice's version and those of the libraries results depend on, read from
    the installed packages' metadata (importing them would take seconds)."""
    if not value:
        return
    others = []
    for package in ("torch", "transformers", "peft", "safetensors"):
        try:
            others.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            others.append(f"{package} not installed")
    typer.echo(f"splice {splice.__version__} ({', '.join(others)})")
    raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the versions of splice, torch, transformers, "
                                                        "peft and safetensors, and exit.")] = False) -> None:
    """The options before any command (`--version`); the app's help text is the one given to typer.Typer."""


def _register_commands() -> None:
    from splice.cli import (
        adapter_cmds,
        analysis_cmds,
        audit_cmd,
        boost_cmd,
        compress_cmd,
        continual_cmd,
        federate_cmd,
        hub_cmd,
        multitask_cmd,
        probe_cmd,
        select_cmd,
        train_cmd,
    )

    train_cmd.register(app)
    adapter_cmds.register(app)
    analysis_cmds.register(app)
    probe_cmd.register(app)
    compress_cmd.register(app)
    hub_cmd.register(app)
    continual_cmd.register(app)
    federate_cmd.register(app)
    select_cmd.register(app)
    multitask_cmd.register(app)
    boost_cmd.register(app)
    audit_cmd.register(app)


_register_commands()

if __name__ == "__main__":
    app()
