"""What a run leaves behind and shows: the run folder's files and the terminal tables.

A run folder holds `adapter/` (written by the loop with `splice.save`), `config.yaml` (rerun
with `splice train runs/NAME/config.yaml`), `metrics.json` (config, metrics before and after,
history, timings, parameter counts, library versions) and `curves.png` (training loss and
validation metrics against steps).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

import splice
from splice.core.summary import Summary
from splice.io.files import prepare_output_dir
from splice.train.config import TrainConfig

ROW_KEYS = ("what", "parameters", "trainable", "detail")  # of `Summary.rows()`

if TYPE_CHECKING:
    from splice.train.loop import RunResult


def prepare_run_dir(path: str | Path, force: bool) -> Path:
    """Create the run folder; a non-empty one raises `splice.OutputExistsError` unless `force`.

    Called before any work, so that a run never trains for minutes and then refuses to save.
    With `force`, files of the same names are replaced and other files are left alone.
    """
    return prepare_output_dir(path, overwrite=force)


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    return {"splice": splice.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def write_run(run_dir: Path, config: TrainConfig, result: RunResult, parameters: Summary) -> dict[str, Path]:
    """Write config.yaml, metrics.json and curves.png into `run_dir`; returns their paths."""
    paths = {"config": run_dir / "config.yaml", "metrics": run_dir / "metrics.json", "plot": run_dir / "curves.png"}
    config.to_yaml(paths["config"])
    report = {
        "config": config.to_dict(),
        "before": result.metrics["before"],
        "after": result.metrics["after"],
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "parameters": {"trainable": parameters.trainable, "total": parameters.total,
                       "trainable_percent": parameters.trainable_percent,
                       "rows": [dict(zip(ROW_KEYS, row, strict=True)) for row in parameters.rows()]},
        "timings": result.timings,
        "history": result.history,
        "versions": versions(),
    }
    paths["metrics"].write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(result.history, paths["plot"], start=result.metrics["before"].get("validation"))
    return paths


def plot_curves(history: list[dict[str, Any]], path: Path, start: dict[str, float] | None = None) -> None:
    """Training loss per step (and its running mean) with validation loss on top; validation
    metrics in a second panel.

    `start`, the validation metrics before training, is drawn at step 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    during = [h for h in history if "eval" in h]
    others = sorted({k for h in during for k in h["eval"] if k != "loss"})
    evals = ([{"step": 0, "eval": start}] if start else []) + during
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(11 if others else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    window = max(1, len(losses) // 25)  # one batch's loss is noisy; show a running mean as well
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    loss_ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue")
    label = "train" if window == 1 else f"train (mean of {window} steps)"
    loss_ax.plot(steps[window - 1 :], running, color="tab:blue", label=label)
    loss_ax.plot([h["step"] for h in evals], [h["eval"]["loss"] for h in evals], "o-", color="tab:orange",
                 label="validation")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    if others:
        metric_ax = axes[0][1]
        for key in others:
            steps, values = zip(*((h["step"], h["eval"][key]) for h in evals if key in h["eval"]), strict=True)
            metric_ax.plot(steps, values, "o-", label=key)
        metric_ax.set(xlabel="step", title="validation")
        metric_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(summary: Summary, title: str) -> Table:
    """`splice.summary` as a rich table."""
    table = Table(title=title)
    for header, justify in (("", "left"), ("parameters", "right"), ("trainable", "right"), ("", "left")):
        table.add_column(header, justify=justify)
    for row in summary.rows():
        table.add_row(*row)
    return table


def metrics_line(label: str, metrics: dict[str, dict[str, float]], best: bool = False) -> str:
    """One line such as `step 60  validation: loss 0.512, accuracy 0.771  (best)`."""
    parts = [f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()) for split, values in metrics.items()]
    return f"[bold]{label}[/]  " + "  ".join(parts) + ("  [green](best)[/]" if best else "")


def results_table(result: RunResult) -> Table:
    """Each split's metrics before and after training, and where the files went."""
    minutes = result.timings["total_s"] / 60
    table = Table(title=f"results (best step {result.best_step}, {minutes:.1f} min)",
                  caption=f"saved to {result.paths['run_dir']}")
    for header in ("split", "metric", "before", "after", "change"):
        table.add_column(header, justify="left" if header in ("split", "metric") else "right")
    for split, after in result.metrics["after"].items():
        for key, value in after.items():
            old = result.metrics["before"][split][key]
            table.add_row(split, key, f"{old:.4f}", f"{value:.4f}", f"{value - old:+.4f}")
    return table
