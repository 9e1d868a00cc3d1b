"""PAGE: where an adapter can learn most at step 0 (Projected Adapter Gradient Energy; the
placement score of DomLoRA, arXiv 2605.06183; volume-1 section 1 of the method specs).

A fresh LoRA has B = 0, so its only non-zero gradient is ∂L/∂B = s G Aᵀ, the full-weight
gradient G = ∂L/∂W projected on A's rows. PAGE scores a candidate layer by that energy,

    PAGE_m = (1/N) Σ_batches ‖ s G_m Aᵀ ‖_F²,   G Aᵀ = Σ_t δ_t (A x_t)ᵀ,

over N probe batches (pass batches of one example for the per-example empirical Fisher the
paper describes). Both factors come from hooks: the layer's input x_t (projected to r numbers
per token at once) and the gradient δ_t of its output, so no weight gradient [out, in] is ever
formed. The closed-form expectation over LoRA's default init of A (Kaiming-uniform, entries of
variance 1 / (3 d_in)) is

    E_A ‖ s G Aᵀ ‖² = s² r ‖G‖_F² / (3 d_in),

with ‖G‖_F² = Σ_{t,t'} (δ_t·δ_t')(x_t·x_t') from two token Gram matrices when that is cheaper
than G itself. The sampled score is what one particular init would see; the expected score
does not depend on the draw, which makes it the default for choosing sites.

The base stays frozen and unchanged: gradients reach the hooks because every candidate's output
gets a zero that requires grad added to it (exact: x + 0 == x), and nothing is optimised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from splice.core import progress
from splice.core.config import AdapterConfig, Targets
from splice.core.errors import SpliceError
from splice.core.layers import describe
from splice.core.targets import layer_index, resolve_targets
from splice.io.figures import pyplot, save_png

Score = Literal["expected", "sampled"]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class SiteScore:
    """One candidate module's PAGE scores and its share of the chosen score's total."""

    name: str
    layer: int | None
    kind: str  # the module's path inside its layer, e.g. "mlp.down_proj", "attention.self.query"
    in_features: int
    out_features: int
    sampled: float
    expected: float
    share: float = 0.0


@dataclass
class Placement:
    """PAGE scores of every candidate, best first by `score`."""

    sites: list[SiteScore]
    score: Score
    r: int
    batches: int

    def top(self, k: int = 1) -> list[str]:
        return [site.name for site in self.sites[:k]]

    def rows(self) -> list[dict[str, Any]]:
        return [vars(site) for site in self.sites]

    def heatmap(self, path: str | Path) -> Path:
        """A PNG of each module's share, layers down and module types across."""
        plt = pyplot()

        rows = {site.name: _row(site) for site in self.sites}
        layers = sorted({row for row in rows.values() if row is not None})
        if None in rows.values():  # outside the layer stacks (a pooler): a row of its own
            layers.append(None)
        stacks = {row[0] for row in layers if row is not None}
        kinds = list(dict.fromkeys(s.kind for s in self.sites))
        grid = torch.full((max(len(layers), 1), len(kinds)), float("nan"))
        for site in self.sites:
            grid[layers.index(rows[site.name]), kinds.index(site.kind)] = 100 * site.share
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.35 * max(len(layers), 1)))
        image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), ["other" if row is None else _row_label(row, stacks) for row in layers])
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(f"PAGE share (%), {self.score} score, r={self.r}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = Path(path)
        save_png(fig, path, dpi=120)
        return path


def _row(site: SiteScore) -> tuple[str, int] | None:
    """A site's heatmap row: its layer stack (the path before the layer number) and layer, so
    that an encoder's and a decoder's layer 0 stay apart; None outside any stack."""
    if site.layer is None:
        return None
    found = re.match(rf"(.*?\.[^.]*)\.{site.layer}\.", site.name)
    return (found.group(1) if found else "", site.layer)


def _row_label(row: tuple[str, int], stacks: set[str]) -> str:
    """The layer number; with several stacks, the part of the stack's path that tells them apart
    ("encoder 0", "decoder 0")."""
    stack, layer = row
    if len(stacks) < 2:
        return str(layer)
    others = [other.split(".") for other in stacks if other != stack]
    own = [part for i, part in enumerate(stack.split(".")) if any(i >= len(o) or o[i] != part for o in others)]
    return f"{'.'.join(own) or stack} {layer}"


class _Probe:
    """Hooks on one candidate layer that accumulate its sampled and expected PAGE. A layer that
    runs several times in one pass (ALBERT's shared layers) gets G summed over its calls, as a
    real LoRA's ∂L/∂B would: the calls' tokens are stacked and the pass squared once (`finish`)."""

    def __init__(self, module: nn.Module, A: torch.Tensor, scaling: float, out_features: int) -> None:
        self.A, self.scaling = A, scaling
        self.in_features, self.out_features = A.shape[1], out_features
        self.sampled = 0.0
        self.expected = 0.0
        self._calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x, δ) of this pass's calls
        self.handle = module.register_forward_hook(self.forward_hook)

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].detach()
        output = output + _ZERO
        output.register_hook(lambda delta: self._calls.append((x, delta)))
        return output

    def finish(self) -> None:
        """Add this pass's scores (after its backward) and forget its calls."""
        if not self._calls:
            return
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in self._calls]).to(self.A.dtype)
        delta = torch.cat([d.reshape(-1, d.shape[-1]) for _, d in self._calls]).to(self.A.dtype)
        self._calls = []
        projected = delta.T @ (x @ self.A.T)  # G Aᵀ, [out, r]
        self.sampled += self.scaling**2 * projected.square().sum().item()
        r = self.A.shape[0]
        self.expected += self.scaling**2 * r * _squared_norm(x, delta) / (3 * self.in_features)


