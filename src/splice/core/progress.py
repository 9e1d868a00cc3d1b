"""Progress bars for the steps that take seconds to minutes (training, evaluation, generation,
probing, calibration, merging, sweeps), in one style and one live display.

    for batch in progress.track(loader, "evaluate"):    # a bar while the loop runs
        ...
    with progress.task("tenants", total=n) as bar:      # a bar advanced by hand
        bar.advance()
    with progress.use(console, quiet=True):             # where the block's bars go, or none

A bar shows only where someone watches it: on a terminal (or in Jupyter), with a console that
is not quiet, outside `use(quiet=True)` (the CLI's `--quiet`) and on the main process of a
distributed run (RANK 0); otherwise the loop runs untouched and nothing is printed. Bars are
transient: each one disappears when its loop ends, so that logs and the tables printed after it
stay clean. rich draws one live display per terminal, so a bar started while another shows (an
evaluation during training) joins that display as a line of its own.

This module depends on rich alone, so that every layer (core, methods, training, the CLI) can
report progress without arguments of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from rich import get_console
from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")

_console: ContextVar[Console | None] = ContextVar("splice_progress_console", default=None)
_quiet: ContextVar[bool] = ContextVar("splice_progress_quiet", default=False)
_live: ContextVar[Progress | None] = ContextVar("splice_progress_live", default=None)


@contextmanager
def use(console: Console | None = None, *, quiet: bool = False) -> Iterator[None]:
    """Within the block, bars go to `console` (default: the one in effect, else rich's global
    console), and `quiet=True` turns them off; a nested `use` cannot turn them back on."""
    quiet_token = _quiet.set(_quiet.get() or quiet)
    console_token = _console.set(console or _console.get())
    try:
        yield
    finally:
        _console.reset(console_token)
        _quiet.reset(quiet_token)


def showing(console: Console | None = None) -> bool:
    """Whether a bar on `console` (default: the one in effect) would be drawn (module doc)."""
    console = console or _console.get() or get_console()
    watched = (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter
    return watched and not console.quiet and not _quiet.get() and os.environ.get("RANK", "0") == "0"


@contextmanager
def display(console: Console | None = None, *, enabled: bool = True, details: str = "",
            transient: bool = True) -> Iterator[Progress]:
    """The live display that bars are drawn in: the one already showing (whatever the
    arguments), else a new one on `console`, drawn if `enabled` and `showing`.

    Columns: description, bar, done/total, `details`, elapsed and remaining time. `details`
    formats each task's own fields ("loss {loss}" for `add_task(..., loss=...)`), blank for a
    task without them. A `transient` display vanishes when it stops; otherwise its last state
    stays on the screen (the training bar).
    """
    live = _live.get()
    if live is not None:
        yield live
        return
    console = console or _console.get() or get_console()
    bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Details(details),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient,
                    disable=not (enabled and showing(console)))
    token = _live.set(bars)
    try:
        bars.start()
    except LiveError:  # rich < 14 draws one live display per console, and the caller's own is showing
        bars.disable = True
    try:
        yield bars
    finally:
        bars.stop()
        _live.reset(token)


@dataclass
class Bar:
    """One bar of a display (nothing at all when it is not drawn)."""

    bars: Progress | None = None
    id: TaskID | None = None

    def advance(self, steps: float = 1) -> None:
        """Count `steps` more units of work done."""
        if self.bars is not None:
            self.bars.advance(self.id, steps)

    def update(self, **changes: Any) -> None:
        """rich's `Progress.update` of this bar: `total=` when the amount of work changes,
        `completed=`, or the task's own fields."""
        if self.bars is not None:
            self.bars.update(self.id, **changes)


@contextmanager
def task(description: str, total: float | None = None, *, enabled: bool = True) -> Iterator[Bar]:
    """A bar of `total` units (None: unknown) for the block, removed at its end; `enabled=False`
    (say, on a process other than the main one) or `use(quiet=True)` draws nothing, even inside
    a display that shows."""
    if not enabled or _quiet.get():
        yield Bar()
        return
    with display() as bars:
        if bars.disable:
            yield Bar()
            return
        task_id = bars.add_task(description, total=total)
        bars.refresh()  # at once, not at the next tick: a short step shows too
        try:
            yield Bar(bars, task_id)
        finally:
            bars.remove_task(task_id)


def track(items: Iterable[T], description: str, *, total: float | None = None, enabled: bool = True) -> Iterator[T]:
    """Yield `items` under a bar that advances with each one; `total` defaults to `len(items)`."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with task(description, total, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.advance()


class _Details(ProgressColumn):
    """A task's own fields through a template ("loss {loss}"); blank for a task without them."""

    def __init__(self, template: str) -> None:
        super().__init__()
        self.template = template

    def render(self, task: Task) -> Text:
        try:
            return Text(self.template.format(**task.fields))
        except KeyError:
            return Text("")
