"""`splice continual`: train a sequence of tasks with one strategy and measure what is remembered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import stopped_by_signal, user_errors
from splice.cli.output import Quiet, command, quieted

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "continual", continual)


def continual(
    sequence: Annotated[Path, typer.Argument(help="Sequence YAML: tasks (name, data, budget), strategy, "
                                             "options, model, adapter, train.", show_default=False)],
    strategy: Annotated[str | None, typer.Option(help="Override the file's strategy: sequential, separate, "
                                                 "olora, ...")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the file's seed.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (default: the file's, else "
                                                   "runs/continual-<model>-<strategy>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty run folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the stopped run in the run folder at the "
                                         "task after the last one it finished (same file and flags).")] = False,
    quiet: Quiet = False,
) -> None:
    """Train the tasks in order; after each one, evaluate every task seen so far (and the next
    one) with the task id given and without it. Prints the accuracy matrix and the scores
    (average final accuracy, backward and forward transfer, forgetting) and writes them with
    the plots to <run>/report/: results.json, results.md, accuracy_matrix.png,
    accuracy_curves.png.

    Examples:

        splice continual examples/continual_minilm.yaml
        splice continual examples/continual_minilm.yaml --strategy olora --seed 1
        splice continual examples/continual_minilm.yaml --resume

    The run is saved after every task: a stopped run (Ctrl-C, a killed job) continues where it
    stopped with the same command and --resume.
    """
    from splice.continual import SequenceConfig, run_sequence
    from splice.core.errors import SpliceError

    with user_errors(), quieted(console, quiet) as tables:
        if resume and force:
            raise SpliceError("--resume continues the run in the folder and --force replaces it: give one")
        config = SequenceConfig.from_yaml(sequence, strategy=strategy, seed=seed, output_dir=output_dir)
        with stopped_by_signal(lambda: _how_to_continue(config.output_dir)):
            result = run_sequence(config, console=tables, quiet=quiet, overwrite=force, resume=resume)
    for setting, matrix in result.matrices.items():
        table = Table(title=f"{config.strategy}: accuracy after each task ({setting.replace('_', '-')})")
        table.add_column("after")
        for name in result.tasks:
            table.add_column(name, justify="right")
        for name, row in zip(result.tasks, matrix, strict=True):
            table.add_row(name, *["" if v is None else f"{v:.3f}" for v in row])
        tables.print(table)
    for setting, s in result.scores.items():
        fwt = "" if s.forward_transfer is None else f", FWT {s.forward_transfer:+.3f}"
        tables.print(f"{setting}: average final accuracy {s.average_accuracy:.3f}, BWT {s.backward_transfer:+.3f}"
                     f"{fwt}, mean forgetting {s.mean_forgetting:+.3f}")
    console.print(f"wrote {result.output_dir / 'report'} ({result.wall_seconds:.0f} s)")


def _how_to_continue(output_dir: str) -> str:
    """What to run after a stop: --resume once a task has finished (the unfinished one starts
    again), else the same command with --force (nothing to resume; the folder is not empty)."""
    from splice.continual.checkpoint import folder_of

    if (folder_of(output_dir) / "state.pt").is_file():
        return (f"The tasks finished so far are saved in {output_dir}; continue with the same command and "
                "--resume (the unfinished task starts again)")
    return f"No task had finished; start again with the same command and --force (it replaces {output_dir})"
