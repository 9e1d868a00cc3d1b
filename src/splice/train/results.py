"""What a run keeps and returns: its result, the progress a checkpoint holds, the best-checkpoint
keeper, and the checks for non-finite numbers (the `Trainer`'s, so every job built on trainers'
too: a multiplexed tenant is a trainer)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

import splice
from splice.core.errors import SpliceError
from splice.train.config import TrainConfig

Metrics = dict[str, float]
MAX_SKIPS_IN_A_ROW = 10  # on_nonfinite: skip gives up after this many non-finite steps in a row

@dataclass
class RunResult:
    """What `run` and `Trainer.fit` return: metrics before and after per split, the step history, the files.

    `history` has one entry per optimizer step (step, epoch, lr, loss) and an "eval" mapping on
    the steps that evaluated; `paths` names the run folder, the adapter and the report files.
    """

    metrics: dict[str, dict[str, Metrics]]
    history: list[dict[str, Any]]
    paths: dict[str, Path]
    timings: dict[str, float]
    best_step: int
    stopped_early: bool
    parameters: dict[str, int] = field(default_factory=dict)
    status: str = "finished"  # "finished", "diverged" (stopped on non-finite numbers) or "interrupted"
    message: str = ""
    skipped_steps: int = 0  # optimizer steps dropped for non-finite numbers (on_nonfinite: skip)


class TrainingInterrupted(SpliceError):
    """SIGINT or SIGTERM stopped the run after a step; it was checkpointed and can be resumed.

    `result` holds what the run had (metrics before, history, best step); `exit_code` is the
    shell's for that signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, result: RunResult, signal_number: int) -> None:
        super().__init__(message)
        self.result, self.signal_number = result, signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


@dataclass
class BestKeeper:
    """Best-checkpoint keeping and early stopping on one validation metric.

    An evaluation with a non-finite number, or a state with a non-finite tensor, is never the
    best (a diverged model that predicts one class can beat the start on accuracy); it counts
    as an evaluation without improvement.
    """

    metric: str
    higher_is_better: bool
    patience: int | None
    value: float | None = None
    step: int = 0
    state: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0

    def offer(self, metrics: Metrics, step: int, snapshot: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record an evaluation; keep `snapshot()` if it is the best so far. True if it was."""
        value = metrics[self.metric]
        finite = all(math.isfinite(v) for v in metrics.values())
        better = self.value is None or (value > self.value if self.higher_is_better else value < self.value)
        improved = finite and better
        state = snapshot() if improved else None
        if improved and not nonfinite_tensors(state):
            self.value, self.step, self.state, self.evals_since_best = value, step, state, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "state": self.state, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.step, self.state = state["value"], state["step"], state["state"]
        self.evals_since_best = state["evals_since_best"]


@dataclass
class RunState:
    """Where a run is, in the form a checkpoint stores it (accelerate's `register_for_checkpointing`).

    The data position is the epoch, the number of its loader batches already trained on, and
    the state of the loader's shuffle generator when that epoch began: restoring that state
    gives the epoch's order again, and the batches done are skipped.
    """

    config: dict[str, Any]
    best: BestKeeper
    step: int = 0
    epoch: int = 0
    batches: int = 0
    epoch_rng: torch.Tensor | None = None
    examples: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    train_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Metrics] = field(default_factory=dict)
    saved_config: dict[str, Any] | None = None  # the config of a loaded checkpoint

    FIELDS = ("step", "epoch", "batches", "epoch_rng", "examples", "skipped", "skipped_in_a_row", "train_s",
              "history", "before")

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "config": self.config, "best": self.best.state_dict(),
                **{name: getattr(self, name) for name in self.FIELDS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_config = state["config"]
        self.best.load_state_dict(state["best"])
        for name in self.FIELDS:
            setattr(self, name, state[name])


@dataclass
class StepCheck:
    """What an optimizer step's numbers say, the same on every process."""

    loss: float
    problem: str | None  # "loss nan", "gradient norm inf", ...
    interrupted: bool


def check_step(accelerator: Accelerator, micro_losses: list[torch.Tensor], micro_totals: list[torch.Tensor],
                params: list[torch.nn.Parameter], max_grad_norm: float | None, check_gradients: bool,
                interrupted: bool) -> StepCheck:
    """The step's mean loss, whether its loss or gradient norm is non-finite (clipping on the
    way, when configured), and whether a process got a stop signal: agreed by all processes."""
    step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), "mean")
    flags = torch.stack([(~torch.isfinite(torch.stack(micro_totals))).sum().float(),
                         torch.tensor(float(interrupted), device=step_loss.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    if max_grad_norm:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    elif check_gradients:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = None
    loss = step_loss.item()
    nonfinite_losses, stop_signal = flags.tolist()
    problem = None
    if nonfinite_losses or not math.isfinite(loss):
        problem = f"loss {loss}"
    elif check_gradients and norm is not None and not math.isfinite(norm := float(norm)):
        problem = f"gradient norm {norm}"
    return StepCheck(loss, problem, bool(stop_signal))


def nonfinite_message(config: TrainConfig, step: int, problem: str, best: BestKeeper, policy: str) -> str:
    what = (f"step {step}: non-finite {problem}; stopped (on_nonfinite: stop)" if policy == "stop" else
            f"step {step}: {MAX_SKIPS_IN_A_ROW} optimizer steps in a row had a non-finite loss or gradient "
            f"(last: {problem}); stopped")
    kept = (f"the best finite state (step {best.step}) is kept" if best.state is not None else
            "there is no validation split, so the final state is all there is")
    return (f"{what}; {kept}. The training diverged: lower the learning rate (lr {config.lr:g}), set "
            "max_grad_norm, or check the data.")


def save_adapter(model: torch.nn.Module, path: Path, save_format: str = "auto", name: str | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """`splice.save`, which writes the folder whole (`atomic_directory`: a reader, or a run
    stopped at any point, finds the old complete adapter or the new one). Refuses a state whose
    trainable tensors (or `tensors`) are not all finite."""
    bad = nonfinite_tensors(splice.trainable_parameters(model) if tensors is None else tensors)
    if bad:
        raise SpliceError(f"refusing to save a non-finite adapter to {path}: {', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''} hold NaN or inf")
    return splice.save(model, path, name, format=save_format, overwrite=True)


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


