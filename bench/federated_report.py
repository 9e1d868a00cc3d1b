"""bench_federated.py's rendering, from the result JSON alone (`--render` needs no model): the
verdicts per claim, the rules section per data set and Dirichlet alpha (final numbers, per-round
curves, uplink bytes to reach FedAvg's final accuracy and loss, the separation error, Med-DualLoRA
per label-shifted client), the SFed rank sweep, and a PNG of the curves."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common_report import DATASETS, environment_line, table

Run = dict[str, Any]
BASELINE = "fedavg"
VARIANT_ORDER = ["fedavg", "exact", "dual", "fstq", "fedeu"]
SCALING_ORDER = ["standard", "rslora", "sfed"]
SCALING_NAMES = {"standard": "alpha/r", "rslora": "rsLoRA alpha/sqrt(r)", "sfed": "SFed alpha*sqrt(N/r)"}
SHIFT_TV = 0.2  # a client is label-shifted when its training label mix is this far (total variation) from the pool's
MARKERS = ["o", "s", "^", "v", "D"]  # one per variant: equal curves stay visible
FSTQ_GOAL = 3.0  # FED-FSTQ's claim: FedAvg's final quality with >= 3x fewer cumulative uplink bytes
CONTINUAL_ORDER = ["fedavg-seq", "prism", "prism-client"]
SEQUENCE_LABEL = "RT -> BBC -> business/tech"


# ------------------------------------------------------------------------------------ helpers


def ok_runs(result: dict[str, Any], section: str, **where: Any) -> list[Run]:
    return [r for r in result["runs"] if r["section"] == section and "error" not in r
            and all(r.get(k) == v for k, v in where.items())]


def spread(values: list[float | None], fmt: str = "{:.3f}") -> str:
    """"mean ± std"; a single value alone; "" for none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def final(run: Run, key: str) -> float | None:
    return run["curves"][key][-1]


def claim(values: list[float], limit: float = 0.0, strict: bool = True) -> str:
    """A claim on per-seed numbers (differences or ratios): "yes" if every seed is on the good side
    of `limit` (above it; at or above with `strict` False), "no" if none is, else "can't tell"."""
    if not values:
        return "not measured"
    if len(values) < 2:
        return "one seed: no verdict"
    lo, hi = min(values), max(values)
    good = lo > limit if strict else lo >= limit
    bad = hi <= limit if strict else hi < limit
    return "yes" if good else ("no" if bad else "can't tell (seeds disagree)")


def per_seed(values: list[float], fmt: str = "{:+.3f}") -> str:
    """"mean (per seed: a, b, c)"."""
    if not values:
        return ""
    shown = ", ".join("inf" if math.isinf(v) else fmt.format(v) for v in values)
    m = statistics.fmean(values)
    return f"{'inf' if math.isinf(m) else fmt.format(m)} (seeds: {shown})"


def order(values: list[Any], preferred: list[Any]) -> list[Any]:
    known = [v for v in preferred if v in values]
    return known + sorted(v for v in set(values) if v not in preferred)


def rules_cells(result: dict[str, Any]) -> list[tuple[str, float]]:
    """(data set, alpha) of every rules run, data sets in the usual order, alphas ascending."""
    cells = {(r["data"], r["alpha"]) for r in result["runs"] if r["section"] == "rules"}
    return sorted(cells, key=lambda c: (list(DATASETS).index(c[0]) if c[0] in DATASETS else 99, c[1]))


def sfed_cells(result: dict[str, Any]) -> list[tuple[str, float]]:
    cells = {(r["data"], r["alpha"]) for r in result["runs"] if r["section"] == "sfed"}
    return sorted(cells, key=lambda c: (list(DATASETS).index(c[0]) if c[0] in DATASETS else 99, c[1]))


def cell_name(data: str, alpha: float) -> str:
    return f"{DATASETS.get(data, data)}, Dirichlet alpha {alpha:g}"


def paired(result: dict[str, Any], section: str, data: str, alpha: float, a: str, b: str,
           value: Callable[[Run], float | None]) -> list[float]:
    """value(a) - value(b) per seed that both ran."""
    runs_a = {r["seed"]: r for r in ok_runs(result, section, data=data, alpha=alpha, variant=a)}
    runs_b = {r["seed"]: r for r in ok_runs(result, section, data=data, alpha=alpha, variant=b)}
    out = []
    for seed in sorted(set(runs_a) & set(runs_b)):
        va, vb = value(runs_a[seed]), value(runs_b[seed])
        if va is not None and vb is not None:
            out.append(va - vb)
    return out


