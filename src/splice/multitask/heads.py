"""The classification heads of one multi-task run: one per task (or per group of tasks that share
labels, `TaskSpec.head`), all on one model, computing one at a time.

Built on the continual harness's `TaskHeads` (the model's head slot holds a linear head per task
and computes with the selected one; the model's loss follows the selected head's classes). Every
head is trainable from the start and given to the `Trainer` as a module it trains in full (at
`head_lr`); a batch holds one task's rows (`splice.multitask.sampler`), so only that task's head
takes part in its forward, gets a gradient and is updated: AdamW leaves a parameter without a
gradient untouched (no step, no weight decay).

A head starts from a seed of its own (the run's seed and its owner task's key), so task i's head
starts the same in its single-task run, in every pair and in the whole mixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from splice.continual.heads import install, select
from splice.io.files import write_bytes, write_text
from splice.multitask.data import TaskData
from splice.multitask.sampler import hash_seed


class RunHeads:
    """A fresh head per head owner among `tasks`, installed in `model`'s head slot."""

    def __init__(self, model: nn.Module, tasks: list[TaskData], seed: int, keys: dict[str, int]) -> None:
        self.model = model
        self.heads, self.path = install(model)
        self.labels: dict[str, list[str]] = {}
        for task in tasks:
            owner = task.head
            if owner not in self.heads.heads:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash_seed(seed, 1_000 + keys[owner]))
                    self.heads.add(owner, len(task.splits.label_names))
                self.labels[owner] = list(task.splits.label_names)
            if owner != task.name:
                self.heads.share(task.name, owner)
        self.heads.heads.requires_grad_(True)

    @property
    def paths(self) -> list[str]:
        """The heads' module paths, for `Trainer(heads=...)`."""
        return [f"{self.path}.heads.{owner}" for owner in self.heads.heads]

    def select(self, task: str) -> None:
        """Compute (and take the loss) with `task`'s head; the model's config names its labels."""
        select(self.model, self.heads, task)
        labels = self.labels[self.heads.owner(task)]
        self.model.config.id2label = dict(enumerate(labels))
        self.model.config.label2id = {name: i for i, name in enumerate(labels)}

    def parameters(self) -> dict[str, int]:
        """Parameters of each head, by owner."""
        return {owner: sum(p.numel() for p in head.parameters()) for owner, head in self.heads.heads.items()}

    def save(self, folder: Path) -> None:
        """heads.safetensors (`<owner>.weight`, `<owner>.bias`) and heads.json (each owner's labels,
        which tasks use it) in `folder`, beside the adapter."""
        tensors = {f"{owner}.{key}": value.detach().cpu().contiguous()
                   for owner, head in self.heads.heads.items() for key, value in head.state_dict().items()}
        write_bytes(folder / "heads.safetensors", save(tensors))
        users = {owner: [t for t in [*self.heads.shared, *self.heads.heads] if self.heads.owner(t) == owner]
                 for owner in self.heads.heads}
        write_text(folder / "heads.json", json.dumps(
            {owner: {"labels": self.labels[owner], "tasks": sorted(set(users[owner]))} for owner in self.heads.heads},
            indent=2) + "\n")
