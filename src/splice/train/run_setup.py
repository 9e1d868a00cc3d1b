"""What a run sets up before its trainer, in one order: seed, data, model, adapter.

`Trainer.from_config` (so `splice.train.run`) and every tenant of a multiplexed run
(`splice.orchestrate`) start here, so that a tenant's initial adapter, heads and data are
those of the same config trained alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed

import splice
from splice.core.config import AdapterConfig
from splice.core.errors import SpliceError
from splice.train import tasks
from splice.train.adapters import continue_adapter
from splice.train.config import TrainConfig, describe_data
from splice.train.data import DatasetSplits, collator, load_splits, with_probe


@dataclass
class RunSetup:
    """A run's model (its adapter attached, trainable), tokenizer and data."""

    model: torch.nn.Module
    tokenizer: Any
    splits: DatasetSplits


def load_run(config: TrainConfig, adapter_name: str = "default",
             check: Callable[[AdapterConfig, Any], None] | None = None, head: bool = True) -> RunSetup:
    """Seed, load the data and `config.model`, and attach `config.adapter` as `adapter_name`
    (or continue `config.init_adapter`, trainable). `check(adapter config, tokenizer)` runs just
    before the attach: where a job that cannot train some adapters refuses them. `head=False`:
    the adapter does not train the classification head (a run that keeps heads of its own)."""
    set_seed(config.seed)
    splits = load_splits(config)
    if not splits.train:
        raise SpliceError(f"no training rows in {describe_data(config.data)}")
    model, tokenizer = tasks.load_model(config, splits.label_names)
    collate = collator(config.task, tokenizer, config.max_length)
    adapter = with_probe(tasks.adapter_config(config, model) if head else config.adapter_config(), splits.train,
                         config, collate)
    if check is not None:
        check(adapter, tokenizer)
    if config.init_adapter is None:
        splice.attach(model, adapter, adapter_name)
    else:
        continue_adapter(model, config.init_adapter, adapter.train_also, adapter_name)
    return RunSetup(model, tokenizer, splits)
