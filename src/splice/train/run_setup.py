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
from splice.core.errors import ConfigError, SpliceError
from splice.train import tasks
from splice.train.adapters import continue_adapter
from splice.train.config import TrainConfig, default_adapter, describe_data
from splice.train.data import DatasetSplits, check_completions_fit, collator, load_splits, with_probe


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
    if config.task == "causal_lm":
        check_completions_fit(splits, tokenizer, config.max_length)
    collate = collator(config.task, tokenizer, config.max_length)
    adapter = with_probe(tasks.adapter_config(config, model) if head else config.adapter_config(), splits.train,
                         config, collate)
    if check is not None:
        check(adapter, tokenizer)
    if config.init_adapter is None:
        splice.attach(model, adapter, adapter_name)
    else:
        continue_adapter(model, config.init_adapter, adapter.train_also, adapter_name)
        _check_continued(config, splice.adapters(model)[adapter_name])
    return RunSetup(model, tokenizer, splits)


def _check_continued(config: TrainConfig, loaded: AdapterConfig) -> None:
    """Refuse a config whose adapter mapping says another method, rank or alpha than the saved
    adapter `init_adapter` continues: the run would train the saved one and record the other.
    (Values equal to the defaults, which every config holds, are not taken as said.)"""
    defaults = default_adapter()
    said = {key: config.adapter[key] for key in ("method", "r", "alpha")
            if key in config.adapter and config.adapter[key] != defaults.get(key)}
    found = {"method": loaded.method, "r": getattr(loaded, "r", None), "alpha": getattr(loaded, "alpha", None)}
    differ = {key: (value, found[key]) for key, value in said.items() if found[key] is not None and value != found[key]}
    if differ:
        detail = ", ".join(f"{key} {ours!r} (saved: {theirs!r})" for key, (ours, theirs) in differ.items())
        raise ConfigError(f"init_adapter {config.init_adapter!r} continues the adapter as saved, but the config's "
                          f"adapter says {detail}: make them agree or leave those keys out")
