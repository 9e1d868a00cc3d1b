"""The host: holds the named adapters of one base layer and adds their output to the base's.

A host does not replace the base layer. It is attached as the child `splice` of the base module
and adds the active adapters' deltas through a forward hook, so module paths, `isinstance`
checks and the base model's own state-dict keys stay exactly as they were, and any base layer
(plain, quantized, compiled) is called through its own forward. The base output is computed
once; each active, unmerged adapter adds `delta(x)`. Without autograd (inference), adapters of
LoRA's shape on a Linear host are added into the base output in place instead, fused
(`Host.add_in_place`): no full-size temporary per adapter and no separate scaling pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from splice.core.config import adapter_delta
from splice.core.errors import MergeError
from splice.core.layers import LayerInfo, is_plain_float_weight
from splice.core.lowrank import LowRankForward, add_low_rank_
from splice.core.route_context import routing_of
from splice.core.targets import HOST_ATTRIBUTE, named_base_modules


class Host(nn.ModuleDict):
    """Named adapters of one base layer, which of them are active, and which are merged."""

    splice_internal = True  # not part of the base model (core.targets skips it)

    def __init__(self, base: nn.Module, info: LayerInfo) -> None:
        super().__init__()
        self.info = info
        self.active: list[str] = []
        self.merged: list[str] = []
        self.enabled = True
        # merged (delta weight, delta bias) of adapters whose delta depends on the base weight
        self._merged_deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # what restores the base weight bit for bit when an adapter gives back its initial delta
        self._restores: dict[str, ExactRestore] = {}
        self._hook = base.register_forward_hook(self.add_to_output, with_kwargs=True)

    def add_to_output(
        self, base: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor:
        """Forward hook: base output plus every active, unmerged adapter's delta.

        Within `route`, each row gets its own adapter instead. An unmerged adapter that is
        switched off (inactive, or the host disabled) but took part of the base weight at init
        (PiSSA) gives that part back, so the output is the base's.
        """
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        if isinstance(output, tuple):  # a block of older transformers: (hidden_states, extras...)
            return (self.add_to_output(base, (x,), {}, output[0]), *output[1:])
        routing = routing_of(self) if self.enabled else None
        if routing is not None:
            return routing.add_to(self, x, output)
        on = [n for n in self.active if n not in self.merged] if self.enabled else []
        off = [n for n in self if n not in on and n not in self.merged]
        if not on and not off:
            return output
        if not torch.is_grad_enabled() and self.info.kind == "linear" and self.add_in_place(x, output, on):
            return self.give_back(x, output, [*on, *off])
        base_output = output
        for name in on:
            output = output + adapter_delta(self[name], x, base_output).to(output.dtype)
        return self.give_back(x, output, off)

    def add_in_place(self, x: torch.Tensor, output: torch.Tensor, names: list[str]) -> bool:
        """Without autograd, add the named adapters' `delta - initial_delta` into `output` in place,
        fused (`add_low_rank_`), and say whether it did; it does nothing unless every one of them
        computes its forward in LoRA's shape (`LowRankForward` with `low_rank_factors`) and has no
        dropout now, and the output is contiguous.

        The caller then gives back every unmerged adapter's initial delta (theirs too), which
        makes the sum `delta` for these and the base's output for the others, as the reference
        path. Results agree with it to float rounding, not bit for bit (see core.lowrank).
        """
        factors = []
        for name in names:
            adapter = self[name]
            found = adapter.low_rank_factors() if isinstance(adapter, LowRankForward) else None
            if found is None or (found.dropout > 0 and adapter.training):
                return False
            factors.append(found)
        if not output.is_contiguous():
            return False
        for found in factors:
            add_low_rank_(output, x, found)
        return True

    def give_back(self, x: torch.Tensor, output: torch.Tensor, names: list[str]) -> torch.Tensor:
        """`output` plus what the named adapters took out of the base weight at init (PiSSA), so
        that an adapter switched off (or not routed to a row) leaves the base's output there."""
        for name in names:
            restore = self[name].initial_delta(x)
            if restore is not None:
                output = output + restore.to(output.dtype)
        return output

    def take_initial(self, base: nn.Module, name: str) -> None:
        """Take adapter `name`'s initial delta (PiSSA's, GOAT's) out of the base weight, keeping
        what `give_initial` needs to put the weight back bit for bit."""
        initial = self[name].initial_delta_weight()
        if initial is None:
            return
        check_mergeable_weight(base)  # `attach` refuses this earlier with the init's reason
        weight = base.weight.detach()
        change = initial.T if self.info.transposed else initial
        taken = added(weight, change, -1.0)
        restore = ExactRestore.of(weight, added(taken, change, 1.0))
        add_to_weight(base, self.info, initial, sign=-1.0, result=taken)
        self._restores[name] = restore

    def give_initial(self, base: nn.Module, name: str) -> None:
        """Put back what `take_initial` took out for adapter `name`: the weight as it was, bit for
        bit, where nothing else changed it since (elsewhere, to float rounding)."""
        restore = self._restores.pop(name, None)
        if restore is None:
            return
        add_to_weight(base, self.info, self[name].initial_delta_weight())
        restore.apply(base.weight)

    def unmerged(self) -> list[str]:
        return [name for name in self if name not in self.merged]

    def remove_hook(self) -> None:
        self._hook.remove()

    def move_to(self, old: nn.Module, new: nn.Module) -> None:
        """Serve `new` instead of `old` (a base layer replaced by its dequantized or quantized copy,
        of the same shape): the hook and the `splice` child go along, adapters untouched."""
        self.remove_hook()
        delattr(old, HOST_ATTRIBUTE)
        setattr(new, HOST_ATTRIBUTE, self)
        self._hook = new.register_forward_hook(self.add_to_output, with_kwargs=True)
        for adapter in self.values():
            adapter.rebase(new)

    # -- merging -----------------------------------------------------------------------------

    def merge(self, base: nn.Module, name: str) -> None:
        """Fold adapter `name` into the base weight; merging twice changes nothing."""
        if name in self.merged:
            return
        self.check_merge(base, name)
        adapter = self[name]
        with torch.no_grad():
            delta, bias = adapter.delta_weight(), adapter.delta_bias()
        add_to_weight(base, self.info, delta, bias=bias)
        if adapter.delta_weight_reads_base:
            self._merged_deltas[name] = (delta, bias)
        self.merged.append(name)

    def check_merge(self, base: nn.Module, name: str) -> None:
        """Raise the MergeError that `merge` would raise, without changing anything."""
        if not self[name].has_weight_form():
            raise MergeError(
                f"adapter {name!r} ({type(self[name]).__name__}) has no equivalent weight change "
                f"and cannot be merged{': ' + self[name].merge_refusal if self[name].merge_refusal else ''}"
            )
        check_mergeable_weight(base)
        with torch.no_grad():
            check_bias_change(base, self[name].delta_bias(), f"adapter {name!r}")

    def unmerge(self, base: nn.Module, name: str) -> None:
        if name not in self.merged:
            return
        adapter = self[name]
        with torch.no_grad():
            delta, bias = self._merged_deltas.pop(name, None) or (adapter.delta_weight(), adapter.delta_bias())
        add_to_weight(base, self.info, delta, sign=-1.0, bias=bias)
        self.merged.remove(name)


