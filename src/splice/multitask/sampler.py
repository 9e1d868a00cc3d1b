"""Which task each training batch comes from: the mixing distribution and a seeded sampler.

Mixing (Raffel et al. 2020, T5 §3.5.2; the multi-task PEFT of volume 2 §9): with n_t training
rows in task t,

    proportional:  p_t = n_t / Σ_s n_s                 (what shuffling the union of the tasks gives)
    temperature:   p_t = n_t^(1/T) / Σ_s n_s^(1/T)     (T = 1 is proportional; T -> ∞ is uniform)

A large task drowns a small one under proportional mixing; T > 1 gives the small one more
batches than its share of rows (it is seen for more epochs), at the large one's expense.

The draw is per batch, not per row: each batch holds rows of one task, so that a classifier
computes it through that task's head alone (and the other tasks' heads get no gradient and no
optimizer update), and a generator's batch holds one prompt format. Over a run the share of
batches of each task converges to p_t (the spec test: within 2% over a few thousand batches).

Inside a task, rows come in a seeded shuffle, pass after pass, each batch taking the next
`batch_size` of them (a batch at the end of a pass runs into the next one's order). Each task's
order has its own generator, seeded by the run's seed and the task's key alone, so a task's rows
come in the same order in every run it is part of (alone or in a pair): the runs of a transfer
matrix then differ by the mixture, not by the order of a task's own rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from splice.core.errors import SpliceError


def mixing_weights(sizes: Sequence[int], mixing: str = "proportional", temperature: float = 1.0) -> list[float]:
    """p_t for tasks of `sizes` training rows: "proportional" (n_t) or "temperature" (n_t^(1/T)),
    normalised to sum to 1."""
    if not sizes or any(n < 1 for n in sizes):
        raise SpliceError(f"every task needs training rows to mix; sizes {list(sizes)}")
    if mixing == "proportional":
        exponent = 1.0
    elif mixing == "temperature":
        if not math.isfinite(temperature) or temperature <= 0:
            raise SpliceError(f"temperature must be a positive number, got {temperature}")
        exponent = 1.0 / temperature
    else:
        raise SpliceError(f"mixing must be proportional or temperature, got {mixing!r}")
    # in log space: n^(1/T) of a large n with a small T overflows a float
    logs = torch.tensor([exponent * math.log(n) for n in sizes], dtype=torch.float64)
    return torch.softmax(logs, dim=0).tolist()


class MixingSampler(Sampler[list[int]]):
    """A batch sampler over the concatenated rows of several tasks: `batches` batches, each
    `batch_size` indices of one task's rows, the task drawn with probabilities `weights`.

    Task t's rows are indices `offsets[t]` to `offsets[t] + sizes[t] - 1` of the concatenation
    (`Mixture.rows`). `keys` (default 0, 1, ...) seed each task's own row order, so that a task
    keeps its order across runs with other task sets. Iterating twice gives the same batches.
    `tasks` is the task of each batch, in order.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, batches: int,
                 seed: int = 0, keys: Sequence[int] | None = None) -> None:
        if len(weights) != len(sizes):
            raise SpliceError(f"{len(weights)} weights for {len(sizes)} tasks")
        if batch_size < 1 or batches < 0:
            raise SpliceError(f"batch_size must be >= 1 and batches >= 0, got {batch_size} and {batches}")
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.keys = list(keys) if keys is not None else list(range(len(sizes)))
        self.offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        generator = torch.Generator().manual_seed(seed)
        probabilities = torch.tensor(list(weights), dtype=torch.float64)
        self.tasks: list[int] = (torch.multinomial(probabilities, batches, replacement=True, generator=generator)
                                 .tolist() if batches else [])

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[list[int]]:
        streams = [self._stream(t) for t in range(len(self.sizes))]
        for task in self.tasks:
            yield [self.offsets[task] + next(streams[task]) for _ in range(self.batch_size)]

    def _stream(self, task: int) -> Iterator[int]:
        """Task `task`'s row indices, one seeded permutation after another, for ever."""
        generator = torch.Generator().manual_seed(hash_seed(self.seed, self.keys[task]))
        while True:
            yield from torch.randperm(self.sizes[task], generator=generator).tolist()

    def counts(self) -> list[int]:
        """How many batches each task gets."""
        return [self.tasks.count(t) for t in range(len(self.sizes))]


def hash_seed(seed: int, key: int) -> int:
    """A seed for stream `key` of run seed `seed`, apart from every other (seed, key)."""
    return (seed * 1_000_003 + key * 7_919 + 12_345) % (2**63 - 1)
