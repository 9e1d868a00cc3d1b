"""How a MoELoRA routes tokens on real data: per module, each expert's share, the routing entropy
and the top expert's share (`splice analyze` on a MoELoRA adapter).

A mixture of LoRA experts has no weight change to take the spectrum of: what it learned shows
in its routers. `adapter_routing` runs the model over texts in eval mode (no gradients, no
balancing loss) with the statistics reset first, and reads them back per module
(`splice.methods.moelora.routing_stats`, padding excluded). Two numbers say how a module routes:

    normalised entropy   H / log E, H the mean per-token entropy of the router's distribution
                         over its E routed experts: 1 when every token sees all experts as
                         equally good, 0 when every token is sure of one expert
    top share            the most used expert's share of the routed slots: 1/E when experts are
                         used evenly, at most 1/k with k experts picked per token (each token's
                         k slots go to k different experts)

`plot_routing` draws both as layers x module types heatmaps, in the style of the spectra's
effective-rank heatmap (`splice.analysis.spectra_plots`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from splice import assets
from splice.analysis.spectra import NamedModule, loaded
from splice.analysis.spectra_plots import draw_heatmap, heatmap_figure, layer_type_grid
from splice.core import progress
from splice.core.api import active_adapters, adapters
from splice.core.errors import DataError, SpliceError
from splice.io.figures import save_png
from splice.methods.moelora import moe_adapters, reset_routing_stats, routing_stats

# Data to route when none is named, by the task of the adapter's base model.
DEFAULT_DATA = {"classification": "rotten_tomatoes", "causal_lm": "arithmetic"}
DEFAULT_ROWS = 200

Text = str | Mapping[str, Any]


@dataclass(frozen=True)
class ModuleRouting(NamedModule):
    """The routing of one module over the data.

    Attributes:
        name: the module's path in the model.
        tokens: tokens routed (padding is not).
        utilisation: each routed expert's share of the routed slots (sums to 1); one per expert
            kept, so a pruned module lists fewer.
        entropy: the mean per-token entropy of the routing distribution, in nats.
        top_share: the largest utilisation.
    """

    name: str
    tokens: int
    utilisation: tuple[float, ...]
    entropy: float
    top_share: float

    @classmethod
    def from_stats(cls, name: str, stats: Mapping[str, Any]) -> ModuleRouting:
        """From one module's `routing_stats` entry."""
        return cls(name, int(stats["tokens"]), tuple(stats["utilisation"]), float(stats["entropy"]),
                   float(stats["top_share"]))

    @property
    def experts(self) -> int:
        return len(self.utilisation)

    @property
    def normalised_entropy(self) -> float:
        """entropy / log E: 1 for uniform routing, 0 for certain routing (and for a single expert)."""
        return self.entropy / math.log(self.experts) if self.experts > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived numbers (layer, type, experts, normalised entropy) for readers."""
        return {"name": self.name, "layer": self.layer, "type": self.module_type, "tokens": self.tokens,
                "experts": self.experts, "utilisation": list(self.utilisation), "entropy": self.entropy,
                "normalised_entropy": self.normalised_entropy, "top_share": self.top_share}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModuleRouting:
        return cls(data["name"], data["tokens"], tuple(data["utilisation"]), data["entropy"], data["top_share"])


@dataclass
class RoutingReport:
    """The routing of every module of one MoELoRA adapter over `texts` texts.

    Attributes:
        adapter: the adapter's name, or the folder it was loaded from.
        top_k: experts picked per token (so a top share is at most 1 / top_k).
        texts: how many texts were run.
        modules: the modules that routed tokens, in model order.
        unrouted: modules no token reached (not on the forward path of this model and data).
    """

    adapter: str
    top_k: int
    texts: int
    modules: list[ModuleRouting]
    unrouted: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means and extremes over modules of the normalised entropy and the top share."""
        if not self.modules:
            return {"modules": 0, "unrouted": len(self.unrouted)}
        entropy = [m.normalised_entropy for m in self.modules]
        share = [m.top_share for m in self.modules]
        return {"modules": len(self.modules), "unrouted": len(self.unrouted),
                "tokens": max(m.tokens for m in self.modules),
                "normalised_entropy": {"mean": sum(entropy) / len(entropy), "min": min(entropy), "max": max(entropy)},
                "top_share": {"mean": sum(share) / len(share), "min": min(share), "max": max(share)}}

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "top_k": self.top_k, "texts": self.texts, "summary": self.summary(),
                "modules": [m.to_dict() for m in self.modules], "unrouted": self.unrouted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingReport:
        """The report `to_dict` wrote (e.g. read back from routing.json)."""
        return cls(data["adapter"], data["top_k"], data["texts"],
                   [ModuleRouting.from_dict(m) for m in data["modules"]], list(data["unrouted"]))


# -- texts -----------------------------------------------------------------------------------------


