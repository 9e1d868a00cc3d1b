"""What a continual-learning strategy is to the harness: where each task's training goes, what it
adds to the loss, what it does when a task ends, and how the model answers a given task.

The harness (`splice.continual.harness`) owns the model, the per-task heads, the data and the
evaluation; a strategy owns the adapters. For each task, in order:

    name = strategy.begin_task(model, task)       # attach / prepare the adapter to train, active
    Trainer(..., adapter_name=name, penalties=strategy.penalties(model, task)).fit()
    strategy.end_task(model, task)                # freeze, merge, recalibrate, unify ...
    with strategy.view(model, j): ...             # the model as it answers task j (task id given)

A resumed run (`splice.continual.checkpoint`) calls `rebuild` for each finished task on a fresh
model, loads the saved tensors over what it re-created, and hands `state()` back to `load_state`.

Task-agnostic inference routes each example to a task first (the harness's prototype rule,
`splice.continual.scoring`), then answers through the strategy's `agnostic_view` of that task.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

import splice
from splice.assets import DatasetSplits
from splice.continual.sequence import TaskSpec
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError
from splice.core.host import hosts
from splice.core.validation import did_you_mean
from splice.train.config import TrainConfig
from splice.train.data import probe_loader

Penalty = Callable[[], torch.Tensor]


@dataclass
class TaskContext:
    """One task of the run: its position, spec, training config, rows and batch maker."""

    index: int
    spec: TaskSpec
    config: TrainConfig
    splits: DatasetSplits
    collate: Any
    seen: list[str] = field(default_factory=list)  # names of the tasks trained before this one

    @property
    def name(self) -> str:
        return self.spec.name

    def batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """`count` training batches in the run's seeded plain shuffle (statistics, probes)."""
        batches = []
        for batch in probe_loader(self.splits.train, self.config, self.collate):
            if len(batches) == count:
                break
            batches.append(batch)
        return batches


class Strategy:
    """A strategy with no memory of its own: subclasses override what they keep."""

    name: ClassVar[str]

    def __init__(self, adapter: AdapterConfig) -> None:
        self.adapter = adapter
        self.trained: list[str] = []  # task names, in order, once their training ended

    def begin_task(self, model: nn.Module, task: TaskContext) -> str:
        raise NotImplementedError

    def penalties(self, model: nn.Module, task: TaskContext) -> list[Penalty]:
        return []

    def end_task(self, model: nn.Module, task: TaskContext) -> None:
        self.trained.append(task.name)

    def rebuild(self, model: nn.Module, task: TaskContext) -> None:
        """Re-create the modules that finished task `task` left in the model (attached, merged),
        with any values: a resume loads the saved tensors over them."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What the strategy remembers beyond the model's tensors, as tensors and plain values."""
        return {"trained": list(self.trained)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.trained = list(state["trained"])

    @contextmanager
    def view(self, model: nn.Module, task: str) -> Iterator[None]:
        raise NotImplementedError
        yield

    def agnostic_view(self, model: nn.Module, task: str) -> AbstractContextManager[None]:
        """The model as it answers rows that the prototype rule routed to `task` when no task id
        is given (default: `view`; ConDU mixes in the base model here)."""
        return self.view(model, task)

    def stored_bytes(self, model: nn.Module) -> int:
        """Bytes kept for all tasks so far (adapters, masks, statistics); heads are counted apart."""
        raise NotImplementedError


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes of adapter `name`'s tensors (parameters and buffers) in every host."""
    return sum(t.numel() * t.element_size() for _, _, host in hosts(model) if name in host
               for t in (*host[name].parameters(), *host[name].buffers()))


@contextmanager
def active(model: nn.Module, names: list[str]) -> Iterator[None]:
    """These adapters active for the block (none: the base, with merged ones merged), then as before."""
    before = splice.active_adapters(model)
    if names:
        splice.activate(model, names)
    else:
        splice.deactivate(model)
    try:
        yield
    finally:
        if before:
            splice.activate(model, before)
        else:
            splice.deactivate(model)


def penalty_weight(strategy: str, key: str, value: Any) -> float:
    """A penalty's weight λ: a finite number >= 0, else a ConfigError naming the option and value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{strategy}: {key} must be a finite number >= 0, got {value!r}")
    return float(value)


def build(cls: type[Strategy], adapter: AdapterConfig, options: dict[str, Any]) -> Strategy:
    """`cls(adapter, **options)`, an unknown or mistyped option refused with the ones there are."""
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "adapter")]
    for key in options:
        if key not in known:
            raise ConfigError(f"strategy {cls.name!r} has no option {key!r}{did_you_mean(key, known)}"
                              + ("" if known else " (it takes none)"))
    return cls(adapter, **options)
