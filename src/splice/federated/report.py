"""What a federated run leaves in `<output_dir>/report/` (written whole, `atomic_directory`):
results.json (every round, every client, every message size, the partition), results.md (the
per-round table), curves.png (global and mean per-client metric and training loss per round)
and bytes.png (cumulative uplink and downlink bytes), forgetting.png for a task sequence (each
task's accuracy after every later task), and federate.yaml (the config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from splice.continual.metrics import scores
from splice.federated.config import FederatedConfig
from splice.federated.history import History
from splice.io.figures import pyplot, save_png
from splice.io.files import atomic_directory, write_json, write_text


def main_metric(config: FederatedConfig) -> str:
    return "accuracy" if config.task == "classification" else "loss"


def as_dict(config: FederatedConfig, history: History, partition: dict[str, Any]) -> dict[str, Any]:
    data = history.to_dict()
    metric = main_metric(config)
    last = history.rounds[-1] if history.rounds else None
    data["final"] = {} if last is None else {
        f"global_{metric}": last.global_metrics.get(metric),
        f"client_mean_{metric}": last.client_mean(metric),
        "uplink_bytes": data["cumulative_uplink_bytes"][-1], "downlink_bytes": data["cumulative_downlink_bytes"][-1],
        "seconds": sum(r.seconds for r in history.rounds)}
    if history.matrix and len(history.matrix) == len(config.datasets):
        data["final"]["continual"] = scores(history.matrix).to_dict()
    data.update(partition=partition, config=config.to_dict())
    return data


def write_report(config: FederatedConfig, history: History, partition: dict[str, Any]) -> Path:
    """Write the report folder; its path."""
    folder = Path(config.output_dir) / "report"
    with atomic_directory(folder, overwrite=True) as tmp:
        write_json(tmp / "results.json", as_dict(config, history, partition))
        write_text(tmp / "results.md", markdown(config, history))
        write_text(tmp / "federate.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        plot_curves(config, history, tmp / "curves.png")
        plot_bytes(history, tmp / "bytes.png")
        if config.tasks is not None and history.matrix:
            plot_forgetting(config, history.matrix, tmp / "forgetting.png")
    return folder


def _cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(config: FederatedConfig, history: History) -> str:
    """The per-round table: global and mean per-client metric, mean training loss, cumulative MB."""
    metric = main_metric(config)
    up, down = history.cumulative_bytes()
    subject = config.data if config.tasks is None else "tasks " + " -> ".join(t.name for t in config.tasks)
    lines = [f"# Federated run: {config.method}, {config.aggregation} aggregation, {config.clients} clients, "
             f"{subject}", "",
             f"Partition: {config.partition.scheme}" + (f" (alpha {config.partition.alpha})"
                                                        if config.partition.scheme == "dirichlet" else "") +
             f"; {config.rounds} rounds{' per task' if config.tasks else ''} of {config.local_steps} local steps; "
             f"{'SecAgg+' if config.secure else 'plain'} aggregation"
             + (f"; DP ({config.privacy.side} clipping, noise {config.privacy.noise_multiplier})"
                if config.privacy else "") + ".", "",
             f"| round | global {metric} | mean client {metric} | train loss | uplink MB (cum.) | "
             "downlink MB (cum.) | separation error | seconds |", "|---" * 8 + "|"]
    for record, u, d in zip(history.rounds, up, down, strict=True):
        label = f"{record.round} ({record.task})" if record.task else f"{record.round}"
        lines.append(f"| {label} | {_cell(record.global_metrics.get(metric))} | "
                     f"{_cell(record.client_mean(metric))} | {_cell(record.client_mean('train_loss', 'train'))} | "
                     f"{u / 1e6:.3f} | {d / 1e6:.3f} | {_cell(record.aggregation.get('separation_error_mean'))} | "
                     f"{record.seconds:.1f} |")
    if history.matrix and config.tasks is not None:
        lines += ["", *matrix_lines(config, history.matrix)]
    return "\n".join(lines) + "\n"


def matrix_lines(config: FederatedConfig, matrix: list[list[float | None]]) -> list[str]:
    """The global accuracy on every task after each task, and the continual scores once all ran."""
    names = [task.name for task in config.tasks or []]
    lines = ["## Global accuracy after each task", "", "| after \\ on | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    lines += [f"| {names[t]} | " + " | ".join(_cell(v) for v in row) + " |" for t, row in enumerate(matrix)]
    if len(matrix) == len(names):
        result = scores(matrix)
        lines += ["", f"Average final accuracy {result.average_accuracy:.3f}, backward transfer "
                      f"{result.backward_transfer:+.3f}, mean forgetting {result.mean_forgetting:.3f}."]
    return lines


def plot_curves(config: FederatedConfig, history: History, path: Path) -> Path:
    plt = pyplot()
    metric = main_metric(config)
    rounds = [r.round for r in history.rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, [r.global_metrics.get(metric) for r in history.rounds], marker="o", label="global")
    left.plot(rounds, [r.client_mean(metric) for r in history.rounds], marker="s", label="mean per client")
    left.set(xlabel="round", ylabel=metric, title=f"{metric} per round")
    left.legend()
    right.plot(rounds, [r.client_mean("train_loss", "train") for r in history.rounds], marker="o")
    right.set(xlabel="round", ylabel="mean local training loss", title="training loss per round")
    fig.tight_layout()
    return save_png(fig, path)


def plot_bytes(history: History, path: Path) -> Path:
    plt = pyplot()
    up, down = history.cumulative_bytes()
    rounds = [r.round for r in history.rounds]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(rounds, [b / 1e6 for b in up], marker="o", label="uplink")
    ax.plot(rounds, [b / 1e6 for b in down], marker="s", label="downlink")
    ax.set(xlabel="round", ylabel="MB, cumulative", title="communication")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def plot_forgetting(config: FederatedConfig, matrix: list[list[float | None]], path: Path) -> Path:
    """A task sequence's forgetting curves: each task's global accuracy after every task from its own on."""
    plt = pyplot()
    names = [task.name for task in config.tasks or []]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, name in enumerate(names):
        after = [(t, row[j]) for t, row in enumerate(matrix) if t >= j and row[j] is not None]
        if after:
            ax.plot([names[t] for t, _ in after], [v for _, v in after], marker="o", label=name)
    ax.set(xlabel="after training", ylabel="global accuracy", title=f"{config.method}: accuracy on each task")
    ax.legend(title="on task")
    fig.tight_layout()
    return save_png(fig, path)
