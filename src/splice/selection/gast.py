"""GAST: gradient-aligned sparse tuning, data and layer selection per step (volume-2 §11; Yao et
al., arXiv 2603.09865).

Each layer block is updated only with the training samples whose gradients agree with the
batch, and only the blocks whose update is strongest move this step. Noisy or off-task samples
are not dropped from the data: a sample may be kept for one layer and left out of another. The
paper's abstract gives only that much; the score and schedule here are the spec's **inferred**
rule, re-check them when the paper body is readable. Per step, for a batch of B samples:

    g_{i,l}   per-sample gradient of sample i's loss w.r.t. block l's trainable parameters
    ḡ_l       reference: the batch's mean direction (1/B) Σ_i g_{i,l}/‖g_{i,l}‖ (reference="direction",
              the default), the batch mean (1/B) Σ_i g_{i,l} (reference="batch", the spec's), or
              the mean gradient of a held-out validation batch (reference="validation")
    a_{i,l} = cos(g_{i,l}, ḡ_l)                        alignment (0 where either is zero)
    K_l     = {i : a_{i,l} among the top ρ·B}          mode="top" (ties with the last kept one kept too)
            | {i : a_{i,l} > 0}                         mode="positive"
    u_l     = mean_{i in K_l} g_{i,l}                    block l's update direction
    S_l     = ‖u_l‖  (score="norm")  or  mean_{i in K_l} a_{i,l}  (score="alignment")
    update the `layers` = K blocks of largest S_l; leave the others as they are this step

Design choices (what the spec leaves open, and one place where it is not followed):

- The default reference is the mean *direction* of the samples' gradients, one vote per sample,
  not the spec's plain batch mean. Once a model fits the clean majority, the samples with wrong
  labels have the largest losses and gradients, and the plain mean follows them. On linear
  classifiers with 30% flipped labels, alignment with the plain mean kept flipped samples as
  often as clean ones or more (one run: 8 of 12 flipped against 8 of 20 clean at step 60), and
  on the spec test's toy (two Gaussian clusters, 4 settings x 3 seeds, 100 SGD steps) it ended
  with a higher clean test loss than plain SGD in 7 of 12; alignment with the mean direction
  beat SGD in all 12 (clean test loss 0.09-0.39 against 0.36-0.54).
  The spec's rule stays available as reference="batch".
- A *layer block* is the trainable parameters under one transformer block: a parameter's module
  path (up to the adapter host, `...query.splice.default.lora_A` -> `...query`) cut after the
  first number that follows a named segment: `bert.encoder.layer.3`, `model.layers.12`,
  `transformer.h.0`, `encoder.block.2` (encoder and decoder stacks are separate blocks).
  Trainable parameters outside any block (a classification head or an LM head trained in full,
  LoRA on the pooler or the embeddings) take no part in the selection: they are updated every
  step with the plain mean of all the batch's per-sample gradients, so the head keeps learning
  what every sample says. A model with no numbered block at all (a plain module whose layers
  are attributes, `fc1` and `fc2`, or a top-level nn.Sequential, `0.` and `1.`) has one block
  per adapter host module instead (`fc1`, `fc2`); there only the parameters of no adapter (a
  head trained in full) are outside. `layer_blocks` gives the grouping.
- Per-sample losses: the model's own loss (`.loss` of its output given the labels) on the
  sample run as a batch of one, so a model whose loss is not plain cross-entropy (label
  smoothing, say) is trained on its own loss; for a transformers causal LM that is the mean
  token loss over the sample's own labelled tokens (labels != -100). A model that returns no
  loss (or takes no labels) gets the cross-entropy of its logits, per token mean for causal LM.
  The reference and the outside update therefore weight samples equally (plain causal-LM
  training weights tokens equally); the loss reported to the trainer is still the
  token-weighted one plain training reports, so that histories compare.
- A causal-LM row without any labelled token (a prompt longer than max_length) has no loss and
  takes no part, as in plain training: it is left out of the reference, never kept, and not
  counted in any mean. A batch of only such rows updates nothing and reports a NaN loss, as
  plain training's mean over no token is, so the trainer's `on_nonfinite` policy applies.
- Per-sample gradients come from `torch.func`: `vmap(grad(loss of one sample))` over the batch
  dimension, each sample run as a batch of one through `functional_call`; no Python loop over
  samples. Through transformers models two things had to change for this to work: (1) the 2-D
  padding mask is turned into the model's own 4-D mask before the vmap (transformers decides
  whether it may skip the mask by looking at the mask's values, which vmap forbids); a batch
  without padding passes no mask at all. (2) Attention runs as "eager" during the per-sample
  pass when the model uses "sdpa" (the same math: PyTorch has no vmap rule for the CPU flash
  kernel and falls back to a per-sample loop for it, at 1.1-4x the time of eager here). Flash
  and flex attention are refused (their masks and kernels do not vmap). The LoRA core's custom
  backward steps aside under torch.func (`splice.core.lowrank.low_rank_delta`), so any adapter
  computed with plain tensor operations works.
- Unselected blocks are left with no gradient (`.grad` untouched, None after the trainer's
  `zero_grad`), not a zero one: AdamW skips a parameter whose grad is None, so the block stays
  bit for bit as it was, while a zero gradient would still move it by its momentum and weight
  decay. This is LISA's freezing: a block's Adam moments and step count advance only on the
  steps it trains. With `grad_accum` > 1 the step's first micro-batch chooses the K blocks
  (from its own per-sample gradients alone); the step's other micro-batches compute and
  update only those blocks (and the outside parameters), each keeping its own samples per
  block. A parameter frozen for the moment (requires_grad False) is neither computed nor
  updated.
- The gradients are written through the trainer's `backward` of Σ ⟨p, u_p⟩ (u detached), so the
  trainer's accumulation scaling and fp16 loss scaling apply as for a plain backward.
- `refresh_every` N: the K blocks are chosen anew every N optimizer steps (and the validation
  reference taken again); in between only the chosen blocks' per-sample gradients are computed
  (data selection still runs on them every step), which saves the backward below the lowest
  chosen block and the memory of the others. N=1 (default) chooses every step.
- reference="validation" takes the validation split's batches in order, cycling, collated as
  the evaluation does, straight from the rows: not from the trainer's prepared loader, on
  which an open iterator would make accelerate decide gradient synchronisation (with
  grad_accum > 1 it then skipped optimizer steps). The rule's state (the blocks chosen and
  when, the reference taken then, the next validation batch, the step records) is in the run's
  checkpoints (`state_dict`), so a resumed run goes on as the uninterrupted one.

Cost. Memory: B × (the trainable parameters computed) floats for the per-sample gradients, on
top of the activations of one vmapped forward (about those of a plain batch): MiniLM with LoRA
r=8 on query/value (6 layers, 73,728 adapter + 770 head parameters) at B=16 is 4.8 MB; SmolLM2
with LoRA r=8 on all linear layers (30 layers, 2.4M) at B=16 is 156 MB. A head trained in full
counts too (SmolLM2's tied LM head, 28M, would be 1.8 GB at B=16: keep large heads frozen or
batches small). Time: on MiniLM, batch 16 × 64 tokens, one CPU thread, the vmapped forward and backward
took about the time of a plain one (0.6-0.8 s against 0.8 s; the per-sample gradients of the
rank-r factors are small matrix products), and a whole training step 1.13-1.18x a plain LoRA
step in `bench/bench_selection.py --quick` (which measures it in every run).

Diagnostics: each history entry of the run gets "selection": {"layers": positions (in
`blocks`) of the blocks updated, "kept": per block the share kept of the labelled samples of
the step's micro-batches it was computed on (None where not computed), "rows": the step's
samples}; the rule keeps the same records in `steps`.

Limits, refused with a message: packing (one row holds many samples), several processes (DDP
reduces gradients in its own backward hooks), a trainer `objective` or `penalties`, adapters
that read the batch's inputs, and gradient checkpointing (torch.func does not run PyTorch's
checkpointing); a quantized base (`quantize`: its layers' autograd functions do not run under
torch.func) and SEA-PEFT's search (whose probes freeze and switch adapters) are refused by
their configs. A model with sliding-window attention works on batches without padding only.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from splice.core.errors import SpliceError
from splice.core.model_state import model_state
from splice.core.targets import HOST_ATTRIBUTE
from splice.train.callbacks import Callback
from splice.train.data import IGNORE_INDEX, collator
from splice.train.gradients import GradientRule, register_gradient_rule

if TYPE_CHECKING:
    from splice.train.trainer import Trainer

Mode = Literal["top", "positive"]
Score = Literal["norm", "alignment"]
Reference = Literal["direction", "batch", "validation"]
MODES = ("top", "positive")
SCORES = ("norm", "alignment")
REFERENCES = ("direction", "batch", "validation")
TIE = 1e-6  # alignments (cosines) this close to the last kept one count as tied with it
_BLOCK = re.compile(r"^(.*?(?:^|\.)[^.\d][^.]*\.\d+)(?:\.|$)")
_HOST = f".{HOST_ATTRIBUTE}."


# ----------------------------------------------------------------------------- layer blocks


def _host_path(name: str) -> str | None:
    """A parameter's adapter host module (`fc1` of `fc1.splice.default.lora_A`); None for a
    parameter of the model itself (a head trained in full)."""
    return name.split(_HOST, 1)[0] if _HOST in name else None


def block_of(name: str) -> str | None:
    """The layer block of a parameter name: its module path (up to an adapter host) up to the
    first number that follows a named segment (`bert.encoder.layer.3`); None outside any block."""
    path = _host_path(name) or name
    found = _BLOCK.match(path)
    return found.group(1) if found else None


def layer_blocks(names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Parameter names grouped by layer block (blocks in the order they first appear), and the
    names outside any block. Where no name has a numbered block (a model whose layers are
    attributes, `fc1`, `fc2`, or a top-level nn.Sequential), each adapter host module is its own
    block, and only parameters of no adapter (heads trained in full) are outside."""
    blocks: dict[str, list[str]] = {}
    outside: list[str] = []
    for name in names:
        block = block_of(name)
        (blocks.setdefault(block, []) if block is not None else outside).append(name)
    if blocks:
        return blocks, outside
    outside = []
    for name in names:
        host = _host_path(name)
        (blocks.setdefault(host, []) if host is not None else outside).append(name)
    return blocks, outside


