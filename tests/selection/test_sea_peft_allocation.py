"""SEA-PEFT's pure pieces: the robust score on fixed windows, the EMA, the audit sample's coverage,
and the allocator: never over the budget, hysteresis, guard cycles, one unit per (site, family)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from splice.core.errors import SpliceError
from splice.selection.sea_peft_allocation import (
    Scores,
    Unit,
    allocate,
    audit_sample,
    audit_size,
    initial_fill,
    robust_score,
)


@pytest.mark.parametrize(("window", "expected"), [
    ([1, 2, 3, 4, 5], 3 - 0.25 * (4 - 2)),
    ([3.0], 3.0),
    ([1, 1, 1, 10, 10], 1 - 0.25 * 9),
    ([0.2, 0.1], 0.15 - 0.25 * 0.05),
    ([5, 4, 3, 2, 1], 2.5),  # the order of the window does not matter
    ([-2, 0, 2, 4], 1 - 0.25 * (2.5 - (-0.5))),
])
def test_robust_score_is_the_median_minus_a_quarter_of_the_iqr(window, expected):
    assert robust_score(window) == pytest.approx(expected)


def test_robust_score_needs_a_value():
    with pytest.raises(SpliceError, match="at least one"):
        robust_score([])


def test_scores_smooth_with_an_ema_and_read_the_last_five_values():
    scores = Scores(["a", "b"], ema=0.93, window=5)
    assert scores.value("a") is None and scores.uncertainty("a") == 0.0
    densities = [1.0, 0.0, 0.0, 2.0, -1.0, 0.5, 0.5]
    emas = []
    ema = None
    for d in densities:
        scores.update("a", d, d)
        ema = d if ema is None else 0.93 * ema + 0.07 * d
        emas.append(ema)
    record = scores.records["a"]
    assert record.ema == pytest.approx(ema) and record.audits == len(densities)
    assert list(record.emas) == pytest.approx(emas[-5:])
    robust = robust_score(emas[-5:])
    assert scores.robust("a") == pytest.approx(robust)
    assert scores.uncertainty("a") == pytest.approx(abs(ema - robust))
    assert scores.value("a") == pytest.approx(robust + 0.5 * abs(ema - robust))
    assert scores.value("b") is None
    with pytest.raises(SpliceError, match="not finite"):
        scores.update("b", 0.0, math.nan)


def test_a_unit_switched_is_guarded_for_the_next_three_audits():
    scores = Scores(["a"])
    scores.records["a"].last_switch = 2
    assert [a for a in range(2, 9) if "a" in scores.guarded(a, 3)] == [2, 3, 4, 5]


def test_audit_sample_covers_every_unit_within_one_over_the_fraction_audits():
    names = [f"u{i}" for i in range(23)]
    scores = Scores(names)
    rng = np.random.default_rng(0)
    order = [names[i] for i in rng.permutation(len(names))]
    k = audit_size(len(names), 0.2)
    assert k == 5
    seen: set[str] = set()
    for audit in range(5):
        sample = audit_sample(order, scores, audit, 0.2, 3, rng)
        assert len(sample) == len(set(sample)) == k
        seen.update(sample)
        for name in sample:
            scores.update(name, 0.0, random.Random(audit).random())
    assert seen == set(names)
    # later audits: weighted by uncertainty and coverage, never a repeat within one audit
    for audit in range(5, 12):
        sample = audit_sample(order, scores, audit, 0.2, 3, rng)
        assert len(sample) == len(set(sample)) == k
    again = audit_sample(order, Scores(names), 0, 0.2, 3, np.random.default_rng(0))
    assert again == order[:k]  # seeded and deterministic
    assert audit_size(3, 0.2) == 1 and audit_size(10, 0.2) == 2 and audit_size(4, 1.0) == 4


def units_of(sizes: dict[str, tuple[str, str, int]]) -> list[Unit]:
    return [Unit(name, site, family, params) for name, (site, family, params) in sizes.items()]


def test_the_allocator_never_exceeds_the_budget_over_random_scores():
    """A property: units of random sizes in random groups, random measurements, many audits in a
    row with hysteresis and guard cycles; the active set fits the budget and holds at most one
    unit per (site, family) after every audit."""
    for trial in range(40):
        rng = random.Random(trial)
        units = [Unit(f"u{i}", f"s{rng.randrange(6)}", rng.choice(["lora", "dora", "loreft"]),
                      rng.randrange(1, 60)) for i in range(rng.randrange(1, 30))]
        budget = rng.randrange(1, 150)
        scores = Scores([u.name for u in units])
        active = initial_fill(units, budget, np.random.default_rng(trial))
        for audit in range(15):
            for u in rng.sample(units, k=max(1, len(units) // 5)):
                scores.update(u.name, 0.0, rng.gauss(0.0, 0.05))
            guarded = scores.guarded(audit, 3)
            chosen = allocate(units, scores.values(), active, budget, guarded=guarded)
            by_name = {u.name: u for u in units}
            assert sum(by_name[n].params for n in chosen) <= budget
            groups = [by_name[n].group for n in chosen]
            assert len(groups) == len(set(groups))
            assert {n for n in active if n in guarded} <= chosen  # guarded active units stay
            assert not (chosen - set(active)) & guarded  # guarded inactive units stay out
            for name in chosen ^ set(active):
                scores.records[name].last_switch = audit
            active = chosen


def test_hysteresis_lets_units_in_above_zero_and_drops_them_below_minus_two_hundredths():
    units = units_of({"a": ("s1", "lora", 10), "b": ("s2", "lora", 10), "c": ("s3", "lora", 10),
                      "d": ("s4", "lora", 10), "e": ("s5", "lora", 10)})
    values = {"a": -0.01, "b": -0.03, "c": 0.0, "d": 0.001, "e": None}
    chosen = allocate(units, values, active={"a", "b", "e"}, budget=100)
    # a: active at -0.01 stays; b: active below -0.02 goes; c: inactive at 0 stays out;
    # d: inactive above 0 comes in; e: active, never audited, stays.
    assert chosen == {"a", "d", "e"}
    assert allocate(units, values, active=set(), budget=100) == {"d"}
    with pytest.raises(SpliceError, match="not among"):
        allocate(units, values, active={"zz"}, budget=100)


def test_guarded_units_keep_their_state_whatever_their_value():
    units = units_of({"a": ("s1", "lora", 10), "b": ("s2", "lora", 10), "c": ("s3", "lora", 10)})
    values = {"a": -5.0, "b": 5.0, "c": 1.0}
    assert allocate(units, values, active={"a"}, budget=20, guarded={"a", "b"}) == {"a", "c"}
    assert allocate(units, values, active={"a"}, budget=20) == {"b", "c"}


def test_one_unit_per_site_and_family_by_value_then_greedy_under_the_budget():
    units = units_of({"q4": ("L0.q", "lora", 4), "q8": ("L0.q", "lora", 8), "q16": ("L0.q", "lora", 16),
                      "qd": ("L0.q", "dora", 9), "v8": ("L0.v", "lora", 8)})
    values = {"q4": 0.1, "q8": 0.3, "q16": 0.2, "qd": 0.05, "v8": 0.25}
    # per group the best: q8 (lora at L0.q), qd (dora at L0.q), v8; by value q8, v8 fit 16; qd does not
    assert allocate(units, values, active=set(), budget=16) == {"q8", "v8"}
    assert allocate(units, values, active=set(), budget=30) == {"q8", "v8", "qd"}
    # the best of a group that does not fit gives way to the group's next allowed unit that fits
    # (the paper's rule would leave the group empty and the budget unused)
    assert allocate(units, {"q16": 1.0, "q4": 0.5}, active=set(), budget=10) == {"q4"}
    assert allocate(units, {"q16": 1.0, "q4": -0.5}, active=set(), budget=10) == set()  # q4 not allowed
