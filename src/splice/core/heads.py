"""Modules an adapter trains in full (`train_also`, PEFT's `modules_to_save`): one copy per adapter.

Each adapter owns its copy of such a module (a classification head, an `lm_head`), as in HF
PEFT: loading a second classifier never overwrites the first one's, switching adapters switches
heads, an adapter without a head runs with the original module, and within `route` every row
goes through its own adapter's head. A copy starts from the original module, not from whatever
another adapter trained.

The module is not replaced, and gets no new child: the copies live in one `splice_heads` child
of the model's root (so `model.to(...)` moves them, while `model.classifier.parameters()` stays
the module's own). The module's parameters and buffers are *bound* to the active adapter's copy:
`classifier.weight` is that adapter's tensor, so optimizers, module paths and
`trainable_parameters` see it, and the forward costs nothing extra. Only rows of other adapters
inside `route` are recomputed, with their own copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from splice.core.errors import SpliceError
from splice.core.nf4_layers import is_4bit_layer
from splice.core.route_context import routing_of
from splice.core.targets import HEADS_ATTRIBUTE, HOST_ATTRIBUTE, named_base_modules


class HeadStore(nn.ModuleDict):
    """The model root's child that holds the `HeadCopies` of every module trained in full."""

    splice_internal = True  # not part of the base model (core.targets skips it)


