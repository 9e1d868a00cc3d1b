"""SEA-PEFT's bookkeeping, as pure functions on numbers: the smoothed scores of the audited units,
which units to audit next, and the budgeted allocation with hysteresis and guard cycles
(Ly & Nguyen, arXiv 2603.05822; the loop that measures and switches is `sea_peft.py`).

A unit's measurement is its validation change per parameter (its density); each audit updates

    ema      = 0.93 * ema + 0.07 * density           (the first measurement starts it)
    robust   = median(w) - 0.25 * IQR(w)             w: the last 5 EMA values
    uncertainty = |ema - robust|
    value    = robust + 0.5 * uncertainty            what the allocation ranks by

and the allocation sorts the allowed units by value (an inactive unit needs value > 0 to come
in, an active one stays while value >= -0.02: the gap is the hysteresis) and adds them greedily,
at most one per (site, family), while the parameter budget holds: a group gets its best allowed
unit that fits (the paper keeps the group's best and drops the group when that one does not fit;
here a unit that fits is not dropped for one that does not). A unit switched on or off keeps
its state for the next `guard` audits.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splice.core.errors import SpliceError


@dataclass(frozen=True)
class Unit:
    """One candidate: an adapter form with its hyperparameters (`config`, an adapter mapping that
    says where it goes) at one site, attached under `name`; `params` its parameter count."""

    name: str
    site: str
    family: str
    params: int
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def group(self) -> tuple[str, str]:
        """(site, family): the allocation keeps at most one unit of each."""
        return self.site, self.family


def robust_score(window: Sequence[float], iqr_weight: float = 0.25) -> float:
    """median(window) - iqr_weight * IQR(window), with the quartiles linearly interpolated
    (numpy's default): a score that a single lucky audit cannot lift much."""
    if len(window) == 0:
        raise SpliceError("robust_score needs at least one value")
    values = np.asarray(window, dtype=float)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median - iqr_weight * (q3 - q1))


@dataclass
class Record:
    """What the audits found for one unit."""

    ema: float | None = None
    emas: deque[float] = field(default_factory=deque)
    audits: int = 0
    last_delta: float | None = None
    last_density: float | None = None
    last_switch: int | None = None  # the audit that last switched the unit on or off


class Scores:
    """The EMA, robust score and uncertainty of every unit, updated one measurement at a time."""

    def __init__(self, names: Iterable[str], *, ema: float = 0.93, window: int = 5, iqr_weight: float = 0.25,
                 uncertainty_weight: float = 0.5) -> None:
        if not 0.0 <= ema < 1.0:
            raise SpliceError(f"ema must be in [0, 1), got {ema}")
        if window < 1:
            raise SpliceError(f"window must be >= 1, got {window}")
        self.beta, self.window, self.iqr_weight, self.bonus = ema, window, iqr_weight, uncertainty_weight
        self.records = {name: Record(emas=deque(maxlen=window)) for name in names}

    def update(self, name: str, delta: float, density: float) -> None:
        """One audit's measurement of unit `name`: its change of the metric and its density."""
        if not math.isfinite(density):
            raise SpliceError(f"unit {name!r}: the measured density {density} is not finite")
        r = self.records[name]
        r.ema = density if r.ema is None else self.beta * r.ema + (1.0 - self.beta) * density
        r.emas.append(r.ema)
        r.audits += 1
        r.last_delta, r.last_density = delta, density

    def robust(self, name: str) -> float | None:
        r = self.records[name]
        return robust_score(list(r.emas), self.iqr_weight) if r.emas else None

    def uncertainty(self, name: str) -> float:
        r = self.records[name]
        return abs(r.ema - self.robust(name)) if r.ema is not None else 0.0

    def value(self, name: str) -> float | None:
        """robust + uncertainty_weight * uncertainty; None for a unit never audited."""
        robust = self.robust(name)
        return None if robust is None else robust + self.bonus * self.uncertainty(name)

    def values(self) -> dict[str, float | None]:
        return {name: self.value(name) for name in self.records}

    def guarded(self, audit: int, guard: int) -> set[str]:
        """Units switched within the last `guard` audits before audit number `audit`."""
        return {name for name, r in self.records.items()
                if r.last_switch is not None and audit - r.last_switch <= guard}

    def row(self, name: str) -> dict[str, Any]:
        r = self.records[name]
        return {"audits": r.audits, "delta": r.last_delta, "density": r.last_density, "ema": r.ema,
                "robust": self.robust(name), "uncertainty": self.uncertainty(name), "value": self.value(name)}


