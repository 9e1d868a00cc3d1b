"""bench_multitask.py's rendering: per setup, the seeds' jobs merged into one (the comparison and
the transfer matrix as mean ± std over seeds, by `splice.multitask`'s own summary and report), the
verdicts on the paper's claims, and the transfer heatmaps; from the result JSON alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common_report import heading

from splice.multitask import MultitaskConfig, RunRecord
from splice.multitask.harness import pair_run
from splice.multitask.report import markdown as job_markdown
from splice.multitask.report import plot_transfer
from splice.multitask.summary import summarize, transfer_over_seeds


def merged(result: dict[str, Any], setup: str) -> dict[str, Any] | None:
    """The setup's seeds as one job's data (`splice.multitask.report.as_dict`'s shape); None when
    no seed ran. Failed seeds are listed under "failed"."""
    jobs = [j for j in result["runs"] if j["setup"] == setup]
    ok = [j for j in jobs if "error" not in j]
    if not ok:
        return None
    seeds = [j["seed"] for j in ok]
    config = MultitaskConfig(**{**ok[0]["config"], "seeds": seeds})
    records = [RunRecord(**r) for j in ok for r in j["runs"]]
    names = [t["name"] for t in ok[0]["tasks"]]
    transfer = transfer_over_seeds(names, seeds, records, pair_run) if config.transfer else None
    return {"config": config.to_dict(), "score": ok[0]["score"], "tasks": ok[0]["tasks"],
            "summary": summarize(config, names, records), "transfer": transfer,
            "wall_seconds": sum(j["wall_seconds"] for j in ok), "runs": [r for j in ok for r in j["runs"]],
            "failed": [f"seed {j['seed']}: {j['error']}" for j in jobs if "error" in j]}


def setups_of(result: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Every setup with a run in the result, its seeds merged (`merged`), in the runs' order."""
    names = dict.fromkeys(run["setup"] for run in result["runs"])
    return {setup: merged(result, setup) for setup in names}


def verdicts(data: dict[str, Any]) -> list[str]:
    """The paper's claims (abstract), read on this setup: close to single-task accuracy, storage
    divided by the number of tasks, less compute."""
    summary, score = data["summary"], data["score"]
    lines = []
    if "single" in summary["average"]:
        joint, single = summary["average"]["joint"], summary["average"]["single"]
        gap = joint["mean"] - single["mean"]
        noise = max(joint["std"], single["std"])
        if len(joint["per_seed"]) < 2:
            said = "one seed, no noise estimate: cannot tell"
        else:
            said = f"seed std up to {noise:.3f}: " + ("within seed noise" if abs(gap) <= 2 * noise else
                                                      "better" if gap > 0 else "worse")
        lines.append(f"- Close to single-task {score}: shared - own = {gap:+.3f} on average over tasks ({said}).")
        ratio = summary["costs"]["ratio"]
        lines.append(f"- Storage: the shared adapter and its heads are {ratio['stored_parameters']:.2f}x the "
                     f"parameters of one adapter per task ({ratio['adapters']:.2f}x the adapters).")
        lines.append(f"- Compute: {ratio['steps']:.2f}x the optimizer steps, {ratio['examples']:.2f}x the training "
                     f"examples, {ratio['train_seconds']:.2f}x the training seconds of one adapter per task "
                     f"({data['config']['budget'].replace('_', ' ')} budget).")
    transfer = data.get("transfer")
    if transfer is not None:
        names, mean = transfer["tasks"], transfer["mean"]
        cells = [(mean[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j]
        best, worst = max(cells), min(cells)
        lines.append(f"- Transfer: largest gain {best[0]:+.3f} ({best[2]} added to {best[1]}), largest loss "
                     f"{worst[0]:+.3f} ({worst[2]} added to {worst[1]}).")
    return lines


def markdown(result: dict[str, Any], settings: Any = None) -> str:
    lines = heading("Multi-task PEFT: one shared adapter vs one adapter per task", result["environment"])
    s = result["settings"]
    lines += ["", f"Settings: steps x{s['step_scale']:g}, training rows per task "
              f"{s['train_examples'] or 'all'}, evaluation rows per task {s['eval_examples'] or 'as the file'}, "
              f"max_length {s['max_length'] or 'as the file'}" + (" (quick: far too small to trust)" if s["quick"]
                                                                   else "") + "."]
    for setup, data in setups_of(result).items():
        if data is None:
            errors = [j["error"] for j in result["runs"] if j["setup"] == setup]
            lines += ["", f"## {setup}: failed", "", *errors]
            continue
        lines += ["", f"## {setup}", "", *verdicts(data), ""]
        body = job_markdown(data).split("\n", 1)[1]  # below its title
        lines.append(body.replace("\n## ", "\n### "))
        if data["transfer"]:
            lines.append(f"![transfer](multitask{'_quick' if s['quick'] else ''}_{setup}_transfer.png)")
        lines += [f"Failed: {f}" for f in data["failed"]]
    lines += [f"Not run (budget): {j['setup']} seed {j['seed']}" for j in result.get("not_run", [])]
    lines += ["", f"Runtime {result['runtime_s']:.0f} s."]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    plot_transfer(data["transfer"], path, data["score"])
