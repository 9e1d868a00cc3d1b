"""One way every command reports a user's mistake: the message, not a traceback."""

from __future__ import annotations

from collections.abc import Iterator
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
