"""`splice analyze` and `splice compare`: spectra of a saved adapter's weight changes (or a
MoELoRA's routing on data), and two adapters side by side, loaded onto their base model (bundled
or a local folder, never a hub)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors
from splice.cli.options import ForceOut
from splice.cli.output import Quiet, command, name_column, quieted
from splice.core.errors import SpliceError

console = Console()
# Texts a MoELoRA's routing is measured on unless --rows says otherwise (the command's own default:
# importing the library's would load torch for `--help`).
ROUTED_ROWS = 200

BaseModel = Annotated[
    str | None,
    typer.Option("--model", help="Base model: 'minilm', 'smollm2' or a folder. Default: the adapter's recorded one."),
]
Task = Annotated[
    str,
    typer.Option(help="auto | classification | causal_lm | base: the model class the adapter was trained on "
                      "(auto: PEFT's task_type, or a classification head among the trained modules)."),
]


def register(app: typer.Typer) -> None:
    command(app, "analyze", analyze)
    command(app, "compare", compare)


def analyze(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory (splice's or HF PEFT's).")],
    model: BaseModel = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the JSON and the plots. Default: "
                                             "ADAPTER-spectra (ADAPTER-routing for a MoELoRA) next to the "
                                             "adapter.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Spectra: leading singular values per module to "
                                       "plot and to write to the JSON.")] = 64,
    data: Annotated[str | None, typer.Option(help="MoELoRA only: the texts to route, a bundled data set "
                                             "(rotten_tomatoes, bbc_news, arithmetic, ...; its test split) or a "
                                             ".jsonl/.csv file with a text column or prompt and completion "
                                             "columns. Default: rotten_tomatoes for a classifier or an encoder, "
                                             "arithmetic for a causal LM or a decoder.", show_default=False)] = None,
    rows: Annotated[int | None, typer.Option(min=1, help=f"MoELoRA only: route the first N rows of --data "
                                             f"(default: {ROUTED_ROWS}).", show_default=False)] = None,
    task: Task = "auto",
    force: ForceOut = False,
    quiet: Quiet = False,
) -> None:
    """What an adapter learned: the spectra of its delta weights or, for a MoELoRA, its routing on data.

    Spectra: singular values, effective and stable ranks per module, written as spectra.json,
    spectra.png (normalised singular values per module type, one line per layer) and
    effective_rank.png (a layers x module types heatmap).

    A MoELoRA (mixture of LoRA experts) has no weight change: its routers pick experts per
    token. For it the command runs the base model with the adapter over the first --rows rows of
    --data and writes routing.json (per module: tokens, each expert's share of the routed slots,
    routing entropy, top expert share) and routing.png (layers x module types heatmaps of the
    routing entropy / log E, 1 for uniform routing and 0 for one sure expert, and of the top
    expert's share). --data and --rows are refused for other adapters.

    Example: splice analyze runs/rotten-tomatoes-lora/adapter --model minilm

    Example: splice analyze runs/arithmetic-moelora/adapter --data arithmetic \\
                 --rows 100
    """
    from splice.io.info import inspect_adapter
    from splice.methods.moelora import MoELoRA

    with user_errors():
        routed = inspect_adapter(adapter).method == MoELoRA.method
        if not routed and (data is not None or rows is not None):
            raise SpliceError(f"--data and --rows choose the texts a MoELoRA's routers are analysed on; {adapter} "
                              "is not a MoELoRA and is analysed from its weights alone: leave them out")
    if routed:
        _analyze_routing(adapter, model, task, out or adapter.parent / f"{adapter.name}-routing", data,
                         rows or ROUTED_ROWS, force, quiet)
    else:
        _analyze_spectra(adapter, model, task, out or adapter.parent / f"{adapter.name}-spectra", top_k, force,
                         quiet)


def _analyze_spectra(adapter: Path, model: str | None, task: str, out: Path, top_k: int, force: bool,
                     quiet: bool) -> None:
    """`splice analyze` of an adapter with weight changes: compute, print and write the spectra."""
    from splice.analysis.spectra import ENERGY_FRACTIONS, adapter_dir_spectra, plot_effective_ranks, plot_spectra
    from splice.core.inventory import shared_prefix
    from splice.io.files import atomic_directory, check_output_dir
    from splice.train.adapter_base import adapter_base

    with user_errors(), quieted(console, quiet) as tables:
        base = adapter_base([adapter], model, task)
        check_output_dir(out, overwrite=force)
        report = adapter_dir_spectra(base.load(), adapter)
    prefix = shared_prefix([m.name for m in report.modules])
    table = Table(title=f"spectra of {adapter}", caption="rank: numerical; erank: entropy effective rank; "
                  "k90%/k99%: energy ranks; srank: stable rank")
    name_column(table, f"{prefix}*" if prefix else "module")
    for column in ("r", "rank", "erank", *(f"k{f:.0%}" for f in ENERGY_FRACTIONS), "srank", "|dW|_F"):
        table.add_column(column, justify="right")
    for m in report.modules:
        table.add_row(m.name.removeprefix(prefix), _cell(m.adapter_rank), str(m.numerical_rank),
                      f"{m.entropy_rank:.2f}", *(str(k) for k in m.energy_ranks.values()), f"{m.stable_rank:.2f}",
                      _cell(m.frobenius_norm))
    tables.print(table)
    for name, reason in report.skipped.items():
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    files = ["spectra.json"]
    with user_errors(), atomic_directory(out, overwrite=force) as folder:
        (folder / "spectra.json").write_text(json.dumps(report.to_dict(top_k), indent=2) + "\n")
        if report.modules:
            plot_spectra(report, folder / "spectra.png", top_k)
            plot_effective_ranks(report, folder / "effective_rank.png")
            files += ["spectra.png", "effective_rank.png"]
    console.print(_spectra_summary(report.summary()) + f" -> {out}/{{{','.join(files)}}}", highlight=False)


def _analyze_routing(adapter: Path, model: str | None, task: str, out: Path, data: str | None, rows: int,
                     force: bool, quiet: bool) -> None:
    """`splice analyze` of a MoELoRA: route `rows` texts of `data`, print and write the routing."""
    from transformers import AutoTokenizer

    from splice.analysis.routing import adapter_dir_routing, default_data, load_texts, plot_routing
    from splice.core.inventory import shared_prefix
    from splice.io.files import atomic_directory, check_output_dir
    from splice.train.adapter_base import adapter_base
    from splice.train.tasks import model_path

    with user_errors(), quieted(console, quiet) as tables:
        base = adapter_base([adapter], model, task)
        data = data or default_data(base.task, base.model)
        texts = load_texts(data, rows)
        check_output_dir(out, overwrite=force)
        tokenizer = AutoTokenizer.from_pretrained(model_path(base.model))
        report = adapter_dir_routing(base.load(), tokenizer, adapter, texts)
    prefix = shared_prefix([m.name for m in report.modules])
    table = Table(title=f"routing of {adapter} over {report.texts} texts of {data}",
                  caption="experts: routed experts kept; top share: the most used expert's share of the routed "
                  f"slots (1/E even, at most 1/k = {1 / report.top_k:.2g}); H/log E: routing entropy, 1 uniform, "
                  "0 one sure expert")
    name_column(table, f"{prefix}*" if prefix else "module")
    for column in ("tokens", "experts", "top share", "H/log E"):
        table.add_column(column, justify="right")
    for m in report.modules:
        table.add_row(m.name.removeprefix(prefix), str(m.tokens), str(m.experts), f"{m.top_share:.3f}",
                      f"{m.normalised_entropy:.3f}")
    tables.print(table)
    for name in report.unrouted:
        console.print(f"[yellow]unrouted[/] {name}: no token reached it")
    files = ["routing.json"]
    with user_errors(), atomic_directory(out, overwrite=force) as folder:
        (folder / "routing.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if report.modules:
            plot_routing(report, folder / "routing.png")
            files.append("routing.png")
    console.print(_routing_summary(report.summary(), report.texts, data) + f" -> {out}/{{{','.join(files)}}}",
                  highlight=False)


def compare(
    adapter_a: Annotated[Path, typer.Argument(help="The first adapter directory (the reference).")],
    adapter_b: Annotated[Path, typer.Argument(help="The second, on the same base model.")],
    model: BaseModel = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for comparison.json (none if unset).")] = None,
    k: Annotated[int | None, typer.Option(min=1, help="Singular directions per module whose subspaces are "
                                          "compared. Default: each delta's 90%-energy rank.")] = None,
    task: Task = "auto",
    force: ForceOut = False,
    quiet: Quiet = False,
) -> None:
    """Compare two adapters module by module: principal angles, subspace overlap, norm ratio, cosine.

    Example: splice compare runs/a/adapter runs/b/adapter --model minilm \\
                 --out a-vs-b
    """
    from splice.analysis.compare import compare_adapter_dirs
    from splice.core.inventory import shared_prefix
    from splice.io.files import atomic_directory, check_output_dir
    from splice.train.adapter_base import adapter_base

    with user_errors(), quieted(console, quiet) as tables:
        base = adapter_base([adapter_a, adapter_b], model, task)
        if out is not None:
            check_output_dir(out, overwrite=force)
        result = compare_adapter_dirs(base.load(), adapter_a, adapter_b, k)
    prefix = shared_prefix([m.name for m in result.modules])
    table = Table(title=f"{adapter_b} against {adapter_a}",
                  caption="angle: smallest principal angle; overlap: mean cos² of the angles; "
                  "norm b/a: |dW_b|_F / |dW_a|_F")
    name_column(table, f"{prefix}*" if prefix else "module")
    for column in ("k_a", "k_b", "angle", "overlap", "norm b/a", "cosine"):
        table.add_column(column, justify="right")
    for m in result.modules:
        table.add_row(m.name.removeprefix(prefix), str(m.k_a), str(m.k_b), f"{math.degrees(m.min_angle):.1f}°",
                      f"{m.overlap:.3f}", _cell(m.norm_ratio), _cell(m.cosine))
    tables.print(table)
    for label, names in ((f"only in {adapter_a}", result.only_a), (f"only in {adapter_b}", result.only_b)):
        if names:
            console.print(f"[yellow]{label}[/] ({len(names)}): " + ", ".join(names), highlight=False)
    for name, reason in result.skipped.items():
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    summary = result.summary()
    line = f"{summary['shared']} shared modules"
    if result.modules:
        line += (f": mean smallest angle {summary['mean_min_angle_deg']:.1f}°, mean overlap "
                 f"{summary['mean_overlap']:.3f}, mean cosine {_cell(summary['mean_cosine'])}")
    if out is not None:
        with user_errors(), atomic_directory(out, overwrite=force) as folder:
            (folder / "comparison.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        line += f" -> {out / 'comparison.json'}"
    console.print(line, highlight=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _spectra_summary(summary: dict[str, Any]) -> str:
    line = f"{summary['modules']} modules"
    if summary["modules"]:
        entropy, stable = summary["entropy_rank"], summary["stable_rank"]
        line += (f": entropy rank mean {entropy['mean']:.2f} (min {entropy['min']:.2f}, max {entropy['max']:.2f}), "
                 f"stable rank mean {stable['mean']:.2f}, largest numerical rank {summary['max_numerical_rank']}")
    if summary["skipped"]:
        line += f"; {summary['skipped']} skipped (no weight form)"
    return line


def _routing_summary(summary: dict[str, Any], texts: int, data: str) -> str:
    line = f"{summary['modules']} modules"
    if summary["modules"]:
        entropy, share = summary["normalised_entropy"], summary["top_share"]
        line += (f" routed {summary['tokens']} tokens of {texts} texts ({data}): routing entropy / log E mean "
                 f"{entropy['mean']:.2f} (min {entropy['min']:.2f}, max {entropy['max']:.2f}), top expert share "
                 f"mean {share['mean']:.2f} (max {share['max']:.2f})")
    if summary["unrouted"]:
        line += f"; {summary['unrouted']} unrouted (no token reached them)"
    return line
