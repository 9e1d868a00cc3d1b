"""A multi-task job: the shared adapter on the whole mixture, one adapter per task, every pair of
tasks; for each seed; then the comparison and the transfer matrix, written to a report.

    from splice.multitask import MultitaskConfig, run_multitask
    result = run_multitask(MultitaskConfig.from_yaml("examples/multitask_minilm.yaml"))
    result.summary["tasks"]["sentiment"]        # shared vs own adapter, mean over seeds
    result.transfer["mean"]                     # Δ_ij

Runs of a seed (`plan`): "joint" (every task, one adapter), "single-<task>" (`compare`), and
"pair-<a>+<b>" (`transfer`; with two tasks the pair is the joint run, trained once). Every run is
a `splice.multitask.run.train_run` in `<output_dir>/runs/seed<s>/<run>/`.

A stopped job (Ctrl-C, a killed process) resumes at its first unfinished run: a run is finished
when its run.json is written (last, after its adapter and heads), and runs are deterministic given
their seed, so a resumed job ends with the records the uninterrupted one would have had. The
config a job started with is kept in `<output_dir>/job.json`; a resume under another is refused.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from splice.core import progress
from splice.core.errors import SpliceError
from splice.core.validation import config_changes
from splice.io.files import write_json
from splice.io.output_dirs import check_output_dir
from splice.multitask.config import MultitaskConfig
from splice.multitask.data import TaskData, described, load_tasks
from splice.multitask.run import Base, RunRecord, load_base, run_budget, train_run
from splice.multitask.summary import summarize, transfer_over_seeds

JOB_FILE = "job.json"  # the config the job was started with, for --resume


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
                  overwrite: bool = False, resume: bool = False) -> MultitaskResult:
    """Train every run of `config` for every seed; the result, with its report written to
    `<output_dir>/report/` (a non-empty output folder is refused unless `overwrite`). `resume`
    continues a stopped job in `config.output_dir`: its finished runs are read back, the others
    trained (again from their start)."""
    from splice.multitask.report import write_report

    if resume and overwrite:
        raise SpliceError("resume continues a job and overwrite replaces it: pass one of them")
    console = console or Console(quiet=quiet)
    started = time.perf_counter()
    folder = Path(config.output_dir) if resume else check_output_dir(config.output_dir, overwrite)
    with progress.use(console, quiet=quiet):
        tasks = load_tasks(config)  # before the old folder goes: a data error leaves it as it was
        if resume:
            check_resumable(folder, config)
        else:
            if folder.exists() and overwrite:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / JOB_FILE, {"config": _plain(config)})
        keys = {t.name: t.key for t in tasks}
        base = Base(*load_base(config.shared_config()))
        runs = plan(config, tasks)
        console.print(f"{len(runs)} run(s) x {len(config.seeds)} seed(s) on {', '.join(keys)} "
                      f"({config.mixing}{f', T={config.temperature:g}' if config.mixing == 'temperature' else ''}"
                      f" mixing, {config.budget.replace('_', ' ')} budget)")
        records = []
        for seed in config.seeds:
            for n, (name, members) in enumerate(runs, 1):
                run_folder = folder / "runs" / f"seed{seed}" / name
                record = finished_run(run_folder, name, seed) if resume else None
                if record is not None:
                    console.print(f"seed {seed}, run {n}/{len(runs)}: {name}, finished before: {_scores_line(record)}")
                else:
                    if run_folder.exists():  # stopped part-way: it starts again
                        shutil.rmtree(run_folder)
                    steps = run_budget(config, members)
                    console.print(f"[bold]seed {seed}, run {n}/{len(runs)}: {name}[/] ({steps} steps on "
                                  f"{' + '.join(t.name for t in members)})")
                    record = train_run(config, members, seed, name, run_folder, keys, console, steps, base)
                    console.print(f"  {_scores_line(record)} ({record.train_seconds:.0f} s training)")
                records.append(record)
        result = MultitaskResult(config, [described(t) for t in tasks], records)
        result.summary = summarize(config, [t.name for t in tasks], records)
        if config.transfer:
            result.transfer = transfer_over_seeds([t.name for t in tasks], config.seeds, records, pair_run)
        result.wall_seconds = time.perf_counter() - started
        write_report(result)
    return result


def check_resumable(folder: Path, config: MultitaskConfig) -> None:
    """Refuse, with the reason, to resume `folder` under `config`: no job there, an unreadable
    job.json, or a job started with another config (naming each change)."""
    job_file = folder / JOB_FILE
    if not job_file.is_file():
        raise SpliceError(f"cannot resume {folder}: it has no {JOB_FILE} (no multi-task job was started there); "
                          "start the job without --resume")
    try:
        saved = json.loads(job_file.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SpliceError(f"cannot resume {folder}: {job_file} is unreadable ({type(err).__name__}: {err})") from err
    current = _plain(config)
    if saved != current:
        raise SpliceError(f"cannot resume {folder}: the job was started with another config "
                          f"({'; '.join(config_changes(saved, current))}); a resumed job continues the same config")


def finished_run(folder: Path, name: str, seed: int) -> RunRecord | None:
    """The record of run `name` of `seed` in `folder` when it finished (its run.json is there),
    else None; an unreadable or foreign run.json is refused with the file and the reason."""
    file = folder / "run.json"
    if not file.is_file():
        return None
    try:
        record = RunRecord(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise SpliceError(f"cannot resume: {file} is unreadable ({type(err).__name__}: {err}); remove the folder "
                          f"{folder} to train that run again") from err
    if (record.name, record.seed) != (name, seed):
        raise SpliceError(f"cannot resume: {file} holds run {record.name!r} of seed {record.seed}, not {name!r} of "
                          f"seed {seed}")
    return record


def _plain(config: MultitaskConfig) -> dict[str, Any]:
    """The config as JSON gives it back (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def _scores_line(record: RunRecord) -> str:
    scores = ", ".join(f"{task} {value:.3f}" for task, value in record.scores.items())
    return scores if record.status == "finished" else f"{scores} [red]({record.status}: {escape(record.message)})[/]"
