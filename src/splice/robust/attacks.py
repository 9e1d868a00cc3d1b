"""Threats: projected gradient descent (PGD, Madry et al. 2018, arXiv 1706.06083) against a
classifier, on images and on text, and the accuracy a model keeps under them.

    x_0   = x + uniform noise in the ball (random_start)
    x_k+1 = Proj_ball(x) ( x_k + step_size * direction(∇_x CE(f(x_k), y)) )      k < steps

`LinfPGD` perturbs image tensors in the ℓ∞ ball of radius eps around x, clamped to the pixel
range (`bounds`); the direction is the gradient's sign. Text cannot be perturbed in token space
by gradient steps, so `EmbeddingPGD` perturbs the input embeddings instead (the model is then
called with `inputs_embeds`, as FreeLB and other embedding-space adversarial training do); the
direction is the sign (ℓ∞) or the per-token normalised gradient (ℓ2).

Every attack runs against the model in eval mode (no dropout: the strongest, deterministic
adversary) and restores the mode it found, each submodule's; gradients are taken with respect to
the perturbation only, so parameters' `.grad` are never touched. `EmbeddingPGD` refuses a
padded batch that the model classifies otherwise from embeddings than from token ids: a GPT-2 or
Llama classifier finds each row's last real token from input_ids (pad such batches on the left),
a RoBERTa-like encoder numbers positions from them (pad those on the right).

Data, for `clean_accuracy`, `attacked_accuracy` and `splice.robust.adversarial_patch`: a pair
`(inputs, labels)` of tensors, or a dict of tensors with "labels" (the whole set, cut into
`batch_size` rows), or any other iterable of batches, each an `(inputs, labels)` pair or a dict
with "labels" (the model is called with the dict's other entries). Labels are class indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.errors import DataError, SpliceError
from splice.core.modes import evaluating

Inputs = torch.Tensor | Mapping[str, torch.Tensor]  # an image batch, or the model's keyword inputs (text)
Batch = tuple[Inputs, torch.Tensor]  # inputs and their class labels
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor] | Iterable[Any]


class Threat(Protocol):
    """What `adversarial_patch` and `attacked_accuracy` need of an attack."""

    def check(self, inputs: Inputs) -> None:
        """Raise a DataError when `inputs` is not a batch this attack can perturb."""

    def perturb(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The perturbed tensor (images, or input embeddings)."""

    def attacked(self, inputs: Inputs, perturbed: torch.Tensor) -> Inputs:
        """What the model is called with for the perturbed batch."""


