"""bench_continual.py's rendering: per sequence, strategy x (scores, costs) as mean ± std over
seeds, the verdicts on the papers' claims, the pooled forgetting-law fit, and a picture of the
mean accuracy matrices; from the result JSON alone (`--render` needs no model)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common_report import heading, table
from optim_report import fmt_diff, paired, said

from splice.analysis.forgetting import fit_forgetting_law

Run = dict[str, Any]
TI, TA = "task_incremental", "task_agnostic"
GENERATORS = {"smollm2"}  # sequences whose tasks are generated answers (an unseen task has a zero-shot score)


LORA_FORM = "lora"  # in the forms table: the `sequential` strategy's own runs (the sequence's adapter is that LoRA)


def all_runs_of(result: dict[str, Any], sequence: str, strategy: str, form: str | None = None) -> list[Run]:
    """Every run of one strategy (form None: the sequence's own adapter) or one form."""
    form = None if form == LORA_FORM else form
    return [r for r in result["runs"] if r["sequence"] == sequence and r["strategy"] == strategy
            and r.get("form") == form]


def runs_of(result: dict[str, Any], sequence: str, strategy: str, form: str | None = None) -> list[Run]:
    return [r for r in all_runs_of(result, sequence, strategy, form) if "error" not in r]


def failed_of(result: dict[str, Any], sequence: str, strategy: str, form: str | None = None) -> list[Run]:
    return [r for r in all_runs_of(result, sequence, strategy, form) if "error" in r]


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """"mean ± std (n)"; a single value alone; nothing for no value."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def column(runs: list[Run], value: Callable[[Run], float | None]) -> list[float]:
    return [v for r in runs if (v := value(r)) is not None]


def score_cells(runs: list[Run]) -> list[str]:
    """Scores and costs over seeds: accuracy, BWT, forgetting, FWT, agnostic accuracy, task 1 at
    the end, parameters, storage, time."""
    return [
        spread(column(runs, lambda r: r["scores"][TI]["average_accuracy"])),
        spread(column(runs, lambda r: r["scores"][TI]["backward_transfer"]), "{:+.3f}"),
        spread(column(runs, lambda r: r["scores"][TI]["mean_forgetting"]), "{:+.3f}"),
        spread(column(runs, lambda r: r["scores"][TI]["forward_transfer"]), "{:+.3f}"),
        spread(column(runs, lambda r: r["scores"][TA]["average_accuracy"] if TA in r["scores"] else None)),
        spread(column(runs, lambda r: r["matrices"][TI][-1][0])),
        f"{runs[0]['trainable_parameters'][-1]:,}",
        f"{runs[0]['stored_bytes'][-1] / 1e6:.2f} MB",
        spread(column(runs, lambda r: sum(r["train_seconds"])), "{:.0f}"),
        str(len(runs)),
    ]


def rows_for(result: dict[str, Any], sequence: str, names: list[str], strategy: str | None) -> list[list[str]]:
    """One row per strategy (`strategy` None: `names` are strategies) or per form of `strategy`."""
    rows = []
    for name in names:
        key = (name, None) if strategy is None else (strategy, name)
        runs, failed = runs_of(result, sequence, *key), failed_of(result, sequence, *key)
        label = name + (f" ({len(failed)} seed(s) failed)" if failed and runs else "")
        if not runs:
            rows.append([name, f"failed: {failed[0]['error']}" if failed else "not run", *[""] * 9])
            continue
        rows.append([label, *score_cells(runs)])
    return rows


def mean_of(result: dict[str, Any], sequence: str, strategy: str, value: Callable[[Run], float],
            form: str | None = None) -> tuple[float, float, int]:
    values = column(runs_of(result, sequence, strategy, form), value)
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def compare(result: dict[str, Any], sequence: str, a: str, b: str, value: Callable[[Run], float],
            better: str, forms: bool = False) -> str:
    """a vs b on `value` (strategies, or forms of `sequential`), paired by seed as the other
    benches' claims are (`optim_report.paired` and `said`): the mean difference, oriented so
    that > 0 is the claim, with its 95% t-interval; held when the interval is above 0, refuted
    when below, else can't tell."""
    def by_seed(name: str) -> dict[int, float]:
        runs = runs_of(result, sequence, "sequential", name) if forms else runs_of(result, sequence, name)
        return {r["seed"]: v for r in runs if (v := value(r)) is not None and not math.isnan(v)}

    va, vb = by_seed(a), by_seed(b)
    if not va or not vb:
        return f"not measured ({a}: {len(va)} runs, {b}: {len(vb)})"
    ma, mb = statistics.fmean(va.values()), statistics.fmean(vb.values())
    sign = 1.0 if better == "higher" else -1.0
    diff = paired({s: sign * v for s, v in va.items()}, {s: sign * v for s, v in vb.items()})
    if diff is None or diff["n"] < 2:
        common = diff["n"] if diff else 0
        return f"{common} seed(s) in common, no noise estimate, no verdict: {a} {ma:.3f} vs {b} {mb:.3f}"
    word = {"yes": "held", "no": "refuted"}.get(said(diff), said(diff))
    return (f"{word}: {a} {ma:.3f} vs {b} {mb:.3f}; {a}'s advantage, paired by seed: {fmt_diff(diff, 3)} "
            f"({diff['n']} seeds, 95% t-interval)")


def mean_forgetting(run: Run) -> float:
    return run["scores"][TI]["mean_forgetting"]


def verdicts(result: dict[str, Any], sequence: str) -> list[str]:
    out = ["- LoDA forgets less than plain LoRA: "
           + compare(result, sequence, "loda", "sequential", mean_forgetting, "lower"),
           "- LoDA at a tenth of the rate forgets less than plain LoRA at a tenth of the rate: "
           + compare(result, sequence, "loda@lr/10", "sequential@lr/10", mean_forgetting, "lower"),
           "- ConDU beats sequential on task 1 after the last task: "
           + compare(result, sequence, "condu", "sequential", lambda r: r["matrices"][TI][-1][0], "higher")]
    condu = runs_of(result, sequence, "condu")
    zero_shot = [(r["matrices"][TI][j - 1][j] - r["before"][j]) for r in condu for j in range(1, len(r["tasks"]))]
    if zero_shot and sequence in GENERATORS:  # a classifier's unseen task has an untrained head: no zero-shot
        out.append(f"- ConDU keeps zero-shot behaviour (accuracy on the next unseen task minus the base model's, "
                   f"every switch and seed): {spread(zero_shot, '{:+.3f}')}")
    agnostic = [r["scores"][TA]["average_accuracy"] - r["scores"][TI]["average_accuracy"]
                for r in condu if TA in r["scores"]]
    if agnostic:
        out.append(f"- ConDU without the task id (prototype routing, base model mixed in) minus with it, average "
                   f"final accuracy: {spread(agnostic, '{:+.3f}')}")
    return out


def law(result: dict[str, Any], sequence: str) -> str:
    """F = a (1 - cos² θ_min) + b over every switch of every run of the sequence."""
    points = [(s["theta_min_mean"], s["forgetting"]) for r in result["runs"] if r["sequence"] == sequence
              and "error" not in r for s in r["switches"] if "theta_min_mean" in s and "forgetting" in s]
    if len({round(p[0], 9) for p in points}) < 2:
        return "not fitted (fewer than two different angles)"
    F = [f for _, f in points]
    fit = fit_forgetting_law([t for t, _ in points], F)
    a, b, r2 = fit.a, fit.b, fit.r2
    angles = [math.degrees(t) for t, _ in points]
    return (f"a = {a:+.3f}, b = {b:+.3f}, R² = {r2:.3f} over {len(points)} switches "
            f"(θ_min {min(angles):.1f}° to {max(angles):.1f}°, forgetting {min(F):+.3f} to {max(F):+.3f})"
            + (" — two points: any line fits them exactly" if len(points) == 2 else ""))


def markdown(result: dict[str, Any], settings: Any = None) -> str:
    s = result["settings"]
    quick = "QUICK smoke run: too few steps and seeds to trust. " if s["quick"] else ""
    out = [*heading("Continual learning on real task sequences: splice.continual's strategies", result["environment"]),
           "", f"{quick}Seeds {s['seeds']}; steps x {s['step_scale']}; "
           f"{'longest process' if 'merged_from' in result else 'runtime'} {result['runtime_s'] / 60:.0f} min. "
           "Scores with the task id given unless said; mean ± std over seeds.", ""]
    if result.get("note"):
        out += [result["note"], ""]
    for part in result.get("merged_from", []):
        p = part["settings"]
        forms = ", ".join(p["forms"]) or "none"
        load = part["environment"].get("loadavg_end")
        out.append(f"- {', '.join(p['sequences'])}: {', '.join(p['strategies']) or 'no strategy'} (forms: {forms}), "
                   f"seeds {p['seeds']}, steps x {p['step_scale']}, evaluation rows "
                   f"{p['eval_examples'] or 'as the file says'}, {part['runtime_s'] / 60:.0f} min"
                   + (f", load average at the end {load[0]:.1f}" if load else ""))
    if "merged_from" in result:
        out += ["", "These processes ran side by side, one thread each: training seconds are under that load.", ""]
    header = ["strategy", "average final accuracy", "BWT", "mean forgetting", "FWT",
              "average final accuracy, no task id", "task 1 after the last", "trainable parameters (last task)",
              "stored after the last task", "training s", "seeds"]
    for sequence in s["sequences"]:
        tasks = next((r["tasks"] for r in result["runs"] if r["sequence"] == sequence and "error" not in r), [])
        out += [f"## {sequence}: {' -> '.join(tasks)}", "",
                table(header, rows_for(result, sequence, s["strategies"], None)), "",
                "Verdicts:", "", *verdicts(result, sequence), f"- Forgetting law, pooled: {law(result, sequence)}", ""]
    if s.get("forms"):
        out += ["## Forgetting by parametrization: `sequential` on the MiniLM sequence, one form each", "",
                table(["form", *header[1:]], rows_for(result, "minilm", [LORA_FORM, *s["forms"]], "sequential")), "",
                "- Tensor decompositions (LoRETTA) forget less than LoRA at an equal budget: " + compare(
                    result, "minilm", "loretta", LORA_FORM, lambda r: r["scores"][TI]["mean_forgetting"], "lower",
                    forms=True), ""]
    return "\n".join(out)


def plot_matrices(result: dict[str, Any], path: Path) -> None:
    """Mean task-incremental accuracy matrix per strategy (columns) and sequence (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    if not s["strategies"]:  # only forms were run
        return
    fig, axes = plt.subplots(len(s["sequences"]), len(s["strategies"]), squeeze=False,
                             figsize=(2.4 * len(s["strategies"]), 2.4 * len(s["sequences"])), layout="constrained")
    for row, sequence in zip(axes, s["sequences"], strict=True):
        for ax, strategy in zip(row, s["strategies"], strict=True):
            runs = runs_of(result, sequence, strategy)
            ax.set_title(f"{sequence}: {strategy}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if not runs:
                continue
            K = len(runs[0]["tasks"])
            mean = [[statistics.fmean(r["matrices"][TI][t][j] for r in runs) if runs[0]["matrices"][TI][t][j]
                     is not None else math.nan for j in range(K)] for t in range(K)]
            ax.imshow(mean, vmin=0, vmax=1, cmap="viridis")
            for t in range(K):
                for j in range(K):
                    if not math.isnan(mean[t][j]):
                        ax.text(j, t, f"{mean[t][j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if mean[t][j] < 0.6 else "black")
    fig.savefig(path, dpi=100)
    plt.close(fig)
