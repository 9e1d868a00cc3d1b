"""The part of every adapter config that says *where* it goes, and the adapter protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from splice.core.errors import SpliceError
from splice.core.inputs import BatchInputs, InputsRecorder
from splice.core.layers import LayerInfo
from splice.core.lowrank import LowRank
from splice.core.validation import check_config_fields

# True while `load` builds adapters whose tensors a file is about to fill (`filled_from_file`).
_FILLED_FROM_FILE: ContextVar[bool] = ContextVar("splice_filled_from_file", default=False)


@contextmanager
def filled_from_file() -> Iterator[None]:
    """Within the block, adapters are built only to receive a file's tensors: an init that costs
    (an SVD of the base weight) may leave zeros of the right shapes instead (`will_be_filled`)."""
    token = _FILLED_FROM_FILE.set(True)
    try:
        yield
    finally:
        _FILLED_FROM_FILE.reset(token)


def will_be_filled() -> bool:
    """Whether the adapter being built will get its tensors from a file (see `filled_from_file`)."""
    return _FILLED_FROM_FILE.get()


Targets = str | list[str] | None
Layers = int | list[int] | range | None


@dataclass(kw_only=True)
class AdapterConfig:
    """Where an adapter is attached; subclasses add the method's hyperparameters.

    Attributes:
        targets: which modules get an adapter, with HF PEFT's rules so configs carry over:
            a list entry matches a module whose dotted name equals it or ends with ".entry";
            a string is a regex that must match the whole name; "all-linear" is every Linear
            and Conv1D except the output layer, by PEFT's rule: a transformers model's LM head,
            or a `*ForSequenceClassification` model's `classifier`/`score` head (PEFT with
            task_type SEQ_CLS); a plain module keeps every Linear (PEFT has no head to leave
            out there either). None picks the architecture's usual default
            (query/value for BERT, q_proj/v_proj for Llama, c_attn for GPT-2).
        exclude: modules never targeted, same syntax, applied first.
        layers: restrict to these layer indices (PEFT's `layers_to_transform`); applies to regex
            targets too. The index is read as PEFT does: the first number in the module path
            that follows a segment other than the first (`model.layers.3.mlp` is 3, and
            `encoder.block.3.layer.1.SelfAttention.q` is 3), or with `layers_pattern` the first
            number after a segment of that name.
        layers_pattern: segment name(s) that precede the layer index (PEFT's `layers_pattern`),
            e.g. "layer" to take M in `encoder.block.N.layer.M`.
        train_also: modules trained in full alongside the adapter and saved with it
            (PEFT's `modules_to_save`), typically a freshly initialised classification head.
    """

    method: ClassVar[str] = ""
    # "layer": the adapter changes what a Linear/Conv/Embedding computes (targets select them).
    # "block": it edits the hidden states a whole block outputs; targets=None selects the
    # model's transformer layers (`layers` picks among them), or name modules explicitly.
    site: ClassVar[Literal["layer", "block"]] = "layer"
    # True when the adapter reads the batch's inputs (token positions, attention mask) through
    # `Adapter.batch_inputs()`; attach then records them at every forward of the model.
    reads_inputs: ClassVar[bool] = False
    # True when `placed` needs probe batches (field `probe`); a trainer passes a few of its own.
    needs_probe: ClassVar[bool] = False
    # True when all an adapter that `reads_inputs` reads is per row (the attention mask of the
    # rows it is given, `BatchInputs.mask_for`): it then runs on any subset of a batch's rows as
    # on those rows alone (`route`, multiplexed packed passes).
    row_local: ClassVar[bool] = False
    targets: Targets = None
    exclude: Targets = None
    layers: Layers = None
    layers_pattern: str | list[str] | None = None
    train_also: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        elif isinstance(self.layers, range):
            self.layers = list(self.layers)
        if isinstance(self.train_also, str):
            self.train_also = [self.train_also]
        self.train_also = list(self.train_also)
        if isinstance(self.targets, list) and not self.targets:
            raise SpliceError("targets is an empty list; give module names, a regex or 'all-linear'")
        if self.layers_pattern is not None and self.layers is None:
            raise SpliceError(f"layers_pattern {self.layers_pattern!r} says where a module name holds its layer index, "
                              "for `layers` to pick layers; give layers too, or leave layers_pattern out (as HF PEFT "
                              "requires)")
        check_config_fields(self)  # every method's fields against their types: r=2.5 or rslora="false" fail here

    def build(self, info: LayerInfo, module_name: str, base: nn.Module) -> Adapter:
        """Create this method's adapter for one base layer."""
        raise NotImplementedError

    def takes_from_base(self) -> bool:
        """Whether the adapters built take part of the base weight at init (PiSSA, GOAT), which
        `attach` takes out and `detach` puts back (`Adapter.initial_delta_weight`)."""
        return False

    def placed(self, model: nn.Module) -> AdapterConfig:
        """The config `attach` builds: this one, or for a config that chooses its own sites from
        the model (DomLoRA), the config of what it chose, with explicit targets."""
        return self

    def on_attach(self, model: nn.Module, name: str) -> Callable[[], None] | None:
        """Model-level set-up a method needs beyond its per-layer adapters (a hook that scores
        each batch, say), run after `attach` built them; returns what undoes it on `detach`."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from their defaults, plus the method name."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                out[f.name] = list(value) if isinstance(value, (tuple, range)) else value
        return out

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


class Adapter(nn.Module):
    """One method's trainable change to one base layer.

    `delta(x)` is the additive change of the base layer's output for input `x`. A form that
    rescales or edits what the base layer computed (DoRA, representation interventions) sets
    `uses_base_output = True` and is called as `delta(x, base_output)` instead, with the base
    layer's own output (bias included), so it never recomputes it.

    Forms that have an equivalent weight change return it from `delta_weight()` in the canonical
    layout of `LayerInfo` (and a bias change, if any, from `delta_bias()`); merging, export and
    spectra are built on it. `initial_delta_weight()` is what the adapter took out of the base
    weight when it was created (PiSSA-style inits), so that detaching can put it back;
    `initial_delta(x)` is the same change as an output, which the host adds while the adapter is
    switched off, so that "off" always means the base model's output.
    """

    uses_base_output: ClassVar[bool] = False
    # The recorder of the model this adapter is attached to, set by `attach` for forms whose
    # config `reads_inputs`; see `batch_inputs`.
    inputs_recorder: InputsRecorder | None = None
    # True when `delta_weight()` reads the base weight (DoRA's norms): after merging, the base
    # weight has changed, so the host keeps the merged delta to take exactly that out again.
    delta_weight_reads_base: ClassVar[bool] = False
    # Why a form without a weight change cannot be merged, for the refusal's message.
    merge_refusal: ClassVar[str] = ""
    # The adapter's name on the model it is attached to (set by `attach`): whose auxiliary losses are whose.
    owner: str | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_inputs(self) -> BatchInputs | None:
        """The batch of the forward of the model this adapter is attached to (its last one
        outside a forward, as activation checkpointing needs); None if it never ran or the
        adapter is not attached to a model."""
        return self.inputs_recorder.current() if self.inputs_recorder is not None else None

    def delta_weight(self) -> torch.Tensor | None:
        return None

    def delta_bias(self) -> torch.Tensor | None:
        """The change of the base layer's bias that merging adds with `delta_weight()`, if any."""
        return None

    def has_weight_form(self) -> bool:
        """Whether `delta_weight()` exists for this form, known without computing it."""
        return type(self).delta_weight is not Adapter.delta_weight

    def initial_delta_weight(self) -> torch.Tensor | None:
        return None

    def initial_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def rebase(self, base: nn.Module) -> None:
        """The host's base layer was replaced by an equivalent one (dequantized, or quantized
        again): an adapter that keeps a reference to the base layer follows it here."""

    def low_rank_factors(self) -> LowRank | None:
        """On a Linear host, `delta(x) - initial_delta(x)` as `s * B A dropout(x)`, if the form
        has that shape. Such adapters share one grouped matmul in mixed batches (`route`)."""
        return None

    def trained_factors(self) -> LowRank | None:
        """The trained parameters A [r, in] and B [out, r] of a form whose output depends on them
        only through `scaling * B A` on a Linear host (beside what it keeps fixed or trains
        otherwise: PiSSA's offset, a bias, DoRA's magnitude), so that dL/dA = s Bᵀ G for the
        gradient G of that product: what LoFT steps. Default: the low-rank form."""
        return self.low_rank_factors()


def adapter_delta(adapter: Adapter, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
    """`adapter.delta` called the way the adapter asks for (with the base output or without)."""
    return adapter.delta(x, base_output) if adapter.uses_base_output else adapter.delta(x)
