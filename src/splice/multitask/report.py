"""What a multi-task job leaves in `<output_dir>/report/` (written whole, `atomic_directory`):
results.json (every run's record, the comparison, the transfer matrices), results.md (the
tables), transfer.png (the mean Δ_ij as a heatmap, when the job measured transfer) and
multitask.yaml (the config it ran)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from splice.io.figures import pyplot, save_png
from splice.io.files import atomic_directory, write_json, write_text
from splice.multitask.run import SCORE

if TYPE_CHECKING:
    from splice.multitask.harness import MultitaskResult


def as_dict(result: MultitaskResult) -> dict[str, Any]:
    return {"config": result.config.to_dict(), "score": SCORE[result.config.task], "tasks": result.tasks,
            "summary": result.summary, "transfer": result.transfer, "wall_seconds": result.wall_seconds,
            "runs": [r.to_dict() for r in result.runs]}


def write_report(result: MultitaskResult) -> Path:
    """Write the report folder; its path."""
    folder = result.output_dir / "report"
    with atomic_directory(folder, overwrite=True) as tmp:
        write_json(tmp / "results.json", as_dict(result))
        write_text(tmp / "results.md", markdown(as_dict(result)))
        write_text(tmp / "multitask.yaml", yaml.safe_dump(result.config.to_dict(), sort_keys=False))
        if result.transfer is not None:
            plot_transfer(result.transfer, tmp / "transfer.png", SCORE[result.config.task])
    return folder


def _pm(cell: dict[str, Any], signed: bool = False) -> str:
    text = f"{cell['mean']:+.3f}" if signed else f"{cell['mean']:.3f}"
    return text + (f" ± {cell['std']:.3f}" if len(cell["per_seed"]) > 1 else "")


def comparison_rows(data: dict[str, Any]) -> list[list[str]]:
    """The rows of the comparison table: each task and the average, shared vs own adapter."""
    summary = data["summary"]
    rows = []
    for task, row in [*summary["tasks"].items(), ("average", summary["average"])]:
        cells = [task, _pm(row["joint"])]
        if "single" in row:
            cells += [_pm(row["single"]), _pm(row["difference"], signed=True) if "difference" in row else
                      f"{row['joint']['mean'] - row['single']['mean']:+.3f}"]
        rows.append(cells)
    return rows


def cost_rows(data: dict[str, Any]) -> list[list[str]]:
    costs = data["summary"]["costs"]
    labels = [("adapters stored", "adapters", "{:.0f}"), ("stored parameters (adapters + heads)",
              "stored_parameters", "{:,.0f}"), ("  of which heads", "head_parameters", "{:,.0f}"),
              ("optimizer steps", "steps", "{:,.0f}"), ("training examples", "examples", "{:,.0f}"),
              ("training seconds", "train_seconds", "{:.1f}")]
    rows = []
    for label, key, form in labels:
        cells = [label, form.format(costs["joint"][key])]
        if "single" in costs:
            ratio = costs["ratio"][key]
            cells += [form.format(costs["single"][key]), "" if ratio is None else f"{ratio:.2f}x"]
        rows.append(cells)
    return rows


def transfer_rows(transfer: dict[str, Any]) -> list[list[str]]:
    names, mean, std = transfer["tasks"], transfer["mean"], transfer["std"]
    several = len(transfer["per_seed"]) > 1
    return [[i, *[f"{mean[a][b]:+.3f}" + (f" ± {std[a][b]:.3f}" if several and a != b else "")
                  for b in range(len(names))]] for a, i in enumerate(names)]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def markdown(data: dict[str, Any]) -> str:
    """The job's tables as markdown, from `as_dict`'s plain data (so a saved results.json renders too)."""
    config, score = data["config"], data["score"]
    seeds = config["seeds"]
    mixing = config["mixing"] + (f" (T = {config['temperature']:g})" if config["mixing"] == "temperature" else "")
    lines = [f"# Multi-task: one adapter for {', '.join(t['name'] for t in data['tasks'])}", "",
             f"Model {config['model']} ({config['task']}), adapter {config['adapter']}, {mixing} mixing, "
             f"{config['budget'].replace('_', ' ')} budget; {score} on each task's "
             + ", ".join(f"{t['name']}: {t['eval_rows']} {t['eval_split']} rows" for t in data["tasks"])
             + f"; seeds {', '.join(map(str, seeds))}" + (" (mean ± std)" if len(seeds) > 1 else "") + ".", "",
             "## Shared adapter vs one adapter per task", ""]
    compared = "single" in data["summary"]["costs"]
    lines += table(["task", f"shared adapter ({score})", *([f"own adapter ({score})", "shared - own"]
                                                           if compared else [])], comparison_rows(data))
    lines += ["", "## Costs (per seed)", ""]
    lines += table(["", "shared adapter", *(["one adapter per task", "shared / per task"] if compared else [])],
                   cost_rows(data))
    transfer = data.get("transfer")
    if transfer is not None:
        lines += ["", "## Transfer matrix Δ_ij = acc_i(trained on i+j) - acc_i(trained on i)", "",
                  "Row i: the task scored; column j: the task added to its training. Positive: j helps i.", ""]
        lines += table(["i \\ j", *transfer["tasks"]], transfer_rows(transfer))
    mix = [f"{r['name']}: " + ", ".join(f"{t} {w:.2f}" for t, w in r["weights"].items())
           for r in data["runs"] if r["seed"] == seeds[0] and len(r["tasks"]) > 1]
    lines += ["", "## Runs", "", "Mixing probabilities p_t: " + "; ".join(mix) + ".", ""]
    lines += table(["run", "seed", "steps", "batches per task", f"{score} per task", "train s", "status"],
                   [[r["name"], str(r["seed"]), str(r["steps"]), ", ".join(f"{t} {n}" for t, n in r["batches"].items()),
                     ", ".join(f"{t} {v:.3f}" for t, v in r["scores"].items()), f"{r['train_seconds']:.1f}",
                     r["status"]] for r in data["runs"]])
    for line in data["summary"].get("diverged", []):
        lines.append(f"\nDiverged: {line}")
    lines += ["", f"Wall time {data['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_transfer(transfer: dict[str, Any], path: Path, score: str = "accuracy") -> None:
    """The mean Δ_ij as a heatmap centred on 0 (red: j hurts i, blue: j helps i), each cell labelled."""
    plt = pyplot()
    names, mean = transfer["tasks"], transfer["mean"]
    K = len(names)
    limit = max([abs(v) for row in mean for v in row] + [1e-3])
    fig, ax = plt.subplots(figsize=(2.6 + 0.9 * K, 1.6 + 0.8 * K), layout="constrained")
    image = ax.imshow(mean, cmap="RdBu", vmin=-limit, vmax=limit)
    for i, row in enumerate(mean):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:+.3f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 * limit else "black")
    ax.set_xticks(range(K), [f"+ {n}" for n in names], rotation=30, ha="right")
    ax.set_yticks(range(K), names)
    ax.set_xlabel("task j added to the training")
    ax.set_ylabel("task i scored")
    fig.colorbar(image, ax=ax, label=f"Δ {score}")
    seeds = len(transfer["per_seed"])
    ax.set_title(rf"Transfer $\Delta_{{ij}}$ (mean of {seeds} seed{'s' if seeds > 1 else ''})", fontsize=9)
    save_png(fig, path)
