"""Calibration for JACTUS: which Linear layers a target pattern selects, and their statistics
over a few batches, the input covariance C_x = E[x xᵀ] and the output-gradient covariance
C_g = E[g gᵀ], g = ∂L/∂(W x), taken with hooks and without changing or storing any weight
gradient (see `splice.compression.jactus` for how they shape the kept subspaces)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.core import progress
from splice.core.config import AdapterConfig, Targets
from splice.core.errors import SpliceError, TargetError
from splice.core.layers import describe
from splice.core.targets import resolve_targets

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class LayerStats:
    """Calibration statistics of one Linear layer (float64, on the CPU).

    Attributes:
        input_cov: C_x = E[x xᵀ] over the calibration token rows, [in, in].
        grad_cov: C_g = E[g gᵀ], g = ∂L/∂(W x) at the same rows, [out, out].
        rows: how many token rows the expectations average.
    """

    input_cov: torch.Tensor
    grad_cov: torch.Tensor
    rows: int



def linear_targets(model: nn.Module, targets: Targets = "all-linear", exclude: Targets = None,
                   layers: Any = None, train_also: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """The Linear modules a splice target pattern selects (PEFT's rules and splice's errors).

    Only Linear layers (nn.Linear and transformers' Conv1D) can be factorized; a pattern that
    selects anything else is refused with the module's name and type.
    """
    config = AdapterConfig(targets=targets, exclude=exclude, layers=layers, train_also=list(train_also))
    selected = resolve_targets(model, config)
    others = [f"{name} ({type(module).__name__})" for name, module in selected
              if describe(module) is None or describe(module).kind != "linear"]
    if others:
        raise TargetError(f"JACTUS factorizes Linear layers only; targets {targets!r} also select: "
                          f"{', '.join(others[:8])}. Narrow targets= or add them to exclude=")
    return selected


def calibrate(model: nn.Module, batches: Iterable[Batch], targets: Targets = "all-linear", *,
              exclude: Targets = None, layers: Any = None, train_also: Sequence[str] = (),
              loss_fn: LossFn | None = None) -> dict[str, LayerStats]:
    """C_x and C_g of every targeted Linear, from forward and backward passes over `batches`.

    Each batch is a mapping the model accepts as `model(**batch)`, with labels so that the
    output has a `.loss`; for a model without one, pass `loss_fn(model, batch) -> loss`. The
    model runs in eval mode (no dropout) and its modes are restored afterwards. Gradients are
    taken with `torch.autograd.grad` with respect to the layers' outputs only, so no parameter
    receives a `.grad` and no weight changes; a frozen model works too (each targeted output is
    connected to the graph by adding a zero that requires grad).
    """
    selected = linear_targets(model, targets, exclude, layers, train_also)
    sums = _Covariances(selected)
    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(sums.forward_hook(name)) for name, module in selected]
    model.eval()
    seen = 0
    try:
        with torch.enable_grad():
            for batch in progress.track(batches, "calibrate"):
                seen += 1
                sums.add_batch(model, batch, loss_fn)
    finally:
        for handle in handles:
            handle.remove()
        sums.captured.clear()
        for module, mode in modes.items():
            module.train(mode)
    if not seen:
        raise SpliceError("calibrate got no batches; pass an iterable of batches (e.g. a DataLoader)")
    return sums.stats()


class _Covariances:
    """Running sums of x xᵀ and g gᵀ per targeted layer, and the token rows they hold.

    The sums live on each layer's device (float64), so a GPU model is not synchronised per
    batch. The forward hook records a layer's inputs and keeps its output for the backward
    pass of the batch; rows where the batch's attention mask is 0 (padding) are left out."""

    def __init__(self, selected: list[tuple[str, nn.Module]]) -> None:
        self.x_sums: dict[str, torch.Tensor] = {}
        self.g_sums: dict[str, torch.Tensor] = {}
        for name, module in selected:
            n, m = _in_out(module)
            device = next(module.parameters()).device
            self.x_sums[name] = torch.zeros(n, n, dtype=torch.float64, device=device)
            self.g_sums[name] = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.rows = dict.fromkeys(self.x_sums, 0)
        self.captured: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self.mask: torch.Tensor | None = None
        self.anchor = torch.zeros((), requires_grad=True)
        self.batches = 0

    def forward_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def record(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            keep = _row_mask(self.mask, output)
            x = _rows(args[0], keep)
            self.x_sums[name] += x.T @ x
            self.rows[name] += x.shape[0]
            if not output.requires_grad:
                output = output + self.anchor.to(output.device)
            self.captured.append((name, output, keep))
            return output

        return record

    def add_batch(self, model: nn.Module, batch: Batch, loss_fn: LossFn | None) -> None:
        """One forward pass (the hooks add the inputs) and the gradients of its loss."""
        self.captured.clear()
        self.mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        loss = _loss(model, batch, loss_fn)
        if not torch.isfinite(loss).all():
            raise SpliceError(f"calibration batch {self.batches} gives a non-finite loss "
                              f"({loss.detach().float().item()}): its statistics would be NaN; check the batch "
                              "or run the model in float32")
        self.batches += 1
        grads = torch.autograd.grad(loss, [out for _, out, _ in self.captured], allow_unused=True)
        for (name, _, keep), g in zip(self.captured, grads, strict=True):
            if g is not None:
                g = _rows(g, keep)
                self.g_sums[name] += g.T @ g

    def stats(self) -> dict[str, LayerStats]:
        """The means, on the CPU; a target no batch reached is refused."""
        unused = [name for name, n in self.rows.items() if n == 0]
        if unused:
            raise SpliceError(f"these targets never ran during calibration, so nothing is known about their "
                              f"inputs: {unused[:8]}; exclude them or check the batches reach them")
        overflowed = [name for name in self.rows
                      if not (torch.isfinite(self.x_sums[name]).all() and torch.isfinite(self.g_sums[name]).all())]
        if overflowed:
            raise SpliceError(f"the calibration statistics of {overflowed[:8]} are not finite (inputs or gradients "
                              "overflowed); run the model in float32 or check the batches")
        return {name: LayerStats((self.x_sums[name] / n).cpu(), (self.g_sums[name] / n).cpu(), n)
                for name, n in self.rows.items()}


def _loss(model: nn.Module, batch: Batch, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    output = model(**batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise SpliceError("model(**batch) returned no loss: give batches with labels "
                          f"(batch keys: {sorted(batch)}), or pass loss_fn=lambda model, batch: ...")
    return loss


def _row_mask(mask: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention mask as a row selector, when it matches the layer's leading dims."""
    if mask is None or tuple(mask.shape) != tuple(output.shape[:-1]):
        return None
    return mask.reshape(-1).to(device=output.device, dtype=torch.bool)


def _rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    rows = t.detach().reshape(-1, t.shape[-1])
    return (rows if keep is None else rows[keep]).to(torch.float64)


def _in_out(module: nn.Module) -> tuple[int, int]:
    info = describe(module)
    assert info is not None  # linear_targets only selects describable layers
    return info.in_features, info.out_features
