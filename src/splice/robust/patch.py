"""Robustness patches (Elytra, volume-2 §14): a LoRA trained by PGD adversarial training on top
of a frozen classifier, one patch per threat, switched at run time.

    attach patch θ (LoRA on every Linear/Conv layer; the base stays frozen and bit-identical)
    each step:  x' = PGD(f_θ, x, y)            the attack against the patched model, in eval mode
                θ ← θ - lr ∇_θ [(1 - c) CE(f_θ(x'), y) + c CE(f_θ(x), y)]     in train mode

(Madry et al. 2018's PGD-AT restricted to the adapter, with c = `clean_weight` a plain mix of the
clean loss, not TRADES.) Since only the patch trains, the base model is untouched: with the patch
off (`splice.deactivate`, `splice.disabled`) the model computes exactly what it did before, and
patches for several threats live side by side on one model, chosen with `splice.activate(model,
name)` or per row with `splice.route(model, [name, None, ...])`.

"Train mode" leaves the base's normalisation layers with running statistics (BatchNorm and any
module with `running_*` buffers) in eval mode, as usual when fine-tuning on a frozen base: in
train mode they would normalise with batch statistics and overwrite their running ones, which
are base state too, so the model with the patch off would no longer compute what it did. The
patch trains against the statistics the model is evaluated with; its own modules (dropout) and
the modules it trains in full (`train_also`) are in train mode.

    result = adversarial_patch(model, (x, y), LinfPGD(eps=8/255), name="linf8", eval_data=(x_test, y_test))
    result.attacked_accuracy_before, result.attacked_accuracy_after

The loop is its own rather than splice's trainer: the trainer takes text data sets and tokenizers,
while a patch trains any classifier (an image CNN on tensors as well as a transformers model on
dict batches), and every step needs the attack in its middle.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from splice.core import progress as bars
from splice.core.api import activate, active_adapters, attaching, deactivate, model_state, trainable_parameters
from splice.core.config import AdapterConfig
from splice.core.errors import DataError, SpliceError, TargetError
from splice.core.layers import unsupported_reason
from splice.core.modes import modes_kept
from splice.core.targets import named_base_modules
from splice.methods.lora import LoRA
from splice.robust.attacks import (
    Data,
    Inputs,
    Threat,
    attacked_accuracy,
    batches,
    check_finite,
    clean_accuracy,
    is_whole_set,
    model_logits,
    parameter_device,
    seeded,
    split_batch,
)

PATCHABLE = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class PatchResult:
    """What a patch changed, measured on the evaluation data: accuracies of the base model
    (before) and of the patched one (after), clean and under the threat it was trained for.

    Attributes:
        name: the patch's adapter name.
        threat: the threat it was trained against (its repr).
        steps: optimizer steps taken.
        losses: the mean training loss of each epoch.
        trainable_parameters: how many numbers the patch trained.
    """

    name: str
    threat: str
    clean_accuracy_before: float
    clean_accuracy_after: float
    attacked_accuracy_before: float
    attacked_accuracy_after: float
    steps: int
    losses: list[float]
    trainable_parameters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def patch_targets(model: nn.Module) -> str:
    """A regex (full match) naming every Linear, Conv1D, Conv1d and Conv2d layer that can host an
    adapter, the output head included: a patch edits a classifier that is already trained, head
    and all ("all-linear" leaves a transformers classifier's head out, since a fresh head is
    trained in full there). Embeddings are left out; so are grouped and dilated convolutions."""
    names = [name for name, module in named_base_modules(model)
             if name and isinstance(module, PATCHABLE) and unsupported_reason(module) is None]
    if not names:
        raise TargetError(f"{type(model).__name__} has no Linear or Conv layer for a patch; pass adapter= with "
                          "the targets to adapt")
    return "|".join(re.escape(name) for name in names)


def adversarial_patch(model: nn.Module, data: Data, threat: Threat, *, name: str, adapter: AdapterConfig | None = None,
                      eval_data: Data | None = None, epochs: int = 5, lr: float = 1e-3, batch_size: int = 64,
                      clean_weight: float = 0.0, seed: int = 0, progress: bool = True) -> PatchResult:
    """Attach adapter `name` to `model` and train it alone by PGD adversarial training against
    `threat` (`LinfPGD` for images, `EmbeddingPGD` for text) on `data`; see the module doc.

    Args:
        data: the training data, as `splice.robust.attacks` describes (tensors or batches on the
            model's device); iterated once per epoch, so batches must be a list, not an iterator.
        adapter: the patch's form; default `splice.LoRA(r=8)` on every Linear/Conv layer
            (`patch_targets`). Only its parameters train, and the modules its `train_also` lists.
        eval_data: where the accuracies before and after are measured (default: `data`).
        epochs, lr, batch_size: passes over the data, AdamW's learning rate, rows per step
            (for data given as batches, each batch is a step).
        clean_weight: c in [0, 1], the weight of the clean loss mixed into the adversarial one.
        seed: the adapter's init, the data order, the attacks' random starts and dropout; the
            caller's random generators are left as they were.
        progress: a progress bar over the steps.

    Other adapters stay attached, untouched: they are switched off while the patch trains (it
    hardens the base model) and the patch is the active adapter afterwards, as after `attach`.
    A non-finite loss raises (the patch is detached again and the adapters active before are
    active again).
    """
    check_settings(epochs, lr, clean_weight)
    previous = active_adapters(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    with seeded(seed, parameter_device(model)):  # the checks read the data too (a shuffling loader draws)
        check_data("data", data, threat, batch_size)
        if eval_data is not None:
            check_data("eval_data", eval_data, threat, batch_size)
        eval_data = data if eval_data is None else eval_data
        try:
            with attaching(model, adapter if adapter is not None else LoRA(r=8, targets=patch_targets(model)), name):
                deactivate(model)
                before = accuracies(model, eval_data, threat, batch_size, seed)
                activate(model, name)
                trained = sum(p.numel() for p in trainable_parameters(model).values())
                losses, steps = train_patch(model, data, threat, name=name, epochs=epochs, lr=lr,
                                            batch_size=batch_size, clean_weight=clean_weight, seed=seed,
                                            progress=progress)
                after = accuracies(model, eval_data, threat, batch_size, seed)
        except BaseException:
            if previous:
                activate(model, previous)
            for parameter, flag in flags.items():  # activate re-derives them; the user's own flags return
                parameter.requires_grad_(flag)
            raise
    return PatchResult(name=name, threat=repr(threat), clean_accuracy_before=before[0], clean_accuracy_after=after[0],
                       attacked_accuracy_before=before[1], attacked_accuracy_after=after[1], steps=steps,
                       losses=losses, trainable_parameters=trained)


def check_settings(epochs: int, lr: float, clean_weight: float) -> None:
    """Refuse settings that cannot train, before anything is attached."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SpliceError(f"adversarial_patch: epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise SpliceError(f"adversarial_patch: lr must be a positive number, got {lr!r}")
    if not isinstance(clean_weight, (int, float)) or not 0.0 <= clean_weight <= 1.0:
        raise SpliceError(f"adversarial_patch: clean_weight must be in [0, 1], got {clean_weight!r}")


def check_data(what: str, data: Data, threat: Threat, batch_size: int) -> None:
    """Refuse data that is read only once, or whose batches lack labels or that the threat cannot
    perturb (an image attack given text, pixels outside its bounds), before anything is attached."""
    if not is_whole_set(data) and iter(data) is data:
        raise DataError(f"adversarial_patch: {what} is a one-pass iterator ({type(data).__name__}); "
                        "pass a list of batches (it is read once per epoch and for the accuracies)")
    for inputs, _ in [split_batch(data)] if is_whole_set(data) else batches(data, batch_size):
        threat.check(inputs)


def accuracies(model: nn.Module, data: Data, threat: Threat, batch_size: int, seed: int) -> tuple[float, float]:
    """(clean, attacked) accuracy of the model as it is now."""
    return clean_accuracy(model, data, batch_size=batch_size), \
        attacked_accuracy(model, data, threat, batch_size=batch_size, seed=seed)


def train_patch(model: nn.Module, data: Data, threat: Threat, *, name: str, epochs: int, lr: float, batch_size: int,
                clean_weight: float, seed: int, progress: bool) -> tuple[list[float], int]:
    """PGD adversarial training of the model's trainable parameters (the patch's): each epoch's
    mean loss and the number of steps. The model trains in train mode, the base's running
    statistics frozen (module doc), and ends with every submodule in the mode it had."""
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    steps = 0
    with modes_kept(model), base_buffers_kept(model, name):
        model.train()
        for module in frozen_statistics(model, name):
            module.eval()
        per_epoch = batch_count(data, batch_size)
        total = epochs * per_epoch if per_epoch is not None else None
        with bars.task(f"patch {name}", total=total, enabled=progress) as bar:
            for _ in range(epochs):
                epoch: list[float] = []
                for inputs, labels in batches(data, batch_size, order):
                    loss = patch_loss(model, threat, inputs, labels, clean_weight)
                    check_finite(loss, f"adversarial_patch {name!r}: the training loss at step {steps + 1}")
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    epoch.append(loss.item())
                    bar.advance()
                losses.append(sum(epoch) / len(epoch))
    return losses, steps


@contextmanager
def base_buffers_kept(model: nn.Module, name: str) -> Iterator[None]:
    """After the block every buffer of the base (outside the modules patch `name` trains in full)
    holds what it held before: base modules run in train mode while the patch trains, and some
    rewrite buffers there (a spectral norm's power iteration), which would change the base."""
    heads = model_state(model).adapters[name].heads
    kept = [(buffer, buffer.detach().clone()) for path, module in named_base_modules(model)
            if not any(path == head or path.startswith(head + ".") for head in heads)
            for buffer in module._buffers.values() if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


def frozen_statistics(model: nn.Module, name: str) -> list[nn.Module]:
    """The base's modules with running statistics (`running_*` buffers: BatchNorm and the like),
    which stay in eval mode while patch `name` trains (module doc); those in modules the patch
    trains in full (`train_also`) are its own and train."""
    heads = model_state(model).adapters[name].heads
    return [module for path, module in named_base_modules(model)
            if any(key.startswith("running_") and buffer is not None for key, buffer in module._buffers.items())
            and not any(path == head or path.startswith(head + ".") for head in heads)]


def patch_loss(model: nn.Module, threat: Threat, inputs: Inputs, labels: torch.Tensor,
               clean_weight: float) -> torch.Tensor:
    """(1 - c) CE on the batch the threat crafted against the model as it is now, + c CE on the clean batch."""
    perturbed = threat.perturb(model, inputs, labels)
    loss = F.cross_entropy(model_logits(model, threat.attacked(inputs, perturbed)), labels)
    if clean_weight:
        loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model_logits(model, inputs), labels)
    return loss


def batch_count(data: Data, batch_size: int) -> int | None:
    """Steps in one epoch over `data`, for the progress bar; None when the batches cannot be counted."""
    if is_whole_set(data):
        return -(-len(split_batch(data)[1]) // batch_size)
    return len(data) if hasattr(data, "__len__") else None
