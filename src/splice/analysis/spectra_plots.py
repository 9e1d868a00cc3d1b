"""Pictures of adapter spectra (`splice analyze`): normalised singular values per module type,
and a layers x module types heatmap of the entropy effective rank. The numbers they draw come
from `splice.analysis.spectra`. The heatmap's parts (`layer_type_grid`, `heatmap_figure`,
`draw_heatmap`) also draw `splice.analysis.routing`'s routing heatmaps."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    grid = layer_type_grid((m.layer, m.module_type, m.entropy_rank) for m in report.modules)
    ranks = {m.adapter_rank for m in report.modules if m.adapter_rank}
    rank = ranks.pop() if len(ranks) == 1 else None
    top = rank or max(grid.values.nan_to_num(0).max().item(), 1.0)
    fig, (ax,) = heatmap_figure(grid)
    draw_heatmap(fig, ax, grid, vmax=top, digits=1,
                 title="effective rank (entropy)" + (f", r = {rank}" if rank else ""))
    save_png(fig, path)


# -- layers x module types heatmaps --------------------------------------------------------------


@dataclass(frozen=True)
class LayerTypeGrid:
    """One number per module on a layers x module types grid.

    Attributes:
        values: [layers, types]; NaN where a layer has no module of that type.
        layers: the rows, ascending; None (a module outside the layers, e.g. a pooler) last.
        types: the columns, module names with their numbers as N, in order of first appearance.
    """

    values: torch.Tensor
    layers: list[int | None]
    types: list[str]


def layer_type_grid(cells: Iterable[tuple[int | None, str, float]]) -> LayerTypeGrid:
    """The grid of (layer, module type, value) cells, e.g. `(m.layer, m.module_type, m.entropy_rank)`."""
    cells = list(cells)
    types = list(dict.fromkeys(kind for _, kind, _ in cells))
    layers = sorted({layer for layer, _, _ in cells}, key=lambda v: (v is None, v or 0))
    values = torch.full((len(layers), len(types)), float("nan"))
    for layer, kind, value in cells:
        values[layers.index(layer), types.index(kind)] = value
    return LayerTypeGrid(values, layers, types)


def heatmap_figure(grid: LayerTypeGrid, panels: int = 1) -> tuple[Any, list[Any]]:
    """A figure with `panels` heatmaps of `grid`'s shape side by side, and their axes."""
    fig, axes = pyplot().subplots(1, panels, figsize=(panels * (2.2 + 0.9 * len(grid.types)),
                                                      1.4 + 0.3 * len(grid.layers)),
                                  squeeze=False, layout="constrained")
    return fig, list(axes.flat)


def draw_heatmap(fig: Any, ax: Any, grid: LayerTypeGrid, *, vmax: float, title: str, digits: int) -> None:
    """`grid` on `ax` with its colour bar: colour from 0 to `vmax` (fixed, so that colour is
    absolute), every cell annotated with `digits` decimals, short module-type labels."""
    image = ax.imshow(grid.values.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    labels = _short_labels(grid.types)
    ax.set_xticks(range(len(grid.types)), [labels[k] for k in grid.types], rotation=30, ha="right")
    ax.set_yticks(range(len(grid.layers)), ["-" if v is None else str(v) for v in grid.layers])
    ax.set(xlabel="module", ylabel="layer")
    for row in range(grid.values.shape[0]):
        for col in range(grid.values.shape[1]):
            value = grid.values[row, col].item()
            if not math.isnan(value):
                ax.text(col, row, f"{value:.{digits}f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 * vmax else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)


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
