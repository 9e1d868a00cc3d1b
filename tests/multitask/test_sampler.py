"""The mixing distribution and the seeded per-batch task sampler (volume 2 §9 (d) test 1)."""

from __future__ import annotations

import pytest

from splice.core.errors import SpliceError
from splice.multitask import MixingSampler, mixing_weights

SIZES = [60, 240, 900]


def test_weights_follow_the_formulas():
    assert mixing_weights(SIZES) == pytest.approx([n / 1200 for n in SIZES])
    for T in (2.0, 5.0):
        scaled = [n ** (1 / T) for n in SIZES]
        assert mixing_weights(SIZES, "temperature", T) == pytest.approx([s / sum(scaled) for s in scaled])
    assert mixing_weights(SIZES, "temperature", 1.0) == pytest.approx(mixing_weights(SIZES))
    assert mixing_weights(SIZES, "temperature", 1e9) == pytest.approx([1 / 3] * 3)  # T -> inf: uniform
    assert mixing_weights([10**9, 1], "temperature", 0.01)[0] == pytest.approx(1.0)  # no overflow
    for bad in ([], [5, 0]):
        with pytest.raises(SpliceError, match="training rows"):
            mixing_weights(bad)
    with pytest.raises(SpliceError, match="temperature"):
        mixing_weights(SIZES, "temperature", -1.0)
    with pytest.raises(SpliceError, match="proportional or temperature"):
        mixing_weights(SIZES, "uniform")


@pytest.mark.parametrize(("mixing", "T"), [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0)])
def test_empirical_task_proportions_are_within_two_percent_of_the_target(mixing, T):
    """Spec test 1. 20,000 batches: the standard error of a share is at most 0.0035, so 2% is
    more than 5 standard errors, for every seed tried."""
    weights = mixing_weights(SIZES, mixing, T)
    for seed in range(3):
        sampler = MixingSampler(SIZES, weights, batch_size=4, batches=20_000, seed=seed)
        shares = [c / len(sampler) for c in sampler.counts()]
        assert max(abs(s - w) for s, w in zip(shares, weights, strict=True)) < 0.02, (shares, weights)


def test_each_batch_is_one_task_and_each_task_goes_through_its_rows_in_passes():
    sizes = [10, 6]
    sampler = MixingSampler(sizes, [0.5, 0.5], batch_size=2, batches=40, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40 and batches == list(sampler)  # the same twice
    seen: dict[int, list[int]] = {0: [], 1: []}
    for task, batch in zip(sampler.tasks, batches, strict=True):
        assert all(sampler.offsets[task] <= i < sampler.offsets[task] + sizes[task] for i in batch)
        seen[task] += [i - sampler.offsets[task] for i in batch]
    for task, rows in seen.items():
        for start in range(0, len(rows) - sizes[task] + 1, sizes[task]):  # every full pass: each row once
            assert sorted(rows[start:start + sizes[task]]) == list(range(sizes[task]))
    assert MixingSampler(sizes, [0.5, 0.5], 2, 40, seed=4).tasks != sampler.tasks


def test_a_task_keeps_its_row_order_whatever_it_is_mixed_with():
    """Its stream is seeded by its key: alone or after another task, its batches come in one order."""
    alone = MixingSampler([8], [1.0], batch_size=4, batches=6, seed=1, keys=[2])
    mixed = MixingSampler([5, 8], [0.3, 0.7], batch_size=4, batches=30, seed=1, keys=[0, 2])
    ours = [[i - 5 for i in batch] for task, batch in zip(mixed.tasks, mixed, strict=True) if task == 1]
    assert len(ours) >= 6 and ours[:6] == list(alone)
