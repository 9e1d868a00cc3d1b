"""Tensor trains as adapter forms use them: a size split into modes, and a train of cores
contracted into the matrix it represents.

A train of cores G_i [r_i-1, k_i, r_i] with r_0 = r_d = 1 represents the tensor
T[i_1..i_d] = G_1[:, i_1, :] ... G_d[:, i_d, :]; read in row-major order it is a matrix whose
rows are indexed by the first modes and columns by the rest.
"""

from __future__ import annotations

import math

import torch


def factorize(n: int, parts: int) -> list[int]:
    """`n` as at most `parts` near-equal factors, largest first: each prime factor, largest
    first, multiplies the currently smallest part; parts left at 1 are dropped (a mode of size 1
    would only add an r x r core). A prime n stays whole: 7 -> [7]."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    factors = [1] * parts
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return sorted((f for f in factors if f > 1), reverse=True) or [1]


def train_matrix(cores: list[torch.Tensor] | torch.nn.ParameterList, rows: int) -> torch.Tensor:
    """The train's tensor as a [rows, product of the modes / rows] matrix (row-major), built core
    by core from the left: O(Σ k_1..k_i r_i r_i+1) work, never more than the matrix's size."""
    out = cores[0].flatten(0, 1)  # [k_1, r_1]
    for core in cores[1:]:
        out = (out @ core.flatten(1)).view(-1, core.shape[2])
    size = math.prod(core.shape[1] for core in cores)
    return out.view(rows, size // rows)
