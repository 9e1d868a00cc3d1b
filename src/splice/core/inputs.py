"""What the current batch looks like, for adapters that edit chosen token positions or choose
per example (ReFT's "first f and last l prompt tokens", input-adaptive ranks).

A host only sees one layer's input tensor. Adapters that need more (the attention mask, the
token ids, whether this forward is a decoding step whose prompt was already seen) read it here:
while a model carrying such an adapter runs its forward, `current_inputs()` gives the batch that
model was called with. Values an adapter derives from it once per forward (a position mask) go
in `memo`; auxiliary losses (a router's budget penalty) go in `aux_losses`, which the trainer
adds to the task loss via `auxiliary_loss(model)`.

After the forward returns, the last batch stays readable: activation checkpointing re-runs
blocks during backward, outside the model's forward, and must see the same inputs.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_CURRENT: ContextVar[BatchInputs | None] = ContextVar("splice_batch_inputs", default=None)


@dataclass
class BatchInputs:
    """The batch a model was called with, as the adapters inside it need it."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    decoding: bool  # a cached decoding step: the prompt's positions were processed before
    memo: dict[Any, Any] = field(default_factory=dict)
    aux_losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int | None:
        for tensor in (self.input_ids, self.attention_mask):
            if tensor is not None:
                return tensor.shape[0]
        return None

    def prompt_mask(self) -> torch.Tensor | None:
        """[rows, seq] True where a token belongs to the prompt: attended to and, when the
        labels are per token (causal-LM training), not supervised (label -100)."""
        if "prompt_mask" not in self.memo:
            ids, mask = self.input_ids, self.attention_mask
            shape = ids.shape if ids is not None else (mask.shape if mask is not None else None)
            if shape is None or len(shape) != 2:
                self.memo["prompt_mask"] = None
            else:
                device = (ids if ids is not None else mask).device
                prompt = mask.bool() if mask is not None else torch.ones(shape, dtype=torch.bool, device=device)
                if self.labels is not None and self.labels.shape == shape:
                    prompt = prompt & (self.labels == -100)
                self.memo["prompt_mask"] = prompt
        return self.memo["prompt_mask"]


class InputsRecorder:
    """Forward hooks on a model that publish each call's `BatchInputs` while it runs."""

    def __init__(self, model: nn.Module) -> None:
        self.last: BatchInputs | None = None
        self._tokens: list[Any] = []
        self.handles = [
            model.register_forward_pre_hook(self.enter, with_kwargs=True),
            model.register_forward_hook(self.leave, always_call=True),
        ]

    def enter(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        inputs = BatchInputs(
            input_ids=ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None,
            attention_mask=kwargs.get("attention_mask"),
            labels=kwargs.get("labels"),
            decoding=_is_decoding_step(kwargs),
        )
        if not self._tokens:  # the outermost call is the batch; a nested call (a scorer's) is not kept
            self.last = _LAST[0] = inputs
        self._tokens.append(_CURRENT.set(inputs))

    def leave(self, model: nn.Module, args: tuple, output: Any) -> None:
        if self._tokens:
            _CURRENT.reset(self._tokens.pop())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if _LAST[0] is self.last:
            _LAST[0] = None


_LAST: list[BatchInputs | None] = [None]  # the last batch any recorder saw; see the module doc


def current_inputs() -> BatchInputs | None:
    """The batch of the model forward now running, else the last one recorded (see module doc)."""
    inputs = _CURRENT.get()
    return inputs if inputs is not None else _LAST[0]


def batch_auxiliary_loss(inputs: BatchInputs | None) -> torch.Tensor | None:
    """Sum of the auxiliary losses adapters added during a forward, or None."""
    if inputs is None or not inputs.aux_losses:
        return None
    return torch.stack([loss.reshape(()) for loss in inputs.aux_losses]).sum()


def _is_decoding_step(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("past_key_values")
    if cache is not None:
        length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else (len(cache) and cache[0][0].shape[-2])
        if length:
            return True
    position = kwargs.get("cache_position")
    return isinstance(position, torch.Tensor) and position.numel() > 0 and int(position.reshape(-1)[0]) > 0