# ----------------------------------------------------------------------- bytes to reach a target


def bytes_to(run: Run, target: float, key: str, higher: bool) -> tuple[int, int] | None:
    """(cumulative uplink bytes, round) at the first trained round (>= 1) whose `key` reaches
    `target` (>= for higher-is-better, <= otherwise); None when no round does."""
    curve, up = run["curves"][key], run["curves"]["uplink_bytes"]
    for i in range(1, len(curve)):
        v = curve[i]
        if v is not None and (v >= target - 1e-12 if higher else v <= target + 1e-12):
            return up[i], i
    return None


def reach_table(result: dict[str, Any], data: str, alpha: float, key: str, higher: bool) -> tuple[
        dict[str, list[tuple[int, Any, Any]]], dict[str, list[float]]]:
    """Per variant and seed: (seed, (bytes, round) or None, FedAvg's (bytes, round)) to reach
    FedAvg's final `key` of the same seed; and per variant the per-seed ratios FedAvg's bytes /
    the variant's (0 where the variant never reaches it, inf where it needs no uplink)."""
    base = {r["seed"]: r for r in ok_runs(result, "rules", data=data, alpha=alpha, variant=BASELINE)}
    reached: dict[str, list[tuple[int, Any, Any]]] = {}
    ratios: dict[str, list[float]] = {}
    variants = order([r["variant"] for r in ok_runs(result, "rules", data=data, alpha=alpha)], VARIANT_ORDER)
    for name in variants:
        for run in ok_runs(result, "rules", data=data, alpha=alpha, variant=name):
            b = base.get(run["seed"])
            if b is None or final(b, key) is None:
                continue
            target = final(b, key)
            mine, theirs = bytes_to(run, target, key, higher), bytes_to(b, target, key, higher)
            reached.setdefault(name, []).append((run["seed"], mine, theirs))
            if theirs is not None:
                ratio = 0.0 if mine is None else (math.inf if mine[0] == 0 else theirs[0] / mine[0])
                ratios.setdefault(name, []).append(ratio)
    return reached, ratios


# ------------------------------------------------------------------------------- Med-DualLoRA


def label_shift(partition: list[dict[str, Any]]) -> list[float]:
    """Per client, the total variation distance of its training label mix from the pooled one."""
    pooled: dict[str, int] = {}
    for c in partition:
        for label, n in c["labels"].items():
            pooled[label] = pooled.get(label, 0) + n
    total = sum(pooled.values())
    out = []
    for c in partition:
        rows = max(c["rows"], 1)
        out.append(0.5 * sum(abs(c["labels"].get(k, 0) / rows - n / total) for k, n in pooled.items()))
    return out


def dual_gaps(run: Run, shifted_only: bool) -> list[float]:
    """Per client with test rows (label-shifted ones only, if asked): personalised accuracy minus
    the global adapter alone, at the last round."""
    shift = label_shift(run["partition"])
    gaps = []
    for client, m in run["clients_final"].items():
        if "accuracy" not in m or "global_accuracy" not in m or not m.get("num-examples"):
            continue
        if shifted_only and shift[int(client)] < SHIFT_TV:
            continue
        gaps.append(m["accuracy"] - m["global_accuracy"])
    return gaps


# ------------------------------------------------------------------------------------ verdicts


