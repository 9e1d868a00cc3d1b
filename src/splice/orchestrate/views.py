"""Several tenants on one model object: joining it, per-tenant trained modules, per-tenant views.

A tenant may train whole modules besides its adapter (`train_also`: a classification head
with its own number of labels, an lm_head, ...). On the shared model such a module's place is
taken by `TenantModules`, which sends each tenant's contiguous rows of a multiplexed batch
through that tenant's copy (or through the original, frozen module for tenants that do not
train it) and pads the outputs to the widest (a classifier's loss reads only its own columns).

A *view* is a second model object that shares every module of the shared model except those
the tenant trains, which are its own copies, and that knows only the tenant's adapter. It is
the model the tenant would have trained alone: its forward routes every row through the
tenant's adapter alone (the shared hosts have every tenant's active) and through the original
of modules that other tenants train, so it evaluates, generates, saves (`splice.save`) and
reports like one, with no copy of the backbone. Each tenant's `Trainer` trains its view.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import splice
from splice.core.api import model_state
from splice.core.config import AdapterConfig
from splice.core.errors import SpliceError
from splice.core.heads import release_head
from splice.core.host import hosts
from splice.core.model_state import AdapterRecord, ModelState, install_model_state
from splice.core.targets import HOST_ATTRIBUTE, exact_targets

# The tenant whose view is computing (in this thread or task): all rows are that tenant's.
_VIEWING: ContextVar[str | None] = ContextVar("splice_tenant_view", default=None)


class TenantModules(nn.Module):
    """Tenants' copies of one module; `segments` [(tenant, rows), ...] is set before a packed
    forward of the shared model (a view's forward needs none: its rows are all its tenant's)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.segments: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        viewing = _VIEWING.get()
        if viewing is not None:
            return self.module_of(viewing)(x)
        chunks = x.split([n for _, n in self.segments])
        parts = [self.module_of(name)(chunk) for (name, _), chunk in zip(self.segments, chunks, strict=True)]
        width = max(p.shape[-1] for p in parts)
        return torch.cat([F.pad(p, (0, width - p.shape[-1])) for p in parts])

    def module_of(self, tenant: str) -> nn.Module:
        """The tenant's copy, or the original (frozen) module for a tenant that does not train it."""
        return self.copies[tenant] if tenant in self.copies else self.original


def join(shared: nn.Module, routers: dict[str, TenantModules], name: str, own: nn.Module,
         device: torch.device) -> nn.Module:
    """Move tenant `name`'s freshly set-up adapter and trained modules from its own model onto
    `shared` (the first tenant's model is `shared` itself), putting a `TenantModules` (kept in
    `routers`, by path) where a module is trained; the tenant's view."""
    record = model_state(own).adapters[name]
    heads = list(record.heads)
    if own is not shared:  # the same modules as on its own model, named in full
        hosted = [module_name for module_name, _, host in hosts(own) if name in host]
        exact = record.config.replace(train_also=[], targets=exact_targets(shared, hosted), exclude=None, layers=None)
        splice.attach(shared, exact, name)
        with torch.no_grad():
            theirs = {k: v for k, v in own.named_parameters() if f".{HOST_ATTRIBUTE}.{name}." in k}
            for key, param in shared.named_parameters():
                if key in theirs:
                    param.copy_(theirs[key])
    for path in heads:  # the tenants' trained modules are managed here
        release_head(own, path, name)
    if own is shared:
        record.heads = []
    own_modules = {}
    for path in heads:
        module = own.get_submodule(path)
        _refuse_tied(own, path, module, name)
        router = routers.get(path)
        if router is None:
            original = copy.deepcopy(module).requires_grad_(False) if own is shared else shared.get_submodule(path)
            router = routers[path] = TenantModules(original)
            shared.set_submodule(path, router)
        router.copies[name] = own_modules[path] = module.to(device)
    return view(shared, name, record.config, own_modules, own.config)


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
    out.forward = _routed(out, name)
    return out


def _routed(model: nn.Module, name: str) -> Callable[..., Any]:
    """The view's forward: its rows through tenant `name`'s adapter, heads and modules only."""
    forward = model.forward

    @functools.wraps(forward)
    def routed(*args: Any, **kwargs: Any) -> Any:
        token = _VIEWING.set(name)
        try:
            with splice.route(model, [name]):
                return forward(*args, **kwargs)
        finally:
            _VIEWING.reset(token)

    return routed


def _shallow(module: nn.Module) -> nn.Module:
    copy = object.__new__(type(module))
    copy.__dict__ = dict(module.__dict__)
    copy._modules = dict(module._modules)
    return copy


def _refuse_tied(model: nn.Module, path: str, module: nn.Module, name: str) -> None:
    """A trained module whose weights are tied elsewhere (lm_head = embeddings) cannot get a
    per-tenant copy: training it alone would change the other module too."""
    own = {id(p) for p in module.parameters()}
    elsewhere = [k for k, p in model.named_parameters(remove_duplicate=False)
                 if id(p) in own and not k.startswith(f"{path}.")]
    if elsewhere:
        raise SpliceError(f"tenant {name}: train_also module {path!r} shares its weights with {elsewhere}; "
                          "a multiplexed tenant cannot train tied weights. Untie them or train it alone.")
