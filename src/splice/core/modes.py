"""Train/eval modes kept across a block: `model.train(flag)` sets every submodule alike, so code
that switches a model's mode for a while (an audit, an attack, a patch's training) restores each
submodule's own mode instead (a BatchNorm a user keeps in eval mode inside a training model
stays so)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode within the block; after it every submodule in the mode it had, not
    only the top one (a BatchNorm kept in eval mode inside a training model stays so)."""
    with modes_kept(model):
        model.eval()
        yield model


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model's modes may change; after it each submodule's train/eval mode
    is what it was before (`model.train(flag)` would set every submodule alike)."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