def row_text(row: Text) -> str:
    """What the model reads of a row: a string itself, a classification row's "text", or a causal-LM
    row's "prompt" followed by its "completion" (the whole sequence training runs)."""
    if isinstance(row, str):
        return row
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("prompt"), str):
        return row["prompt"] + str(row.get("completion") or "")
    raise DataError(f"a row to route needs a 'text' or a 'prompt' column of strings; its columns: {sorted(row)}")


def load_texts(data: str | Path, rows: int = DEFAULT_ROWS) -> list[str]:
    """The first `rows` texts of a bundled data set's test split (the rows `splice eval` scores)
    or of a .jsonl / .csv file or `save_to_disk` folder, read as `splice train` reads one."""
    from splice.train.data import read_rows

    if rows < 1:
        raise SpliceError(f"rows must be >= 1, got {rows}")
    found = assets.dataset(data).test if isinstance(data, str) and data in assets.DATASETS else read_rows(data)
    return [row_text(row) for row in found[:rows]]


def default_data(task: str, model: str) -> str:
    """The bundled data set to route when none is named: Rotten Tomatoes reviews for a classifier
    (or an encoder's bare model), arithmetic problems for a causal LM (or a decoder's)."""
    from splice.train.tasks import default_task

    return DEFAULT_DATA[task if task in DEFAULT_DATA else default_task(model)]


# -- running the model -----------------------------------------------------------------------------


def adapter_routing(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[Text],
                    name: str | None = None, *, batch_size: int = 16, max_length: int = 128) -> RoutingReport:
    """Run `model` over `texts` (strings, or rows as `row_text` reads them) and report how its
    MoELoRA `name` (default: the only one) routes them.

    The statistics are reset first and hold this run's afterwards (`routing_stats(model)` gives
    them raw). The model runs in eval mode under `torch.inference_mode`, `batch_size` texts at a
    time, each cut to `max_length` tokens; its train/eval mode is restored afterwards.
    """
    name, _ = moe_adapters(model, name)
    if name not in active_adapters(model):
        raise SpliceError(f"MoELoRA {name!r} is not active, so it routes nothing: splice.activate(model, {name!r})")
    if batch_size < 1:
        raise SpliceError(f"batch_size must be >= 1, got {batch_size}")
    strings = [row_text(t) for t in texts]
    if not strings:
        raise SpliceError("no texts to route")
    reset_routing_stats(model, name)
    _run(model, tokenizer, strings, batch_size, max_length)
    stats = routing_stats(model, name)
    return RoutingReport(name, adapters(model)[name].top_k, len(strings),
                         [ModuleRouting.from_stats(module, s) for module, s in stats.items() if s["tokens"]],
                         [module for module, s in stats.items() if not s["tokens"]])


def adapter_dir_routing(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                        texts: Sequence[Text], **options: Any) -> RoutingReport:
    """`adapter_routing` of the MoELoRA saved in `path`, loaded onto `model` (its base) meanwhile."""
    with loaded(model, path) as (name,):
        report = adapter_routing(model, tokenizer, texts, name, **options)
    report.adapter = str(path)
    return report


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int,
         max_length: int) -> None:
    """Forward passes over `texts`, with their attention masks (so that padding is not counted)."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with _pad_token(tokenizer), torch.inference_mode():
            for start in progress.track(range(0, len(texts), batch_size), "route"):
                batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt", return_token_type_ids=False)
                model(**batch.to(device))
    finally:
        model.train(training)


@contextmanager
def _pad_token(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """A tokenizer without a pad token (most decoders) pads with its eos token meanwhile, as
    training does; padding is masked, so the token it pads with changes no statistic."""
    missing = tokenizer.pad_token is None
    if missing:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        if missing:
            tokenizer.pad_token = None


# -- the picture -----------------------------------------------------------------------------------


def routing_figure(report: RoutingReport) -> Any:
    """Two layers x module types heatmaps side by side, cells annotated: the normalised routing
    entropy (colour 0 to 1) and the top expert's share (colour 0 to its most, 1 / top_k)."""
    entropy = layer_type_grid((m.layer, m.module_type, m.normalised_entropy) for m in report.modules)
    share = layer_type_grid((m.layer, m.module_type, m.top_share) for m in report.modules)
    fig, (left, right) = heatmap_figure(entropy, panels=2)
    draw_heatmap(fig, left, entropy, vmax=1.0, digits=2, title="routing entropy / log E")
    draw_heatmap(fig, right, share, vmax=1 / report.top_k, digits=2,
                 title=f"top expert share (at most 1/k = {1 / report.top_k:.2g})")
    fig.suptitle(f"routing of {report.adapter} over {report.texts} texts", fontsize=10)
    return fig


def plot_routing(report: RoutingReport, path: str | Path) -> Path:
    """`routing_figure` as a PNG at `path`."""
    return save_png(routing_figure(report), path)
