"""The robust z-score every audit check flags outliers with: the distance from the median in
units of 1.4826 x MAD (the standard deviation of normal data, which an outlier cannot widen as
it would a standard deviation), the MAD floored by each check's own smallest meaningful spread."""

from __future__ import annotations

import statistics

NORMAL_MAD = 1.4826  # sigma / MAD for normal data


def robust_z(values: list[float], floor: float) -> list[float]:
    """Each value's robust z over `values`, the MAD taken as at least `floor`."""
    median = statistics.median(values)
    scale = NORMAL_MAD * max(statistics.median(abs(v - median) for v in values), floor)
    return [(v - median) / scale for v in values]
