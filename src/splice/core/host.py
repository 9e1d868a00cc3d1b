"""The host: holds the named adapters of one base layer and adds their output to the base's.

A host does not replace the base layer. It is attached as the child `splice` of the base module
and adds the active adapters' deltas through a forward hook, so module paths, `isinstance`
checks and the base model's own state-dict keys stay exactly as they were, and any base layer
(plain, quantized, compiled) is called through its own forward. The base output is computed
once; each active, unmerged adapter adds `delta(x)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from splice.core.errors import MergeError
from splice.core.layers import LayerInfo, is_plain_float_weight
from splice.core.targets import HOST_ATTRIBUTE, named_base_modules

if TYPE_CHECKING:
    from splice.core.routing import Routing


class Host(nn.ModuleDict):
    """Named adapters of one base layer, which of them are active, and which are merged."""

    def __init__(self, base: nn.Module, info: LayerInfo) -> None:
        super().__init__()
        self.info = info
        self.active: list[str] = []
        self.merged: list[str] = []
        self.enabled = True
        self.routing: Routing | None = None  # set by `route` for a mixed batch
        self._hook = base.register_forward_hook(self.add_to_output, with_kwargs=True)

    def add_to_output(
        self, base: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor:
        """Forward hook: base output plus every active, unmerged adapter's delta.

        Within `route`, each row gets its own adapter instead. An unmerged adapter that is
        switched off (inactive, or the host disabled) but took part of the base weight at init
        (PiSSA) gives that part back, so the output is the base's.
        """
        x = args[0] if args else next(iter(kwargs.values()))
        if self.routing is not None and self.enabled:
            return self.routing.add_to(self, x, output)
        on = [n for n in self.active if n not in self.merged] if self.enabled else []
        off = [n for n in self if n not in on and n not in self.merged]
        if not on and not off:
            return output
        for name in on:
            output = output + self[name].delta(x).to(output.dtype)
        for name in off:
            restore = self[name].initial_delta(x)
            if restore is not None:
                output = output + restore.to(output.dtype)
        return output

    def remove_hook(self) -> None:
        self._hook.remove()

    # -- merging -----------------------------------------------------------------------------

    def merge(self, base: nn.Module, name: str) -> None:
        """Fold adapter `name` into the base weight; merging twice changes nothing."""
        if name in self.merged:
            return
        self.check_merge(base, name)
        add_to_weight(base, self.info, self[name].delta_weight())
        self.merged.append(name)

    def check_merge(self, base: nn.Module, name: str) -> None:
        """Raise the MergeError that `merge` would raise, without changing anything."""
        if not self[name].has_weight_form():
            raise MergeError(
                f"adapter {name!r} ({type(self[name]).__name__}) has no equivalent weight change "
                "and cannot be merged"
            )
        check_mergeable_weight(base)

    def unmerge(self, base: nn.Module, name: str) -> None:
        if name not in self.merged:
            return
        add_to_weight(base, self.info, self[name].delta_weight(), sign=-1.0)
        self.merged.remove(name)


def add_to_weight(base: nn.Module, info: LayerInfo, delta: torch.Tensor, sign: float = 1.0) -> None:
    """weight += sign * delta, accumulated in fp32 so bf16/fp16 weights round only once.

    Refuses packed quantized weights (4-bit/8-bit), which cannot represent the sum exactly, and
    refuses a result that is not finite rather than corrupting the model.
    """
    check_mergeable_weight(base)
    weight = base.weight
    delta = delta.T if info.transposed else delta
    if delta.shape != weight.shape:
        raise MergeError(f"delta weight {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    with torch.no_grad():
        delta = delta.to(weight.device)
        if weight.dtype in (torch.float32, torch.float64):
            if not torch.isfinite(delta).all():
                raise MergeError(f"the delta for {type(base).__name__} holds inf/nan; weights unchanged")
            weight.add_(delta.to(weight.dtype), alpha=sign)
            return
        merged = weight.float() + sign * delta.float()
        if not torch.isfinite(merged.to(weight.dtype)).all():
            raise MergeError(f"merging into {type(base).__name__} overflows {weight.dtype}; weights unchanged")
        weight.copy_(merged.to(weight.dtype))


def check_mergeable_weight(base: nn.Module) -> None:
    weight = base.weight
    if not is_plain_float_weight(weight):
        raise MergeError(
            f"cannot merge into a {type(weight).__name__} weight of dtype {weight.dtype} "
            f"({type(base).__name__}); a quantized weight cannot represent the merged sum. "
            "Dequantize the model first, or keep the adapter unmerged."
        )


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
