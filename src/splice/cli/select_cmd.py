"""`splice autoconfig`: choose an adapter configuration under a parameter budget by SEA-PEFT's audits,
export it, and fine-tune it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors
from splice.cli.output import Quiet, command, name_column, quieted

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "autoconfig", autoconfig)


def autoconfig(
    config: Annotated[Path, typer.Argument(help="YAML: training config fields (model, task, data, lr, max_steps, "
                                           "...; no adapter) and a sea_peft: section (budget, sites, layers, "
                                           "families, audits, ...).", show_default=False)],
    budget: Annotated[int | None, typer.Option(help="Most adapter parameters the chosen set may hold "
                                               "(overrides sea_peft.budget).")] = None,
    audits: Annotated[int | None, typer.Option(help="Audits in the search (overrides sea_peft.audits).")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Folder for the search report, the exported config and "
                                                    "the fine-tuning run (default: the file's output_dir, else "
                                                    "runs/<data>-sea-peft).")] = None,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Fine-tune the chosen configuration "
                                           "from a fresh model after the search.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder (not one a live "
                                        "run holds).")] = False,
    quiet: Quiet = False,
) -> None:
    """Attach every candidate unit (sites x forms x ranks), train them under a parameter budget
    while auditing ~20% of them every few steps (switch off and on, measure the validation change
    per parameter) and re-allocating with hysteresis; then export the chosen units as ordinary
    adapter configs and fine-tune them from a fresh model (SEA-PEFT, arXiv 2603.05822).

    Writes <out>/sea_peft.json (every audit, every unit's score, the choice),
    <out>/selected_adapters.yaml (the chosen adapters by name), <out>/selected.yaml (a config
    `splice train` runs, when the choice is one adapter; it trains into <out>/retrain/) and the
    fine-tuning run <out>/finetune/. The output folder is locked while the command runs; one
    that another live run holds is refused, even with --force.

    Examples:

        splice autoconfig examples/rotten_tomatoes_sea_peft.yaml
        splice autoconfig examples/rotten_tomatoes_sea_peft.yaml \\
            --budget 40000 --no-finetune
    """
    from splice.selection.autoconfig import autoconfig as run_autoconfig

    with user_errors(), quieted(console, quiet) as tables:
        done = run_autoconfig(config, budget=budget, audits=audits, output_dir=output_dir, fine_tune=finetune,
                              force=force, console=tables)
        tables.print(_choice_table(done.selection))
    selection, out, result = done.selection, done.folder, done.finetuned
    line = (f"chose {len(selection.chosen)} units, {selection.params:,} of {selection.budget:,} parameters "
            f"({', '.join(selection.adapters) or 'none'}) in {selection.seconds:.0f} s; wrote {out / 'sea_peft.json'}")
    if result is not None:
        after = result.metrics.get("after", {})
        scores = ", ".join(f"{split} {metric} {value:.4f}" for split, m in after.items()
                           for metric, value in m.items() if metric in ("accuracy", "loss"))
        line += f"; fine-tuned in {out / 'finetune'}: {scores}"
    if (out / "selected.yaml").is_file():
        line += f"; train the choice again with `splice train {out / 'selected.yaml'}` (into {out / 'retrain'})"
    console.print(line)


def _choice_table(selection: Any) -> Table:
    by_name = {u.name: u for u in selection.units}
    last = {m["unit"]: m for audit in selection.audits for m in audit["measured"]}
    table = Table(title=f"SEA-PEFT choice: {selection.params:,} / {selection.budget:,} parameters, "
                        f"{len(selection.audits)} audits of {len(selection.units)} units")
    name_column(table, "unit")
    for column in ("site", "family", "params", "value"):
        table.add_column(column, justify="right" if column in ("params", "value") else "left")
    for name in selection.chosen:
        u = by_name[name]
        value = last.get(name, {}).get("value")
        table.add_row(name, u.site, u.family, f"{u.params:,}", "-" if value is None else f"{value:+.4f}")
    return table
