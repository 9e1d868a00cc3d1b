"""The verbs users call on a model: attach, activate, merge, detach, unload, ...

Every verb changes the model in place and returns it (where it returns anything), so any
training loop works on the result. What splice needs to remember per model (each adapter's
config, whether it is trainable, which modules it trains in full) lives in `model._splice`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from splice.core import quantization
from splice.core.config import AdapterConfig
from splice.core.errors import MergeError, SpliceError, TargetError
from splice.core.heads import add_head, all_head_copies, bind_heads, head_module, release_head, remove_head
from splice.core.host import Host, ensure_host, host_of, hosts, remove_host
from splice.core.inputs import InputsRecorder, batch_auxiliary_loss
from splice.core.layers import is_plain_float_weight
from splice.core.model_state import AdapterRecord, ModelState, drop_model_state, model_state
from splice.core.targets import matches, named_base_modules, resolve_targets, site_info, tied_parameters

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# Adapters are held by name in a `Host` (an nn.ModuleDict) and in a ModuleDict of head copies,
# so a name must not be one of their attributes: the host's own, and every nn.Module's.
RESERVED_NAMES = frozenset({"info", "active", "merged", "enabled", "_merged_deltas", "_restores", "_hook"}
                           | set(vars(nn.Module())))


class CheckpointInputGrads:
    """Makes the input embeddings' output require grad while the model trains with gradient
    checkpointing on, so that the adapters inside checkpointed blocks get gradients.

    Why: reentrant checkpointing (`use_reentrant=True`; what `gradient_checkpointing_enable()`
    used by default before transformers 5) runs a block without autograd and connects its output
    to the graph only through the block's *input tensors*, not through the parameters inside it.
    With the base frozen, the hidden states that enter the first block do not require grad, so
    no block output does: a classifier whose head trains gets gradients for the head alone,
    silently, and a causal LM fails in backward with "element 0 of tensors does not require grad
    and does not have a grad_fn". Marking the embeddings' output as requiring grad, as PEFT and
    transformers' `enable_input_require_grads` do, makes every block's output require grad.
    Non-reentrant checkpointing does not need it.

    It acts only when it is needed: a forward pre-hook on the model checks, per call, that the
    model is training with grad enabled and that some module carries transformers' checkpointing
    flag (`gradient_checkpointing = True`). Without checkpointing an input that requires grad
    would only add backward work (about 5% of a MiniLM LoRA step). Values never change: only
    `requires_grad` of the embeddings' output is set. The hooks hold no reference to the model.
    """

    def __init__(self, model: nn.Module, embeddings: list[nn.Module], flagged: list[nn.Module]) -> None:
        self.on = False
        self.flagged = flagged  # the modules that carry transformers' checkpointing flag
        self.handles = [model.register_forward_pre_hook(self.check)]
        self.handles += [module.register_forward_hook(self.mark) for module in embeddings]

    @classmethod
    def install(cls, model: nn.Module) -> CheckpointInputGrads | None:
        """Hooks for a model that transformers can checkpoint and that names its input
        embeddings (`get_input_embeddings`); None for any other model."""
        flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        if not flagged:
            return None
        embeddings = {}
        for module in model.modules():
            getter = getattr(module, "get_input_embeddings", None)
            try:
                found = getter() if callable(getter) else None
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(found, nn.Module):
                embeddings[id(found)] = found
        return cls(model, list(embeddings.values()), flagged) if embeddings else None

    def check(self, model: nn.Module, args: tuple) -> None:
        # Only the modules found at install carry the flag; walking the whole model each call
        # cost about 0.5 ms a forward on MiniLM.
        self.on = model.training and torch.is_grad_enabled() and any(
            m.__dict__.get("gradient_checkpointing") is True for m in self.flagged)

    def mark(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.on and isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            output.requires_grad_(True)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter (None: it can): it must be an identifier, and not an
    attribute of splice's host layer (the adapters are modules stored under their names)."""
    if not _NAME.match(name):
        return f"adapter name {name!r} must be an identifier (letters, digits, _ or -)"
    if hasattr(Host, name) or name in RESERVED_NAMES:
        return f"adapter name {name!r} is reserved (an attribute of splice's host layer); choose another"
    return None