@dataclass(frozen=True)
class LinfPGD:
    """PGD in the ℓ∞ ball of radius `eps` around an image batch, clamped to `bounds`.

    Attributes:
        eps: the ball's radius in input units; 8/255 is the usual CIFAR-10 threat for pixels in [0, 1].
        step_size: each step's move per pixel (2/255 with 10 steps reaches the ball's faces).
        steps: gradient steps (PGD-10 is the usual training attack).
        random_start: start from a uniform point of the ball (Madry et al.), not from x.
        bounds: the valid input range, (low, high); None for inputs without one (normalised images).
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    bounds: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_budget(self, self.eps, self.step_size, self.steps)
        if self.bounds is not None and not (len(self.bounds) == 2 and self.bounds[0] < self.bounds[1]):
            raise SpliceError(f"LinfPGD bounds must be (low, high) with low < high, got {self.bounds!r}")

    def check(self, inputs: Inputs) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise DataError(f"LinfPGD perturbs tensors (images); got a {type(inputs).__name__} batch "
                            "(EmbeddingPGD perturbs the embeddings of dict batches of text)")
        if not inputs.is_floating_point() or inputs.dim() < 2:
            raise DataError(f"LinfPGD perturbs floating-point batches of at least 2 dimensions (rows first); got "
                            f"dtype {str(inputs.dtype).removeprefix('torch.')}, shape {tuple(inputs.shape)}")
        if self.bounds is not None and inputs.numel():
            low, high = inputs.min().item(), inputs.max().item()
            if low < self.bounds[0] or high > self.bounds[1]:
                raise DataError(f"LinfPGD inputs range over [{low:.4g}, {high:.4g}], outside bounds {self.bounds}: "
                                "scale them into the bounds (eps is in the same units), or pass the inputs' bounds")

    def perturb(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The adversarial images: within `eps` of `inputs` in every pixel and inside `bounds`."""
        self.check(inputs)
        inputs = inputs.detach()
        x = inputs
        if self.random_start:
            noise = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
            x = self._project(inputs + (2 * noise - 1) * self.eps, inputs)
        with evaluating(model), torch.enable_grad():
            for _ in range(self.steps):
                grad = input_gradient(model, x, lambda z: z, labels, loss_fn)
                x = self._project(x + self.step_size * grad.sign(), inputs)
        return x

    def attacked(self, inputs: Inputs, perturbed: torch.Tensor) -> Inputs:
        return perturbed

    def _project(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        x = torch.minimum(torch.maximum(x, inputs - self.eps), inputs + self.eps)
        return x.clamp(*self.bounds) if self.bounds is not None else x


@dataclass(frozen=True)
class EmbeddingPGD:
    """PGD on the input embeddings of a text classifier (`model.get_input_embeddings()`).

    The radius is relative to the size of the model's embeddings, so one eps means the same on
    any model: with ρ the root mean square of the embedding matrix's entries and d its width,
    each token's perturbation δ_t is bounded by ‖δ_t‖∞ <= eps ρ ("linf") or ‖δ_t‖2 <= eps ρ √d
    ("l2"; ρ √d is a typical token vector's length). `step_size` is in the same units. Only the
    tokens the attention mask keeps are perturbed.

    Attributes:
        eps: the ball's radius, as a fraction of the typical embedding entry (linf) or vector (l2).
        step_size: each step's move, same units.
        steps: gradient steps.
        norm: "l2" (each token's vector moves along its normalised gradient) or "linf" (the sign).
        random_start: start from a uniform point of the ball, not from the clean embeddings.
    """

    eps: float
    step_size: float
    steps: int = 10
    norm: Literal["linf", "l2"] = "l2"
    random_start: bool = True

    def __post_init__(self) -> None:
        check_budget(self, self.eps, self.step_size, self.steps)
        if self.norm not in ("linf", "l2"):
            raise SpliceError(f"EmbeddingPGD norm must be 'linf' or 'l2', got {self.norm!r}")

    def check(self, inputs: Inputs) -> None:
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise DataError("EmbeddingPGD perturbs the embeddings of text batches: mappings with 'input_ids' (and "
                            f"'attention_mask'); got {describe_batch(inputs)} (LinfPGD perturbs image tensors)")
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.is_floating_point():
            raise DataError(f"EmbeddingPGD: input_ids must be integer token ids of shape (rows, length); got dtype "
                            f"{str(ids.dtype).removeprefix('torch.')}, shape {tuple(ids.shape)}")
        mask = inputs.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise DataError(f"EmbeddingPGD: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")

    def radius(self, model: nn.Module) -> tuple[float, float]:
        """(eps, step_size) in the embeddings' own units for `model` (see the class doc)."""
        weight = embeddings_of(model).weight.detach()
        scale = weight.float().pow(2).mean().sqrt().item()
        if self.norm == "l2":
            scale *= math.sqrt(weight.shape[-1])
        return self.eps * scale, self.step_size * scale

    def perturb(self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                loss_fn: LossFn = F.cross_entropy, generator: torch.Generator | None = None) -> torch.Tensor:
        """The adversarial `inputs_embeds`: each kept token's embedding moved at most the radius."""
        self.check(inputs)
        eps, step = self.radius(model)
        with torch.no_grad():
            clean = embeddings_of(model)(inputs["input_ids"])
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))[..., None].to(clean.dtype)
        delta = self._start(clean, eps, generator) * mask
        with evaluating(model), torch.enable_grad():
            self._check_embeddings_path(model, inputs, clean)
            for _ in range(self.steps):
                grad = input_gradient(model, delta, lambda d: self.attacked(inputs, clean + d), labels, loss_fn)
                delta = self._project(delta + step * self._direction(grad), eps) * mask
        # the embeddings again, in the caller's grad mode: a loss on the result reaches the
        # embedding layer (a patch that adapts it trains), the perturbation is a constant
        return embeddings_of(model)(inputs["input_ids"]) + delta.detach()

    def attacked(self, inputs: Inputs, perturbed: torch.Tensor) -> Inputs:
        assert isinstance(inputs, Mapping), "check() refuses other inputs"
        return {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": perturbed}

    @torch.no_grad()
    def _check_embeddings_path(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], clean: torch.Tensor) -> None:
        """Refuse a batch the model classifies otherwise from its clean `inputs_embeds` than from
        its `input_ids`. Given embeddings only, a GPT-2 or Llama sequence classifier takes the last
        position (from ids: each row's last token that is not padding), and RoBERTa-like encoders
        number the positions from the start (from ids: counting real tokens only). Only a batch
        with padding can differ so (a masked position, or the pad token id at a row's end); others
        are not checked, nor a padding side a model of the same class has passed with (the two
        paths differ by architecture, not weights), which saves two forward passes a batch."""
        side = self._padding_side(model, inputs)
        if side is None or (type(model), side) in _PASSED_EMBEDDINGS_PATH:
            return
        by_ids = model_logits(model, inputs).float()
        by_embeddings = model_logits(model, self.attacked(inputs, clean)).float()
        scale = by_ids.abs().max().item()
        if by_ids.shape != by_embeddings.shape or (by_ids - by_embeddings).abs().max().item() > 1e-4 * max(scale, 1.0):
            raise SpliceError(f"EmbeddingPGD: {type(model).__name__} classifies this padded batch otherwise from its "
                              "embeddings (inputs_embeds) than from its input_ids, so the attack would perturb another "
                              "input than the one classified: decoder classifiers (GPT-2, Llama) find each row's last "
                              "real token from input_ids (pad them on the left), RoBERTa-like encoders number "
                              "positions from input_ids (pad them on the right); or give rows without padding")
        if side != "mixed":
            _PASSED_EMBEDDINGS_PATH.add((type(model), side))

    @staticmethod
    def _padding_side(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> str | None:
        """Where the batch is padded: "left", "right", "mixed" (both, or inside rows), "pad id" (no
        mask, the pad token at a row's end); None: nowhere."""
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            first, last = bool(mask[:, 0].all()), bool(mask[:, -1].all())
            return "right" if first and not last else "left" if last and not first else "mixed"
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return "pad id" if isinstance(pad, int) and bool((inputs["input_ids"][:, -1] == pad).any()) else None

    def _start(self, clean: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return torch.zeros_like(clean)
        if self.norm == "linf":
            noise = torch.rand(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
            return (2 * noise - 1) * eps
        # uniform in each token's l2 ball: a uniform direction, a length of eps * U^(1/d)
        direction = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        length = torch.rand((*clean.shape[:-1], 1), generator=generator, device=clean.device, dtype=clean.dtype)
        return unit(direction) * eps * length.pow(1 / clean.shape[-1])

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign() if self.norm == "linf" else unit(grad)

    def _project(self, delta: torch.Tensor, eps: float) -> torch.Tensor:
        if self.norm == "linf":
            return delta.clamp(-eps, eps)
        norms = delta.norm(dim=-1, keepdim=True)
        return delta * (eps / norms.clamp_min(eps))


# (model class, padding side) whose classification from inputs_embeds matched the one from input_ids
_PASSED_EMBEDDINGS_PATH: set[tuple[type, str]] = set()


def check_budget(threat: object, eps: float, step_size: float, steps: int) -> None:
    """Refuse a radius or step that is not a positive finite number, or fewer than one step."""
    name = type(threat).__name__
    for field, value in (("eps", eps), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SpliceError(f"{name} {field} must be a positive number, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpliceError(f"{name} steps must be an integer >= 1, got {steps!r}")


def unit(t: torch.Tensor) -> torch.Tensor:
    """`t` scaled to length 1 along the last dimension (zero vectors stay zero)."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


def embeddings_of(model: nn.Module) -> nn.Module:
    """The model's input embedding layer (`get_input_embeddings()`, transformers' convention)."""
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    if not isinstance(found, nn.Module) or not isinstance(getattr(found, "weight", None), torch.Tensor):
        raise SpliceError(f"EmbeddingPGD needs a model whose get_input_embeddings() returns an embedding layer; "
                          f"{type(model).__name__} has none")
    return found


def model_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The model's class scores: a dict batch is passed as keyword arguments; HF outputs give `.logits`."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def input_gradient(model: nn.Module, leaf: torch.Tensor, feed: Callable[[torch.Tensor], Inputs],
                   labels: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """∇ of the loss of `model(feed(leaf))` with respect to `leaf` alone (no parameter's `.grad` changes)."""
    leaf = leaf.detach().requires_grad_(True)
    loss = loss_fn(model_logits(model, feed(leaf)), labels)
    check_finite(loss, "the attack's loss")
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def check_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite values (a loss, or outputs): every measurement after would be meaningless."""
    if not torch.isfinite(values).all():
        bad = values.detach().flatten()[~torch.isfinite(values.detach().flatten())][0].item()
        raise SpliceError(f"{what} {'is' if values.numel() == 1 else 'hold'} {bad}: the model's outputs overflow or "
                          "are NaN (a learning rate too high, or inputs the model cannot take)")


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block the global random generators of the CPU (and of `device`, if CUDA) start
    from `seed` (random starts, dropout, adapter inits); after it they are as they were."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def batches(data: Data, batch_size: int, order: torch.Generator | None = None) -> Iterator[Batch]:
    """The (inputs, labels) batches of `data` (module doc); a whole set in `batch_size` rows, shuffled
    by `order` when given. Each batch is checked: labels are 1-D class indices, one per input row."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpliceError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    whole = split_batch(data) if is_whole_set(data) else None
    if whole is not None:
        inputs, labels = whole
        rows = torch.randperm(len(labels), generator=order) if order is not None else torch.arange(len(labels))
        for index in rows.split(batch_size):
            index = index.to(labels.device)
            yield (take_rows(inputs, index), labels[index])
        return
    count = 0
    for batch in data:
        count += 1
        yield split_batch(batch)
    if not count:
        raise DataError("the data holds no batch")


def is_whole_set(data: Data) -> bool:
    """A pair of tensors or a dict of tensors is a whole set; anything else iterates batches (a batch
    is never a bare tensor, so a list of two tensors is a pair too)."""
    if isinstance(data, Mapping):
        return True
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def split_batch(batch: Any) -> Batch:
    """(inputs, labels) of one batch, checked; a dict batch's inputs are its other entries."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise DataError(f"a dict batch needs 'labels' (class indices); it has {sorted(batch)}")
        inputs: Inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
    else:
        raise DataError(f"a batch is an (inputs, labels) pair or a dict with 'labels'; got {describe_batch(batch)}")
    check_labels(inputs, labels)
    return inputs, labels


def check_labels(inputs: Any, labels: Any) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DataError(f"labels must be a 1-D tensor of class indices, got {shape}")
    tensors = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise DataError(f"inputs must be tensors with rows first; got {describe_batch(inputs)}")
        if len(tensor) != len(labels):
            raise DataError(f"inputs have {len(tensor)} rows but labels {len(labels)}")
    if not len(labels):
        raise DataError("a batch has no rows")
    if bool((labels < 0).any()):
        raise DataError(f"labels must be class indices >= 0, got {int(labels.min())} (an 'ignore' label such as -100 "
                        "would drop its row from the attack and the loss but count it as wrong): drop such rows")


def take_rows(inputs: Inputs, index: torch.Tensor) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[index.to(v.device)] for k, v in inputs.items()}
    return inputs[index.to(inputs.device)]


def describe_batch(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with {sorted(batch)}"
    return f"a {type(batch).__name__}"


def clean_accuracy(model: nn.Module, data: Data, *, batch_size: int = 64) -> float:
    """The fraction of rows the model classifies correctly, in eval mode."""
    correct = total = 0
    with evaluating(model), torch.no_grad():
        for inputs, labels in batches(data, batch_size):
            logits = model_logits(model, inputs)
            check_finite(logits, "clean_accuracy: the model's outputs")
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def attacked_accuracy(model: nn.Module, data: Data, threat: Threat, *, batch_size: int = 64, seed: int = 0) -> float:
    """The fraction of rows still classified correctly after `threat` attacked each one (its random
    start drawn from `seed`), in eval mode."""
    correct = total = 0
    with evaluating(model), seeded(seed, parameter_device(model)):
        for inputs, labels in batches(data, batch_size):
            perturbed = threat.perturb(model, inputs, labels)
            with torch.no_grad():
                logits = model_logits(model, threat.attacked(inputs, perturbed))
            check_finite(logits, "attacked_accuracy: the model's outputs on the attacked batch")
            predicted = logits.argmax(-1)
            correct += int((predicted == labels).sum())
            total += len(labels)
    return correct / total


def parameter_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
