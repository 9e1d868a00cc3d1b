"""Client splits: disjoint, covering, seeded; the Dirichlet split's skew follows alpha, and a test
split made like it keeps each client's label mix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splice.core.errors import SpliceError
from splice.federated import partition

LABELS = [i % 4 for i in range(400)]  # four balanced labels, interleaved


def assert_partitions(shards: list[list[int]], num_rows: int) -> None:
    rows = [row for shard in shards for row in shard]
    assert sorted(rows) == list(range(num_rows))  # disjoint and covering
    assert all(shard == sorted(shard) for shard in shards)


def mean_entropy(shards: list[list[int]], labels: list[int]) -> float:
    clients = partition.describe(shards, labels)["clients"]
    return sum(c["entropy"] for c in clients) / len(clients)


def test_iid_is_a_near_equal_seeded_split() -> None:
    shards = partition.iid(103, 5, seed=0)
    assert_partitions(shards, 103)
    assert sorted(len(s) for s in shards) == [20, 20, 21, 21, 21]
    assert partition.iid(103, 5, seed=0) == shards
    assert partition.iid(103, 5, seed=1) != shards


def test_one_client_gets_every_row_in_order() -> None:
    assert partition.iid(17, 1, seed=3) == [list(range(17))]
    assert partition.dirichlet(LABELS, 1, alpha=0.1, seed=3).shards == [list(range(len(LABELS)))]


def test_dirichlet_is_a_seeded_split_with_proportions_per_label() -> None:
    split = partition.dirichlet(LABELS, 6, alpha=0.5, seed=0)
    assert_partitions(split.shards, len(LABELS))
    assert split == partition.dirichlet(LABELS, 6, alpha=0.5, seed=0)
    assert split.shards != partition.dirichlet(LABELS, 6, alpha=0.5, seed=1).shards
    assert set(split.proportions) == {0, 1, 2, 3}
    for shares in split.proportions.values():
        assert len(shares) == 6 and min(shares) >= 0 and sum(shares) == pytest.approx(1)
    # each client's count of a label is its drawn share of that label's 100 rows, rounded down or up
    for label, shares in split.proportions.items():
        for shard, share in zip(split.shards, shares, strict=True):
            count = sum(LABELS[row] == label for row in shard)
            assert abs(count - share * 100) <= 1 + 1e-9


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    entropy = {alpha: np.mean([mean_entropy(partition.dirichlet(LABELS, 5, alpha, seed).shards, LABELS)
                               for seed in range(5)])
               for alpha in (0.1, 1.0, 100.0)}
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 1.9  # near the uniform mix of four labels, 2 bits
    iid_entropy = mean_entropy(partition.iid(len(LABELS), 5, seed=0), LABELS)
    assert entropy[0.1] < iid_entropy


def test_dirichlet_min_size_is_honoured_or_refused() -> None:
    first_draw = partition.dirichlet(LABELS, 5, alpha=0.5, seed=2, min_size=0)
    assert min(len(s) for s in first_draw.shards) < 40  # so min_size=40 needs a redraw
    split = partition.dirichlet(LABELS, 5, alpha=0.5, seed=2, min_size=40)
    assert min(len(s) for s in split.shards) >= 40
    assert split == partition.dirichlet(LABELS, 5, alpha=0.5, seed=2, min_size=40)
    with pytest.raises(SpliceError, match=rf"{partition.MAX_TRIES} Dirichlet draws .* min_size=39"):
        partition.dirichlet(LABELS, 10, alpha=0.05, seed=0, min_size=39)
    with pytest.raises(SpliceError, match="need 500 rows, but there are 400"):
        partition.dirichlet(LABELS, 10, alpha=1.0, seed=0, min_size=50)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: partition.iid(3, 5, seed=0), "5 clients but only 3 rows"),
    (lambda: partition.iid(3, 0, seed=0), "num_clients must be an integer of at least 1, got 0"),
    (lambda: partition.dirichlet([0, 1, 0], 4, alpha=1.0, seed=0), "4 clients but only 3 rows"),
    (lambda: partition.dirichlet(LABELS, 2, alpha=0.0, seed=0), "alpha must be a positive number, got 0.0"),
    (lambda: partition.dirichlet(LABELS, 2, alpha=-1, seed=0), "alpha must be a positive number"),
    (lambda: partition.dirichlet(LABELS, 2, alpha=1.0, seed=0, min_size=-1), "min_size must be"),
    (lambda: partition.dirichlet_like([0, 1], {}, seed=0), "no proportions given"),
    (lambda: partition.dirichlet_like([0, 1], {0: [0.5, 0.5], 1: [1.0]}, seed=0), "label 1 must be 2"),
    (lambda: partition.dirichlet_like([0, 1], {0: [0.7, 0.7]}, seed=0), "summing to 1"),
    (lambda: partition.describe([[0, 5]], [0, 1]), "client 0's shard holds row 5, but there are 2 labels"),
])
def test_errors_name_the_numbers(call, message: str) -> None:
    with pytest.raises(SpliceError, match=message):
        call()


def test_dirichlet_like_gives_each_client_its_training_label_mix() -> None:
    split = partition.dirichlet(LABELS, 4, alpha=0.3, seed=2)
    test_labels = [i % 4 for i in range(4000)]
    test_shards = partition.dirichlet_like(test_labels, split.proportions, seed=7)
    assert_partitions(test_shards, len(test_labels))
    assert partition.dirichlet_like(test_labels, split.proportions, seed=7) == test_shards

    def mix(shards: list[list[int]], labels: list[int]) -> np.ndarray:
        return np.array([[sum(labels[r] == k for r in shard) / max(len(shard), 1) for k in range(4)]
                         for shard in shards])

    train, test = mix(split.shards, LABELS), mix(test_shards, test_labels)
    assert np.corrcoef(train.ravel(), test.ravel())[0, 1] > 0.95
    # against an unrelated split the mixes do not match
    other = mix(partition.dirichlet(LABELS, 4, alpha=0.3, seed=9).shards, LABELS)
    assert np.abs(train - test).mean() < np.abs(other - test).mean()


def test_dirichlet_like_shares_unseen_labels_uniformly() -> None:
    shards = partition.dirichlet_like(["new"] * 1000, {"old": [1.0, 0.0, 0.0]}, seed=0)
    assert [len(s) for s in shards] == [333, 333, 334]
    assert partition.dirichlet_like(["old"] * 10, {"old": [0.0, 1.0, 0.0]}, seed=0) == [[], list(range(10)), []]


def test_labels_may_be_a_tensor() -> None:
    labels = torch.tensor(LABELS)
    assert partition.dirichlet(labels, 3, alpha=0.5, seed=0) == partition.dirichlet(LABELS, 3, alpha=0.5, seed=0)


def test_describe_is_json_able_and_summarised() -> None:
    shards = [[0, 1, 2], [3, 4, 5, 6], []]
    labels = ["a", "b", "a", "a", "a", "b", "b"]
    described = partition.describe(shards, labels)
    assert json.loads(json.dumps(described)) == described
    assert described["num_clients"] == 3 and described["num_rows"] == 7 and described["num_labels"] == 2
    assert described["clients"][0] == {"rows": 3, "labels": {"a": 2, "b": 1},
                                       "entropy": pytest.approx(0.9182958)}
    assert described["clients"][1]["entropy"] == 1.0
    assert described["clients"][2] == {"rows": 0, "labels": {}, "entropy": 0.0}
    assert partition.describe([[0, 2, 3]], labels)["clients"][0]["entropy"] == 0.0
    line = partition.summary(described)
    assert line.startswith("3 clients, 7 rows: sizes 0–4") and "\n" not in line
