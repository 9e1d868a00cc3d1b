"""What the current batch looks like, for adapters that edit chosen token positions or choose
per example (ReFT's "first f and last l prompt tokens", input-adaptive ranks).

A host only sees one layer's input tensor. Adapters that need more (the attention mask, the
token ids, whether this forward is a decoding step whose prompt was already seen) read it here:
while a model carrying such an adapter runs its forward, its recorder's `current()` gives the
batch that model was called with (an adapter asks through `Adapter.batch_inputs()`, which reads
the recorder of the model it is attached to, never another model's). Values an adapter derives
from it once per forward (a position mask) go in `memo`; auxiliary losses (a router's budget
penalty) go in `aux_losses`, which the trainer adds to the task loss via `auxiliary_loss(model)`.

After the forward returns, that model's last batch stays readable: activation checkpointing
re-runs blocks during backward, outside the model's forward, and must see the same inputs.

A cached decoding step is told from the shapes transformers guarantees, not from the keyword
arguments a release happens to pass (4.x passes `past_key_values` and `cache_position`, 5.x a
`cache` and no positions): its input holds only the new tokens while the 2-D attention mask
covers the cached ones too. Without such a mask, a non-empty cache object among the arguments
(whatever its name) or a `cache_position` past 0 says the same. Inside `model.generate` without
a cache, every step re-runs the whole sequence; the recorder wraps `generate` so that the first
forward there fixes the prompt's width, and later steps see only those columns as the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The batch of the forward running in this context (thread or asyncio task), and whose it is.
_CURRENT: ContextVar[tuple[InputsRecorder, BatchInputs] | None] = ContextVar("splice_batch_inputs", default=None)
# Within `route`, the rows of the batch the adapter being called sees (it runs on those only).
_ROUTED_ROWS: ContextVar[torch.Tensor | None] = ContextVar("splice_routed_rows", default=None)


@contextmanager
def routed_rows(rows: torch.Tensor) -> Iterator[None]:
    """Within the block, adapters see only these rows of the batch (`BatchInputs.mask_for`)."""
    token = _ROUTED_ROWS.set(rows)
    try:
        yield
    finally:
        _ROUTED_ROWS.reset(token)


@dataclass
class BatchInputs:
    """The batch a model was called with, as the adapters inside it need it."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    decoding: bool  # a cached decoding step: the prompt's positions were processed before
    prompt_width: int | None = None  # inside generate without a cache: the prompt's columns (the rest was generated)
    memo: dict[Any, Any] = field(default_factory=dict)
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    aux_owners: list[str | None] = field(default_factory=list)  # the adapter that added each loss

    @property
    def rows(self) -> int | None:
        for tensor in (self.input_ids, self.attention_mask):
            if tensor is not None:
                return tensor.shape[0]
        return None

    def add_aux_loss(self, loss: torch.Tensor, owner: str | None) -> None:
        """An auxiliary loss of adapter `owner` (its name), which `auxiliary_loss` adds up."""
        self.aux_losses.append(loss)
        self.aux_owners.append(owner)

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The attention mask [rows, seq] of a layer input x [rows, seq, features]: the batch's,
        or within `route` that of the rows x holds; None where it does not fit x (a cached
        decoding step, a layer that reshapes its input)."""
        mask = self.attention_mask
        if mask is None or self.decoding or x.dim() != 3:
            return None
        rows = _ROUTED_ROWS.get()
        if rows is not None and rows.shape[0] != mask.shape[0]:
            mask = mask.index_select(0, rows.to(mask.device))
        return mask if tuple(mask.shape) == tuple(x.shape[:2]) else None

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
                if self.prompt_width is not None:
                    prompt = prompt & (torch.arange(prompt.shape[1], device=device) < self.prompt_width)
                self.memo["prompt_mask"] = prompt
        return self.memo["prompt_mask"]


class InputsRecorder:
    """Forward hooks on a model that publish each call's `BatchInputs` while it runs, and
    `model.generate` wrapped so that its steps without a cache know the prompt's width."""

    def __init__(self, model: nn.Module) -> None:
        self.last: BatchInputs | None = None
        self._tokens: list[Any] = []
        self.handles = [
            model.register_forward_pre_hook(self.enter, with_kwargs=True),
            model.register_forward_hook(self.leave, always_call=True),
        ]
        self.generate: _Generate | None = None
        if callable(getattr(type(model), "generate", None)):
            self.generate = _Generate(model, self, model.__dict__.get("generate"))
            model.generate = self.generate

    def enter(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None
        mask = kwargs.get("attention_mask")
        width = _new_tokens(ids, kwargs.get("inputs_embeds"))
        inputs = BatchInputs(
            input_ids=ids,
            attention_mask=mask,
            labels=kwargs.get("labels"),
            decoding=_is_decoding_step(width, mask, kwargs),
        )
        generation = _GENERATION.get()
        if generation is not None and generation.recorder is self and not self._tokens and not inputs.decoding:
            if generation.prompt_width is None:  # generate's first forward: the prompt
                generation.prompt_width = width
            elif width is not None and generation.prompt_width is not None and width > generation.prompt_width:
                inputs.prompt_width = generation.prompt_width  # a step without cache: prompt + generated tokens
        if not self._tokens:  # the outermost call is the batch; a nested call (a scorer's) is not kept
            self.last = inputs
        self._tokens.append(_CURRENT.set((self, inputs)))

    def leave(self, model: nn.Module, args: tuple, output: Any) -> None:
        if self._tokens:
            _CURRENT.reset(self._tokens.pop())

    def current(self) -> BatchInputs | None:
        """The batch of this model's forward now running, else its last one (see the module doc)."""
        running = _CURRENT.get()
        return running[1] if running is not None and running[0] is self else self.last

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.generate is not None:
            self.generate.restore()
            self.generate = None
        self.last = None


@dataclass
class _Generation:
    recorder: InputsRecorder
    prompt_width: int | None = None  # set by the first forward inside generate


_GENERATION: ContextVar[_Generation | None] = ContextVar("splice_generation", default=None)


class _Generate:
    """`model.generate` while a recorder is attached: the same call, inside a generation scope.

    Set as an instance attribute (the class's method stays untouched) and holding the model,
    not a bound method, so that `copy.deepcopy` and pickling of the model carry it correctly.
    """

    def __init__(self, model: nn.Module, recorder: InputsRecorder, inner: Any) -> None:
        self.model, self.recorder, self.inner = model, recorder, inner  # inner: an instance attribute it replaced
        self.__doc__ = getattr(type(model).generate, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = _GENERATION.set(_Generation(self.recorder))
        try:
            if self.inner is not None:
                return self.inner(*args, **kwargs)
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            _GENERATION.reset(token)

    def restore(self) -> None:
        if self.model.__dict__.get("generate") is self:
            if self.inner is not None:
                self.model.generate = self.inner
            else:
                del self.model.generate


def batch_auxiliary_loss(inputs: BatchInputs | None, owner: str | None = None) -> torch.Tensor | None:
    """Sum of the auxiliary losses adapters (or adapter `owner` alone) added during a forward, or None."""
    if inputs is None:
        return None
    losses = [loss.reshape(()) for loss, who in zip(inputs.aux_losses, inputs.aux_owners, strict=True)
              if owner is None or who == owner]
    return torch.stack(losses).sum() if losses else None


def _new_tokens(ids: torch.Tensor | None, embeds: Any) -> int | None:
    """How many positions this forward computes: the width of its token ids or embeddings."""
    if ids is not None and ids.dim() == 2:
        return ids.shape[1]
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[1]
    return None


def _is_decoding_step(new_tokens: int | None, attention_mask: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this forward continues a sequence whose earlier positions are in a cache.

    Decided from what every transformers release guarantees rather than from the names of the
    keyword arguments (4.x: `past_key_values`, `cache_position`; 5.x: `cache`): in a cached step
    the 2-D attention mask covers the cached positions and the new ones, the input only the new
    ones. Without a 2-D mask (none given, or a 4-D one built for a static cache) a cache object
    that already holds positions, under any argument name, or a `cache_position` past 0 decides.
    """
    if (new_tokens is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and attention_mask.shape[1] > new_tokens):
        return True
    for name, value in kwargs.items():
        if _cached_length(name, value):
            return True
    position = kwargs.get("cache_position")
    return isinstance(position, torch.Tensor) and position.numel() > 0 and int(position.reshape(-1)[0]) > 0


def _cached_length(name: str, value: Any) -> int:
    """Positions a cache argument already holds; 0 for anything that is not a cache."""
    length = getattr(value, "get_seq_length", None)
    if callable(length):  # a transformers Cache (DynamicCache, StaticCache, EncoderDecoderCache, ...)
        try:
            return int(length())
        except (TypeError, ValueError, IndexError, AttributeError):
            return 0
    if name in ("past_key_values", "cache", "past") and isinstance(value, (tuple, list)) and value:
        first = value[0]  # the legacy format: per layer (key, value), each [batch, heads, seq, dim]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor) and first[0].dim() >= 2:
            return first[0].shape[-2]
    return 0
