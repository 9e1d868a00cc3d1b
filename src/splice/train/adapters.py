"""The adapter a `Trainer` trains: checked, made the only active one, its optimizer groups; and
continuing from a saved adapter with a new task's own heads (`TrainConfig.init_adapter`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import splice
from splice.core.api import model_state, resolve_heads
from splice.core.errors import SpliceError
from splice.core.heads import add_head
from splice.io import native, peft_format
from splice.io.files import read_adapter
from splice.train.config import TrainConfig


def continue_adapter(model: torch.nn.Module, path: str | Path, train_also: Sequence[str] = (),
                     name: str = "default") -> None:
    """Attach the adapter saved in `path` as `name`, trainable, without the heads it trained:
    the modules `train_also` names get fresh copies of their own (the new task's heads, whose
    shapes may differ from the old task's: 5 classes after 2)."""
    if not Path(path).is_dir():
        raise SpliceError(f"init_adapter {os.fspath(path)!r} is not a folder (an adapter folder, such as a "
                          "run's adapter/)")
    config, tensors = read_adapter(path)
    if config.get("format") == native.FORMAT:
        body = {k: v for k, v in tensors.items() if not k.startswith(native.HEAD_PREFIX)}
        native.read(model, {**config, "train_also": []}, body, name, True, source=path)
    elif "peft_type" in config:
        state = peft_format.from_peft(config, tensors, source=path)
        peft_format.attach_state(model, dataclasses.replace(state, heads={}, head_modules=[]), name, trainable=True)
    else:
        splice.load(model, path, name, trainable=True)  # which says what the folder lacks
    record = model_state(model).adapters[name]
    for head in resolve_heads(model, list(train_also)):
        add_head(model, head, name)
        record.heads.append(head)
    splice.activate(model, name)


def trainable_adapter(model: torch.nn.Module, name: str) -> list[str]:
    """Make adapter `name` the only active one (so only it trains); the heads it trains."""
    records = model_state(model).adapters
    if name not in records:
        raise SpliceError(f"the model has no adapter named {name!r} (attached: {list(records)}); "
                          "attach one, or load one with trainable=True")
    if not records[name].trainable:
        raise SpliceError(f"adapter {name!r} is frozen; load it with splice.load(..., trainable=True) to train it")
    if splice.active_adapters(model) != [name]:
        splice.activate(model, name)
    return list(records[name].heads)


def param_groups(model: torch.nn.Module, heads: list[str], config: TrainConfig) -> list[dict[str, Any]]:
    """Adapter parameters at `lr`; parameters of modules trained in full at `head_lr`."""
    prefixes = tuple(f"{name}." for name in heads)
    groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
    for name, p in splice.trainable_parameters(model).items():
        groups[name.startswith(prefixes)].append(p)
    lrs = {False: config.lr, True: config.head_lr or config.lr}
    return [{"params": ps, "lr": lrs[is_head]} for is_head, ps in groups.items() if ps]