class HeadCopies(nn.Module):
    """The original tensors of one module trained in full, and every adapter's copy of it."""

    def __init__(self, module: nn.Module, path: str) -> None:
        super().__init__()
        self.path = path
        self.__dict__["module"] = module  # not a child: the module stays where it is in the model
        tensors = [t for m in _own_modules(module) for t in (*m._parameters.values(), *m._buffers.values())
                   if t is not None]
        # a structural copy that shares the module's own (original) tensors
        self.original = _copy(module, {id(t): t for t in tensors})
        self.copies = nn.ModuleDict()
        self.live: str | None = None  # whose tensors the module computes with (None: the original)
        self.enabled = True  # False within `splice.disabled`: every row gets the original's output
        self._hook = module.register_forward_hook(self.route_rows)

    def add(self, name: str) -> None:
        """A fresh copy of the original module for adapter `name` (frozen until activated)."""
        self.copies[name] = _copy(self.original, {}).requires_grad_(False)

    def source(self, name: str | None) -> nn.Module:
        """The module whose tensors adapter `name` computes with (its copy, else the original)."""
        return self.copies[name] if name is not None and name in self.copies else self.original

    def bind(self, name: str | None) -> None:
        """Make the module compute with adapter `name`'s tensors (None or no copy: the original's)."""
        owner = name if name is not None and name in self.copies else None
        for target, source in zip(_own_modules(self.module), _own_modules(self.source(owner)), strict=True):
            target._parameters.update(source._parameters)
            target._buffers.update(source._buffers)
        self.live = owner

    def route_rows(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: within `route`, rows whose adapter has another head get that head's output."""
        routing = routing_of(self)
        if (routing is None or not self.enabled or not args or not isinstance(args[0], torch.Tensor)
                or not isinstance(output, torch.Tensor)):
            return output
        x = args[0]
        repeat = routing.repeat(x)
        owners: dict[str | None, list[str | None]] = {}
        for adapter_id in dict.fromkeys(routing.ids):
            owners.setdefault(adapter_id if adapter_id in self.copies else None, []).append(adapter_id)
        for owner, ids in owners.items():
            if owner == self.live:
                continue
            rows = routing.rows_of(ids, repeat, x.device)
            part = self.source(owner)(x.index_select(0, rows), *args[1:])
            if part.shape[1:] != output.shape[1:]:
                raise SpliceError(
                    f"route(): the {self.path!r} of adapters {[self.live, owner]} give outputs of shapes "
                    f"{tuple(output.shape[1:])} and {tuple(part.shape[1:])} per row; route adapters whose "
                    "heads differ in shape in separate batches")
            output = output.index_copy(0, rows, part.to(output.dtype))
        return output

    def release(self) -> None:
        """Stop routing the module's rows; it keeps the tensors it is bound to as its own."""
        self._hook.remove()


def _store(model: nn.Module, create: bool = False) -> HeadStore | None:
    store = model._modules.get(HEADS_ATTRIBUTE)
    if not isinstance(store, HeadStore):
        if not create:
            return None
        store = model._modules[HEADS_ATTRIBUTE] = HeadStore()
    return store


def _key(path: str) -> str:
    return path.replace(".", ":")  # a ModuleDict key has no dots


def head_copies_of(model: nn.Module, path: str) -> HeadCopies | None:
    store = _store(model)
    return store[_key(path)] if store is not None and _key(path) in store else None


def all_head_copies(model: nn.Module) -> Iterator[HeadCopies]:
    """The copies of every module some adapter of the model trains in full."""
    store = _store(model)
    yield from (store.values() if store is not None else ())


def add_head(model: nn.Module, path: str, name: str) -> None:
    """Give adapter `name` its own copy of module `path` (the module keeps computing as before)."""
    copies = head_copies_of(model, path)
    if copies is None:
        module = model.get_submodule(path)
        hosted = [n for n, m in named_base_modules(module) if HOST_ATTRIBUTE in m._modules]
        if hosted:
            raise SpliceError(f"{path!r} cannot be trained in full by adapter {name!r}: it holds adapters "
                              f"(in {[f'{path}.{n}'.rstrip('.') for n in hosted]}); detach them first")
        packed = [n for n, m in named_base_modules(module) if is_4bit_layer(m)]
        if packed:
            raise SpliceError(f"{path!r} cannot be trained in full by adapter {name!r}: it holds 4-bit layers "
                              f"({[f'{path}.{n}'.rstrip('.') for n in packed]}) that take no gradient; keep it dense "
                              "(splice.quantize(..., skip=[...]), or keep_heads=True for output heads)")
        copies = HeadCopies(module, path)
        _store(model, create=True)[_key(path)] = copies
    copies.add(name)


def remove_head(model: nn.Module, path: str, name: str) -> None:
    """Drop adapter `name`'s copy of module `path`; the module computes with the original again
    if it computed with that copy, and is left alone by splice once no copy remains."""
    copies = head_copies_of(model, path)
    if copies is None or name not in copies.copies:
        return
    if copies.live == name:
        copies.bind(None)
    del copies.copies[name]
    if not len(copies.copies):
        release_head(model, path, None)


def release_head(model: nn.Module, path: str, name: str | None) -> None:
    """Module `path` keeps adapter `name`'s tensors (None: those it is bound to now) as its own,
    and splice keeps no copies of it any more (`unload`, and code that manages per-adapter
    modules itself, as the multi-tenant trainer does)."""
    copies = head_copies_of(model, path)
    if copies is None:
        return
    if name is not None:
        copies.bind(name)
    copies.release()
    store = _store(model)
    del store[_key(path)]
    if not len(store):
        del model._modules[HEADS_ATTRIBUTE]


def head_module(model: nn.Module, path: str, name: str) -> nn.Module:
    """The module holding adapter `name`'s tensors for `path`: its copy, or the module itself
    where splice keeps no copies (a multi-tenant view holds each tenant's own module)."""
    copies = head_copies_of(model, path)
    return copies.copies[name] if copies is not None and name in copies.copies else model.get_submodule(path)


def head_tensors(model: nn.Module, paths: list[str], name: str, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors of the modules it trains in full, keyed by their path in the
    model ("classifier.weight"), whether or not the adapter is active."""
    return {f"{path}.{key}": value for path in paths
            for key, value in head_module(model, path, name).state_dict(keep_vars=keep_vars).items()}


def bind_heads(model: nn.Module, active: list[str]) -> None:
    """Bind every module trained in full to the copy of the one active adapter that owns it
    (the original where none does); refuse, before changing anything, two active owners."""
    plan = []
    for copies in all_head_copies(model):
        owners = [n for n in active if n in copies.copies]
        if len(owners) > 1:
            raise SpliceError(
                f"adapters {owners} each train their own {copies.path!r}; only one of them can be active at a "
                "time (splice.route runs each row through its own adapter and head)")
        plan.append((copies, owners[0] if owners else None))
    for copies, owner in plan:
        copies.bind(owner)


def _own_modules(module: nn.Module) -> list[nn.Module]:
    """The module and its submodules, without splice's children (adapters, head copies)."""
    return [m for _, m in named_base_modules(module)]


def _copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A deep copy of `module` without its hooks; the tensors in `memo` are shared, not copied.

    Hooks are set aside during the copy: they may be bound to objects that hold the whole model.
    """
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    modules = list(module.modules())
    saved = [{kind: getattr(m, kind) for kind in kinds if hasattr(m, kind)} for m in modules]
    for m, hooks in zip(modules, saved, strict=True):
        for kind, value in hooks.items():
            setattr(m, kind, type(value)())
    try:
        return copy.deepcopy(module, memo)
    finally:
        for m, hooks in zip(modules, saved, strict=True):
            for kind, value in hooks.items():
                setattr(m, kind, value)
