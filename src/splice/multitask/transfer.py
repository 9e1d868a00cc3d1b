"""The pairwise transfer matrix of a mixture of tasks (volume 2 §9):

    Δ_ij = acc_i(trained on i+j) - acc_i(trained on i)

Row i is the task scored, column j the task added to its training: Δ_ij > 0, j helps i; < 0, j
hurts i. The matrix need not be symmetric (transfer is often one way). Δ_ii is 0 by
construction: "trained on i+i" is the single-task run of i itself, not a run on two copies.
Pure functions of the runs' scores, so that the same runs give the same matrix, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Pair = tuple[str, str]


def pair_key(i: str, j: str, order: Sequence[str]) -> Pair:
    """The pair {i, j} in the tasks' `order`: (a, b) with a before b."""
    return (i, j) if order.index(i) <= order.index(j) else (j, i)


def transfer_matrix(tasks: Sequence[str], single: Mapping[str, float],
                    pairs: Mapping[Pair, Mapping[str, float]]) -> list[list[float]]:
    """Δ[i][j] for `tasks` from each task's single-task score and each pair run's scores
    (`pairs[(a, b)]` maps a and b to their scores in the run on a+b, a before b in `tasks`)."""
    matrix = []
    for i in tasks:
        row = []
        for j in tasks:
            row.append(0.0 if i == j else pairs[pair_key(i, j, tasks)][i] - single[i])
        matrix.append(row)
    return matrix


def mean_std(matrices: Sequence[Sequence[Sequence[float]]]) -> tuple[list[list[float]], list[list[float]]]:
    """Element-wise mean and standard deviation (ddof 1; 0 for one matrix) over seeds."""
    n = len(matrices)
    size = len(matrices[0])
    mean = [[sum(m[i][j] for m in matrices) / n for j in range(size)] for i in range(size)]
    std = [[math.sqrt(sum((m[i][j] - mean[i][j]) ** 2 for m in matrices) / (n - 1)) if n > 1 else 0.0
            for j in range(size)] for i in range(size)]
    return mean, std
