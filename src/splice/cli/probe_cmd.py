"""`splice probe`: rank a model's modules by PAGE on a training config's data (DomLoRA's probe)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors
from splice.cli.output import Quiet, command, name_column, quieted

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "probe", probe)


def probe(
    config: Annotated[Path | None, typer.Argument(help="Training YAML (model, task, data); default: the main job.",
                                                  show_default=False)] = None,
    batches: Annotated[int, typer.Option(help="Probe batches of the config's batch size, from its training "
                                         "data (in its shuffled order).")] = 8,
    r: Annotated[int, typer.Option(help="Rank of the adapter the scores are for.")] = 8,
    candidates: Annotated[str, typer.Option(help="Modules that compete: 'all-linear', a regex, or "
                                            "comma-separated names.")] = "all-linear",
    score: Annotated[str, typer.Option(help="expected (closed form over random A) or sampled (one draw).")]
    = "expected",
    top: Annotated[int, typer.Option(help="Rows of the ranking to print.")] = 15,
    out: Annotated[Path | None, typer.Option(help="Folder for probe.json and probe.png "
                                             "(default: <output_dir>-probe).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty output folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Score every candidate module by Projected Adapter Gradient Energy (PAGE): how much gradient
    a fresh LoRA there would receive at step 0. Prints the ranking, writes the scores (JSON) and a
    heatmap of each module's share (layers x module types). DomLoRA attaches at the top ones.

    Example:

        splice probe examples/smollm2_arithmetic.yaml --batches 4 --top 10
    """
    from splice.cli.adapter_cmds import _split
    from splice.io.files import atomic_directory, check_output_dir
    from splice.placement import page
    from splice.train import TrainConfig, tasks
    from splice.train.data import collator, load_splits, probe_loader

    with user_errors(), quieted(console, quiet) as tables:
        for option, value in (("--batches", batches), ("--r", r), ("--top", top)):
            if value < 1:
                raise typer.BadParameter(f"must be a positive integer, got {value}", param_hint=option)
        settings = TrainConfig.from_yaml(config)
        out = check_output_dir(out or Path(f"{settings.output_dir}-probe"), force)  # before the work
        splits = load_splits(settings)
        model, tokenizer = tasks.load_model(settings, splits.label_names)
        loader = probe_loader(splits.train, settings, collator(settings.task, tokenizer, settings.max_length))
        probe_batches = list(itertools.islice(loader, batches))  # a list: its length is the bar's
        placement = page(model, probe_batches, _split(candidates), r, score=score)
    table = Table(title=f"PAGE on {settings.model} / {settings.data} ({placement.batches} batches, r={r}, {score})")
    table.add_column("rank", justify="right")
    name_column(table, "module")
    for column in ("share", "expected", "sampled"):
        table.add_column(column, justify="right")
    for rank, site in enumerate(placement.sites[:top], 1):
        table.add_row(str(rank), site.name, f"{100 * site.share:.1f}%", f"{site.expected:.3g}", f"{site.sampled:.3g}")
    tables.print(table)
    with user_errors(), atomic_directory(out, overwrite=force) as folder:
        (folder / "probe.json").write_text(json.dumps({"score": score, "r": r, "batches": placement.batches,
                                                       "sites": placement.rows()}, indent=2) + "\n")
        placement.heatmap(folder / "probe.png")
    best = placement.sites[0]
    console.print(f"dominant module: {best.name} ({100 * best.share:.1f}% of the energy); "
                  f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
