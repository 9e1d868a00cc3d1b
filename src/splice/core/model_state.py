"""What splice remembers about a model: its adapters' configs and what each trains in full.

It lives in `model.__dict__["_splice"]`, not as a module attribute, so that it never appears in
the model's modules, parameters or state dict. A second model object that shares the first's
modules (a multi-tenant view) gets its own with `install_model_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from splice.core.config import AdapterConfig

if TYPE_CHECKING:
    from splice.core.inputs import InputsRecorder

_KEY = "_splice"


@dataclass
class AdapterRecord:
    config: AdapterConfig
    trainable: bool = True
    heads: list[str] = field(default_factory=list)  # paths of the modules it trains in full (its own copies)
    undo: Callable[[], None] | None = None  # what `config.on_attach` set up on the model


@dataclass
class ModelState:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    checkpoint_inputs: Any = None  # api.CheckpointInputGrads while a checkpointable model has adapters
    inputs_recorder: InputsRecorder | None = None  # while an attached adapter reads the batch's inputs


def model_state(model: nn.Module) -> ModelState:
    """The model's splice bookkeeping, created empty on first use."""
    state = model.__dict__.get(_KEY)
    if state is None:
        state = install_model_state(model, ModelState())
    return state


def install_model_state(model: nn.Module, state: ModelState) -> ModelState:
    """Give `model` this bookkeeping (e.g. a view of a shared model that knows one adapter only)."""
    model.__dict__[_KEY] = state
    return state


def drop_model_state(model: nn.Module) -> None:
    model.__dict__.pop(_KEY, None)