# ------------------------------------------------------------------- per-sample gradients


class PerSample(NamedTuple):
    """Per-sample gradients ([B, *shape] per parameter name), losses [B] and the weight of each
    sample in the plain batch loss (its labelled tokens for causal LM, 1 for classification). A
    sample of weight 0 (a causal-LM row without labelled tokens) has loss and gradients 0 and
    no vote in the selection."""

    grads: dict[str, torch.Tensor]
    losses: torch.Tensor
    weights: torch.Tensor


def sample_weights(task: str, labels: torch.Tensor) -> torch.Tensor:
    """Each row's weight in the plain batch loss: 1 for classification, for causal LM the number
    of its labelled next tokens (labels[1:] != -100)."""
    if task == "classification":
        return torch.ones(labels.shape[0], device=labels.device)
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()


def sample_losses(task: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and weight from the logits, for a model that returns no loss of its own:
    cross-entropy (weight 1), or for causal LM the mean token loss over the row's labelled next
    tokens (weight: their number)."""
    logits = logits.float()
    if task == "classification":
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        return loss, torch.ones_like(loss)
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                             reduction="none")
    tokens = (labels != IGNORE_INDEX).sum(-1).to(logits.dtype)
    return token_loss.sum(-1) / tokens.clamp(min=1), tokens


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _takes_labels(model: nn.Module) -> bool:
    """Whether the model's forward accepts `labels` (by name or **kwargs)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "labels" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def row_loss(model: nn.Module, task: str, constants: Mapping[str, torch.Tensor] | None = None,
             ) -> Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """`loss(params, row, label)`: one row's loss, the row run as a batch of one (for vmap). The
    model's own `.loss` on that batch where it gives one (label smoothing and all; for a causal
    LM the mean over the row's own labelled tokens), else `sample_losses` of its logits.
    `constants` are further tensors substituted into the model without gradients."""
    fixed = {n: p.detach() for n, p in (constants or {}).items()}
    labelled = _takes_labels(model)

    def loss_of_one(diff: dict[str, torch.Tensor], sample: dict[str, torch.Tensor], label: torch.Tensor):
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        labels = label.unsqueeze(0)
        output = functional_call(model, {**fixed, **diff}, args=(),
                                 kwargs={**one, "labels": labels} if labelled else one)
        own = None if isinstance(output, torch.Tensor) else getattr(output, "loss", None)
        if own is not None:
            return own.float().reshape(())
        return sample_losses(task, _logits(output), labels)[0][0]

    return loss_of_one