def verdict_rows(result: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    cells = rules_cells(result)
    # exact vs separate
    pooled: list[float] = []
    for data, alpha in cells:
        diffs = paired(result, "rules", data, alpha, "exact", BASELINE, lambda r: final(r, "global_accuracy"))
        client = paired(result, "rules", data, alpha, "exact", BASELINE, lambda r: final(r, "client_accuracy"))
        sep = [mean(r["curves"]["separation_error_mean"])
               for r in ok_runs(result, "rules", data=data, alpha=alpha, variant=BASELINE)]
        if not diffs:
            continue
        pooled += diffs
        rows.append(["exact beats FedAvg-separate (global accuracy)", cell_name(data, alpha),
                     f"Δ global {per_seed(diffs)}; Δ client mean {per_seed(client)}; separation error of the "
                     f"A/B rule (mean over rounds) {spread(sep)}", claim(diffs)])
    if len({(d, a) for d, a in cells}) > 1 and pooled:
        rows.append(["exact beats FedAvg-separate (global accuracy)", "all cells pooled",
                     f"Δ global mean {statistics.fmean(pooled):+.3f}, {sum(d > 0 for d in pooled)} of "
                     f"{len(pooled)} runs better", claim(pooled)])
    # SFed
    for data, alpha in sfed_cells(result):
        ranks = sorted({r["rank"] for r in ok_runs(result, "sfed", data=data, alpha=alpha)})
        spreads = sfed_spreads(result, data, alpha)
        if "sfed" not in spreads or len(ranks) < 2:
            continue
        for other in ("standard", "rslora"):
            if other not in spreads:
                continue
            diffs = [spreads[other][seed] - spreads["sfed"][seed] for seed in sorted(spreads["sfed"])
                     if seed in spreads[other]]
            rows.append([f"SFed: smaller accuracy spread across ranks {ranks} than {SCALING_NAMES[other]}",
                         cell_name(data, alpha), f"spread {SCALING_NAMES[other]} minus SFed's {per_seed(diffs)}",
                         claim(diffs)])
        top = ranks[-1]
        for other in ("standard", "rslora"):
            diffs = sfed_at_rank(result, data, alpha, top, "sfed", other)
            if diffs:
                rows.append([f"SFed: no high-rank collapse (accuracy at r={top} above {SCALING_NAMES[other]}'s)",
                             cell_name(data, alpha), f"Δ global {per_seed(diffs)}", claim(diffs)])
    # Med-DualLoRA
    pooled = []
    for data, alpha in cells:
        runs = ok_runs(result, "rules", data=data, alpha=alpha, variant="dual")
        if not runs:
            continue
        seeds = [mean(dual_gaps(r, True)) for r in runs]
        seeds = [g for g in seeds if g is not None]
        gaps = [g for r in runs for g in dual_gaps(r, True)]
        pooled += seeds
        rows.append([f"Med-DualLoRA: personalised >= global-only on label-shifted clients (TV >= {SHIFT_TV})",
                     cell_name(data, alpha),
                     f"mean gap over shifted clients {per_seed(seeds)}; {sum(g >= 0 for g in gaps)} of {len(gaps)} "
                     f"client-runs >= 0", claim(seeds, strict=False)])
    # FED-FSTQ
    for data, alpha in cells:
        for key, higher, what in (("global_accuracy", True, "accuracy"), ("global_loss", False, "loss")):
            _, ratios = reach_table(result, data, alpha, key, higher)
            if "fstq" not in ratios:
                continue
            rows.append([f"FED-FSTQ: FedAvg's final global {what} with >= {FSTQ_GOAL:g}x fewer uplink bytes",
                         cell_name(data, alpha), f"FedAvg's bytes / FSTQ's {per_seed(ratios['fstq'], '{:.2f}x')}"
                         " (0: never reached)", claim(ratios["fstq"], FSTQ_GOAL, strict=False)])
    # FedEU
    for data, alpha in cells:
        diffs = paired(result, "rules", data, alpha, "fedeu", BASELINE, lambda r: final(r, "global_accuracy"))
        client = paired(result, "rules", data, alpha, "fedeu", BASELINE, lambda r: final(r, "client_accuracy"))
        if diffs:
            rows.append(["FedEU beats FedAvg (global accuracy)", cell_name(data, alpha),
                         f"Δ global {per_seed(diffs)}; Δ client mean {per_seed(client)}", claim(diffs)])
    rows += continual_verdicts(result)
    return rows


def continual_score(run: Run, key: str) -> float | None:
    scores = run["final"].get("continual")
    return None if scores is None else scores[key]


def continual_verdicts(result: dict[str, Any]) -> list[list[str]]:
    """PRISM vs FedAvg-sequential and vs its client-bases negative control, paired by seed."""
    rows: list[list[str]] = []
    runs = ok_runs(result, "continual")
    if not runs:
        return [["PRISM: forgets less than FedAvg-sequential (backward transfer)", "", "not measured in this result",
                 "not measured"]]
    data, alpha = runs[0]["data"], runs[0]["alpha"]
    for other, what in (("fedavg-seq", "FedAvg-sequential"), ("prism-client", "client-specific bases (the negative "
                                                                              "control)")):
        bwt = paired(result, "continual", data, alpha, "prism", other,
                     lambda r: continual_score(r, "backward_transfer"))
        acc = paired(result, "continual", data, alpha, "prism", other,
                     lambda r: continual_score(r, "average_accuracy"))
        if bwt:
            rows.append([f"PRISM forgets less than {what} (backward transfer)", SEQUENCE_LABEL,
                         f"Δ BWT {per_seed(bwt)}; Δ average accuracy {per_seed(acc)}", claim(bwt)])
    errors = [max(v for v in r["prism"].get("prism_orthogonality_error", []) if v is not None)
              for r in ok_runs(result, "continual", variant="prism") if r["prism"].get("prism_orthogonality_error")]
    if errors:
        rows.append(["PRISM: the FedAvg mean stays off the shared bases (max ‖A_e M_e‖_F over rounds)",
                     SEQUENCE_LABEL, per_seed(errors, "{:.1e}"), "yes" if max(errors) < 1e-4 else "no"])
    return rows


def sfed_spreads(result: dict[str, Any], data: str, alpha: float) -> dict[str, dict[int, float]]:
    """Per scale rule and seed: max - min of the final global accuracy over the ranks it ran."""
    out: dict[str, dict[int, float]] = {}
    for scaling in SCALING_ORDER:
        by_seed: dict[int, list[float]] = {}
        for r in ok_runs(result, "sfed", data=data, alpha=alpha, scaling=scaling):
            by_seed.setdefault(r["seed"], []).append(final(r, "global_accuracy"))
        full = {seed: max(v) - min(v) for seed, v in by_seed.items() if len(v) > 1}
        if full:
            out[scaling] = full
    return out


def sfed_at_rank(result: dict[str, Any], data: str, alpha: float, rank: int, a: str, b: str) -> list[float]:
    runs_a = {r["seed"]: r for r in ok_runs(result, "sfed", data=data, alpha=alpha, scaling=a, rank=rank)}
    runs_b = {r["seed"]: r for r in ok_runs(result, "sfed", data=data, alpha=alpha, scaling=b, rank=rank)}
    return [final(runs_a[s], "global_accuracy") - final(runs_b[s], "global_accuracy")
            for s in sorted(set(runs_a) & set(runs_b))]


# ------------------------------------------------------------------------------------ sections


def rules_section(result: dict[str, Any], data: str, alpha: float) -> list[str]:
    runs = ok_runs(result, "rules", data=data, alpha=alpha)
    variants = order([r["variant"] for r in runs], VARIANT_ORDER)
    clients = runs[0]["clients"] if runs else "?"
    out = [f"### {cell_name(data, alpha)} ({clients} clients)", ""]
    rows = []
    for name in variants:
        vr = [r for r in runs if r["variant"] == name]
        rows.append([name, spread([final(r, "global_accuracy") for r in vr]),
                     spread([final(r, "client_accuracy") for r in vr]),
                     spread([final(r, "client_global_accuracy") for r in vr]),
                     spread([final(r, "global_loss") for r in vr]),
                     spread([r["final"]["uplink_bytes"] / 1e6 for r in vr], "{:.2f}"),
                     spread([r["final"]["downlink_bytes"] / 1e6 for r in vr], "{:.2f}"),
                     spread([mean(r["curves"]["separation_error_mean"]) for r in vr]),
                     spread([r["final"]["seconds"] for r in vr], "{:.0f}"),
                     spread([r["process_s"] for r in vr], "{:.0f}"), str(len(vr))])
    out += [table(["variant", "global acc", "client-mean acc", "clients' global-only acc", "global loss",
                   "uplink MB (cum.)", "downlink MB (cum.)", "separation error", "run s", "process s", "seeds"],
                  rows), ""]
    # per-round curves
    rounds = max((len(r["curves"]["global_accuracy"]) for r in runs), default=0)
    curve_rows = []
    for name in variants:
        vr = [r for r in runs if r["variant"] == name]
        for key, label in (("global_accuracy", "global"), ("client_accuracy", "client mean"),
                           ("client_global_accuracy", "clients' global-only")):
            values = [mean([r["curves"][key][i] for r in vr if i < len(r["curves"][key])]) for i in range(rounds)]
            if any(v is not None for v in values):
                curve_rows.append([f"{name}: {label}", *["" if v is None else f"{v:.3f}" for v in values]])
        up = [mean([r["curves"]["uplink_bytes"][i] / 1e6 for r in vr if i < len(r["curves"]["uplink_bytes"])])
              for i in range(rounds)]
        curve_rows.append([f"{name}: uplink MB (cum.)", *["" if v is None else f"{v:.2f}" for v in up]])
    out += ["Per round (mean over seeds; round 0 is the untrained global adapter, clients evaluate after "
            "their first round):", "", table(["", *[f"r{i}" for i in range(rounds)]], curve_rows), ""]
    # uplink to reach FedAvg's final quality
    reach_rows = []
    for key, higher, what in (("global_accuracy", True, "accuracy"), ("global_loss", False, "loss")):
        reached, ratios = reach_table(result, data, alpha, key, higher)
        for name in variants:
            if name not in reached:
                continue
            mine = [m for _, m, _ in reached[name]]
            got = [m for m in mine if m is not None]
            reach_rows.append([what, name, f"{len(got)} of {len(mine)}",
                               spread([m[0] / 1e6 for m in got], "{:.2f}") if got else "never",
                               spread([m[1] for m in got], "{:.1f}") if got else "",
                               per_seed(ratios.get(name, []), "{:.2f}x")])
    if reach_rows:
        out += ["Uplink to reach FedAvg's final global accuracy / loss (same seed; the first trained round "
                "at or past it, so one round is the resolution):", "",
                table(["target", "variant", "seeds reached", "uplink MB", "round", "FedAvg's bytes / variant's"],
                      reach_rows), ""]
    # aggregation errors
    err_rows = []
    for name in variants:
        vr = [r for r in runs if r["variant"] == name]
        sep = [mean(r["curves"]["separation_error_mean"]) for r in vr]
        sep_max = [max((v for v in r["curves"]["separation_error_max"] if v is not None), default=None) for r in vr]
        ref = [max((v for v in r["curves"]["refactor_error_max"] if v is not None), default=None) for r in vr]
        if any(v is not None for v in sep + ref):
            err_rows.append([name, spread(sep), spread(sep_max), spread(ref)])
    if err_rows:
        out += ["Aggregation errors: ‖mean(B) mean(A) − mean(B A)‖ / ‖mean(B A)‖ per module (the separate rule's "
                "error, computed on every round's uploads whichever rule ran); the exact rule's rank-r "
                "re-factoring error:", "",
                table(["variant", "separation error, mean over rounds and modules", "largest, any module/round",
                       "exact: re-factoring error, largest"], err_rows), ""]
    # method metrics
    met_rows = []
    for name in variants:
        vr = [r for r in runs if r["variant"] == name]
        keys = sorted({k for r in vr for k in r["method_metrics"]})
        for key in keys:
            met_rows.append([name, key, spread([mean(r["method_metrics"][key]) for r in vr], "{:.4g}")])
    if met_rows:
        out += ["Method metrics the clients report with their uploads (mean over clients and rounds):", "",
                table(["variant", "metric", "value"], met_rows), ""]
    # Med-DualLoRA per client
    dual = [r for r in runs if r["variant"] == "dual"]
    if dual:
        shift_rows = []
        for r in dual:
            shift = label_shift(r["partition"])
            for client, m in sorted(r["clients_final"].items(), key=lambda kv: int(kv[0])):
                if "global_accuracy" not in m:
                    continue
                shift_rows.append([str(r["seed"]), client, f"{shift[int(client)]:.2f}",
                                   str(int(m.get("num-examples", 0))), f"{m['accuracy']:.3f}",
                                   f"{m['global_accuracy']:.3f}", f"{m['accuracy'] - m['global_accuracy']:+.3f}"])
        out += [f"Med-DualLoRA per client at the last round (label shift: total variation distance of the client's "
                f"training label mix from the pooled one; shifted: >= {SHIFT_TV}):", "",
                table(["seed", "client", "label shift", "test rows", "personalised", "global only", "gap"],
                      shift_rows), ""]
    return out


def sfed_section(result: dict[str, Any], data: str, alpha: float) -> list[str]:
    runs = ok_runs(result, "sfed", data=data, alpha=alpha)
    ranks = sorted({r["rank"] for r in runs})
    scalings = order([r["scaling"] for r in runs], SCALING_ORDER)
    clients = runs[0]["clients"] if runs else "?"
    lora_alpha = runs[0]["adapter"]["alpha"] if runs else "?"
    spreads = sfed_spreads(result, data, alpha)
    rows = []
    for scaling in scalings:
        cells = []
        for rank in ranks:
            rr = [r for r in runs if r["scaling"] == scaling and r["rank"] == rank]
            if not rr:
                cells.append("not run")
                continue
            cells.append(f"{spread([final(r, 'global_accuracy') for r in rr])} (loss "
                         f"{spread([final(r, 'global_loss') for r in rr])}; s = {rr[0]['scale']:.3g}; "
                         f"{len(rr)} seeds)")
        drop = sfed_drop(runs, scaling, ranks)
        rows.append([SCALING_NAMES.get(scaling, scaling), *cells,
                     spread(list(spreads.get(scaling, {}).values())), spread(drop, "{:+.3f}")])
    return [f"### {cell_name(data, alpha)} ({clients} clients, LoRA alpha {lora_alpha} for every rule, FedAvg)", "",
            table(["scale rule", *[f"r={r}: global acc (loss; scale s)" for r in ranks],
                   "spread over ranks (max − min)", f"r={max(ranks, default='?')} minus r={min(ranks, default='?')}"],
                  rows), ""]


def sfed_drop(runs: list[Run], scaling: str, ranks: list[int]) -> list[float]:
    if len(ranks) < 2:
        return []
    lo = {r["seed"]: final(r, "global_accuracy") for r in runs if r["scaling"] == scaling and r["rank"] == ranks[0]}
    hi = {r["seed"]: final(r, "global_accuracy") for r in runs if r["scaling"] == scaling and r["rank"] == ranks[-1]}
    return [hi[s] - lo[s] for s in sorted(set(lo) & set(hi))]


# ------------------------------------------------------------------------------------ markdown


def continual_section(result: dict[str, Any]) -> list[str]:
    """The federated continual sequence: scores, the accuracy matrix's last row, PRISM's numbers."""
    runs = ok_runs(result, "continual")
    variants = order(sorted({r["variant"] for r in runs}), CONTINUAL_ORDER)
    tasks = len(runs[0]["accuracy_matrix"] or [])
    rows = []
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        last = [[r["accuracy_matrix"][-1][j] for r in mine] for j in range(tasks)]
        orth = [max((v for v in r["prism"].get("prism_orthogonality_error", []) if v is not None), default=None)
                for r in mine]
        dims = [next((v for v in reversed(r["prism"].get("prism_basis_mean_dim", [])) if v is not None), None)
                for r in mine]
        rows.append([name, str(len(mine)), spread([continual_score(r, "average_accuracy") for r in mine]),
                     spread([continual_score(r, "backward_transfer") for r in mine], "{:+.3f}"),
                     spread([continual_score(r, "mean_forgetting") for r in mine]),
                     *[spread(values) for values in last],
                     spread(orth, "{:.1e}"), spread(dims, "{:.1f}"),
                     spread([r["final"]["uplink_bytes"] / 1e6 for r in mine], "{:.1f}"),
                     spread([r["final"]["downlink_bytes"] / 1e6 for r in mine], "{:.1f}"),
                     spread([r["run_s"] for r in mine], "{:.0f}")])
    names = [t["name"] for t in result.get("sequence", [])] or [f"task {j + 1}" for j in range(tasks)]
    notes = "; ".join(f"**{n}**: {v['note']}" for n, v in result.get("continual_variants", {}).items()
                      if n in variants)
    s = result["settings"]
    return ["## Federated continual learning: PRISM vs FedAvg-sequential", "",
            f"{SEQUENCE_LABEL}: MiniLM with MoELoRA (4 experts, top-2, total rank {s['rank']}), "
            f"{s['continual_clients']} clients, Dirichlet alpha {s['continual_alpha']:g} per task, "
            f"{s['continual_rounds']} rounds of {s['local_steps']} local steps per task. " + notes + ".", "",
            "Average accuracy, backward transfer (BWT; negative: forgetting) and mean forgetting from the global "
            "accuracy matrix (each task on its own evaluation rows and head after each task); final: the accuracy on "
            "each task after the last; ‖A M‖: the largest ‖A_e M_e‖_F of the aggregated global block over the run; "
            "basis dim: the bases' mean size at the end (of 384); MB: all messages, all clients.", "",
            table(["variant", "seeds", "avg acc", "BWT", "forgetting", *[f"final {n}" for n in names],
                   "max ‖A M‖", "basis dim", "uplink MB", "downlink MB", "run s"], rows), ""]


def settings_line(result: dict[str, Any]) -> str:
    s = result["settings"]
    limit = f", {s['max_train_examples']} training rows" if s.get("max_train_examples") else ""
    return (f"MiniLM classification, LoRA on query/value + the head, Flower simulation, label-Dirichlet partitions; "
            f"{s['rounds']} rounds x {s['local_steps']} local steps, batch {s['batch_size']}, max_length "
            f"{s['max_length']}, lr {s['lr']:g} (head {s['head_lr']:g}){limit}, every client every round, "
            f"{s['eval_examples']} evaluation rows (global; per client at most that many of its share of the test "
            f"split); clients per data set {s['clients']}; rules LoRA r={s['rank']}, alpha {s['lora_alpha']:g}; "
            f"seeds of this invocation {s['seeds']}, budget {s['budget_min']:g} min.")


def markdown(result: dict[str, Any], settings: Any = None) -> str:
    s = result["settings"]
    env = dict(result["environment"])
    env.setdefault("loadavg_end", env["loadavg_start"])
    quick = "**QUICK smoke run: too few clients, steps and rows to mean anything.** " if s["quick"] else ""
    runs = result["runs"]
    failed = [r for r in runs if "error" in r]
    out = ["# Federated LoRA on Flower: aggregation rules, Med-DualLoRA, FED-FSTQ, FedEU, SFed-LoRA, PRISM", "",
           environment_line(env), "", quick + settings_line(result), "",
           f"{len(runs) - len(failed)} runs finished, {len(failed)} failed, {len(result.get('not_run', []))} not "
           f"started (budget); this invocation's runtime {result.get('runtime_s', 0) / 60:.0f} min."]
    sources = sorted({r.get("source", "?") for r in runs if "error" not in r})
    loads = [r["loadavg"][0] for r in runs if "loadavg" in r]
    if sources:
        out.append(f"Runs made on splice source {', '.join(sources)}"
                   + (f", at load average {min(loads):.1f}–{max(loads):.1f} (1-minute, at each run's end)"
                      if loads else "") + ".")
    for inv in result.get("invocations", [])[:-1]:
        out.append(f"Earlier invocation {inv['date']} ({inv['source']}): its runs kept where their settings match.")
    out += ["", "## Verdicts", "",
            "Paired by seed (a seed fixes the partition and the data order for every variant): \"yes\" when every "
            "seed agrees, \"no\" when none does, \"can't tell\" when the seeds disagree; one seed gives no verdict.",
            "", table(["claim", "where", "measured", "verdict"], verdict_rows(result)), ""]
    cells = rules_cells(result)
    if cells:
        out += ["## Aggregation rules and methods", "",
                "Variants: " + "; ".join(f"**{name}**: {v['note']}" for name, v in result.get("variants", {}).items()
                                         if any(r["variant"] == name for r in runs if r["section"] == "rules"))
                + ".", "",
                "global acc: the server's global adapter on the evaluation rows; client-mean acc: the unweighted "
                "mean over clients of each client's accuracy on its own label mix of the test rows (with its local "
                "adapter for dual); clients' global-only acc: dual's clients with the global adapter alone; bytes: "
                "Flower's serialized messages, all clients, cumulative; run s: the run's own report (rounds, "
                "evaluations included); process s: the child interpreter from start to end (imports, Ray).", ""]
        for data, alpha in cells:
            out += rules_section(result, data, alpha)
    scells = sfed_cells(result)
    if scells:
        out += ["## SFed-LoRA vs alpha/r vs rsLoRA across ranks", "",
                "The same LoRA alpha for every rule, FedAvg of A and B; s is the scale each rule gives. With the "
                "client count N fixed, SFed's alpha*sqrt(N/r) is rsLoRA's alpha/sqrt(r) times sqrt(N): a difference "
                "between them is the effect of the larger scale. Spread: max − min over the ranks of the final global "
                "accuracy, per seed, then mean ± std.", ""]
        for data, alpha in scells:
            out += sfed_section(result, data, alpha)
    if ok_runs(result, "continual"):
        out += continual_section(result)
    skipped = {(r["variant"], r["why"]) for r in result.get("skipped", [])}
    notes = [f"- Variant {v} skipped: {why}." for v, why in sorted(skipped)]
    if result.get("not_run"):
        listed = ", ".join(f"{j['section']}/{j['variant']}/{j['data']}/alpha {j['alpha']:g}/seed {j['seed']}"
                           for j in result["not_run"])
        notes.append(f"- Not started (expected to end past the {s['budget_min']:g}-minute budget; continue with "
                     f"--merge): {listed}.")
    for r in failed:
        notes.append(f"- Failed: {r['section']}/{r['variant']}/{r['data']}/alpha {r['alpha']:g}/seed {r['seed']}: "
                     f"{r['error']}")
    notes += [f"- {n['date']}: {n['text']}" for n in result.get("notes", [])]
    out += ["## Notes", "", *notes]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ the PNG


def draw(result: dict[str, Any], path: Path) -> Path | None:
    """Per rules cell: global accuracy per round, mean per-client accuracy per round, and global
    accuracy against cumulative uplink MB, one line per variant (means over seeds); and the SFed
    sweep: final global accuracy against rank per scale rule (std bars). None when nothing ran."""
    from matplotlib.ticker import MaxNLocator

    from splice.io.figures import pyplot, save_png

    cells, scells = rules_cells(result), sfed_cells(result)
    columns = [("rules", c) for c in cells] + [("sfed", c) for c in scells]
    columns = [(k, c) for k, c in columns if ok_runs(result, k, data=c[0], alpha=c[1])]
    if not columns:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(3, len(columns), figsize=(5.2 * len(columns), 11), squeeze=False)
    for col, (kind, (data, alpha)) in enumerate(columns):
        top, mid, bottom = axes[0][col], axes[1][col], axes[2][col]
        runs = ok_runs(result, kind, data=data, alpha=alpha)
        if kind == "rules":
            for name in order([r["variant"] for r in runs], VARIANT_ORDER):
                vr = [r for r in runs if r["variant"] == name]
                n = min(len(r["curves"]["global_accuracy"]) for r in vr)
                acc = [mean([r["curves"]["global_accuracy"][i] for r in vr]) for i in range(n)]
                client = [mean([r["curves"]["client_accuracy"][i] for r in vr]) for i in range(n)]
                up = [mean([r["curves"]["uplink_bytes"][i] / 1e6 for r in vr]) for i in range(n)]
                marker = MARKERS[VARIANT_ORDER.index(name) % len(MARKERS)] if name in VARIANT_ORDER else "o"
                line = top.plot(range(n), acc, marker=marker, label=name)[0]
                mid.plot([i for i in range(n) if client[i] is not None], [c for c in client if c is not None],
                         marker=marker, color=line.get_color(), label=name)
                if name == "dual":
                    glob = [mean([r["curves"]["client_global_accuracy"][i] for r in vr]) for i in range(n)]
                    mid.plot([i for i in range(n) if glob[i] is not None], [g for g in glob if g is not None],
                             linestyle="--", color=line.get_color(), label="dual: global only")
                bottom.plot(up[1:], acc[1:], marker=marker, color=line.get_color(), label=name)
            top.set(title=f"{cell_name(data, alpha)}", xlabel="round", ylabel="global accuracy")
            mid.set(xlabel="round", ylabel="mean per-client accuracy")
            for ax in (top, mid):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            bottom.set(xlabel="cumulative uplink MB (all clients)", ylabel="global accuracy")
            if any(r["curves"]["uplink_bytes"][-1] > 0 for r in runs):
                bottom.set_xscale("log")
            for ax in (top, mid, bottom):
                ax.legend(fontsize=7)
        else:
            ranks = sorted({r["rank"] for r in runs})
            for scaling in order([r["scaling"] for r in runs], SCALING_ORDER):
                ms, ss, ls, rs = [], [], [], []
                for rank in ranks:
                    rr = [final(r, "global_accuracy") for r in runs if r["scaling"] == scaling and r["rank"] == rank]
                    lo = [final(r, "global_loss") for r in runs if r["scaling"] == scaling and r["rank"] == rank]
                    if rr:
                        rs.append(rank)
                        ms.append(statistics.fmean(rr))
                        ss.append(statistics.stdev(rr) if len(rr) > 1 else 0.0)
                        ls.append(statistics.fmean(lo))
                top.errorbar(rs, ms, yerr=ss, marker="o", capsize=3, label=SCALING_NAMES.get(scaling, scaling))
                mid.plot(rs, ls, marker="s", label=SCALING_NAMES.get(scaling, scaling))
            for ax in (top, mid):
                ax.set_xscale("log", base=2)
                ax.set_xticks(ranks, [str(r) for r in ranks])
                ax.legend(fontsize=7)
            top.set(title=f"SFed sweep: {cell_name(data, alpha)}", xlabel="LoRA rank", ylabel="final global accuracy")
            mid.set(xlabel="LoRA rank", ylabel="final global loss")
            bottom.axis("off")
    fig.tight_layout()
    return save_png(fig, path)
