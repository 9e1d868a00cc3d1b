"""One way every command reports a user's mistake: the message, not a traceback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from splice.core.errors import SpliceError


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a SpliceError's message (it says what to change) and exit with status 1."""
    try:
        yield
    except SpliceError as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from None


@contextmanager
def stopped_by_signal(advice: Callable[[], str]) -> Iterator[None]:
    """A job of several trainings stopped by Ctrl-C or SIGTERM, inside a task's training (the
    trainer's `TrainingInterrupted`, whose own advice names that one training) or between two
    (KeyboardInterrupt): `advice()` (how to continue the whole job) and the signal's exit status."""
    from splice.train.results import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as err:
        Console().print(f"[yellow]stopped.[/] {advice()}", highlight=False)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        Console().print(f"[yellow]stopped.[/] {advice()}", highlight=False)
        raise typer.Exit(130) from None