def attach(
    model: nn.Module, config: AdapterConfig, name: str = "default", *, trainable: bool = True
) -> nn.Module:
    """Attach adapter `name` to every module `config.targets` selects, and make it the active one.

    Everything that is not an adapter parameter is frozen, except the modules listed in
    `config.train_also`, of which the adapter gets its own copy (starting from the original
    module, as PEFT's `modules_to_save`). Several named adapters may live on one model; see
    `activate`.
    """
    if (problem := adapter_name_problem(name)) is not None:
        raise SpliceError(problem)
    state = model_state(model)
    if name in state.adapters:
        raise SpliceError(f"adapter {name!r} is already attached; detach it or choose another name")
    config = config.placed(model)
    selected = resolve_targets(model, config)
    _refuse_inits_from_base(model, config, selected)
    heads = resolve_heads(model, config.train_also)
    built: list[nn.Module] = []
    try:
        for module_name, module in selected:
            info = site_info(model, module_name, module, config)
            adapter = config.build(info, module_name, module)
            adapter.train(model.training)  # an adapter follows its model's mode (dropout, BatchNorm)
            weight = module.weight if info.kind != "block" else next(module.parameters(), None)
            if weight is not None:
                adapter.to(device=weight.device, dtype=_adapter_dtype(weight))
            adapter.owner = name
            host = ensure_host(module, info)
            host[name] = adapter
            built.append(module)
            host.take_initial(module, name)
        for head in heads:
            add_head(model, head, name)
    except Exception:
        for module in built:
            _remove_adapter(module, name)
        for head in heads:
            remove_head(model, head, name)
        raise
    state.adapters[name] = AdapterRecord(config, trainable, heads)
    if state.checkpoint_inputs is None:
        state.checkpoint_inputs = CheckpointInputGrads.install(model)
    if config.reads_inputs:
        if state.inputs_recorder is None:
            state.inputs_recorder = InputsRecorder(model)
        for module in built:
            host_of(module)[name].inputs_recorder = state.inputs_recorder
    state.adapters[name].undo = config.on_attach(model, name)
    activate(model, name)
    return model


@contextmanager
def attaching(model: nn.Module, config: AdapterConfig, name: str, *, trainable: bool = True) -> Iterator[None]:
    """`attach`, then the block (filling the new adapter's tensors, say); if the block fails, the
    adapter is detached again and every parameter's `requires_grad` is as it was before."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    attach(model, config, name, trainable=trainable)
    try:
        yield
    except BaseException:
        detach(model, name)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise


def resolve_heads(model: nn.Module, train_also: list[str]) -> list[str]:
    """Full names of the modules `train_also` lists (exact name or dotted suffix, like PEFT)."""
    names = [n for n, _ in named_base_modules(model) if n]
    found = []
    for entry in train_also:
        hits = [n for n in names if matches([entry], n)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "." not in n or n.count(".") < 2})
            raise TargetError(f"train_also entry {entry!r} matches no module; top-level modules: {leaves}")
        found += [h for h in hits if not any(h.startswith(f + ".") for f in hits)]
    return list(dict.fromkeys(found))


def activate(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make exactly these adapters active; their outputs are summed. Only active ones train.

    Modules trained in full compute with the active adapter's copy (the original where no active
    adapter has one); two active adapters with their own copy of one module are refused.
    """
    names = [names] if isinstance(names, str) else list(names)
    state = model_state(model)
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise SpliceError(f"no adapter named {unknown}; attached: {list(state.adapters)}")
    bind_heads(model, names)
    for _, _, host in hosts(model):
        host.active = [n for n in names if n in host]
    _apply_trainability(model, names)
    return model


def deactivate(model: nn.Module) -> nn.Module:
    """No adapter active: the model computes the base output (merged adapters stay merged)."""
    bind_heads(model, [])
    for _, _, host in hosts(model):
        host.active = []
    _apply_trainability(model, [])
    return model


def active_adapters(model: nn.Module) -> list[str]:
    found: dict[str, None] = {}
    for _, _, host in hosts(model):
        found.update(dict.fromkeys(host.active))
    return list(found)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base output (e.g. a reference model for DPO)."""
    merged = {n for _, _, host in hosts(model) for n in host.merged}
    if merged:
        raise MergeError(f"adapters {sorted(merged)} are merged into the weights; unmerge them first")
    all_hosts = [(host, host.enabled) for _, _, host in hosts(model)]  # as they were: blocks nest
    heads = [(copies, copies.live, copies.enabled) for copies in all_head_copies(model)]
    for host, _ in all_hosts:
        host.enabled = False
    for copies, _, _ in heads:
        copies.bind(None)
        copies.enabled = False  # within `route` too: no row gets an adapter's head
    try:
        yield model
    finally:
        for host, enabled in all_hosts:
            host.enabled = enabled
        for copies, live, enabled in heads:
            copies.bind(live)
            copies.enabled = enabled


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter `name` (default: every active one) into the base weights, exactly.

    The delta is accumulated in fp32 and rounded once into the weight's dtype. A merged adapter
    is skipped by the forward pass, so outputs do not change; `unmerge` takes it out again.
    """
    names = [name] if name else active_adapters(model)
    pending = check_merge(model, names)  # refuse before any weight changes
    done: list[tuple[nn.Module, Host, str]] = []
    try:  # only a non-finite result can still fail here
        for _, base, host, adapter_name in pending:
            host.merge(base, adapter_name)
            done.append((base, host, adapter_name))
    except MergeError:
        for base, host, adapter_name in reversed(done):
            host.unmerge(base, adapter_name)
        raise
    return model


