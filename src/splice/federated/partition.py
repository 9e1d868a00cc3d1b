"""Splitting a data set's rows among federated clients: seeded, reproducible, indices only.

Every split returns one shard per client, a sorted list of row indices; the shards are disjoint
and cover every row. Two rules:

    iid         a seeded random permutation cut into near-equal shards (sizes differ by ≤ 1)
    dirichlet   the label-Dirichlet non-IID split (Hsu et al., 2019, "Measuring the effects of
                non-identical data distribution for federated visual classification"): for each
                label k, client proportions p_k ~ Dir(α·1_N), and label k's rows, shuffled, are
                cut at the cumulative proportions ⌊n_k · Σ_{j≤i} p_kj⌋. Small α gives each
                client few labels; large α approaches the IID split.

`dirichlet` also returns the proportions it drew, so that `dirichlet_like` can split another set
of rows (the test split) with the same per-label client shares: a client is then evaluated on
rows with its own training label mix.

This is the rule of flwr-datasets' `DirichletPartitioner` (without its self-balancing option).
We do not use flwr-datasets itself: it requires datasets<5, which conflicts with our transformers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splice.core.errors import SpliceError

# Redraws of the Dirichlet proportions before `dirichlet` gives up on `min_size`. Two labels over
# 8 clients at alpha 0.1 (Rotten Tomatoes) give every client 8 rows in ~9% of draws: 10 tries
# (flwr-datasets' default) fail for 4 seeds in 10; a draw costs a millisecond.
MAX_TRIES = 1000


@dataclass(frozen=True)
class Partition:
    """A dirichlet split: `shards[i]` are client i's rows (sorted); `proportions[label][i]` is the
    share p_ki of that label's rows drawn for client i (each label's shares sum to 1)."""

    shards: list[list[int]]
    proportions: dict[Hashable, list[float]]


def iid(num_rows: int, num_clients: int, seed: int) -> list[list[int]]:
    """A seeded random split of rows 0..num_rows-1 into `num_clients` near-equal shards.

    Each shard is sorted, so a single client gets every row in its original order."""
    _check_clients(num_rows, num_clients)
    permutation = np.random.default_rng(seed).permutation(num_rows)
    return [sorted(shard.tolist()) for shard in np.array_split(permutation, num_clients)]


def dirichlet(labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int,
              min_size: int = 1) -> Partition:
    """The label-Dirichlet split of the rows whose labels are `labels` (see the module docstring).

    A draw that leaves some client with fewer than `min_size` rows is redrawn (the same seeded
    stream continues, so the result stays reproducible); after `MAX_TRIES` draws it is an error.
    """
    labels = _as_list(labels)
    _check_clients(len(labels), num_clients)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise SpliceError(f"the Dirichlet concentration alpha must be a positive number, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise SpliceError(f"min_size must be a non-negative integer, got {min_size!r}")
    if min_size * num_clients > len(labels):
        raise SpliceError(f"{num_clients} clients with at least min_size={min_size} rows each need "
                          f"{min_size * num_clients} rows, but there are {len(labels)}")
    rows = _rows_by_label(labels)
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(MAX_TRIES):
        proportions = {label: rng.dirichlet(np.full(num_clients, float(alpha))) for label in rows}
        shards = _split(rows, proportions, num_clients, rng)
        smallest = min(len(shard) for shard in shards)
        if smallest >= min_size:
            return Partition(shards, {label: p.tolist() for label, p in proportions.items()})
    raise SpliceError(
        f"{MAX_TRIES} Dirichlet draws (alpha={alpha}, seed={seed}) all left a client with fewer than "
        f"min_size={min_size} rows (the last: {smallest}); raise alpha, lower min_size or use fewer "
        f"than {num_clients} clients")


def dirichlet_like(labels: Sequence[Hashable], proportions: Mapping[Hashable, Sequence[float]],
                   seed: int) -> list[list[int]]:
    """Split rows with given per-label client shares (a `Partition.proportions`), as `dirichlet`
    cuts each label's shuffled rows; a label the proportions lack is shared uniformly.

    No minimum size: a client whose shares of every label present are small may get no rows."""
    labels = _as_list(labels)
    if not proportions:
        raise SpliceError("no proportions given; pass the `proportions` of a dirichlet Partition")
    num_clients = len(next(iter(proportions.values())))
    shares = {}
    for label, p in proportions.items():
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (num_clients,) or not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise SpliceError(f"proportions of label {label!r} must be {num_clients} non-negative shares "
                              f"summing to 1 (one per client), got {p.tolist()}")
        shares[label] = p
    rows = _rows_by_label(labels)
    uniform = np.full(num_clients, 1 / num_clients)
    return _split(rows, {label: shares.get(label, uniform) for label in rows}, num_clients,
                  np.random.default_rng(seed))


def describe(shards: Sequence[Sequence[int]], labels: Sequence[Hashable]) -> dict[str, Any]:
    """Per client: its row count, its label counts (labels as strings, so the dict is JSON-able)
    and the entropy of its label mix in bits, H = −Σ_k q_k log2 q_k (0 for a single label)."""
    labels = _as_list(labels)
    clients = []
    for i, shard in enumerate(shards):
        bad = [row for row in shard if not 0 <= row < len(labels)]
        if bad:
            raise SpliceError(f"client {i}'s shard holds row {bad[0]}, but there are {len(labels)} labels")
        counts = Counter(labels[row] for row in shard)
        q = np.array(list(counts.values()), dtype=np.float64) / max(len(shard), 1)
        clients.append({"rows": len(shard), "labels": {str(k): n for k, n in counts.items()},
                        "entropy": abs(float((q * np.log2(q)).sum()))})  # abs: no -0.0 for one label
    return {"num_clients": len(clients), "num_rows": sum(c["rows"] for c in clients),
            "num_labels": len(set(labels)), "clients": clients}


def summary(description: Mapping[str, Any]) -> str:
    """One line for the CLI from a `describe` result: sizes and the mean label entropy."""
    clients = description["clients"]
    sizes = [c["rows"] for c in clients]
    entropy = sum(c["entropy"] for c in clients) / len(clients)
    return (f"{description['num_clients']} clients, {description['num_rows']} rows: sizes {min(sizes)}–"
            f"{max(sizes)}, label entropy {entropy:.2f} bits on average (uniform over "
            f"{description['num_labels']} labels: {math.log2(max(description['num_labels'], 1)):.2f})")


def _split(rows: Mapping[Hashable, np.ndarray], proportions: Mapping[Hashable, np.ndarray], num_clients: int,
           rng: np.random.Generator) -> list[list[int]]:
    """Each label's rows shuffled and cut at ⌊n_k · cumsum(p_k)⌋, gathered per client and sorted."""
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for label, indices in rows.items():
        cuts = (np.cumsum(proportions[label]) * len(indices)).astype(int)[:-1]
        for shard, part in zip(shards, np.split(rng.permutation(indices), cuts), strict=True):
            shard.extend(part.tolist())
    return [sorted(shard) for shard in shards]


def _rows_by_label(labels: list[Hashable]) -> dict[Hashable, np.ndarray]:
    """Row indices per label, labels in order of first appearance (so draws are reproducible)."""
    rows: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        rows.setdefault(label, []).append(i)
    return {label: np.array(indices) for label, indices in rows.items()}


def _as_list(labels: Sequence[Hashable]) -> list[Hashable]:
    """Labels as a list of plain values: a tensor or array becomes Python numbers (its elements
    would hash by identity, each row a label of its own)."""
    return labels.tolist() if hasattr(labels, "tolist") else list(labels)


def _check_clients(num_rows: int, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise SpliceError(f"num_clients must be an integer of at least 1, got {num_clients!r}")
    if num_clients > num_rows:
        raise SpliceError(f"{num_clients} clients but only {num_rows} rows; every client needs at least one row, "
                          f"so use at most {num_rows} clients")
