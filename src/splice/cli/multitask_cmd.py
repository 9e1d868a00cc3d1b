"""`splice multitask`: one shared adapter on a mixture of tasks, against one adapter per task, with
the pairwise transfer matrix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from splice.cli.errors import stopped_by_signal, user_errors
from splice.cli.output import Quiet, command, quieted, to_stderr

if TYPE_CHECKING:
    from splice.multitask import MultitaskResult

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "multitask", multitask)


def multitask(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="Multi-task YAML: tasks (name, data, kind, "
                                                "tag, head, ...), model, task, adapter, train, mixing, temperature, "
                                                "budget, seeds.", show_default=False)],
    seed: Annotated[int | None, typer.Option(help="Run this seed only (instead of the file's seeds).")] = None,
    mixing: Annotated[str | None, typer.Option(help="Override the mixing: proportional (p_t ∝ n_t) or "
                                               "temperature (p_t ∝ n_t^(1/T)).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Override T of temperature mixing.")] = None,
    budget: Annotated[str | None, typer.Option(help="Override the budget: per_task (a run on k tasks takes the "
                                               "sum of their single-task steps) or total (the mean).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps of one task alone (train.max_steps).")] = None,
    max_train_examples: Annotated[int | None, typer.Option(
        help="Train each task on a fixed sample of N of its rows.")] = None,
    max_eval_examples: Annotated[int | None, typer.Option(
        help="Score each task on the first N rows of its evaluation split.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--set", help="A training field as KEY=VALUE (YAML value), repeatable: --set lr=1e-3 --set batch_size=8.",
        show_default=False)] = None,
    compare: Annotated[bool | None, typer.Option(help="Also train one adapter per task (the baseline); "
                                                 "--no-compare turns the transfer matrix off too.")] = None,
    transfer: Annotated[bool | None, typer.Option(help="Also train every pair of tasks for the transfer "
                                                  "matrix.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Job folder (default: the file's, else "
                                                   "runs/multitask-<model>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty job folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped job in its folder: the runs it "
                                         "finished are kept, the others trained (the same config and flags, "
                                         "refused otherwise).")] = False,
    quiet: Quiet = False,
) -> None:
    """Train one adapter on a mixture of tasks (each batch from one task, drawn with probability
    p_t; a classifier keeps one head per task, a generator reads each prompt with its task's tag),
    one adapter per task, and one per pair of tasks; score every task. Prints the shared adapter
    against one adapter per task (score, stored parameters, steps, examples, seconds) and the
    transfer matrix Δ_ij = acc_i(trained on i+j) - acc_i(trained on i), and writes
    <job>/report/: results.json, results.md, transfer.png (and each run's adapter and heads under
    <job>/runs/seed<S>/<run>/).

    Examples:

        splice multitask examples/multitask_minilm.yaml
        splice multitask examples/multitask_smollm2.yaml --seed 1 \\
            --max-steps 20 --max-eval-examples 50
        splice multitask examples/multitask_minilm.yaml \\
            --mixing temperature --temperature 3 --no-transfer --force
        # after Ctrl-C, the unfinished runs:
        splice multitask examples/multitask_minilm.yaml --resume
    """
    from splice.cli.train_cmd import key_values
    from splice.multitask import MultitaskConfig, run_multitask

    with user_errors(), quieted(console, quiet) as tables:
        flags = {"max_steps": max_steps, "max_train_examples": max_train_examples,
                 "max_eval_examples": max_eval_examples}
        train = {**{k: v for k, v in flags.items() if v is not None}, **key_values(param or [])}
        config = MultitaskConfig.from_yaml(
            config_file, train=train, seeds=None if seed is None else [seed], mixing=mixing, temperature=temperature,
            budget=budget, output_dir=output_dir, compare=compare,
            transfer=False if compare is False and transfer is None else transfer)  # --no-compare: no pairs
        with stopped_by_signal(lambda: f"The runs finished so far are in {config.output_dir}/runs; the same "
                                       "command with --resume trains the rest"):
            result = run_multitask(config, console=tables, quiet=quiet, overwrite=force, resume=resume)
    print_tables(result, tables)
    console.print(f"wrote {result.output_dir / 'report'} ({result.wall_seconds:.0f} s): " + closing(result),
                  highlight=False)
    _exit_if_diverged(result)


def _exit_if_diverged(result: MultitaskResult) -> None:
    """Runs stopped by non-finite numbers: their scores are in the tables but are no results; say
    which on stderr (whatever --quiet) and exit 1, as `splice train` does."""
    diverged = result.summary.get("diverged", [])
    for line in diverged:
        to_stderr(f"[red]error:[/] run {escape(line)}")
    if diverged:
        raise typer.Exit(1)


def print_tables(result: MultitaskResult, out: Console) -> None:
    """The comparison, the costs and the transfer matrix, as in results.md."""
    from splice.multitask.report import as_dict, comparison_rows, cost_rows, transfer_rows

    data = as_dict(result)
    score, compared = data["score"], "single" in result.summary["costs"]
    seeds = len(result.config.seeds)
    spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    title = "shared adapter vs one adapter per task" if compared else "shared adapter"
    out.print(_table(f"{title}: {score}{spread}",
                     ["task", "shared", *(["own", "shared - own"] if compared else [])], comparison_rows(data)))
    out.print(_table("costs (per seed)", ["", "shared", *(["per task", "ratio"] if compared else [])],
                     cost_rows(data)))
    if result.transfer is not None:
        out.print(_table("transfer Δ_ij = acc_i(i+j) - acc_i(i): row i scored, column j added",
                         ["i \\ j", *result.transfer["tasks"]], transfer_rows(result.transfer)))


def closing(result: MultitaskResult) -> str:
    """The headline numbers on one line: the average score each way."""
    average = result.summary["average"]
    text = f"shared adapter {average['joint']['mean']:.3f}"
    if "single" in average:
        text += f", one adapter per task {average['single']['mean']:.3f}"
    return text + f" ({as_score(result)}, mean over tasks)"


def as_score(result: MultitaskResult) -> str:
    from splice.multitask.run import SCORE

    return SCORE[result.config.task]


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, min_width=len(title))  # the title on one line
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
