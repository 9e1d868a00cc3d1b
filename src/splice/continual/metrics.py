"""The continual-learning scores of an accuracy matrix.

a[t][j] is the accuracy on task j after training tasks 0..t (None where not evaluated: tasks
beyond the next unseen one), and b[j] the accuracy of the model before any training (the
pretrained model with task j's untrained head, or the base generator), for forward transfer.
With K tasks (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

    average final accuracy   A   = mean_j a[K-1][j]
    backward transfer        BWT = mean_{j<K-1} (a[K-1][j] - a[j][j])      (negative: forgetting)
    forward transfer         FWT = mean_{j>0} (a[j-1][j] - b[j])           (before training task j)
    forgetting               F_j = max_{j<=t<K-1} a[t][j] - a[K-1][j]       (`analysis.forgetting`)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import fmean

from splice.analysis.forgetting import forgetting
from splice.core.errors import SpliceError

Matrix = Sequence[Sequence[float | None]]


@dataclass(frozen=True)
class Scores:
    """A, BWT, FWT (None without a before-training row), per-task forgetting and its mean."""

    average_accuracy: float
    backward_transfer: float
    forward_transfer: float | None
    forgetting: list[float]
    mean_forgetting: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def scores(matrix: Matrix, before: Sequence[float] | None = None) -> Scores:
    """The scores of a K x K matrix whose rows t hold at least tasks 0..t (see the module docstring)."""
    K = len(matrix)
    if K < 2 or any(len(row) != K for row in matrix):
        raise SpliceError(f"an accuracy matrix is K x K with K >= 2; got rows of lengths {[len(r) for r in matrix]}")
    for t, row in enumerate(matrix):
        if any(row[j] is None for j in range(t + 1)):
            raise SpliceError(f"row {t} of the accuracy matrix lacks a seen task: {list(row)}")
    final = [float(v) for v in matrix[-1]]  # type: ignore[arg-type]
    per_task = forgetting(matrix)
    bwt = fmean(final[j] - float(matrix[j][j]) for j in range(K - 1))  # type: ignore[arg-type]
    fwt = None
    if before is not None:
        if len(before) != K:
            raise SpliceError(f"the before-training accuracies name {len(before)} tasks, the matrix {K}")
        gains = [float(matrix[j - 1][j]) - before[j] for j in range(1, K) if matrix[j - 1][j] is not None]
        fwt = fmean(gains) if gains else None
    return Scores(fmean(final), bwt, fwt, per_task, fmean(per_task))
