"""bench_time_to_accuracy.py's rendering: per target, per-candidate summaries and ratios against
HF PEFT + HF Trainer (paired by seed); the per-run table; from the result JSON alone (`--render`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common_report import heading, table, verdict

if TYPE_CHECKING:
    from bench_time_to_accuracy import Settings

BASELINE = "peft_hf"
GOAL = 0.6  # the goal: splice's time to accuracy <= 0.6x HF PEFT + HF Trainer's
ENDS = {True: "the end of the main job", False: "the last target's, unless a target was missed"}

Hit = dict[str, Any]


def ok_runs(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in result["runs"] if r["candidate"] == name and "error" not in r]


def hits(result: dict[str, Any], name: str, target: str) -> dict[int, Hit]:
    """Seed -> what the candidate's run of that seed had when it reached `target`."""
    return {r["seed"]: r["targets"][target] for r in ok_runs(result, name) if target in r["targets"]}


def per_step_ms(hit: Hit) -> float:
    return 1e3 * hit["wall_s"] / hit["step"]


def ratios(result: dict[str, Any], name: str, target: str) -> dict[str, list[float]]:
    """Per seed where both reached `target`: this candidate's over the baseline's wall time, CPU
    time and wall time per step (the last leaves out how many steps each needed)."""
    mine, base = hits(result, name, target), hits(result, BASELINE, target)
    pairs = [(mine[seed], base[seed]) for seed in mine if seed in base]
    return {"wall": [a["wall_s"] / b["wall_s"] for a, b in pairs], "cpu": [a["cpu_s"] / b["cpu_s"] for a, b in pairs],
            "step": [per_step_ms(a) / per_step_ms(b) for a, b in pairs]}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{median:.2f}" if len(values) == 1 else f"{median:.2f} [{min(values):.2f}-{max(values):.2f}]"


def median_cell(found: list[Hit], value: Callable[[Hit], float], pattern: str) -> str:
    return pattern.format(statistics.median(value(h) for h in found)) if found else "-"


def accuracy_cell(values: list[float]) -> str:
    if not values:
        return "-"
    std = f" ± {statistics.stdev(values):.1%}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1%}{std}"


def summary_table(result: dict[str, Any], target: str) -> str:
    rows = []
    for name, label in result["candidates"].items():
        runs = ok_runs(result, name)
        found = list(hits(result, name, target).values())
        failed = sum(1 for r in result["runs"] if r["candidate"] == name and "error" in r)
        r = ratios(result, name, target)
        rows.append([
            label, f"{len(found)}/{len(runs)}" + (f" ({failed} failed)" if failed else ""),
            median_cell(found, lambda h: h["wall_s"], "{:.0f}"), median_cell(found, lambda h: h["cpu_s"], "{:.0f}"),
            median_cell(found, lambda h: h["step"], "{:.0f}"), median_cell(found, per_step_ms, "{:.0f}"),
            median_cell(found, lambda h: h["real"] / 1e3, "{:.0f}k"),
            median_cell(found, lambda h: h["padded"] / 1e3, "{:.0f}k"),
            median_cell(found, lambda h: 1 - h["real"] / h["padded"], "{:.0%}"),
            accuracy_cell([h["test_accuracy"] for h in found]), spread(r["wall"]), spread(r["cpu"]),
            spread(r["step"])])
    return table(["candidate", "reached", "wall s", "CPU s", "steps", "ms/step", "real tokens", "padded slots",
                  "padding", "test acc there", "wall vs HF", "CPU vs HF", "ms/step vs HF"], rows)


def end_table(result: dict[str, Any]) -> str:
    """Where the runs ended: steps, test accuracy of the final state, training time and padding."""
    rows = []
    for name, label in result["candidates"].items():
        runs = ok_runs(result, name)
        ends = [r["end"] for r in runs]
        steps = "/".join(str(n) for n in sorted({r["steps_run"] for r in runs})) or "-"
        rows.append([label, steps, accuracy_cell([e["test_accuracy"] for e in ends]),
                     median_cell(ends, lambda e: e["cpu_s"], "{:.0f}"),
                     median_cell(ends, lambda e: 1 - e["real"] / e["padded"], "{:.0%}")])
    return table(["candidate", "steps run", "test acc at the end", "CPU s (training)", "padding"], rows)


def runs_table(result: dict[str, Any], targets: list[str]) -> str:
    rows = []
    order = list(result["candidates"])
    for run in sorted(result["runs"], key=lambda r: (order.index(r["candidate"]), r["seed"])):
        if "error" in run:
            rows.append([run["candidate"], str(run["seed"]), f"failed: {run['error']}"] + [""] * len(targets))
            continue
        cells = [hit_cell(run["targets"][t]) if t in run["targets"] else "not reached" for t in targets]
        rows.append([run["candidate"], str(run["seed"]), *cells,
                     f"step {run['steps_run']}, test {run['end']['test_accuracy']:.3f}",
                     " ".join(f"{e['step']}:{e['accuracy']:.3f}" for e in run["evals"])])
    return table(["candidate", "seed", *(f"target {t}" for t in targets), "end", "validation accuracy by step"],
                 rows)


def hit_cell(h: Hit) -> str:
    return (f"step {h['step']}, {h['wall_s']:.0f} s, {h['cpu_s']:.0f} s CPU, {1 - h['real'] / h['padded']:.0%} pad, "
            f"test {h['test_accuracy']:.3f}")


def goal_line(result: dict[str, Any], target: str) -> str:
    wall, cpu = ratios(result, "splice", target)["wall"], ratios(result, "splice", target)["cpu"]
    if not wall:
        return f"**Goal** (splice's time to {target} <= {GOAL}x HF PEFT + HF Trainer's): no seed where both reached it."
    return (f"**Goal** (splice's time to validation accuracy {target} <= {GOAL}x that of HF PEFT + HF Trainer with "
            f"defaults, per seed): wall {spread(wall)} -> {verdict(min(wall), max(wall), GOAL)}; CPU time "
            f"{spread(cpu)} -> {verdict(min(cpu), max(cpu), GOAL)}.")


def markdown(result: dict[str, Any], s: Settings) -> str:
    targets = [str(t) for t in s.targets]
    out = [
        *heading("Time to accuracy: splice's trainer vs HF PEFT + HF Trainer (MiniLM, Rotten Tomatoes, CPU)",
                 result["environment"]),
        f"Runtime {result['runtime_s'] / 60:.1f} min. {'QUICK smoke run: not a measurement. ' if s.quick else ''}"
        f"Targets: validation accuracy {', '.join(targets)} ({s.eval_examples or 'all 486'} validation rows), "
        f"evaluated every {s.eval_every} optimizer steps; seeds {', '.join(map(str, s.seeds))}; {s.threads} torch "
        f"thread(s); at most {s.max_steps or 488} steps. Times are training only: the clocks stop during every "
        "evaluation. One run at a time, each in a fresh process; the candidates' order rotates by seed.",
        "",
        "Medians over the seeds that reached the target; ratios are per seed against HF PEFT + HF Trainer "
        "(defaults) of the same seed, median [min-max]. Padding: the share of the padded token slots up to the "
        "target that are padding. Test accuracy: all 488 test reviews, on the state that reached the target.",
        "",
    ]
    for target in targets:
        out += [f"## Time to validation accuracy {target}", "", summary_table(result, target), ""]
    out += [goal_line(result, targets[-1]), "",
            f"## Where the runs ended ({ENDS[s.to_end]})", "", end_table(result), "",
            "## Every run", "", runs_table(result, targets), ""]
    return "\n".join(out)
