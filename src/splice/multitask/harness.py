"""A multi-task job: the shared adapter on the whole mixture, one adapter per task, every pair of
tasks; for each seed; then the comparison and the transfer matrix, written to a report.

    from splice.multitask import MultitaskConfig, run_multitask
    result = run_multitask(MultitaskConfig.from_yaml("examples/multitask_minilm.yaml"))
    result.summary["tasks"]["sentiment"]        # shared vs own adapter, mean over seeds
    result.transfer["mean"]                     # Δ_ij

Runs of a seed (`plan`): "joint" (every task, one adapter), "single-<task>" (`compare`), and
"pair-<a>+<b>" (`transfer`; with two tasks the pair is the joint run, trained once). Every run is
a `splice.multitask.run.train_run` in `<output_dir>/runs/seed<s>/<run>/`.
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from splice.core import progress
from splice.io.output_dirs import check_output_dir
from splice.multitask.config import MultitaskConfig
from splice.multitask.data import TaskData, described, load_tasks
from splice.multitask.run import Base, RunRecord, load_base, run_budget, train_run
from splice.multitask.summary import summarize, transfer_over_seeds


@dataclass
class MultitaskResult:
    """Every run's record, the tasks' data, and what they add up to (`summary`, `transfer`)."""

    config: MultitaskConfig
    tasks: list[dict[str, Any]]
    runs: list[RunRecord]
    summary: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] | None = None
    wall_seconds: float = 0.0

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def run(self, name: str, seed: int) -> RunRecord:
        return next(r for r in self.runs if r.name == name and r.seed == seed)


def plan(config: MultitaskConfig, tasks: list[TaskData]) -> list[tuple[str, list[TaskData]]]:
    """The runs of one seed, in order: (name, its tasks)."""
    runs = [("joint", list(tasks))]
    if config.compare:
        runs += [(f"single-{t.name}", [t]) for t in tasks]
    if config.transfer and len(tasks) > 2:
        runs += [(f"pair-{a.name}+{b.name}", [a, b]) for a, b in itertools.combinations(tasks, 2)]
    return runs


def pair_run(a: str, b: str, n_tasks: int) -> str:
    """The name of the run trained on a+b (a before b in the config): the joint run for two tasks."""
    return "joint" if n_tasks == 2 else f"pair-{a}+{b}"


def run_multitask(config: MultitaskConfig, *, console: Console | None = None, quiet: bool = False,
                  overwrite: bool = False) -> MultitaskResult:
    """Train every run of `config` for every seed; the result, with its report written to
    `<output_dir>/report/` (a non-empty output folder is refused unless `overwrite`)."""
    from splice.multitask.report import write_report

    console = console or Console(quiet=quiet)
    started = time.perf_counter()
    folder = check_output_dir(config.output_dir, overwrite)
    with progress.use(console, quiet=quiet):
        tasks = load_tasks(config)  # before the old folder goes: a data error leaves it as it was
        if folder.exists() and overwrite:
            shutil.rmtree(folder)
        keys = {t.name: t.key for t in tasks}
        base = Base(*load_base(config.shared_config()))
        runs = plan(config, tasks)
        console.print(f"{len(runs)} run(s) x {len(config.seeds)} seed(s) on {', '.join(keys)} "
                      f"({config.mixing}{f', T={config.temperature:g}' if config.mixing == 'temperature' else ''}"
                      f" mixing, {config.budget.replace('_', ' ')} budget)")
        records = []
        for seed in config.seeds:
            for n, (name, members) in enumerate(runs, 1):
                steps = run_budget(config, members)
                console.print(f"[bold]seed {seed}, run {n}/{len(runs)}: {name}[/] ({steps} steps on "
                              f"{' + '.join(t.name for t in members)})")
                record = train_run(config, members, seed, name, folder / "runs" / f"seed{seed}" / name, keys,
                                   console, steps, base)
                console.print(f"  {_scores_line(record)} ({record.train_seconds:.0f} s training)")
                records.append(record)
        result = MultitaskResult(config, [described(t) for t in tasks], records)
        result.summary = summarize(config, [t.name for t in tasks], records)
        if config.transfer:
            result.transfer = transfer_over_seeds([t.name for t in tasks], config.seeds, records, pair_run)
        result.wall_seconds = time.perf_counter() - started
        write_report(result)
    return result


def _scores_line(record: RunRecord) -> str:
    scores = ", ".join(f"{task} {value:.3f}" for task, value in record.scores.items())
    return scores if record.status == "finished" else f"{scores} [red]({record.status}: {escape(record.message)})[/]"
