"""Pictures of adapter spectra (`splice analyze`): normalised singular values per module type,
and a layers x module types heatmap of the entropy effective rank. The numbers they draw come
from `splice.analysis.spectra`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from splice.io.figures import pyplot, save_png

if TYPE_CHECKING:
    from splice.analysis.spectra import ModuleSpectrum, SpectraReport


def plot_spectra(report: SpectraReport, path: str | Path, top_k: int | None = None) -> None:
    """Normalised spectra σ_i/σ₁ on a log scale: one panel per module type, one line per layer
    (coloured by depth), a dashed line at the adapter's rank r. Round-off values are not drawn."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = _by_type(report.modules)
    cols = min(len(groups), 3) or 1
    rows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols + 1, 3.0 * rows), squeeze=False, layout="constrained")
    layers = [m.layer for m in report.modules if m.layer is not None]
    norm = plt.Normalize(min(layers, default=0), max(max(layers, default=0), 1))
    cmap = plt.get_cmap("viridis")
    labels = _short_labels(list(groups))
    for ax, (kind, members) in zip(axes.flat, groups.items(), strict=False):
        for m in members:
            s = m.singular_values[m.singular_values > 0][:top_k]
            if s.numel():
                ax.plot(range(1, s.numel() + 1), (s / s[0]).numpy(), marker="." if s.numel() < 40 else None,
                        lw=1, color=cmap(norm(m.layer if m.layer is not None else 0)))
        ranks = {m.adapter_rank for m in members if m.adapter_rank}
        if len(ranks) == 1:
            ax.axvline(ranks.pop(), ls="--", lw=0.8, color="gray")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(labels[kind], fontsize=9)
        ax.set(xlabel="i", ylabel="σ_i / σ_1")
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    if layers:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer", shrink=0.8,
                     ticks=MaxNLocator(integer=True))
    fig.suptitle(f"singular values of ΔW, {report.adapter}", fontsize=10)
    save_png(fig, path)


def plot_effective_ranks(report: SpectraReport, path: str | Path) -> None:
    """A heatmap layers x module types of the entropy effective rank, each cell annotated; the
    colour scale runs from 0 to the adapter's rank r (or the largest value), so colour is absolute."""
    plt = pyplot()
    groups = _by_type(report.modules)
    layer_keys = sorted({m.layer for m in report.modules}, key=lambda v: (v is None, v or 0))
    grid = torch.full((len(layer_keys), len(groups)), float("nan"))
    for col, members in enumerate(groups.values()):
        for m in members:
            grid[layer_keys.index(m.layer), col] = m.entropy_rank
    ranks = {m.adapter_rank for m in report.modules if m.adapter_rank}
    rank = ranks.pop() if len(ranks) == 1 else None
    top = rank or max(grid.nan_to_num(0).max().item(), 1.0)
    labels = _short_labels(list(groups))
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(groups), 1.4 + 0.3 * len(layer_keys)), layout="constrained")
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=top, interpolation="nearest")
    ax.set_xticks(range(len(groups)), [labels[k] for k in groups], rotation=30, ha="right")
    ax.set_yticks(range(len(layer_keys)), ["-" if v is None else str(v) for v in layer_keys])
    ax.set(xlabel="module", ylabel="layer")
    for row in range(grid.shape[0]):
        for col in range(grid.shape[1]):
            value = grid[row, col].item()
            if not math.isnan(value):
                ax.text(col, row, f"{value:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 * top else "white")
    ax.set_title("effective rank (entropy)" + (f", r = {rank}" if rank else ""), fontsize=10)
    fig.colorbar(image, ax=ax)
    save_png(fig, path)



def _by_type(modules: list[ModuleSpectrum]) -> dict[str, list[ModuleSpectrum]]:
    groups: dict[str, list[ModuleSpectrum]] = {}
    for m in modules:
        groups.setdefault(m.module_type, []).append(m)
    return groups


def _short_labels(types: list[str]) -> dict[str, str]:
    """Short names for module types: the part after the layer number, without the dotted prefix
    all of them share (`query`, `value`), keeping at least the last segment."""
    parts = [t.split(".N.", 1)[-1].split(".") for t in types]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return {t: ".".join(p[shared:]) for t, p in zip(types, parts, strict=True)}
