"""Several tenants on one model object: per-tenant trained modules and per-tenant views.

A tenant may train whole modules besides its adapter (`train_also`: a classification head
with its own number of labels, an lm_head, ...). On the shared model such a module's place is
taken by `TenantModules`, which sends each tenant's contiguous rows of a multiplexed batch
through that tenant's copy (or through the original, frozen module for tenants that do not
train it) and pads the outputs to the widest (a classifier's loss reads only its own columns).

A *view* is a second model object that shares every module of the shared model except those
the tenant trains, which are its own copies, and that knows only the tenant's adapter. It is
the model the tenant would have trained alone: it evaluates, saves (`splice.save`) and
reports like one, with no copy of the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.config import AdapterConfig
from splice.core.model_state import AdapterRecord, ModelState, install_model_state


class TenantModules(nn.Module):
    """Tenants' copies of one module; `segments` [(tenant, rows), ...] is set before a forward."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.segments: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.split([n for _, n in self.segments])
        parts = [self.copies[name](chunk) if name in self.copies else self.original(chunk)
                 for (name, _), chunk in zip(self.segments, chunks, strict=True)]
        width = max(p.shape[-1] for p in parts)
        return torch.cat([F.pad(p, (0, width - p.shape[-1])) for p in parts])


def view(shared: nn.Module, name: str, config: AdapterConfig, own_modules: dict[str, nn.Module],
         model_config: object) -> nn.Module:
    """`shared` as tenant `name` sees it: its adapter only, its own copies at their paths."""
    out = _shallow(shared)
    for path, module in own_modules.items():
        parent = out
        *parents, leaf = path.split(".")
        for part in parents:  # copy the parents on the way so the shared model keeps its own
            child = _shallow(parent._modules[part])
            parent._modules[part] = child
            parent = child
        parent._modules[leaf] = module
    out.config = model_config
    if hasattr(out, "num_labels"):
        out.num_labels = model_config.num_labels
    install_model_state(out, ModelState(adapters={name: AdapterRecord(config, True, list(own_modules))}))
    return out


def _shallow(module: nn.Module) -> nn.Module:
    copy = object.__new__(type(module))
    copy.__dict__ = dict(module.__dict__)
    copy._modules = dict(module._modules)
    return copy