def check_merge(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module, Host, str]]:
    """Raise the MergeError that merging adapters `names` would raise (no weight form, a quantized
    or tied weight, a bias the base lacks), changing nothing; else the (module, base, host,
    adapter) to merge. For jobs that merge what they train (boosting) to refuse before training."""
    _require_known(model, names)
    pending = [(module_name, base, host, n) for module_name, base, host in hosts(model)
               for n in names if n in host and n not in host.merged]
    tied = tied_parameters(model)
    for module_name, base, host, adapter_name in pending:
        host.check_merge(base, adapter_name)
        if id(base.weight) in tied:
            others = [n for n in tied[id(base.weight)] if n != f"{module_name}.weight"]
            raise MergeError(
                f"{module_name}.weight is tied to {others}: merging {adapter_name!r} would change "
                "those modules too. Keep the adapter unmerged, or untie the weights first."
            )
    return _weight_readers_first(model, pending)


def _weight_readers_first(model: nn.Module,
                          pending: list[tuple[str, nn.Module, Host, str]]) -> list[tuple[str, nn.Module, Host, str]]:
    """`pending` with, in each layer, the adapter whose change reads the weight (DoRA's norm
    ‖W + s B A‖) merged before the others, so that it reads the weight it reads unmerged; a
    merge that would change such an active adapter's weight under it is refused."""
    active = set(active_adapters(model))
    order: list[tuple[str, nn.Module, Host, str]] = []
    for module_name, _, host in hosts(model):
        here = [item for item in pending if item[2] is host]
        if not here:
            continue
        merging = [item[3] for item in here]
        readers = [n for n in host if n in active and n not in host.merged and host[n].delta_weight_reads_base]
        staying = [n for n in readers if n not in merging]
        if staying:
            raise MergeError(f"{module_name}: merging {merging} changes the weight that active adapter "
                             f"{staying[0]!r} ({type(host[staying[0]]).__name__}) reads its norm from, so its "
                             "output would change; merge it too (splice.merge(model) merges every active "
                             "adapter, it first), or deactivate it")
        if len(readers) > 1:
            raise MergeError(f"{module_name}: {readers} each read the weight ({type(host[readers[0]]).__name__}'s "
                             "norm); merged one after the other, the second would read the first's change: "
                             "keep one of them unmerged")
        order += sorted(here, key=lambda item: not host[item[3]].delta_weight_reads_base)
    return order


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take merged adapters (default: all) back out of the base weights."""
    if name is not None:
        _require_known(model, [name])
    for _, base, host in hosts(model):
        for adapter_name in reversed(list(host.merged)):
            if name is None or adapter_name == name:
                host.unmerge(base, adapter_name)
    return model


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`, restoring the base weights (within rounding if it was merged: see
    `unmerge`) and any head it trained."""
    _require_known(model, [name])
    state = model_state(model)
    for _, base, _ in list(hosts(model)):
        _remove_adapter(base, name)
    record = state.adapters.pop(name)
    if record.undo is not None:
        record.undo()
    for head in record.heads:
        remove_head(model, head, name)
    if not state.adapters:
        _remove_checkpoint_hooks(state)
    if state.inputs_recorder is not None and not any(r.config.reads_inputs for r in state.adapters.values()):
        state.inputs_recorder.remove()
        state.inputs_recorder = None
    _apply_trainability(model, active_adapters(model))
    return model


