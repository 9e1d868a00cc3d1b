"""Folding an adapter into its base model: a plain model, no adapter left, same outputs."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from splice.core.adapter_state import AdapterState
from splice.core.api import unload
from splice.io import load
from splice.io.peft_format import attach_state


def fold_into_base(model: nn.Module, adapter: AdapterState | str | Path) -> nn.Module:
    """Attach `adapter` (a state, or a folder of any method with a weight form) to `model` and
    merge it in; returns the plain model, with the adapter's trained heads."""
    if isinstance(adapter, AdapterState):
        attach_state(model, adapter, "default")
    else:
        load(model, adapter)
    return unload(model)
