"""`separate`: a fresh adapter per task, chosen by the task id at inference: the isolation upper
bound (nothing is forgotten, nothing transfers) whose storage grows with every task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

import splice
from splice.continual.strategies.base import Strategy, TaskContext, active, adapter_bytes


class Separate(Strategy):
    """Adapter `<task name>` per task; a task not trained yet is answered by the base model."""

    name = "separate"

    def begin_task(self, model: nn.Module, task: TaskContext) -> str:
        splice.attach(model, self.adapter, task.name)
        return task.name

    def rebuild(self, model: nn.Module, task: TaskContext) -> None:
        self.begin_task(model, task)

    @contextmanager
    def view(self, model: nn.Module, task: str) -> Iterator[None]:
        with active(model, [task] if task in self.trained else []):
            yield

    def stored_bytes(self, model: nn.Module) -> int:
        return sum(adapter_bytes(model, name) for name in self.trained)
