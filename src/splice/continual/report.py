"""What a continual run leaves in `<output_dir>/report/` (written whole, `atomic_directory`):
results.json (everything), results.md (the tables), accuracy_matrix.png (a heatmap per inference
setting) and accuracy_curves.png (each task's accuracy as the tasks go by), and sequence.yaml."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from splice.io.figures import pyplot, save_png
from splice.io.files import atomic_directory, write_json, write_text

if TYPE_CHECKING:
    from splice.continual.harness import ContinualResult


def setting_title(setting: str, result: ContinualResult) -> str:
    return "task id given" if setting == "task_incremental" else f"no task id ({result.config.routing} routing)"


def as_dict(result: ContinualResult) -> dict[str, Any]:
    return {
        "strategy": result.config.strategy, "tasks": result.tasks, "before": result.before,
        "matrices": result.matrices, "routing": result.routing,
        "scores": {s: v.to_dict() for s, v in result.scores.items()},
        "switches": result.switches, "forgetting_law": result.law,
        "trainable_parameters": result.trainable_parameters, "stored_bytes": result.stored_bytes,
        "train_seconds": result.train_seconds, "wall_seconds": result.wall_seconds, "eval_splits": result.eval_splits,
        "config": result.config.to_dict(),
    }


def write_report(result: ContinualResult) -> Path:
    """Write the report folder; its path."""
    folder = result.output_dir / "report"
    with atomic_directory(folder, overwrite=True) as tmp:
        write_json(tmp / "results.json", as_dict(result))
        write_text(tmp / "results.md", markdown(result))
        write_text(tmp / "sequence.yaml", yaml.safe_dump(result.config.to_dict(), sort_keys=False))
        plot_matrices(result, tmp / "accuracy_matrix.png")
        plot_curves(result, tmp / "accuracy_curves.png")
    return folder


def _cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown(result: ContinualResult) -> str:
    """The matrices, scores, costs and switch angles as markdown tables."""
    lines = [f"# Continual run: {result.config.strategy} on {', '.join(result.tasks)}", "",
             "Accuracy on each task's " + ", ".join(f"{n}: {s}" for n, s in zip(result.tasks, result.eval_splits,
                                                                              strict=True)) + " rows.", ""]
    for setting, matrix in result.matrices.items():
        lines += [f"## Accuracy matrix, {setting_title(setting, result)}", "",
                  "| after \\ on | " + " | ".join(result.tasks) + " |", "|---" * (len(result.tasks) + 1) + "|"]
        if setting == "task_incremental":
            lines.append("| (before) | " + " | ".join(_cell(v) for v in result.before) + " |")
        lines += [f"| {name} | " + " | ".join(_cell(v) for v in row) + " |" for name, row in zip(result.tasks, matrix,
                                                                                                 strict=True)]
        lines.append("")
    if result.routing:
        lines += ["## Routing without task id: share of each task's rows sent to that task", "",
                  "| after \\ on | " + " | ".join(result.tasks) + " |", "|---" * (len(result.tasks) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_cell(v) for v in row) + " |" for name, row in zip(result.tasks,
                  result.routing, strict=True)]
        lines += ["", "A classification row routed elsewhere is answered by another task's head and counts as "
                  "wrong: this bounds the task-agnostic accuracy from above.", ""]
    lines += ["## Scores", "",
              "| setting | average final accuracy | BWT | FWT | mean forgetting | forgetting per task |",
              "|---|---|---|---|---|---|"]
    for setting, s in result.scores.items():
        lines.append(f"| {setting} | {s.average_accuracy:.3f} | {s.backward_transfer:+.3f} | "
                     f"{'' if s.forward_transfer is None else f'{s.forward_transfer:+.3f}'} | "
                     f"{s.mean_forgetting:+.3f} | {', '.join(f'{f:+.3f}' for f in s.forgetting)} |")
    lines += ["", "## Costs", "", "| task | trainable parameters | stored bytes after it | training seconds |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {p:,} | {b:,} | {t:.1f} |" for n, p, b, t in
              zip(result.tasks, result.trainable_parameters, result.stored_bytes, result.train_seconds, strict=True)]
    lines += ["", f"Wall time {result.wall_seconds:.0f} s.", ""]
    if result.switches:
        lines += ["## Task switches: gradient-subspace angle and forgetting", "",
                  "| switch | θ_min mean over layers | θ_min smallest | forgetting of the task left |",
                  "|---|---|---|---|"]
        for s in result.switches:
            if "skipped" in s:
                lines.append(f"| {' -> '.join(s['between'])} | skipped: {s['skipped']} | | |")
                continue
            lines.append(f"| {' -> '.join(s['between'])} | {math.degrees(s['theta_min_mean']):.2f}° | "
                         f"{math.degrees(s['theta_min_min']):.2f}° | {_cell(s.get('forgetting'))} |")
        law = result.law
        lines += ["", "Forgetting law F = a (1 - cos² θ_min) + b: " + (
            f"a = {law['a']:+.3f}, b = {law['b']:+.3f}, R² = {law['r2']:.3f} over {law['n']} switches"
            + (" (two points: any line fits them exactly)" if law["n"] == 2 else "")
            if law else "not fitted (fewer than two different angles)"), ""]
    return "\n".join(lines)


def plot_matrices(result: ContinualResult, path: Path) -> None:
    """A heatmap of each setting's accuracy matrix (rows: after task t; columns: on task j)."""
    plt = pyplot()
    settings = list(result.matrices)
    K = len(result.tasks)
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 + 1.1 * K * len(settings), 1.2 + 0.9 * K),
                             squeeze=False, layout="constrained")
    for ax, setting in zip(axes[0], settings, strict=True):
        values = [[math.nan if v is None else v for v in row] for row in result.matrices[setting]]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
        for t, row in enumerate(values):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, t, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                            fontsize=8)
        ax.set_xticks(range(K), result.tasks, rotation=30, ha="right")
        ax.set_yticks(range(K), [f"after {n}" for n in result.tasks])
        ax.set_title(setting_title(setting, result), fontsize=9)
    fig.colorbar(image, ax=axes[0, -1], label="accuracy")
    fig.suptitle(f"{result.config.strategy}: accuracy after each task")
    save_png(fig, path)


def plot_curves(result: ContinualResult, path: Path) -> None:
    """Each task's task-incremental accuracy from before training to after the last task."""
    plt = pyplot()
    matrix = result.matrices["task_incremental"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
    steps = ["before", *[f"after {n}" for n in result.tasks]]
    for j, name in enumerate(result.tasks):
        values = [result.before[j], *[row[j] for row in matrix]]
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xticks(range(len(steps)), steps, rotation=20, ha="right")
    ax.set_ylabel("accuracy (task id given)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{result.config.strategy}: forgetting curves")
    save_png(fig, path)

