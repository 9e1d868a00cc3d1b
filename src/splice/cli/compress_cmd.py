"""`splice compress`: cut a trained LoRA to per-module ranks (PARA), data-free; or cut it to
several budgets and evaluate each on a data set (`--sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors

if TYPE_CHECKING:
    from splice.compression.para import SweepPoint
    from splice.core.state import AdapterState

console = Console()


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)


def compress(
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter directory (HF PEFT format, LoRA or DoRA).")],
    budget: Annotated[float | None, typer.Option(help="Fraction of the adapter's parameters to keep, in (0, 1]: "
                                                 "0.25 = 75% fewer.", show_default=False)] = None,
    energy: Annotated[float | None, typer.Option(help="Fraction of the squared singular values (Σσ²) to keep, "
                                                 "in (0, 1].", show_default=False)] = None,
    rank: Annotated[int | None, typer.Option(help="Directions to keep per module (capped at its rank).",
                                             show_default=False)] = None,
    threshold: Annotated[float | None, typer.Option(help="Keep the singular values >= this (after --normalize).",
                                                    show_default=False)] = None,
    allocation: Annotated[str, typer.Option(help="global: one threshold over all modules' singular values; "
                                            "per-module: the target applied to each module alone.")] = "global",
    normalize: Annotated[str, typer.Option(help="none | max | frobenius: divide each module's singular values "
                                           "by its largest one or by its norm before pooling.")] = "none",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the compressed adapter (with "
                                             "--sweep: sweep.json, sweep.png and one adapter per budget). "
                                             "Without it nothing is written.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out folder.")] = False,
    sweep: Annotated[str | None, typer.Option(help="Comma-separated budgets, e.g. 1,0.5,0.25,0.1: compress to "
                                              "each and evaluate it on --data.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="--sweep: base model, 'minilm', 'smollm2' or a folder. "
                                              "Default: the adapter's recorded one.")] = None,
    data: Annotated[str | None, typer.Option(help="--sweep: bundled data set (rotten_tomatoes, bbc_news, "
                                             "arithmetic, ...) or a .jsonl/.csv file to evaluate on.")] = None,
    task: Annotated[str | None, typer.Option(help="--sweep: classification or causal_lm. Default: the "
                                             "adapter's PEFT task_type.")] = None,
    split: Annotated[str, typer.Option(help="--sweep: split of a bundled data set.")] = "test",
    metric: Annotated[str | None, typer.Option(help="--sweep: metric to plot (accuracy, loss, exact_match, "
                                               "...). Default: accuracy, or loss for causal_lm.")] = None,
    max_eval_examples: Annotated[int | None, typer.Option(help="--sweep: evaluate on the first N rows.")] = None,
    batch_size: Annotated[int, typer.Option(help="--sweep: examples per forward pass.")] = 32,
    max_length: Annotated[int, typer.Option(help="--sweep: tokens per example.")] = 64,
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

        splice compress runs/rotten-tomatoes-lora/adapter --budget 0.25 --out small

        splice compress runs/rotten-tomatoes-lora/adapter --energy 0.9

        splice compress runs/rt/adapter --sweep 1,0.5,0.25,0.1 --data rotten_tomatoes --out sweep
    """
    from splice.compression import para
    from splice.core.errors import SpliceError
    from splice.io.files import check_output_dir
    from splice.io.state import adapter_state

    with user_errors():
        if sweep is not None:
            if any(v is not None for v in (budget, energy, rank, threshold)):
                raise SpliceError("--sweep sets the budgets; leave out --budget, --energy, --rank and --threshold")
            budgets = _budgets(sweep)
            if data is None:
                raise SpliceError("--sweep evaluates every budget; pass --data (e.g. --data rotten_tomatoes)")
            if out is not None:
                check_output_dir(out, overwrite=force)  # refused before the work, written whole after it
            state = adapter_state(adapter)
            _sweep(state, budgets, allocation, normalize, out, force, model=model, data=data, task=task,
                   split=split, metric=metric, max_eval_examples=max_eval_examples, batch_size=batch_size,
                   max_length=max_length)
            return
        if out is not None:
            check_output_dir(out, overwrite=force)
        result = para.compress(adapter, budget=budget, energy=energy, rank=rank, threshold=threshold,
                               allocation=allocation, normalize=normalize)
        console.print(result.summary())  # its caption is the headline: parameters before -> after
        if out is not None:
            result.save(out, overwrite=force)
    console.print(f"-> {out}" if out is not None else "nothing written; pass --out DIR to save it", highlight=False)


