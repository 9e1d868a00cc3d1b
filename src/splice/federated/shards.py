"""Each client's rows: its shard of the training rows and, for its own evaluation, of the test
rows with its training label mix. Computed from the config alone (seeded), so the server and
every client process agree without exchanging data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splice.assets import DatasetSplits, Row
from splice.federated import partition
from splice.federated.config import FederatedConfig

TASK_SEED_STRIDE = 1000  # a task sequence draws task t's partition with seed + t * stride


@dataclass
class Shards:
    """Per client: training rows and evaluation rows; and the partition's description."""

    train: list[list[Row]]
    test: list[list[Row]]
    description: dict[str, Any]

    def client(self, index: int, splits: DatasetSplits) -> DatasetSplits:
        """Client `index`'s data as splits for its local trainer: training rows only (a round is
        a few steps; evaluation happens at the server's request)."""
        return DatasetSplits(train=self.train[index], validation=[], test=[], task=splits.task,
                             label_names=splits.label_names)


def eval_rows(splits: DatasetSplits, limit: int | None) -> list[Row]:
    """The rows a run evaluates on: the test split, or validation where there is none; the first `limit`."""
    rows = splits.test or splits.validation
    return rows[:limit] if limit is not None else rows


def make_shards(config: FederatedConfig, splits: DatasetSplits, seed: int | None = None) -> Shards:
    """Split `splits` among `config.clients` as `config.partition` says, drawn with `seed`
    (default: the run's; a task sequence draws each task's split apart). A client's test rows:
    an IID share of the evaluation rows, or, non-IID, the evaluation rows split with the same
    per-label proportions as the training rows (each client is tested on its own label mix);
    at most `config.eval_examples` per client."""
    test = eval_rows(splits, None)
    scheme, n = config.partition, config.clients
    seed = config.seed if seed is None else seed
    if scheme.scheme == "iid":
        train_parts = partition.iid(len(splits.train), n, seed)
        test_parts = partition.iid(len(test), min(n, len(test)), seed + 1) if test else []
        test_parts += [[] for _ in range(n - len(test_parts))]  # fewer test rows than clients: some get none
    else:
        labels = [row["label"] for row in splits.train]
        split = partition.dirichlet(labels, n, scheme.alpha, seed, min_size=scheme.min_size)
        train_parts = split.shards
        test_parts = partition.dirichlet_like([row["label"] for row in test], split.proportions, seed + 1)
    labels = [row.get("label", 0) for row in splits.train]
    limit = config.eval_examples
    return Shards(train=[[splits.train[i] for i in part] for part in train_parts],
                  test=[[test[i] for i in part][:limit] for part in test_parts],
                  description=partition.describe(train_parts, labels))


def check_shards(config: FederatedConfig) -> None:
    """Every task's data loads and splits among the clients as `config` says (what the server
    and each client do first), refused with the reason before an earlier run is replaced."""
    from splice.continual.data import task_splits
    from splice.train.data import load_splits

    if config.tasks is None:
        make_shards(config, load_splits(config.train_config()))
        return
    for index, spec in enumerate(config.tasks):
        make_shards(config, task_splits(spec, config.train_config(task=index)),
                    seed=config.seed + index * TASK_SEED_STRIDE)
