"""A federated continual run's tasks, the same at the server and in every client process: each
task's rows (re-labelled as its spec says) and their split among the clients, and the model's
per-task classification heads (`splice.continual.heads`), so that a message names a task by its
index alone.

Every head is part of what the server holds and broadcasts; a task trains the adapter and its own
head (or the earlier head it shares), the other heads stay frozen, and the server aggregates only
what the task trained, so a finished task's head reaches the end of the run bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from splice.assets import DatasetSplits
from splice.continual import heads as task_heads
from splice.continual.data import task_splits
from splice.continual.sequence import TaskSpec
from splice.federated.config import FederatedConfig
from splice.federated.shards import TASK_SEED_STRIDE, Shards, make_shards


@dataclass
class FederatedTask:
    """One task: its spec, rows and their split among the clients."""

    index: int
    spec: TaskSpec
    splits: DatasetSplits
    shards: Shards

    @property
    def name(self) -> str:
        return self.spec.name


class TaskSequence:
    """The tasks of `config` and a head per task installed on `model` (all frozen until selected)."""

    def __init__(self, config: FederatedConfig, model: nn.Module) -> None:
        assert config.tasks is not None
        self.tasks = []
        for index, spec in enumerate(config.tasks):
            splits = task_splits(spec, config.train_config(task=index))
            shards = make_shards(config, splits, seed=config.seed + index * TASK_SEED_STRIDE)
            self.tasks.append(FederatedTask(index, spec, splits, shards))
        self.heads, self.path = task_heads.install(model)
        for task in self.tasks:
            if task.spec.head is None:
                self.heads.add(task.name, len(task.splits.label_names))
            else:
                owner = next(t for t in self.tasks if t.name == task.spec.head)
                task_heads.check_same_labels(task.name, task.splits.label_names, owner.name, owner.splits.label_names)
                self.heads.share(task.name, task.spec.head)
        self.heads.requires_grad_(False)
        self.model = model

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> FederatedTask:
        return self.tasks[index]

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """Every head's parameters, by their names in the model."""
        prefix = f"{self.path}."
        return {prefix + name: p for name, p in self.heads.named_parameters()}

    def head_of(self, index: int) -> str:
        """The module path of the head task `index` computes with."""
        return f"{self.path}.heads.{self.heads.owner(self.tasks[index].name)}"

    def select(self, index: int) -> str:
        """Compute with task `index`'s head (the model's loss over its classes); its module path."""
        task_heads.select(self.model, self.heads, self.tasks[index].name)
        return self.head_of(index)

    def trained_names(self, index: int, adapter: set[str]) -> list[str]:
        """What task `index` trains, of what the server holds: the adapter's tensors and its head's."""
        head = f"{self.head_of(index)}."
        return sorted(adapter | {name for name in self.head_parameters() if name.startswith(head)})

    def set_training(self, index: int, on: bool) -> None:
        """Make task `index`'s head trainable (or frozen again)."""
        self.heads.head(self.tasks[index].name).requires_grad_(on)