def _budgets(text: str) -> list[float]:
    from splice.core.errors import SpliceError

    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpliceError(f"--sweep expects comma-separated fractions such as 1,0.5,0.25,0.1; got {text!r}") from None
    if not budgets:
        raise SpliceError("--sweep needs at least one budget")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise SpliceError(f"--sweep budgets are fractions in (0, 1]; got {b:g}")
    return budgets


def _sweep(state: AdapterState, budgets: list[float], allocation: str, normalize: str, out: Path | None,
           force: bool, *, model: str | None, data: str, task: str | None, split: str, metric: str | None,
           max_eval_examples: int | None, batch_size: int, max_length: int) -> None:
    """Evaluate the uncompressed adapter and every budget's compression on one loaded base model."""
    from splice.compression import para
    from splice.core.api import detach
    from splice.core.errors import SpliceError
    from splice.io.files import atomic_directory, write_json
    from splice.io.peft_format import attach_state
    from splice.io.state import save_state
    from splice.train import TrainConfig
    from splice.train.adapter_base import PEFT_TASKS
    from splice.train.data import load_eval_rows
    from splice.train.loop import evaluate
    from splice.train.tasks import MAIN_METRIC, default_task, load_model

    model = model or state.base_model
    if not model:
        raise SpliceError("the adapter names no base model; pass --model")
    task = task or PEFT_TASKS.get(state.task_type or "")
    config = TrainConfig.from_dict(model=model, task=task or default_task(model), data=data, batch_size=batch_size,
                                   max_length=max_length, max_eval_examples=max_eval_examples)
    metric = metric or MAIN_METRIC[config.task][0]
    rows = load_eval_rows(config, split)
    if not rows.test:
        raise SpliceError(f"no rows to evaluate in {data!r} ({split})")
    net, tokenizer = load_model(config, rows.label_names)
    scores: list[dict[str, float]] = []

    def score(candidate: AdapterState) -> float:
        attach_state(net, candidate, "para")
        try:
            metrics = evaluate(net, tokenizer, rows.test, config)
        finally:
            detach(net, "para")
        if metric not in metrics:
            raise SpliceError(f"no metric {metric!r}; the evaluation gives {', '.join(metrics)}")
        scores.append(metrics)
        return metrics[metric]

    reference = score(state)
    points = para.sweep(state, budgets, evaluate=score, allocation=allocation, normalize=normalize)
    console.print(_sweep_table(points, metric, reference, state.parameters, f"{data} ({split}, {len(rows.test)} rows)"))
    if out is None:
        console.print("nothing written; pass --out DIR for sweep.json, sweep.png and the adapters", highlight=False)
        return
    report: dict[str, Any] = {
        "adapter_parameters": state.parameters, "metric": metric, "reference": reference,
        "reference_metrics": scores[0], "model": model, "task": config.task, "data": data, "split": split,
        "rows": len(rows.test), "allocation": allocation, "normalize": normalize,
        "points": [p.to_dict() | {"metrics": m, "folder": f"budget-{b:g}"}
                   for (b, p), m in zip(points.items(), scores[1:], strict=True)],
    }
    with atomic_directory(out, overwrite=force) as folder:  # the adapters, json and plot: all or none
        for budget, point in points.items():
            save_state(point.result.state, folder / f"budget-{budget:g}")
        write_json(folder / "sweep.json", report)
        para.plot_sweep(points, folder / "sweep.png", metric=metric, reference=reference,
                        title=f"PARA sweep: {metric} on {data} ({split})")
    console.print(f"-> {out}/{{sweep.json,sweep.png,budget-*/}}", highlight=False)


def _sweep_table(points: dict[float, SweepPoint], metric: str, reference: float, parameters: int,
                 title: str) -> Table:
    table = Table(title=f"PARA sweep on {title}", caption=f"uncompressed: {parameters:,} parameters, "
                  f"{metric} {reference:.4f}")
    for column in ("budget", "parameters", "fewer", "energy kept", "ranks (min-max)", metric, "change"):
        table.add_column(column, justify="right")
    for budget, p in points.items():
        ranks = [r for r in p.result.ranks_after.values() if r]
        table.add_row(f"{budget:g}", f"{p.parameters:,}", f"{p.result.reduction:.1%}", f"{p.retained_energy:.2%}",
                      f"{min(ranks)}-{max(ranks)}", f"{p.metric:.4f}", f"{p.metric - reference:+.4f}")
    return table
