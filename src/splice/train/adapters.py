"""The adapter a `Trainer` trains: checked, made the only active one, its parameters and optimizer
groups; and
continuing from a saved adapter with a new task's own heads (`TrainConfig.init_adapter`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

import splice
from splice.core.api import model_state, resolve_heads
from splice.core.errors import SpliceError
from splice.core.heads import add_head
from splice.core.host import hosts


def continue_adapter(model: torch.nn.Module, path: str | Path, train_also: Sequence[str] = (),
                     name: str = "default") -> None:
    """Attach the adapter saved in `path` as `name`, trainable, without the heads it trained:
    the modules `train_also` names get fresh copies of their own (the new task's heads, whose
    shapes may differ from the old task's: 5 classes after 2)."""
    if not Path(path).is_dir():
        raise SpliceError(f"init_adapter {os.fspath(path)!r} is not a folder (an adapter folder, such as a "
                          "run's adapter/)")
    splice.load(model, path, name, trainable=True, heads=False)
    record = model_state(model).adapters[name]
    for head in resolve_heads(model, list(train_also)):
        add_head(model, head, name)
        record.heads.append(head)
    splice.activate(model, name)


def trainable_adapter(model: torch.nn.Module, name: str, companions: Sequence[str] = ()) -> list[str]:
    """Make adapter `name` (and `companions`, trained along with it) the only active trainable
    ones, so only they train; frozen adapters that are active stay active (the trained one
    learns on top of them); the heads they train."""
    records = model_state(model).adapters
    names = [name, *companions]
    for each in names:
        if each not in records:
            raise SpliceError(f"the model has no adapter named {each!r} (attached: {list(records)}); "
                              "attach one, or load one with trainable=True")
        if not records[each].trainable:
            raise SpliceError(f"adapter {each!r} is frozen; load it with splice.load(..., trainable=True) to train it")
    frozen = [each for each in splice.active_adapters(model) if each not in names and not records[each].trainable]
    if set(splice.active_adapters(model)) != set(names + frozen):
        splice.activate(model, names + frozen)
    return [head for each in names for head in records[each].heads]


def adapter_parameters(model: torch.nn.Module, name: str,
                       companions: Sequence[str] = ()) -> dict[str, torch.nn.Parameter]:
    """What training adapter `name` (with `companions`) updates, by name in `model`: the trainable
    parameters that belong to no other adapter (its own in every host, the modules it trains in
    full, and any a method keeps outside the hosts).

    On a model where `name` is the only active adapter that is all of `splice.trainable_parameters`.
    A multi-tenant view shares its hosts with the other tenants, whose adapters train too: they
    are left out, so snapshots, clipping and saving touch this adapter alone.
    """
    own = {name, *companions}
    others = {id(p) for _, _, host in hosts(model) for owner, adapter in host.items() if owner not in own
              for p in adapter.parameters()}
    return {key: p for key, p in splice.trainable_parameters(model).items() if id(p) not in others}