def unload(model: nn.Module, dequantize: bool = False, requantize: bool = False,
           dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every active adapter, drop all adapters, and return the plain model.

    Modules trained in full (`train_also`) keep the active adapter's trained weights. A 4-bit base
    (QLoRA, `splice.quantize`) cannot take the merge: `dequantize=True` first turns its layers into
    dense layers holding exactly the weights the 4-bit layers computed with (in `dtype`, by default
    the dtype each had before it was quantized: fp32 for a model loaded in fp32; Conv1D layers
    become Conv1D again), merges there (accumulated in fp32, rounded once) and returns a
    full-precision model. `requantize=True` then quantizes the layers the merge changed again with
    their settings, gives the others their very 4-bit layers back, and warns how much of the
    merged change the rounding moved. On a refused merge the model is left as it was, 4-bit
    layers included.
    """
    if requantize and not dequantize:
        raise SpliceError("unload: requantize=True needs dequantize=True (a 4-bit weight cannot take a merge)")
    old: dict[str, nn.Module] = {}
    if dequantize:
        with quantization.dequantized(model, dtype) as found:
            old = found if requantize else {}
            merge(model)
    else:
        merge(model)
    for copies in list(all_head_copies(model)):
        release_head(model, copies.path, None)
    for _, base, host in list(hosts(model)):
        for name in [n for n in host if n not in host.merged]:
            _remove_adapter(base, name)  # gives back what a PiSSA-style init took out
        remove_host(base)
    state = model_state(model)
    for record in state.adapters.values():
        if record.undo is not None:
            record.undo()
    _remove_checkpoint_hooks(state)
    if state.inputs_recorder is not None:
        state.inputs_recorder.remove()
    drop_model_state(model)
    if dequantize:
        quantization.restore_conv1d(model)
    if old:
        warnings.warn(quantization.describe_requantize(quantization.requantize(model, old)), stacklevel=2)
    return model


def freeze(model: nn.Module, name: str) -> nn.Module:
    """Make adapter `name` frozen: it no longer trains, active or not (as one loaded with
    `trainable=False`); for jobs that train adapters one after another on top of the earlier
    ones (boosting rounds)."""
    _require_known(model, [name])
    model_state(model).adapters[name].trainable = False
    _apply_trainability(model, active_adapters(model))
    return model


def adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """The attached adapters' configs, by name."""
    return {name: record.config for name, record in model_state(model).adapters.items()}


def auxiliary_loss(model: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """The auxiliary losses (e.g. a rank router's budget penalty) the adapters (or adapter `name`
    alone) added during the model's last forward, summed; None when there are none. Add it to
    the task loss."""
    recorder = model_state(model).inputs_recorder
    return batch_auxiliary_loss(recorder.last, name) if recorder is not None else None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that train, by name: hand `.values()` to an optimizer."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _remove_adapter(base: nn.Module, name: str) -> None:
    host = host_of(base)
    if host is None or name not in host:
        return
    host.unmerge(base, name)
    host.give_initial(base, name)
    del host[name]
    host.active = [n for n in host.active if n != name]
    if not len(host):
        remove_host(base)


def _remove_checkpoint_hooks(state: ModelState) -> None:
    if state.checkpoint_inputs is not None:
        state.checkpoint_inputs.remove()
        state.checkpoint_inputs = None


def _refuse_inits_from_base(model: nn.Module, config: AdapterConfig,
                            selected: list[tuple[str, nn.Module]]) -> None:
    """An init that takes part of the base weight (PiSSA, GOAT) would change every module that
    shares that weight, and a quantized weight cannot give part of itself up exactly; both are
    refused before anything is built, as merging into them is."""
    if not config.takes_from_base():
        return
    tied = tied_parameters(model)
    for module_name, module in selected:
        weight = getattr(module, "weight", None)
        if weight is not None and not is_plain_float_weight(weight):
            raise SpliceError(f"{config.method} init {getattr(config, 'init', '')!r} starts from part of the base "
                              f"weight (PiSSA, GOAT and other spectrum inits), which the quantized "
                              f"{type(weight).__name__} of {module_name!r} cannot give up exactly: use the "
                              "default init on a quantized base")
        if weight is not None and id(weight) in tied:
            others = [n for n in tied[id(weight)] if n != f"{module_name}.weight"]
            raise SpliceError(f"{module_name}.weight is tied to {others}: an init that takes part of it out of the "
                              "base would change those modules too; leave the module out or use the default init")


def _require_known(model: nn.Module, names: list[str]) -> None:
    known = model_state(model).adapters
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpliceError(f"no adapter named {unknown}; attached: {list(known)}")


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on half-precision or quantized bases (as PEFT's autocast does)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _apply_trainability(model: nn.Module, active: list[str]) -> None:
    """Freeze everything, then unfreeze active trainable adapters and the heads they train."""
    state = model_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, host in hosts(model):
        for adapter_name, adapter in host.items():
            train = adapter_name in active and state.adapters[adapter_name].trainable
            adapter.requires_grad_(train)
    for adapter_name in active:
        record = state.adapters[adapter_name]
        if record.trainable:
            for head in record.heads:
                head_module(model, head, adapter_name).requires_grad_(True)