_ZERO = torch.zeros((), requires_grad=True)  # added to every probed output (see module doc)


def _squared_norm(x: torch.Tensor, delta: torch.Tensor) -> float:
    """‖δᵀ x‖_F² without forming it when the token Gram matrices are smaller."""
    tokens, d_in, d_out = x.shape[0], x.shape[1], delta.shape[1]
    if tokens * (d_in + d_out) < d_in * d_out:
        return ((delta @ delta.T) * (x @ x.T)).sum().item()
    return (delta.T @ x).square().sum().item()


def page(
    model: nn.Module,
    batches: Iterable[Any],
    candidates: Targets = "all-linear",
    r: int = 8,
    *,
    alpha: float | None = None,
    layers: list[int] | None = None,
    exclude: Targets = None,
    score: Score = "expected",
    loss_fn: LossFn | None = None,
    seed: int = 0,
    factors: dict[str, torch.Tensor] | None = None,
) -> Placement:
    """Score every candidate Linear module by PAGE on `batches`; see the module doc.

    Args:
        batches: probe batches; a dict is called as `model(**batch)` and its `.loss` used,
            anything else goes to `loss_fn(model, batch)`.
        candidates, layers, exclude: which modules compete, with `splice.LoRA`'s target rules.
        r, alpha: the adapter the score is for (scale alpha / r; alpha defaults to 2r).
        score: which score orders the table and gives the shares.
        seed: the draw of A for the sampled score (Kaiming-uniform, as `splice.LoRA`).
        factors: A [r, in] by module name instead of a draw, e.g. an attached LoRA's lora_A.
    """
    if score not in ("expected", "sampled"):
        raise SpliceError(f"score must be 'expected' or 'sampled', got {score!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise SpliceError(f"r (the rank the score is for) must be a positive integer, got {r!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise SpliceError(f"alpha must be a positive finite number (or None for 2r), got {alpha!r}")
    scaling = (2 * r if alpha is None else alpha) / r
    selected = resolve_targets(model, AdapterConfig(targets=candidates, layers=layers, exclude=exclude))
    unknown = sorted(set(factors or {}) - {name for name, _ in selected})
    if unknown:
        raise SpliceError(f"factors name modules that are not candidates: {unknown[:5]}; the candidates are "
                          f"{[name for name, _ in selected][:5]}{' ...' if len(selected) > 5 else ''}")
    generator = torch.Generator().manual_seed(seed)
    probes = {name: _probe(name, module, r, scaling, generator, factors) for name, module in selected}
    count = _backward_passes(model, batches, probes, loss_fn)
    bad = [name for name, p in probes.items() if not (math.isfinite(p.sampled) and math.isfinite(p.expected))]
    if bad:
        raise SpliceError(f"PAGE scores of {bad[:5]} are not finite (an overflowing gradient): nothing to rank")
    sites = [
        SiteScore(name, layer_index(name + "."), _kind(name), p.in_features, p.out_features,
                  p.sampled / count, p.expected / count)
        for name, p in probes.items()
    ]
    total = sum(getattr(s, score) for s in sites) or 1.0
    for site in sites:
        site.share = getattr(site, score) / total
    sites.sort(key=lambda s: getattr(s, score), reverse=True)
    return Placement(sites, score, r, count)


def _probe(name: str, module: nn.Module, r: int, scaling: float, generator: torch.Generator,
           factors: dict[str, torch.Tensor] | None) -> _Probe:
    """Hooks on a candidate Linear for a LoRA of rank r: A drawn as `splice.LoRA` draws it
    (from `generator`, in candidate order), or the one `factors` gives."""
    info = describe(module)
    if info is None or info.kind != "linear":
        raise SpliceError(f"PAGE scores Linear layers; candidate {name!r} is a {type(module).__name__}")
    bound = 1 / math.sqrt(info.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    A = (torch.rand(r, info.in_features, generator=generator) * 2 - 1) * bound
    if factors is not None and name in factors:
        A = factors[name].detach().float()
        if A.shape != (r, info.in_features):
            raise SpliceError(f"factors[{name!r}] has shape {tuple(A.shape)}, PAGE needs {(r, info.in_features)}")
    return _Probe(module, A.to(module.weight.device), scaling, info.out_features)


def _backward_passes(model: nn.Module, batches: Iterable[Any], probes: dict[str, _Probe],
                     loss_fn: LossFn | None) -> int:
    """Run every batch forward and backward so that the probes accumulate; return how many.

    The model is in eval mode meanwhile (no dropout: the score of the model as it is) and its
    parameters do not require grad (only the hooks need gradients: no weight gradient is formed
    or left behind); the hooks, modes and flags are restored or removed afterwards."""
    was_training = model.training
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    count = 0
    try:
        for batch in progress.track(batches, "PAGE probe"):
            loss = _loss(model, batch, loss_fn)
            if not torch.isfinite(loss).all():
                raise SpliceError(f"probe batch {count} gives a non-finite loss ({loss.detach().float().item()}): "
                                  "PAGE cannot rank modules from it; check the batch or run the model in float32")
            loss.backward()
            for probe in probes.values():
                probe.finish()
            count += 1
    finally:
        for probe in probes.values():
            probe.handle.remove()
        model.train(was_training)
        for param in trainable:
            param.requires_grad_(True)
        _ZERO.grad = None
    if not count:
        raise SpliceError("PAGE needs at least one probe batch")
    return count


def _kind(name: str) -> str:
    """The module's path inside its layer ("mlp.down_proj", "attention.output.dense"), else its name."""
    found = re.match(r".*?\.\d+\.(.+)$", name)
    return found.group(1) if found else name


def _loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, dict):
        raise SpliceError(f"a probe batch of type {type(batch).__name__} needs loss_fn=(model, batch) -> loss")
    device = next(model.parameters()).device
    output = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    loss = getattr(output, "loss", None)
    if loss is None:
        raise SpliceError("the model returned no .loss for a probe batch; include labels or pass loss_fn")
    return loss
