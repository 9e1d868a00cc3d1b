"""`splice compress`: cut a trained LoRA to per-module ranks (PARA), data-free; or cut it to
several budgets and evaluate each on a data set (`--sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors
from splice.cli.options import ForceOut
from splice.cli.output import Quiet, command, quieted

if TYPE_CHECKING:
    from splice.compression.para_sweep import DataSweep

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "compress", compress)


AdapterDir = Annotated[Path, typer.Argument(help="A LoRA adapter directory (HF PEFT format, LoRA or DoRA).")]
Budget = Annotated[float | None, typer.Option(help="Fraction of the adapter's parameters to keep, in (0, 1]: "
                                              "0.25 = 75% fewer.", show_default=False)]
Energy = Annotated[float | None, typer.Option(help="Fraction of the squared singular values (Σσ²) to keep, "
                                              "in (0, 1].", show_default=False)]
Rank = Annotated[int | None, typer.Option(help="Directions to keep per module (capped at its rank).",
                                          show_default=False)]
Threshold = Annotated[float | None, typer.Option(help="Keep the singular values >= this (after --normalize).",
                                                 show_default=False)]
Allocation = Annotated[str, typer.Option(help="global: one threshold over all modules' singular values; "
                                         "per-module: the target applied to each module alone.")]
Normalize = Annotated[str, typer.Option(help="none | max | frobenius: divide each module's singular values "
                                        "by its largest one or by its norm before pooling.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the compressed adapter (with "
                                          "--sweep: sweep.json, sweep.png and one adapter per budget). "
                                          "Without it nothing is written.")]
Sweep = Annotated[str | None, typer.Option(help="Comma-separated budgets, e.g. 1,0.5,0.25,0.1: compress to "
                                           "each and evaluate it on --data.", show_default=False)]
SweepModel = Annotated[str | None, typer.Option(help="--sweep: base model, 'minilm', 'smollm2' or a folder. "
                                                "Default: the adapter's recorded one.")]
SweepData = Annotated[str | None, typer.Option(help="--sweep: bundled data set (rotten_tomatoes, bbc_news, "
                                               "arithmetic, ...) or a .jsonl/.csv file to evaluate on.")]
SweepTask = Annotated[str | None, typer.Option(help="--sweep: classification or causal_lm. Default: the "
                                               "adapter's PEFT task_type.")]
Split = Annotated[str, typer.Option(help="--sweep: split of a bundled data set.")]
Metric = Annotated[str | None, typer.Option(help="--sweep: metric to plot (accuracy, loss, exact_match, "
                                            "...). Default: accuracy, or loss for causal_lm.")]
SweepRows = Annotated[int | None, typer.Option(help="--sweep: evaluate on the first N rows.")]
SweepBatch = Annotated[int, typer.Option(help="--sweep: examples per forward pass.")]
SweepLength = Annotated[int, typer.Option(help="--sweep: tokens per example.")]


def compress(
    adapter: AdapterDir,
    budget: Budget = None, energy: Energy = None, rank: Rank = None, threshold: Threshold = None,
    allocation: Allocation = "global", normalize: Normalize = "none",
    out: Out = None, force: ForceOut = False, sweep: Sweep = None,
    model: SweepModel = None, data: SweepData = None, task: SweepTask = None, split: Split = "test",
    metric: Metric = None, max_eval_examples: SweepRows = None, batch_size: SweepBatch = 32,
    max_length: SweepLength = 64, quiet: Quiet = False,
) -> None:
    """Compress a trained LoRA to the ranks each module really uses (PARA), without data.

    Each module's weight change s·B·A is decomposed exactly (thin QRs of B
    and Aᵀ, then the SVD of a small r×r matrix). The singular values of all
    modules are pooled, and one threshold keeps the strongest directions
    until the target is met, so each module ends with its own rank. The
    result is a PEFT LoRA folder (per-module rank_pattern) that HF PEFT and
    splice load.

    Give exactly one target: --budget, --energy, --rank or --threshold; or
    --sweep several budgets, each evaluated on --data, for the
    budget-vs-accuracy curve.

    Examples:

        splice compress runs/rotten-tomatoes-lora/adapter \\
            --budget 0.25 --out small

        splice compress runs/rotten-tomatoes-lora/adapter --energy 0.9

        splice compress runs/rt/adapter --sweep 1,0.5,0.25,0.1 \\
            --data rotten_tomatoes --out sweep
    """
    from splice.compression import para
    from splice.io.files import check_output_dir

    with user_errors(), quieted(console, quiet) as tables:
        budgets = None if sweep is None else _budgets(sweep, (budget, energy, rank, threshold), data)
        if out is not None:
            check_output_dir(out, overwrite=force)  # refused before the work, written whole after it
        if budgets is not None:
            _sweep(adapter, budgets, out, force, tables, model=model, data=data, task=task, split=split,
                   metric=metric, allocation=allocation, normalize=normalize, max_eval_examples=max_eval_examples,
                   batch_size=batch_size, max_length=max_length)
            return
        result = para.compress(adapter, budget=budget, energy=energy, rank=rank, threshold=threshold,
                               allocation=allocation, normalize=normalize)
        tables.print(result.summary())  # its caption is the headline: parameters before -> after
        if quiet:
            console.print(result.headline(), highlight=False)
        if out is not None:
            result.save(out, overwrite=force)
    console.print(f"-> {out}" if out is not None else "nothing written; pass --out DIR to save it", highlight=False)


def _budgets(text: str, targets: tuple[float | None, ...], data: str | None) -> list[float]:
    """The budgets of `--sweep`, which sets the target itself and evaluates on --data."""
    from splice.core.errors import SpliceError

    if any(v is not None for v in targets):
        raise SpliceError("--sweep sets the budgets; leave out --budget, --energy, --rank and --threshold")
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpliceError(f"--sweep expects comma-separated fractions such as 1,0.5,0.25,0.1; got {text!r}") from None
    if not budgets:
        raise SpliceError("--sweep needs at least one budget")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise SpliceError(f"--sweep budgets are fractions in (0, 1]; got {b:g}")
    repeated = sorted({b for b in budgets if budgets.count(b) > 1})
    if repeated:
        raise SpliceError(f"--sweep names budget {repeated[0]:g} more than once; give each budget once")
    if data is None:
        raise SpliceError("--sweep evaluates every budget; pass --data (e.g. --data rotten_tomatoes)")
    return budgets


def _sweep(adapter: Path, budgets: list[float], out: Path | None, force: bool, tables: Console,
           **options: Any) -> None:
    """Evaluate the uncompressed adapter and every budget's compression on data, print the
    table to `tables`, and write the report if asked."""
    from splice.compression.para_sweep import sweep_on_data

    result = sweep_on_data(adapter, budgets, **options)
    tables.print(_sweep_table(result))
    if out is None:
        console.print("nothing written; pass --out DIR for sweep.json, sweep.png and the adapters", highlight=False)
        return
    result.save(out, overwrite=force)
    console.print(f"-> {out}/{{sweep.json,sweep.png,budget-*/}}", highlight=False)


def _sweep_table(result: DataSweep) -> Table:
    metric, reference = result.metric, result.reference
    table = Table(title=f"PARA sweep on {result.config.data} ({result.split}, {result.rows} rows)",
                  caption=f"uncompressed: {result.parameters:,} parameters, {metric} {reference:.4f}")
    for column in ("budget", "parameters", "fewer", "energy kept", "ranks (min-max)", metric, "change"):
        table.add_column(column, justify="right")
    for budget, p in result.points.items():
        ranks = [r for r in p.result.ranks_after.values() if r]
        table.add_row(f"{budget:g}", f"{p.parameters:,}", f"{p.result.reduction:.1%}", f"{p.retained_energy:.2%}",
                      f"{min(ranks)}-{max(ranks)}", f"{p.metric:.4f}", f"{p.metric - reference:+.4f}")
    return table
