"""`condu`: ConDU, Continual Decoupling-Unifying (Gao, Zhang et al., ICLR 2026; arXiv 2503.10705).

Every task trains a fresh expert from the pretrained model θ_0 (no earlier expert active, the
base weights untouched). When task t ends, its task vector τ_t = θ_t − θ_0 is taken, every
stored task is rebuilt from the unified form, and all of them are unified again
(`splice.merging.emr`, EMR-merging's elect / mask / rescale):

    τ̂_i      = λ_i · M_i ⊙ τ_U                      (decouple, i < t)
    τ_U, M_i, λ_i = unify(τ̂_1 .. τ̂_{t−1}, τ_t)

and the expert is dropped: what is kept is one unified vector, a 1-bit mask per task and entry,
and one scale per task. With the task id, task i is answered by θ_0 + τ̂_i (a task not trained
yet by θ_0). Without it, the harness routes each row to the seen task with the closest
prototype (`splice.continual.scoring`: the frozen pretrained model's features, as ConDU's
code) and `agnostic_view` answers it with the mean of the logits of θ_0 and θ_0 + τ̂_i: always
mixing in the zero-shot model is what protects zero-shot ability.

As the released code:
- fresh expert per task from θ_0; decouple all old tasks, unify with the new one;
- the unify rule itself (σ = sign Σ_i τ_i with 0 → −1, τ_U = σ ⊙ max agreeing |τ_i|, M_i, λ_i
  summed over parameter tensors, a bias being a tensor of its own);
- θ_0 in every task-agnostic ensemble, logits averaged with equal weight.

Our choices:
- τ is taken in weight-change space (the dense ΔW of each adapted layer, in the layer's weight
  layout, plus its bias change where the form has one), not on the LoRA factors themselves as
  ConDU(LoRA) does; any form with a weight change works (LoRA, PiSSA, DoRA, ...).
- The code's top-k experts by prototype score become top-1: the harness routes each row to one
  task, so the ensemble is θ_0 and that task's model.
- Views put θ_0 + τ̂_i into the adapted layers' weights (a second copy of those weights, switched
  in and out by pointer, the originals restored bit for bit on exit); a weight shared with
  another module (tied embeddings) is refused, as adding τ̂ there would change both.
- For generation, averaging per forward is ensemble decoding; the zero-shot model keeps its own
  key/value cache next to the caller's.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import splice
from splice.continual.strategies.base import Strategy, TaskContext, active
from splice.core.config import AdapterConfig
from splice.core.errors import ConfigError, SpliceError
from splice.core.host import check_mergeable_weight, hosts
from splice.merging.emr import Unified, decouple, unify

Switch = Callable[[bool], None]  # True: the task's weights θ_0 + τ̂ in place; False: θ_0


class ConDU(Strategy):
    """A fresh expert per task, all tasks kept as one unified change plus a mask and a scale each."""

    name = "condu"

    def __init__(self, adapter: AdapterConfig) -> None:
        super().__init__(adapter)
        if adapter.train_also:
            raise ConfigError(f"condu keeps only the adapted layers' weight changes; train_also "
                              f"{adapter.train_also} would be lost when the expert is dropped")
        self.unified: Unified | None = None

    def begin_task(self, model: nn.Module, task: TaskContext) -> str:
        splice.attach(model, self.adapter, task.name)  # the only adapter there: earlier experts are gone
        try:
            check_expert(model, task.name)
        except SpliceError:
            splice.detach(model, task.name)
            raise
        return task.name

    def end_task(self, model: nn.Module, task: TaskContext) -> None:
        tau = task_vector(model, task.name)
        old = [decouple(self.unified, i) for i in range(self.unified.tasks)] if self.unified else []
        self.unified = unify([*old, tau])
        splice.detach(model, task.name)
        super().end_task(model, task)

    def rebuild(self, model: nn.Module, task: TaskContext) -> None:
        """Nothing: a finished task's expert is gone from the model, kept in `unified`."""

    def state(self) -> dict[str, Any]:
        unified = None if self.unified is None else {
            "vector": self.unified.vector, "masks": self.unified.masks, "scales": self.unified.scales}
        return {**super().state(), "unified": unified}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.unified = None if state["unified"] is None else Unified(**state["unified"])

    def decoupled(self, task: str) -> dict[str, torch.Tensor] | None:
        """τ̂ of `task` by parameter name (None: not trained yet)."""
        if self.unified is None or task not in self.trained:
            return None
        return decouple(self.unified, self.trained.index(task))

    @contextmanager
    def view(self, model: nn.Module, task: str) -> Iterator[None]:
        """The model computes θ_0 + τ̂_task (θ_0 for a task not trained yet)."""
        with active(model, []), task_weights(model, self.decoupled(task)) as switch:
            switch(True)
            yield

    @contextmanager
    def agnostic_view(self, model: nn.Module, task: str) -> Iterator[None]:
        """`model(...)` returns the mean of θ_0's and (θ_0 + τ̂_task)'s logits (generation: per
        step); everything else about the call (loss, cache, hidden states) is the task model's."""
        change = self.decoupled(task)
        with active(model, []), task_weights(model, change) as switch:
            if change is None:
                yield
            else:
                with ensemble(model, switch):
                    yield

    def stored_bytes(self, model: nn.Module) -> int:
        """The unified vector at its dtype, each mask at 1 bit per entry (a tensor's bits rounded up
        to whole bytes), and each scale as a float64."""
        if self.unified is None:
            return 0
        vector = sum(v.numel() * v.element_size() for v in self.unified.vector.values())
        masks = sum(math.ceil(m.numel() / 8) for task in self.unified.masks for m in task.values())
        return vector + masks + 8 * self.unified.tasks


