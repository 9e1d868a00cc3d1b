"""Less padding per training batch: length-grouped sampling and padding-free packing.

A batch is padded to its longest row, so a batch of one long review and fifteen short ones
costs sixteen long rows. `LengthGroupedSampler` (`TrainConfig.group_by_length`, HF's
`LengthGroupedSampler`, made deterministic and resumable) keeps the shuffle but puts rows of
similar length together: each epoch it permutes the rows with the run's generator, cuts the
permutation into mega-batches of 50 optimizer steps' rows, sorts each mega-batch by length and
cuts it into steps, taken in random order. Batches stay random in which rows they hold (a row's
neighbours come from a random fifty-step slice of the data), and the epoch's first batch holds
its longest row, so a batch that does not fit in memory fails at the first step, not an hour in.

The sampler draws from the generator the DataLoader holds (`loader.generator`), through torch's
`RandomSampler`, as a loader with `shuffle=True` does: a checkpoint that records the generator's state at the
start of an epoch (`splice.train.checkpoint.batches`) replays the same order on resume, and under
`accelerate launch` accelerate synchronises that generator across processes and deals each
process every n-th batch of the one order, as it does for a shuffled loader.

`PackedCollator` (`TrainConfig.packing`, causal LM only) removes padding altogether: a batch's
sequences are concatenated into one row whose `position_ids` restart at 0 for every sequence.
transformers (>= 5 with sdpa or eager attention, or flash attention) reads the restarts as
sequence boundaries and masks attention block-diagonally, so every sequence sees only itself:
the loss is that of the padded batch up to float rounding. `check_packing` proves this on the
model itself before training, since an attention implementation that ignores the restarts
would silently let sequences attend to each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import RandomSampler, Sampler
from transformers import DataCollatorWithFlattening

from splice.assets import Row
from splice.core.errors import SpliceError

MEGA_BATCH_STEPS = 50  # optimizer steps' worth of rows sorted together (HF's mega_batch_mult)
MIN_MEGA_BATCHES = 4  # a small data set is still cut into this many mega-batches, so that some shuffle stays


def mega_batch_size(rows: int, step_rows: int) -> int:
    """Rows per mega-batch: 50 optimizer steps' rows, fewer where that would leave under four
    mega-batches, at least one step's rows (HF's rule, so that the two samplers compare)."""
    return max(1, min(rows // (step_rows * MIN_MEGA_BATCHES), MEGA_BATCH_STEPS)) * step_rows


def grouped_order(lengths: Sequence[int], step_rows: int, generator: torch.Generator) -> list[int]:
    """One epoch's row order: torch's `RandomSampler` permutation cut into mega-batches; each
    mega-batch sorted by length and cut into optimizer steps, which keep the order of their
    earliest row in the permutation; the step holding the epoch's longest row first, so that the
    first batch is the epoch's largest.

    The permutation is `RandomSampler`'s, drawn from the same generator in the same way, so rows
    of one length (nothing to group) come in exactly the plain shuffled order, epoch after epoch.
    Unlike HF's sampler, which leaves each mega-batch longest first, the steps of a mega-batch come
    in random order (their earliest rows' positions are random): the tokens per step do not fall
    from long to short every fifty steps (no length curriculum, an even pace of work). A short
    step, where the row count does not divide evenly, stays last; the sorting is stable.
    """
    permutation = list(RandomSampler(range(len(lengths)), generator=generator))
    position = {row: i for i, row in enumerate(permutation)}
    size = mega_batch_size(len(lengths), step_rows)
    steps: list[list[int]] = []
    for start in range(0, len(permutation), size):
        group = sorted(permutation[start: start + size], key=lambda row: -lengths[row])
        cut = [group[i: i + step_rows] for i in range(0, len(group), step_rows)]
        whole = len(cut) - (len(cut[-1]) < step_rows)
        steps += sorted(cut[:whole], key=lambda step: min(position[row] for row in step)) + cut[whole:]
    if steps:
        candidates = [i for i, step in enumerate(steps) if len(step) == step_rows] or [0]
        first = max(candidates, key=lambda i: lengths[steps[i][0]])
        steps[0], steps[first] = steps[first], steps[0]
    return [row for step in steps for row in step]


class LengthGroupedSampler(Sampler[int]):
    """Row indices in length-grouped order (`grouped_order`), a new order each epoch.

    `lengths` are the rows' token counts; `step_rows` the rows of one optimizer step over all
    processes (batch size x gradient accumulation x processes), so that mega-batches hold whole
    steps and one process with batch 8 sees the order two processes with batch 4 share.
    `generator` is the loader's: each epoch draws one `RandomSampler` permutation from it.
    """

    def __init__(self, lengths: Sequence[int], step_rows: int, generator: torch.Generator) -> None:
        super().__init__()
        self.lengths, self.step_rows, self.generator = list(lengths), step_rows, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.lengths, self.step_rows, self.generator))


@dataclass
class PackedCollator:
    """A causal-LM batch as one row without padding: the sequences of `encode` (a
    `CausalLMCollator`'s) concatenated, `position_ids` restarting at 0 for each and the first
    label of each set to the ignored index (so that no sequence predicts the next one's first
    token); `use_cache=False`, because transformers detects packed sequences only without a cache."""

    encode: Any  # (prompt, completion) -> {"input_ids", "attention_mask", "labels"}
    flatten: DataCollatorWithFlattening = field(default_factory=lambda: DataCollatorWithFlattening(
        return_tensors="pt"))

    def __call__(self, rows: list[Row]) -> dict[str, Any]:
        features = [self.encode(r["prompt"], r["completion"]) for r in rows]
        return {**self.flatten([{k: f[k] for k in ("input_ids", "labels")} for f in features]), "use_cache": False}


def rows_in(batch: dict[str, Any]) -> int:
    """The number of examples in a training batch, padded (one per row) or packed (one per
    restart of `position_ids`, which only a `PackedCollator` batch carries)."""
    if "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum())
    return len(batch["labels"])


def check_packing(model: torch.nn.Module, collate: Any, tenant: bool = False) -> None:
    """Refuse packing where the model's attention would let packed sequences see each other
    (the logits of two short sequences packed must equal their logits run one by one), and for
    a tenant of a multiplexed run, whose batches are padded together with the other tenants'."""
    if tenant:
        raise SpliceError("packing does not apply to --tenants runs (their batches are padded together); "
                          "set packing: false")
    rows = [{"prompt": "1 2 3", "completion": " 4"}, {"prompt": "5 6", "completion": " 7 8"}]
    packed = PackedCollator(collate.encode)(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            together = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items()
                                if k != "labels"}).logits[0]
            alone = [model(input_ids=torch.tensor([collate.encode(r["prompt"], r["completion"])["input_ids"]],
                                                  device=device), use_cache=False).logits[0] for r in rows]
    finally:
        model.train(was_training)
    alone_cat = torch.cat(alone)
    if together.shape != alone_cat.shape or not torch.allclose(together, alone_cat, atol=1e-4, rtol=1e-3):
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", "unknown")
        raise SpliceError(f"packing: {type(model).__name__} with attention {implementation!r} lets packed sequences "
                          "attend to each other (its attention ignores restarting position_ids); train without "
                          "packing, or load the model with attn_implementation='sdpa' (transformers >= 5)")
