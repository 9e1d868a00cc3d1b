"""What a multi-task job's runs add up to: the shared adapter against one adapter per task
(score per task, stored parameters, compute), and the transfer matrix per seed and over seeds.
Plain numbers from the run records, for the report and for tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from splice.multitask.config import MultitaskConfig
from splice.multitask.run import RunRecord
from splice.multitask.transfer import mean_std, transfer_matrix


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1; 0 for one value) and the values, over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": list(values)}


def summarize(config: MultitaskConfig, names: list[str], records: list[RunRecord]) -> dict[str, Any]:
    """Per task: the shared adapter's score ("joint"), its own adapter's ("single") and the
    difference, over seeds; the average over tasks; and the costs of each way (per seed, then mean)."""
    runs = {(r.name, r.seed): r for r in records}
    seeds = config.seeds
    joint = {s: runs[("joint", s)] for s in seeds}
    single = {(t, s): runs[(f"single-{t}", s)] for t in names for s in seeds} if config.compare else {}
    tasks: dict[str, Any] = {}
    for t in names:
        row = {"joint": spread([joint[s].scores[t] for s in seeds])}
        if single:
            row["single"] = spread([single[(t, s)].scores[t] for s in seeds])
            row["difference"] = spread([joint[s].scores[t] - single[(t, s)].scores[t] for s in seeds])
        tasks[t] = row
    average = {"joint": spread([sum(joint[s].scores[t] for t in names) / len(names) for s in seeds])}
    costs = {"joint": _costs([[joint[s]] for s in seeds])}
    if single:
        average["single"] = spread([sum(single[(t, s)].scores[t] for t in names) / len(names) for s in seeds])
        costs["single"] = _costs([[single[(t, s)] for t in names] for s in seeds])
        costs["ratio"] = {key: costs["joint"][key] / costs["single"][key] if costs["single"][key] else None
                          for key in costs["joint"]}
    return {"tasks": tasks, "average": average, "costs": costs,
            "diverged": [f"{r.name} (seed {r.seed}): {r.message}" for r in records if r.status != "finished"]}


def _costs(groups: list[list[RunRecord]]) -> dict[str, float]:
    """One way of serving the tasks (the runs of a group, one group per seed): what it stores
    and what training it took, summed over its runs, averaged over seeds."""
    keys = {
        "stored_parameters": lambda r: r.stored_parameters,
        "adapter_parameters": lambda r: r.adapter_parameters,
        "head_parameters": lambda r: sum(r.head_parameters.values()),
        "adapters": lambda r: 1,
        "steps": lambda r: r.steps,
        "examples": lambda r: r.examples,
        "train_seconds": lambda r: r.train_seconds,
    }
    return {key: sum(sum(get(r) for r in group) for group in groups) / len(groups) for key, get in keys.items()}


def transfer_over_seeds(names: list[str], seeds: list[int], records: list[RunRecord],
                        pair_run: Callable[[str, str, int], str]) -> dict[str, Any]:
    """Δ_ij for each seed (from that seed's single and pair runs) and its mean and std over seeds."""
    runs = {(r.name, r.seed): r for r in records}
    per_seed = {}
    for s in seeds:
        single = {t: runs[(f"single-{t}", s)].scores[t] for t in names}
        pairs = {(a, b): runs[(pair_run(a, b, len(names)), s)].scores for i, a in enumerate(names)
                 for b in names[i + 1:]}
        per_seed[str(s)] = transfer_matrix(names, single, pairs)
    mean, std = mean_std(list(per_seed.values()))
    return {"tasks": names, "per_seed": per_seed, "mean": mean, "std": std}
