"""`splice.train.run`: one training from a config, a thin wrapper over `Trainer`.

    claim the run folder -> Trainer.from_config (config, model + tokenizer, adapter) -> fit
    (evaluate before, train with periodic evaluation and checkpoints, restore the best adapter,
    evaluate after, save, report) -> release the folder

`run(..., resume=True)` (CLI: `splice train --resume RUN`) sets the run up as before, loads the
newest checkpoint and continues to the same result as a run that was never stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import parse_flag_from_env
from rich.console import Console
from rich.markup import escape

from splice.core.errors import SpliceError
from splice.train.checkpoint import ADDED_FIELDS, claim
from splice.train.config import TrainConfig, read_yaml_mapping

# The names below lived here before `Trainer`; kept so that existing imports keep working.
from splice.train.evaluation import enable_gradient_checkpointing as _enable_gradient_checkpointing  # noqa: F401
from splice.train.evaluation import evaluate, evaluate_adapter  # noqa: F401
from splice.train.results import (  # noqa: F401
    MAX_SKIPS_IN_A_ROW,
    BestKeeper,
    RunResult,
    TrainingInterrupted,
    save_adapter,
)
from splice.train.trainer import Trainer


def run(config: TrainConfig, *, console: Console | None = None, force: bool = False,
        resume: bool = False) -> RunResult:
    """Train `config.adapter` on `config.data` and write the adapter and a report to output_dir.

    The run folder is locked for the run's duration: a second run into it is refused at once.
    A non-empty output_dir is refused before any work unless `force=True`. `resume=True`
    continues the interrupted run in output_dir from its newest checkpoint (see `resume`).
    SIGINT/SIGTERM stop the run after the current step with a checkpoint and raise
    `TrainingInterrupted`; a second signal stops at once.
    """
    console = console or Console()
    started = time.perf_counter()
    # First, before any work. The process state as the Accelerator would make it (not the
    # Accelerator itself, whose shared state another run in this process may be using).
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    folder = claim(processes, config.output_dir, force, resume)
    try:
        if folder is not None and folder.stale_pid is not None:
            console.print(f"took over {escape(str(folder.lock_file))} from process {folder.stale_pid}, which is gone")
        trainer = Trainer.from_config(config, console=console, resume=resume)
        trainer.started = started
        return trainer.fit()
    finally:
        if folder is not None:
            folder.release()


def resume(run_dir: str | Path, *, console: Console | None = None) -> RunResult:
    """Continue the interrupted run in `run_dir` from its newest checkpoint, with its config.yaml.

    The result is that of the run had it never stopped (same batches, random states, schedule
    and best checkpoint). A run that has ended (finished or diverged) is refused. A config.yaml
    written before a field existed resumes with the value that run had (`checkpoint.ADDED_FIELDS`),
    not today's default.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SpliceError(f"cannot resume {run_dir}: it has no config.yaml (not a `splice train` run folder)")
    written = read_yaml_mapping(config_file, "config file", "config fields")
    older = {k: v for k, v in ADDED_FIELDS.items() if k not in written}  # written before these fields existed
    return run(TrainConfig.from_yaml(config_file, output_dir=str(run_dir), **older), console=console, resume=True)