def per_sample_gradients(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                         task: str, constants: Mapping[str, torch.Tensor] | None = None) -> PerSample:
    """Gradients of each sample's loss (`row_loss`: the model's own) w.r.t. `params` (name in
    `model` -> tensor), by `vmap(grad(...))` over the batch's first dimension, each sample a
    batch of one.

    `batch` is the trainer's: model inputs plus "labels". `constants` are further tensors
    substituted into the model without gradients (trainable parameters not wanted now). In
    train mode each sample draws its own dropout masks. A transformers model's padding mask is
    made 4-D first and "sdpa" attention runs as "eager" (see the module docstring). Rows of
    weight 0 (no labelled token) get loss and gradients 0."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    primals = {n: p.detach() for n, p in params.items()}
    loss_of_one = row_loss(model, task, constants)

    def with_loss(diff: dict[str, torch.Tensor], sample: dict[str, torch.Tensor], label: torch.Tensor):
        loss = loss_of_one(diff, sample, label)
        return loss, loss.detach()

    with vmappable_attention(model):
        inputs = vmappable_inputs(model, inputs)
        try:
            grads, losses = vmap(grad(with_loss, has_aux=True), in_dims=(None, 0, 0),
                                 randomness="different")(primals, inputs, labels)
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
            raise SpliceError(f"GAST could not take per-sample gradients through {type(model).__name__} with "
                              f"torch.func.vmap: {str(err).splitlines()[0]}") from err
    weights = sample_weights(task, labels).to(losses.device)
    labelled = weights > 0
    if not bool(labelled.all()):  # no labelled token: the model's loss is 0/0, its gradient NaN
        losses = torch.where(labelled, losses, torch.zeros_like(losses))
        grads = {n: torch.where(labelled.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g))
                 for n, g in grads.items()}
    return PerSample(grads, losses, weights)


@contextmanager
def vmappable_attention(model: nn.Module) -> Iterator[None]:
    """Run a transformers model with "eager" attention where it uses "sdpa" (the same math, with
    vmap rules on every operation); refuse attention kernels that cannot be vmapped."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or current == "eager" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    if current != "sdpa":
        raise SpliceError(f"GAST takes per-sample gradients with torch.func.vmap, which needs attention 'eager' or "
                          f"'sdpa'; {type(model).__name__} uses {current!r}: load it with attn_implementation='sdpa'")
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def vmappable_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with a 2-D padding mask replaced by what needs no look at its values inside
    vmap: nothing where nothing is padded, else (transformers models) the model's own 4-D mask
    for its attention implementation, causal where its attention modules are."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    inputs = dict(inputs)
    if bool(mask.all()):
        del inputs["attention_mask"]
        return inputs
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return inputs  # a plain module: its own use of the mask must be vmappable
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        raise SpliceError(f"GAST cannot build {type(model).__name__}'s sliding-window attention mask for a padded "
                          "batch; use batch_size 1 or rows of one length")
    embeds = torch.empty(*mask.shape, 0, device=mask.device, dtype=_dtype(model))  # shape, dtype and device only
    causal = any(getattr(m, "is_causal", False) is True for m in model.modules())
    full = create_causal_mask(config, embeds, mask, None) if causal else create_bidirectional_mask(config, embeds, mask)
    if full is None:
        del inputs["attention_mask"]
    else:
        inputs["attention_mask"] = full
    return inputs


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# ------------------------------------------------------------------------------ selection