class ExactRestore(NamedTuple):
    """Where adding an initial delta back to the weight it was taken from does not round to the
    original value (a few percent of the entries): their flat indices, the value the add-back
    gives there, and the original value."""

    index: torch.Tensor
    rounded: torch.Tensor
    original: torch.Tensor

    @classmethod
    def of(cls, original: torch.Tensor, given_back: torch.Tensor) -> ExactRestore:
        index = (given_back != original).flatten().nonzero().flatten()
        index = index.to(torch.int32) if original.numel() < 2**31 else index
        return cls(index, given_back.flatten()[index].clone(), original.flatten()[index].clone())

    def apply(self, weight: torch.Tensor) -> None:
        """Set the original value where the weight holds exactly what the add-back gave; nothing
        when the weight changed dtype since (`model.to(bfloat16)`: the originals no longer fit)."""
        if weight.dtype != self.original.dtype:
            return
        index = self.index.to(weight.device, torch.long)
        with torch.no_grad():
            flat = weight.view(-1)
            unchanged = flat[index] == self.rounded.to(weight.device)
            flat[index[unchanged]] = self.original.to(weight.device)[unchanged]


def added(target: torch.Tensor, change: torch.Tensor, sign: float) -> torch.Tensor:
    """target + sign * change in target's dtype, accumulated in fp32 for narrower dtypes."""
    change = change.detach().to(target.device)
    if target.dtype in (torch.float32, torch.float64):
        return target.detach() + sign * change.to(target.dtype)
    return (target.detach().float() + sign * change.float()).to(target.dtype)


