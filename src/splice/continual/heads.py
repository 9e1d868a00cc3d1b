"""Per-task classification heads on one model: each task of a continual run has its own head
with its own number of classes (2 for sentiment, 5 for news topics), and switching tasks
switches heads. A task may instead share an earlier task's head (`TaskSpec.head`: the same label
set in a new domain, or the same task again), which it then trains on.

`TaskHeads` replaces the model's head module (`classifier` for BERT-like models, `score` for
decoders) by one module that holds a linear head per task and computes with the selected one.
The heads are the run's, not an adapter's (an adapter's `train_also` copies would all have the
original head's shape): the harness makes the current task's head trainable and gives its path
to the `Trainer`, which trains it at `head_lr`. The model's `num_labels` follows the selected
head, so the model's own loss (cross-entropy over `num_labels`) is that task's.
"""

from __future__ import annotations

import torch
from torch import nn

from splice.core.errors import ConfigError, SpliceError
from splice.train.tasks import head_name


class TaskHeads(nn.Module):
    """One linear head per task, by name; the forward uses the selected one."""

    def __init__(self, template: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.bias = template.in_features, template.bias is not None
        self.heads = nn.ModuleDict()
        self.shared: dict[str, str] = {}  # task -> the earlier task whose head it uses
        self.current: str | None = None
        # moves with the model, so that a head added later lands on the model's device
        self.register_buffer("anchor", torch.empty(0, device=template.weight.device), persistent=False)

    def add(self, task: str, classes: int) -> None:
        """A fresh head for `task` (transformers' initialisation: normal, std 0.02; zero bias)."""
        if task in self.heads:
            raise SpliceError(f"task {task!r} already has a head")
        head = nn.Linear(self.in_features, classes, bias=self.bias)
        nn.init.normal_(head.weight, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        self.heads[task] = head.to(self.anchor.device)

    def share(self, task: str, owner: str) -> None:
        """`task` computes with (and trains) `owner`'s head."""
        if owner not in self.heads:
            raise SpliceError(f"task {task!r} shares the head of {owner!r}, which has none; tasks with heads: "
                              f"{list(self.heads)}")
        self.shared[task] = owner

    def owner(self, task: str) -> str:
        """The task whose head `task` uses (itself unless it shares one)."""
        return self.shared.get(task, task)

    def head(self, task: str) -> nn.Linear:
        return self.heads[self.owner(task)]

    def forward(self, features):
        if self.current is None:
            raise SpliceError("no task head selected (TaskHeads.select)")
        return self.heads[self.current](features)


def check_same_labels(task: str, labels: tuple[str, ...], owner: str, owner_labels: tuple[str, ...]) -> None:
    """A task sharing `owner`'s head must have its labels, in its order."""
    if labels != owner_labels:
        raise ConfigError(f"task {task!r} shares the head of {owner!r} (head: {owner}) but its labels {labels} are "
                          f"not {owner!r}'s {owner_labels}")


def install(model: nn.Module) -> tuple[TaskHeads, str]:
    """Replace the model's classification head by `TaskHeads`; (the heads, their module path)."""
    path = head_name(model)
    template = getattr(model, path)
    if not isinstance(template, nn.Linear):
        raise SpliceError(f"{type(model).__name__}.{path} is a {type(template).__name__}; per-task heads "
                          "replace a single nn.Linear head")
    heads = TaskHeads(template).to(template.weight.device)
    setattr(model, path, heads)
    return heads, path


def select(model: nn.Module, heads: TaskHeads, task: str) -> None:
    """Compute with `task`'s head, and make the model's loss a cross-entropy over its classes."""
    if heads.owner(task) not in heads.heads:
        raise SpliceError(f"no head for task {task!r}; tasks with heads: {list(heads.heads)}")
    heads.current = heads.owner(task)
    classes = heads.head(task).out_features
    model.num_labels = classes
    model.config.num_labels = classes  # some models' loss reads it there (Llama's, in transformers 5)
    model.config.problem_type = "single_label_classification"
