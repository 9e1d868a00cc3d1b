"""Gradient rules: a training batch's backward computed another way than `loss.backward()`.

A rule (`selection: {name: gast, ...}` in a training config) replaces the trainer's forward
and backward of one batch: it computes the batch's loss and adds that batch's gradients to the
`.grad` of the trained parameters itself (accumulating, as `backward` does), e.g. GAST's
per-layer mean of the per-sample gradients it keeps. The trainer then clips, checks and steps
as usual. Rules are registered by `splice.selection` on import, which `gradient_rule` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from splice.core.validation import build_named

if TYPE_CHECKING:
    from splice.train.trainer import Trainer


class GradientRule:
    """How one training batch's gradients are made; subclass and register with a name."""

    def backward(self, trainer: Trainer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the batch's gradients to `.grad` of `trainer.trained`'s parameters; return the
        batch's task loss and the total that the gradients are of (both may be detached)."""
        raise NotImplementedError


GRADIENT_RULES: dict[str, type[GradientRule]] = {}


def register_gradient_rule(name: str) -> Callable[[type[GradientRule]], type[GradientRule]]:
    """Class decorator: make a gradient rule known to training configs under `name`."""
    def register(cls: type[GradientRule]) -> type[GradientRule]:
        GRADIENT_RULES[name] = cls
        return cls
    return register


def gradient_rule(spec: Mapping[str, Any] | None) -> GradientRule | None:
    """The rule a config's `selection` mapping names (None for None); a clear error for an
    unknown name or option."""
    if spec is None:
        return None
    import splice.selection  # noqa: F401  (registers them; not imported with splice itself)

    return build_named(GRADIENT_RULES, spec, "selection", "{name: gast}")