def add_to_weight(base: nn.Module, info: LayerInfo, delta: torch.Tensor, sign: float = 1.0,
                  bias: torch.Tensor | None = None, result: torch.Tensor | None = None) -> None:
    """weight += sign * delta (and bias += sign * bias delta), accumulated in fp32 so bf16/fp16
    weights round only once; `result`, when given, is that new weight already computed (`added`).

    Refuses packed quantized weights (4-bit/8-bit), which cannot represent the sum exactly, a
    bias change for a layer without a bias, and a result that is not finite, rather than
    corrupting the model; nothing changes when it refuses.
    """
    check_mergeable_weight(base)
    check_bias_change(base, bias, "the adapter")
    changes = [(base.weight, delta.T if info.transposed else delta, "weight")]
    if bias is not None and base.bias is not None:
        changes.append((base.bias, bias, "bias"))
    updated = []
    for target, change, what in changes:
        if change.shape != target.shape:
            raise MergeError(f"delta {what} {tuple(change.shape)} does not fit {what} {tuple(target.shape)}")
        merged = result if result is not None and what == "weight" else added(target, change, sign)
        if not torch.isfinite(merged).all():
            raise MergeError(f"merging into {type(base).__name__} gives inf/nan in its {what} "
                             f"({target.dtype}); weights unchanged")
        updated.append((target, merged))
    with torch.no_grad():
        for target, merged in updated:
            target.copy_(merged)


def check_bias_change(base: nn.Module, bias: torch.Tensor | None, who: str) -> None:
    """A non-zero bias change cannot be merged into a layer without a bias."""
    if getattr(base, "bias", None) is None and bias is not None and torch.count_nonzero(bias):
        raise MergeError(f"{who} changes the bias, but this {type(base).__name__} has none; "
                         "keep the adapter unmerged (or give the layer a zero bias first)")


def check_mergeable_weight(base: nn.Module) -> None:
    weight = base.weight
    if not is_plain_float_weight(weight):
        raise MergeError(
            f"cannot merge into a {type(weight).__name__} weight of dtype {weight.dtype} "
            f"({type(base).__name__}); a quantized weight cannot represent the merged sum. Use "
            "splice.unload(model, dequantize=True) (merges exactly into a full-precision copy of the base), "
            "or keep the adapter unmerged."
        )


@contextmanager
def initial_deltas_given_back(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block, what adapter `name` took out of the base weights at init is back in
    them, bit for bit; after it, the adapter's initial deltas (changed in the block, say by
    loading a file's) are taken out again."""
    taken = [(base, host) for _, base, host in hosts(model) if name in host._restores]
    for base, host in taken:
        host.give_initial(base, name)
    try:
        yield
    finally:
        for base, host in taken:
            host.take_initial(base, name)


def host_of(module: nn.Module) -> Host | None:
    host = getattr(module, HOST_ATTRIBUTE, None)
    return host if isinstance(host, Host) else None


def hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module, Host]]:
    """(module name, base module, host) for every base layer that carries adapters."""
    for name, module in named_base_modules(model):
        host = host_of(module)
        if host is not None:
            yield name, module, host


def ensure_host(base: nn.Module, info: LayerInfo) -> Host:
    host = host_of(base)
    if host is None:
        host = Host(base, info)
        setattr(base, HOST_ATTRIBUTE, host)
    return host


def remove_host(base: nn.Module) -> None:
    host = host_of(base)
    if host is not None:
        host.remove_hook()
        delattr(base, HOST_ATTRIBUTE)