def check_expert(model: nn.Module, name: str) -> None:
    """Refuse, before training, an expert whose change cannot be kept as a task vector on the weights."""
    holders: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(param_name)
    for module_name, base, host in hosts(model):
        if name not in host:
            continue
        adapter, where = host[name], module_name or "the model"
        if not adapter.has_weight_form():
            raise ConfigError(f"condu needs an adapter form with a weight change (LoRA-like); {where} has a "
                              f"{type(adapter).__name__}")
        check_mergeable_weight(base)
        if len(holders[id(base.weight)]) > 1:
            raise ConfigError(f"condu adds task vectors to weights, but {where}'s weight is shared "
                              f"({', '.join(holders[id(base.weight)])}); leave tied layers out of the targets")
        if adapter.delta_bias() is not None and getattr(base, "bias", None) is None:
            raise ConfigError(f"the adapter changes the bias of {where}, which has none")


def parameter_name(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf


@torch.no_grad()
def task_vector(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """θ_t − θ_0 of adapter `name` by base parameter name, in the parameters' layout, float32:
    the weight change (less what a PiSSA-style init took out of the base) and any bias change."""
    tau: dict[str, torch.Tensor] = {}
    for module_name, _, host in hosts(model):
        if name not in host:
            continue
        adapter = host[name]
        delta = adapter.delta_weight()
        initial = adapter.initial_delta_weight()
        if initial is not None:
            delta = delta - initial
        tau[parameter_name(module_name, "weight")] = (delta.T if host.info.transposed else delta).float().clone()
        bias = adapter.delta_bias()
        if bias is not None:
            tau[parameter_name(module_name, "bias")] = bias.float().clone()
    return tau


@contextmanager
def task_weights(model: nn.Module, change: dict[str, torch.Tensor] | None) -> Iterator[Switch]:
    """A switch between θ_0 and θ_0 + `change` for the named parameters (θ_0 to start with); the
    sums are built once, switching swaps tensors, and θ_0's own tensors are back on exit."""
    params = [model.get_parameter(key) for key in change or {}]
    originals = [p.data for p in params]
    with torch.no_grad():
        summed = [_added(p.data, change[key]) for p, key in zip(params, change or {}, strict=True)]

    def switch(on: bool) -> None:
        for param, base, task in zip(params, originals, summed, strict=True):
            param.data = task if on else base

    try:
        yield switch
    finally:
        switch(False)


def _added(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """weight + delta, accumulated in float32 for half-precision weights (one rounding)."""
    if weight.dtype in (torch.float32, torch.float64):
        return weight + delta.to(weight.device, weight.dtype)
    return (weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype)


@contextmanager
def ensemble(model: nn.Module, switch: Switch) -> Iterator[None]:
    """`model.forward` replaced for the block: θ_0 then θ_0 + τ̂ on the same inputs, logits
    averaged. The zero-shot pass keeps its own twin of the caller's key/value cache, made when
    the caller's cache is seen empty (HF `generate` makes one per call)."""
    forward = model.forward
    own = "forward" in vars(model)
    twins: list[Any] = [None, None]  # the caller's cache (the task model's) and the zero-shot twin

    @functools.wraps(forward)
    def averaged(*args: Any, **kwargs: Any) -> Any:
        base_kwargs = _with_twin_cache(kwargs, twins)
        try:
            base = forward(*args, **base_kwargs)
            switch(True)
            out = forward(*args, **kwargs)
        finally:
            switch(False)
        if isinstance(out, torch.Tensor):  # a plain module: its output is the logits
            return (base + out) / 2
        if getattr(out, "logits", None) is None or getattr(base, "logits", None) is None:
            raise SpliceError("condu's task-agnostic ensemble needs outputs that are logits or have "
                              "`.logits` (transformers: return_dict=True)")
        out.logits = (base.logits + out.logits) / 2
        returned = _cache_of(out)
        if returned is not None:
            twins[:] = [returned, _cache_of(base)]
        return out

    model.forward = averaged
    try:
        yield
    finally:
        if own:
            model.forward = forward
        else:
            del model.forward


# The key/value cache's name as a forward argument and an output field: transformers >= 5 says
# `cache`, older versions `past_key_values` (`cache_params` for state-space models).
CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def _with_twin_cache(kwargs: dict[str, Any], twins: list[Any]) -> dict[str, Any]:
    """`kwargs` with the zero-shot model's twin of the key/value cache in its place (if any)."""
    key = next((k for k in CACHE_NAMES if kwargs.get(k) is not None), None)
    if key is None:
        return kwargs
    cache = kwargs[key]
    if cache is not twins[0]:
        if not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0:
            raise SpliceError("condu's task-agnostic ensemble can only continue a key/value cache it has "
                              "seen from the start (pass an empty cache, or none)")
        twins[:] = [cache, copy.deepcopy(cache)]
    return {**kwargs, key: twins[1]}


def _cache_of(output: Any) -> Any:
    """The key/value cache a model output carries, or None (read by field, without BC warnings)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return next((getattr(output, k) for k in CACHE_NAMES if k in fields and getattr(output, k) is not None), None)