def audit_size(units: int, fraction: float) -> int:
    """How many units an audit measures: ceil(fraction * units), at least one, so that every unit
    is reached within ceil(1 / fraction) audits."""
    return max(1, min(units, math.ceil(fraction * units - 1e-9)))


def audit_sample(order: Sequence[str], scores: Scores, audit: int, fraction: float, uniform_audits: int,
                 rng: np.random.Generator) -> list[str]:
    """The units audit number `audit` (0-based) measures.

    Units never audited come first, in `order` (a seeded permutation fixed at the start): the
    first audits are thus uniform without repeats, and every unit is measured within
    ceil(1 / fraction) audits. The rest of the sample is drawn without replacement, uniformly
    during the first `uniform_audits` audits and afterwards with weight
    uncertainty / max(uncertainty) + 1 / (1 + times audited): units whose score is unsettled,
    or seldom measured, are measured again sooner.
    """
    k = audit_size(len(order), fraction)
    fresh = [name for name in order if scores.records[name].audits == 0]
    picked = fresh[:k]
    rest = [name for name in order if name not in set(picked)]
    need = k - len(picked)
    if need <= 0 or not rest:
        return picked
    if audit < uniform_audits:
        weights = np.ones(len(rest))
    else:
        spread = np.array([scores.uncertainty(name) for name in rest])
        top = spread.max()
        spread = spread / top if top > 0 else spread
        coverage = np.array([1.0 / (1 + scores.records[name].audits) for name in rest])
        weights = spread + coverage
    drawn = rng.choice(len(rest), size=min(need, len(rest)), replace=False, p=weights / weights.sum())
    return picked + [rest[i] for i in sorted(drawn)]


def allocate(units: Sequence[Unit], values: Mapping[str, float | None], active: Collection[str], budget: int, *,
             guarded: Collection[str] = (), add_above: float = 0.0, drop_below: float = -0.02) -> set[str]:
    """The next active set.

    Guarded units keep their state: the active ones stay (their parameters are counted first),
    the inactive ones stay out. Of the others, an active unit is allowed while its value is at
    least `drop_below` (a unit never audited counts as value 0), an inactive one once its value
    is above `add_above`. The allowed units are sorted by value (ties: the active one, then the
    smaller, then the name) and added greedily, at most one per (site, family), while the sum of
    parameters stays within `budget`: a group keeps its best allowed unit that fits, so when its
    best one does not fit, its next allowed one (an active unit that fits is not dropped for a
    better one that does not). A group that a guarded active unit holds takes no other unit. The
    result never exceeds the budget when the guarded active units fit it, which they do whenever
    `active` came from this function (or fits the budget itself).
    """
    by_name = {u.name: u for u in units}
    unknown = sorted(set(active) - set(by_name))
    if unknown:
        raise SpliceError(f"active units {unknown} are not among the candidates")
    kept = [by_name[n] for n in active if n in guarded]
    used = sum(u.params for u in kept)
    if used > budget:
        raise SpliceError(f"the guarded active units hold {used:,} parameters, over the budget of {budget:,}")
    held = {u.group for u in kept}
    allowed: list[tuple[tuple[float, bool, int, str], Unit]] = []
    for u in units:
        if u.name in guarded or u.group in held:
            continue
        value = values.get(u.name)
        on = u.name in active
        if on:
            value = 0.0 if value is None else value
            if value < drop_below:
                continue
        elif value is None or value <= add_above:
            continue
        allowed.append(((value, on, -u.params, u.name), u))
    chosen = [u.name for u in kept]
    for _key, u in sorted(allowed, key=lambda item: _order(item[0])):
        if u.group not in held and used + u.params <= budget:
            chosen.append(u.name)
            held.add(u.group)
            used += u.params
    return set(chosen)


def _order(key: tuple[float, bool, int, str]) -> tuple[float, bool, int, str]:
    """Highest value first, then active before inactive, the smaller first, then by name."""
    value, on, neg_params, name = key
    return -value, not on, -neg_params, name


def initial_fill(units: Sequence[Unit], budget: int, rng: np.random.Generator) -> set[str]:
    """A start for the search: units in a seeded random order, at most one per (site, family),
    added while they fit the budget."""
    chosen: set[str] = set()
    groups: set[tuple[str, str]] = set()
    used = 0
    for i in rng.permutation(len(units)):
        u = units[int(i)]
        if u.group not in groups and used + u.params <= budget:
            chosen.add(u.name)
            groups.add(u.group)
            used += u.params
    return chosen
