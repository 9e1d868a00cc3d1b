"""bench_time_to_accuracy.py's rendering: per-candidate summaries, ratios against HF PEFT + HF
Trainer (paired by seed) and the per-run table, from the result JSON alone (`--render`)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from common_report import heading, table, verdict

if TYPE_CHECKING:
    from bench_time_to_accuracy import Settings

BASELINE = "peft_hf"
GOAL = 0.6  # the goal: splice's time to accuracy <= 0.6x HF PEFT + HF Trainer's
ENDS = {True: "the end of the main job", False: "the same, unless the target was missed"}


def ok_runs(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in result["runs"] if r["candidate"] == name and "error" not in r]


def per_step_ms(hit: dict[str, Any]) -> float:
    return 1e3 * hit["wall_s"] / hit["step"]


def ratios(result: dict[str, Any], name: str) -> dict[str, list[float]]:
    """Per seed where both reached the target: this candidate's over the baseline's wall time, CPU
    time and wall time per step (the last leaves out how many steps each needed)."""
    base = {r["seed"]: r["target"] for r in ok_runs(result, BASELINE) if r["reached"]}
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "step": []}
    for run in ok_runs(result, name):
        if run["reached"] and run["seed"] in base:
            hit, ref = run["target"], base[run["seed"]]
            out["wall"].append(hit["wall_s"] / ref["wall_s"])
            out["cpu"].append(hit["cpu_s"] / ref["cpu_s"])
            out["step"].append(per_step_ms(hit) / per_step_ms(ref))
    return out


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{median:.2f}" if len(values) == 1 else f"{median:.2f} [{min(values):.2f}-{max(values):.2f}]"


def median_of(runs: list[dict[str, Any]], value: Any) -> float | None:
    values = [value(r["target"]) for r in runs if r["reached"]]
    return statistics.median(values) if values else None


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def accuracy_cell(values: list[float]) -> str:
    acc = [a for a in values if a is not None]
    if not acc:
        return "-"
    std = f" ± {statistics.stdev(acc):.1%}" if len(acc) > 1 else ""
    return f"{statistics.mean(acc):.1%}{std}"


def summary_table(result: dict[str, Any]) -> str:
    rows = []
    for name, label in result["candidates"].items():
        runs = ok_runs(result, name)
        failed = sum(1 for r in result["runs"] if r["candidate"] == name and "error" in r)
        r = ratios(result, name)
        rows.append([
            label, f"{sum(x['reached'] for x in runs)}/{len(runs)}" + (f" ({failed} failed)" if failed else ""),
            fmt(median_of(runs, lambda h: h["wall_s"]), "{:.0f}"), fmt(median_of(runs, lambda h: h["cpu_s"]), "{:.0f}"),
            fmt(median_of(runs, lambda h: h["step"]), "{:.0f}"), fmt(median_of(runs, per_step_ms), "{:.0f}"),
            fmt(median_of(runs, lambda h: h["real"] / 1e3), "{:.0f}k"),
            fmt(median_of(runs, lambda h: h["padded"] / 1e3), "{:.0f}k"),
            fmt(median_of(runs, lambda h: 1 - h["real"] / h["padded"]), "{:.0%}"),
            accuracy_cell([x["target"]["test_accuracy"] for x in runs if x["reached"]]),
            accuracy_cell([x["end"]["test_accuracy"] for x in runs]) + f" (step {max_steps(runs)})",
            spread(r["wall"]), spread(r["cpu"]), spread(r["step"])])
    return table(["candidate", "reached", "wall s", "CPU s", "steps", "ms/step", "real tokens", "padded slots",
                  "padding", "test acc at target", "test acc at end", "wall vs HF", "CPU vs HF", "ms/step vs HF"],
                 rows)


def max_steps(runs: list[dict[str, Any]]) -> str:
    steps = sorted({r["steps_run"] for r in runs})
    return "/".join(map(str, steps)) or "-"


def runs_table(result: dict[str, Any]) -> str:
    rows = []
    for run in sorted(result["runs"], key=lambda r: (list(result["candidates"]).index(r["candidate"]), r["seed"])):
        if "error" in run:
            rows.append([run["candidate"], str(run["seed"]), f"failed: {run['error']}"] + [""] * 8)
            continue
        hit, end = run["target"], run["end"]
        at = hit or end
        rows.append([run["candidate"], str(run["seed"]), str(hit["step"]) if hit else f"not in {run['steps_run']}",
                     f"{at['wall_s']:.1f}", f"{at['cpu_s']:.1f}", f"{at['real']:,}", f"{at['padded']:,}",
                     f"{1 - at['real'] / at['padded']:.1%}", f"{hit['test_accuracy']:.3f}" if hit else "-",
                     f"{end['test_accuracy']:.3f} (step {run['steps_run']})",
                     " ".join(f"{e['step']}:{e['accuracy']:.3f}" for e in run["evals"])])
    return table(["candidate", "seed", "target at step", "wall s", "CPU s", "real tokens", "padded slots",
                  "padding", "test acc at target", "test acc at end", "validation accuracy by step"], rows)


def goal_line(result: dict[str, Any]) -> str:
    wall = ratios(result, "splice")["wall"]
    if not wall:
        return "Goal (splice time to accuracy <= 0.6x HF PEFT + HF Trainer's): no seed where both reached the target."
    met = verdict(min(wall), max(wall), GOAL)
    return (f"**Goal** (splice's time to the target <= {GOAL}x that of HF PEFT + HF Trainer with defaults, wall "
            f"time, per seed): {spread(wall)} -> {met}.")


def markdown(result: dict[str, Any], s: Settings) -> str:
    seeds = ", ".join(map(str, s.seeds))
    return "\n".join([
        *heading("Time to accuracy: splice's trainer vs HF PEFT + HF Trainer (MiniLM, Rotten Tomatoes, CPU)",
                 result["environment"]),
        f"Runtime {result['runtime_s'] / 60:.1f} min. {'QUICK smoke run: not a measurement. ' if s.quick else ''}"
        f"Target: validation accuracy >= {s.target} ({s.eval_examples or 'all 486'} validation rows), evaluated "
        f"every {s.eval_every} optimizer steps; seeds {seeds}; {s.threads} torch thread(s); at most "
        f"{s.max_steps or 'the main job`s 488'} steps. Times are training only: the clocks stop during every "
        "evaluation. One run at a time, each in a fresh process; the candidates' order rotates by seed.",
        "",
        "Medians over the seeds that reached the target; ratios are per seed against HF PEFT + HF Trainer "
        "(defaults) of the same seed, median [min-max]. Padding: the share of the padded token slots up to the "
        "target that are padding. Test accuracy: all 488 test reviews, on the state that reached the target and "
        f"on the state the run ended in ({ENDS[s.to_end]}).",
        "",
        summary_table(result), "", goal_line(result), "",
        "## Every run", "", runs_table(result), "",
    ])
