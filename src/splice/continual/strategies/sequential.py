"""`sequential`: one adapter trained on task after task, the forgetting baseline: every task
after the first starts from where the previous one left the adapter, and nothing protects it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

import splice
from splice.continual.strategies.base import Strategy, TaskContext, active, adapter_bytes

ADAPTER = "shared"


class Sequential(Strategy):
    """One adapter, named "shared", carried from task to task; every task reads it."""

    name = "sequential"

    def begin_task(self, model: nn.Module, task: TaskContext) -> str:
        if ADAPTER not in splice.adapters(model):
            splice.attach(model, self.adapter, ADAPTER)
        splice.activate(model, ADAPTER)
        return ADAPTER

    def rebuild(self, model: nn.Module, task: TaskContext) -> None:
        self.begin_task(model, task)

    @contextmanager
    def view(self, model: nn.Module, task: str) -> Iterator[None]:
        with active(model, [ADAPTER] if ADAPTER in splice.adapters(model) else []):
            yield

    def stored_bytes(self, model: nn.Module) -> int:
        return adapter_bytes(model, ADAPTER) if ADAPTER in splice.adapters(model) else 0
