"""How the commands print: `--quiet`, name columns that fold, and help text that reflows.

`--quiet` (`-q`) leaves out the progress bars (splice's and transformers'), the tables and the
running commentary (training's parameter table, its per-evaluation lines, the results table);
what still goes out is every error and warning (stderr) and the command's closing line on
stdout: where the result was written, with its headline numbers. The exit status is the same
with or without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from splice.core import progress

Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars and no tables: only errors, warnings and the closing line (what "
    "was written, with its headline numbers).")]


def to_stderr(message: str, markup: bool = True) -> None:
    """A message that no --quiet silences (whole lines: a path in it is not broken)."""
    Console(stderr=True, soft_wrap=True).print(message, highlight=False, markup=markup)


@contextmanager
def quieted(console: Console, quiet: bool) -> Iterator[Console]:
    """The body of a command: its progress bars go to `console`, or nowhere under `--quiet`;
    yields the console for its tables and commentary (`console`, or a silent one when quiet).
    The closing line goes to `console` either way, errors to stderr (`user_errors`)."""
    with progress.use(console, quiet=quiet), _transformers_bars(progress.showing()):
        yield Console(quiet=True) if quiet else console


@contextmanager
def _transformers_bars(shown: bool) -> Iterator[None]:
    """transformers' (and the Hub's) tqdm bars, such as "Loading weights", only where splice's
    own bars show: not under --quiet, and not in a log or a pipe."""
    from transformers.utils import logging

    hide = not shown and logging.is_progress_bar_enabled()
    if hide:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            logging.enable_progress_bar()


def name_column(table: Table, header: str, **options: Any) -> None:
    """Add a column of module, adapter or path names that folds a name too long for the terminal
    onto the next line instead of cutting it to "…": the whole name is what a user copies (into
    --targets, a path)."""
    table.add_column(header, overflow="fold", **options)


def command(app: typer.Typer, name: str, function: Callable[..., Any]) -> None:
    """Add `function` to `app` as command `name`, with its docstring reflowed as the help."""
    app.command(name, help=reflowed(function.__doc__ or ""))(function)


def reflowed(doc: str) -> str:
    """A docstring with each prose paragraph on one line, which the terminal then wraps; indented
    lines (the example commands) stay as written.

    typer's help keeps a docstring's line breaks and wraps each line at the terminal's width,
    so at 80 columns a 100-column docstring line was broken twice ("... head" / "trained)").
    """
    lines: list[str] = []
    for line in inspect.cleandoc(doc).splitlines():
        prose = bool(line) and not line[0].isspace()
        if prose and lines and lines[-1] and not lines[-1][0].isspace():
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)
