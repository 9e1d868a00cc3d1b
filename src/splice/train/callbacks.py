"""Hooks into a `Trainer`, and its progress bar.

A callback is any object with some of these methods (subclass `Callback` to get no-op defaults):

    on_begin(trainer)                once, before the run starts or resumes (before a
                                     checkpoint loads: a callback that changed the adapter's
                                     shapes, as DMEP's pruning does, changes them again here)
    on_step_end(trainer, entry)      after each optimizer step (entry: its history record, with
                                     "eval" when the step evaluated)
    on_evaluate(trainer, metrics)    after each evaluation ({split: metrics}; step 0 is the start)
    on_save(trainer, path)           before the adapter is written to `path`

They run on every process; `trainer.main` says whether this is the main one. A multiplexed
tenant is a trainer too: `Multiplexer.add(config, callbacks=[...])` hooks into its run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress

from splice.core import progress
from splice.core.validation import build_named

if TYPE_CHECKING:
    from splice.train.trainer import Trainer


class Callback:
    """No-op hooks; override the ones you need."""

    def on_begin(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, dict[str, float]]) -> None:
        pass

    def on_save(self, trainer: Trainer, path: Path) -> None:
        pass


# Training schedules a config names (`schedule: {name: dmep, ...}`): name -> Callback class,
# built with the mapping's other keys. Registered by `splice.schedules` on import, which
# `schedule_callback` does.
SCHEDULES: dict[str, type[Callback]] = {}


def register_schedule(name: str) -> Callable[[type[Callback]], type[Callback]]:
    """Class decorator: make a schedule callback known to training configs under `name`."""
    def register(cls: type[Callback]) -> type[Callback]:
        SCHEDULES[name] = cls
        return cls
    return register


def schedule_callback(spec: Mapping[str, Any] | None) -> list[Callback]:
    """The callback a config's `schedule` mapping names (none for None); a clear error for an
    unknown name or option."""
    if spec is None:
        return []
    import splice.schedules  # noqa: F401  (registers them; not imported with splice itself)

    return [build_named(SCHEDULES, spec, "schedule", "{name: dmep}")]


def progress_bar(console: Console, enabled: bool) -> AbstractContextManager[Progress]:
    """The display of the training bar (a task with `loss` and `speed` fields): splice's shared
    one (`splice.core.progress`), so that the evaluations during training show beneath it. Its
    last state stays on the screen; not drawn unless `enabled` and the console is a terminal."""
    return progress.display(console, enabled=enabled, details="loss {loss} {speed} ex/s", transient=False)