def alignments(grads: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """cos(g_i, r) per sample i, over all the named parameters at once (one block); 0 where a
    gradient or the reference is zero."""
    dots = sum((g.flatten(1).float() @ reference[n].flatten().float()) for n, g in grads.items())
    norms = torch.sqrt(sum(g.flatten(1).float().square().sum(1) for g in grads.values()))
    ref_norm = torch.sqrt(sum(reference[n].float().square().sum() for n in grads))
    return dots / (norms * ref_norm).clamp(min=torch.finfo(torch.float32).tiny)


def kept_rows(a: torch.Tensor, keep: float, mode: Mode, voting: torch.Tensor | None = None) -> torch.Tensor:
    """Which samples a block keeps (bool [B]) among the `voting` ones (default all): mode "top",
    the ceil(keep·n) best aligned of the n voting samples and every one tied with the last of
    them (identical gradients are all kept); "positive", a > 0."""
    voting = torch.ones_like(a, dtype=torch.bool) if voting is None else voting
    if mode == "positive":
        return (a > 0) & voting
    votes = int(voting.sum())
    if votes == 0:
        return torch.zeros_like(voting)
    n = min(votes, max(1, math.ceil(keep * votes - 1e-9)))
    threshold = torch.topk(a[voting], n).values[-1]
    return (a >= threshold - TIE) & voting


def mean_of(grads: Mapping[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_i w_i g_i per parameter (w sums to 1: a mean over the chosen samples)."""
    return {n: torch.tensordot(weights.to(g.dtype), g, dims=1) for n, g in grads.items()}


class Selection(NamedTuple):
    """One batch's outcome: the update of each parameter to change (block or outside), the
    blocks updated (names), the samples each computed block kept (bool [B]) and its score."""

    updates: dict[str, torch.Tensor]
    chosen: list[str]
    kept: dict[str, torch.Tensor]
    scores: dict[str, float]


# ----------------------------------------------------------------------------------- rule


@register_gradient_rule("gast")
@dataclass(eq=False)
class GAST(GradientRule, Callback):
    """GAST's per-layer data selection and top-K layer selection (`selection: {name: gast, ...}`).

    Attributes:
        keep: ρ, the share of a batch's samples each block keeps in mode "top" (the best aligned
            ones). 0.5 keeps half: with 30% of the labels flipped (bench/bench_selection.py) the
            flipped samples' gradients point against the batch's and fall in the dropped half.
        mode: "top" (keep the top ρ) or "positive" (keep every sample with a > 0, however many).
        layers: K, the number of blocks updated per step (LISA-like layer sparsity); None: all.
        score: how blocks are ranked for `layers`: "norm", ‖mean of the kept gradients‖ (the
            size of the block's update), or "alignment", the kept samples' mean alignment.
        reference: what alignment is measured against: "direction", the mean of the batch's
            per-sample gradient directions (each sample one vote, so a few large gradients of
            mislabelled samples cannot steer it; see the module docstring); "batch", the batch's
            mean gradient (the spec's rule); or "validation", the mean gradient of a batch of
            the run's validation split (a held-out direction; taken in eval mode, anew every
            `refresh_every` steps, cycling through the split).
        refresh_every: choose the K blocks (and take the validation reference) every N optimizer
            steps; in between, only the chosen blocks' per-sample gradients are computed.
    """

    keep: float = 0.5
    mode: Mode = "top"
    layers: int | None = None
    score: Score = "norm"
    reference: Reference = "direction"
    refresh_every: int = 1
    blocks: list[str] = field(default_factory=list, init=False, repr=False)
    steps: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise SpliceError(f"gast option keep is the share of a batch's samples each layer keeps, in (0, 1]; "
                              f"got {self.keep!r}")
        self.keep = float(self.keep)
        for option, value, allowed in (("mode", self.mode, MODES), ("score", self.score, SCORES),
                                       ("reference", self.reference, REFERENCES)):
            if value not in allowed:
                raise SpliceError(f"gast option {option} must be one of {', '.join(allowed)}; got {value!r}")
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                        or self.layers < 1):
            raise SpliceError(f"gast option layers is the number of layer blocks updated per step, a whole number "
                              f">= 1 (or null for all); got {self.layers!r}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise SpliceError(f"gast option refresh_every is a number of optimizer steps, a whole number >= 1; "
                              f"got {self.refresh_every!r}")
        self._blocks: dict[str, list[str]] = {}
        self._outside: list[str] = []
        self._owner: int | None = None
        self._collate: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None
        self._reset()

    def _reset(self) -> None:
        """A fresh run's state: what `state_dict` holds."""
        self._chosen: list[str] | None = None  # the blocks chosen at the last refresh (None: choose now)
        self._chosen_at: int | None = None  # the optimizer step of the last refresh
        self._reference: dict[str, torch.Tensor] | None = None  # the validation reference taken then
        self._validation_batch = 0  # the validation batch the next reference is taken from
        self.steps.clear()
        self._counts: dict[str, int] = {}  # the step under way: samples kept per block,
        self._seen: dict[str, int] = {}  # the labelled samples each block was computed on,
        self._updated: set[str] = set()  # the blocks updated,
        self._rows = 0  # the samples seen,
        self._pending: dict[str, Any] | None = None  # and its record so far

    # -- the selection on given gradients (no trainer) --------------------------------------

    def select(self, per_sample: PerSample, blocks: Mapping[str, list[str]], outside: list[str],
               reference: Mapping[str, torch.Tensor] | None = None) -> Selection:
        """GAST on one batch's per-sample gradients: per block (of `blocks`, name -> parameter
        names), the samples kept and the mean of their gradients; the top-`layers` blocks by
        score; the plain mean for the `outside` parameters. `reference` (parameter name ->
        gradient, e.g. a validation batch's) replaces the batch's own when given. Samples of
        weight 0 (no labelled token) take no part: not in the reference, never kept, not in
        the outside mean; a batch of such samples only updates nothing."""
        grads = per_sample.grads
        voting = per_sample.weights > 0
        votes = int(voting.sum())
        share = voting.float() / max(votes, 1)  # the plain mean over the voting samples
        kept: dict[str, torch.Tensor] = {}
        means: dict[str, dict[str, torch.Tensor]] = {}
        scores: dict[str, float] = {}
        for block, names in blocks.items():
            if not all(n in grads for n in names):
                continue
            block_grads = {n: grads[n] for n in names}
            if reference is not None:
                ref = {n: reference[n] for n in names}
            elif self.reference == "direction":
                norms = torch.sqrt(sum(g.flatten(1).float().square().sum(1) for g in block_grads.values()))
                ref = mean_of(block_grads, share / norms.clamp(min=torch.finfo(torch.float32).tiny))
            else:
                ref = mean_of(block_grads, share)
            a = alignments(block_grads, ref)
            rows_kept = kept_rows(a, self.keep, self.mode, voting)
            kept[block] = rows_kept
            count = int(rows_kept.sum())
            if count == 0:
                scores[block] = -math.inf  # nothing to update it with
                continue
            means[block] = mean_of(block_grads, rows_kept.float() / count)
            scores[block] = (math.sqrt(sum(float(u.float().square().sum()) for u in means[block].values()))
                             if self.score == "norm" else float(a[rows_kept].mean()))
        ranked = sorted(means, key=lambda b: -scores[b])
        chosen = ranked if self.layers is None else ranked[: self.layers]
        updates = {n: u for b in chosen for n, u in means[b].items()}
        if outside and votes:
            updates |= mean_of({n: grads[n] for n in outside}, share)
        return Selection(updates, [b for b in blocks if b in chosen], kept, scores)

    # -- the trainer's side -----------------------------------------------------------------

    def backward(self, trainer: Trainer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GAST's gradients of one training batch, added to `.grad` of the chosen blocks' and the
        outside parameters; the batch's task loss (token-weighted for causal LM, as plain; NaN
        for a batch without any labelled token, as plain training's loss is)."""
        self._start(trainer)
        model, trained, blocks = trainer.plain_model, trainer.trained, self._blocks
        step = trainer.step_count
        if self._chosen_at is None or (step != self._chosen_at and step % self.refresh_every == 0):
            self._chosen, self._chosen_at = None, step  # every block computed, K chosen anew
            if self.reference == "validation":
                self._reference = self._validation_reference(trainer)
        wanted = list(blocks) if self._chosen is None or self.layers is None else self._chosen
        # Parameters frozen for now (requires_grad False) get no gradient, as in plain training.
        wanted_blocks = {b: live for b in wanted if (live := [n for n in blocks[b] if trained[n].requires_grad])}
        outside = [n for n in self._outside if trained[n].requires_grad]
        params = {n: trained[n] for n in [*(n for names in wanted_blocks.values() for n in names), *outside]}
        constants = {n: p for n, p in trained.items() if n not in params}
        per_sample = per_sample_gradients(model, params, batch, trainer.config.task, constants)
        reference = None if self._reference is None else {
            n: r.to(trained[n].device) for n, r in self._reference.items() if n in params}
        selection = self.select(per_sample, wanted_blocks, outside, reference)
        if self._chosen is None and selection.chosen:  # a batch without labels chooses nothing
            self._chosen = selection.chosen
        if selection.updates:
            # d/dp of Σ ⟨p, u_p⟩ is u_p: the trainer's backward scales it as it would the loss's
            surrogate = sum((trained[n] * u.to(trained[n].dtype)).sum() for n, u in selection.updates.items())
            trainer.backward(surrogate)
        losses, weights = per_sample.losses, per_sample.weights
        self._record(selection, losses.shape[0], int((weights > 0).sum()))
        loss = (losses * weights).sum() / weights.sum()  # 0/0 = NaN without labelled tokens
        return loss, loss

    def on_begin(self, trainer: Trainer) -> None:
        """A run begins (before a resumed run's checkpoint loads this rule's state)."""
        self._reset()

    def on_step_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        """Put the step's selection into its history entry (and `steps`)."""
        if self._pending is not None:
            entry["selection"] = self._pending
            self.steps.append(self._pending)
        self._pending, self._counts, self._seen, self._updated, self._rows = None, {}, {}, set(), 0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as the uninterrupted one (the trainer registers it
        for its checkpoints): the blocks chosen and when, the validation reference taken then,
        the next validation batch, the records of the steps so far and of the step under way."""
        reference = None if self._reference is None else {n: r.detach().cpu() for n, r in self._reference.items()}
        return {"chosen": None if self._chosen is None else list(self._chosen), "chosen_at": self._chosen_at,
                "reference": reference, "validation_batch": self._validation_batch, "steps": list(self.steps),
                "counts": dict(self._counts), "seen": dict(self._seen), "updated": sorted(self._updated),
                "rows": self._rows, "pending": self._pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what `state_dict` gave (tensors stay on the CPU until used)."""
        self._chosen = None if state["chosen"] is None else list(state["chosen"])
        self._chosen_at = state["chosen_at"]
        self._reference = None if state["reference"] is None else dict(state["reference"])
        self._validation_batch = int(state["validation_batch"])
        self.steps[:] = list(state["steps"])
        self._counts, self._seen = dict(state["counts"]), dict(state["seen"])
        self._updated, self._rows, self._pending = set(state["updated"]), int(state["rows"]), state["pending"]

    def _start(self, trainer: Trainer) -> None:
        """On a trainer's first batch: check what GAST cannot do and group the parameters (the
        trainer calls the rule's `on_begin` and `on_step_end` as a callback's)."""
        if self._owner == id(trainer):
            return
        model = trainer.plain_model
        problems = [
            (trainer.config.packing, "packing: true puts a batch's examples into one row; set packing: false"),
            (trainer.accelerator.num_processes > 1, f"it runs in one process only ({trainer.accelerator.num_processes}"
                                                    " here): DDP reduces gradients inside its own backward"),
            (trainer.objective is not None or bool(trainer.penalties),
             "it computes the task loss per sample itself and cannot take a trainer objective or penalties"),
            (model_state(model).inputs_recorder is not None,
             "an attached adapter reads the batch's inputs, which a per-sample pass would cut to one row"),
            (_checkpointing(model),
             "torch.func cannot run gradient checkpointing; set gradient_checkpointing: false (and a smaller "
             "batch_size if memory is short)"),
        ]
        for problem, why in problems:
            if problem:
                raise SpliceError(f"selection gast: {why}")
        self._blocks, self._outside = layer_blocks(list(trainer.trained))
        if not self._blocks:
            raise SpliceError("selection gast found no layer block among the trained parameters (no adapter: "
                              f"only heads trained in full): {list(trainer.trained)[:6]}")
        unknown = [b for b in self._chosen or [] if b not in self._blocks]
        if unknown:
            raise SpliceError(f"selection gast: the checkpoint's chosen blocks {unknown} are not among this model's "
                              f"layer blocks {list(self._blocks)[:6]}")
        self.blocks = list(self._blocks)
        self._collate = collator(trainer.config.task, trainer.tokenizer, trainer.config.max_length)
        self._owner = id(trainer)

    def _record(self, selection: Selection, rows: int, labelled: int) -> None:
        """Add a batch's outcome to the record of the step under way (several with grad_accum):
        a block's kept share is over the labelled samples of the batches it was computed on."""
        for block, rows_kept in selection.kept.items():
            self._counts[block] = self._counts.get(block, 0) + int(rows_kept.sum())
            self._seen[block] = self._seen.get(block, 0) + labelled
        self._updated.update(selection.chosen)
        self._rows += rows
        self._pending = {"layers": [i for i, b in enumerate(self.blocks) if b in self._updated],
                         "kept": [round(self._counts[b] / self._seen[b], 4) if self._seen.get(b) else None
                                  for b in self.blocks],
                         "rows": self._rows}

    def _validation_batch_rows(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """The next batch of the validation split (batch_size rows, in order, cycling), collated
        as the trainer's evaluation does and on its device. Drawn from the rows, not from the
        trainer's prepared loader: an iterator left open on that loader would make accelerate
        take it for the active one and decide gradient synchronisation from it."""
        rows = trainer.eval_rows.get("validation")
        if not rows:
            raise SpliceError("selection gast with reference: validation needs a validation split (set validation: "
                              "or use data with one)")
        size = trainer.config.batch_size
        index = self._validation_batch % math.ceil(len(rows) / size)
        self._validation_batch = index + 1
        batch = self._collate([rows[i] for i in range(index * size, min(len(rows), (index + 1) * size))])
        device = trainer.accelerator.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _validation_reference(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """The mean gradient (per-sample losses averaged, as in training: the model's own loss of
        each row, rows without labelled tokens left out) of the next validation batch, eval mode."""
        batch = self._validation_batch_rows(trainer)
        model, task = trainer.plain_model, trainer.config.task
        params = {n: p.detach() for n, p in trainer.trained.items()}
        labelled = sample_weights(task, batch["labels"]) > 0  # a row without any has no loss (0/0)
        if not bool(labelled.any()):
            return {n: torch.zeros_like(p) for n, p in params.items()}  # no direction: every sample ties
        batch = {k: v[labelled] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels = batch["labels"]
        loss_of_one = row_loss(model, task)

        def mean_loss(diff: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return vmap(loss_of_one, in_dims=(None, 0, 0), randomness="different")(diff, inputs, labels).mean()

        was_training = model.training
        model.eval()
        try:
            with vmappable_attention(model):
                inputs = vmappable_inputs(model, {k: v for k, v in batch.items() if k != "labels"})
                return grad(mean_loss)(params, inputs)
        finally:
            model.train(was_training)


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on (its name since 5.x first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False
