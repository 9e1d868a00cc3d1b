"""bench_optim.py's rendering, from the result JSON alone (`--render` needs no model): the rate each
sweep picked, a quality and a cost table per task (mean ± std over seeds), the paired step timing,
the sweep and alpha runs, a verdict per claim, where LoFT loses and where it wins, and a PNG of the
loss curves."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common_report import DATASETS, environment_line, table

Run = dict[str, Any]
ARMS = {
    "adamw": "AdamW LoRA",
    "loraplus": "LoRA+ (AdamW, B at ratio x A's rate)",
    "loft": "LoFT",
    "full": "full fine-tuning of the same layers (AdamW)",
}
# arm -> the settings' list of rates it is swept over (an older result without a list: not swept)
SWEPT = {"loft": "loft_lrs", "full": "full_lrs", "loraplus": "loraplus_lrs"}
TASK_NAMES = {**DATASETS, "arithmetic": "SmolLM2 arithmetic"}


# ------------------------------------------------------------------------ choosing the sweeps' rate


def score(run: Run) -> tuple[float, ...]:
    """How good a run's best state is on validation, higher better: accuracy then -loss for a
    classifier, -loss for a generator (what the trainer keeps its best by)."""
    val = run["best"]["validation"]
    loss = val["loss"] if math.isfinite(val["loss"]) else math.inf
    return (val["accuracy"], -loss) if "accuracy" in val else (-loss,)


def sweep_runs(runs: list[Run], settings: dict[str, Any], task: str, arm: str) -> list[Run]:
    """The sweep's runs of `arm` on `task`: seed `sweep_seed`, alpha 2r, a rate in the arm's list."""
    return [r for r in runs if r["section"] == "train" and r["task"] == task and r["arm"] == arm
            and r["seed"] == settings["sweep_seed"] and r["alpha"] == 2 * settings["rank"]
            and r["lr"] in settings[SWEPT[arm]]]


def chosen_lrs(runs: list[Run], settings: dict[str, Any], task: str) -> dict[str, float | None]:
    """The rate of each swept arm on `task`: the only one listed, else the sweep run with the best
    validation `score`; None while a listed rate has no run yet or every sweep run failed."""
    out: dict[str, float | None] = {}
    for arm, key in SWEPT.items():
        lrs = settings.get(key) or [None]
        if len(lrs) == 1:
            out[arm] = lrs[0]
            continue
        sweep = sweep_runs(runs, settings, task, arm)
        ok = [r for r in sweep if "error" not in r]
        out[arm] = max(ok, key=score)["lr"] if ok and {r["lr"] for r in sweep} >= set(lrs) else None
    return out


# ------------------------------------------------------------------------------- reading runs


def main_runs(result: dict[str, Any], task: str, arm: str, alpha: float | None = None,
              failed: bool = False) -> list[Run]:
    """An arm's runs at its rate (the task's LoRA rate, or the sweep's pick) and `alpha` (2r), one per
    seed (of every invocation whose runs were kept); the failed ones instead with `failed`."""
    s = result["settings"]
    lr = chosen_lrs(result["runs"], s, task).get(arm, result["tasks"][task]["lr"])
    alpha = 2 * s["rank"] if alpha is None else alpha
    return [r for r in result["runs"] if r["section"] == "train" and r["task"] == task and r["arm"] == arm
            and r["lr"] == lr and r["alpha"] == alpha and ("error" in r) == failed]


def quality(result: dict[str, Any], task: str) -> str:
    """The task's headline test metric: accuracy, or greedy exact match for the generator."""
    return "accuracy" if result["tasks"][task]["kind"] == "classification" else "exact_match"


def window(losses: list[float | None], low: float, high: float) -> float | None:
    """The mean training loss over the steps between fractions `low` and `high` of the run."""
    n = len(losses)
    part = [x for x in losses[int(low * n): max(int(high * n), int(low * n) + 1)] if x is not None]
    return statistics.fmean(part) if part else None


def metrics(result: dict[str, Any], task: str) -> dict[str, tuple[str, bool, Callable[[Run], float | None]]]:
    """name -> (label, higher is better, value of a run)."""
    q = quality(result, task)
    label = "accuracy" if q == "accuracy" else "exact match"
    main = "accuracy" if q == "accuracy" else "loss"
    return {
        "test_best": (f"test {label} (best-validation state)", True, lambda r: r["best"]["test"][q]),
        "test_final": (f"test {label} (final state)", True, lambda r: (r["final"]["test"] or {}).get(q)),
        "test_loss": ("test loss (best-validation state)", False, lambda r: r["best"]["test"]["loss"]),
        "val_best": (f"best validation {main}", main == "accuracy", lambda r: r["best"]["validation"][main]),
        "val_loss_final": ("final validation loss", False, lambda r: (r["final"]["validation"] or {}).get("loss")),
        "loss_25": ("training loss, steps 15-25%", False, lambda r: window(r["loss"], 0.15, 0.25)),
        "loss_50": ("training loss, steps 40-50%", False, lambda r: window(r["loss"], 0.40, 0.50)),
        "loss_end": ("training loss, last 10% of steps", False, lambda r: window(r["loss"], 0.90, 1.0)),
        "delta_w": ("|ΔW| (final)", True, lambda r: r["delta_w"]),
        "step_s": ("step s (runs, unpaired)", False, lambda r: r["step_time"]["mean_s"]),
        "optimizer_ms": ("optimizer step ms (median)", False,
                         lambda r: None if r["optimizer_time"]["median_s"] is None
                         else 1e3 * r["optimizer_time"]["median_s"]),
        "state_bytes": ("optimizer state bytes", False, lambda r: r["state_bytes"]),
        "adapter_state_bytes": ("optimizer state bytes without the head", False, lambda r: r["adapter_state_bytes"]),
    }


def per_seed(runs: list[Run], value: Callable[[Run], float | None]) -> dict[int, float]:
    out = {}
    for r in runs:
        v = value(r)
        if v is not None and math.isfinite(v):
            out[r["seed"]] = v
    return out


def mean_sd(values: dict[int, float], digits: int = 3) -> str:
    """"mean ± std" over seeds (the value alone for one seed, "-" for none)."""
    vals = list(values.values())
    if not vals:
        return "-"
    form = f",.{digits}f" if digits == 0 else f".{digits}f"  # whole numbers (bytes) with thousands separators
    sd = f" ± {statistics.stdev(vals):{form}}" if len(vals) > 1 else ""
    return f"{statistics.fmean(vals):{form}}{sd}"


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """a - b over the seeds both have: mean, sd, 95% t-interval, per seed; None without a seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    n, mean = len(d), statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else math.nan
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    else:
        half = math.nan
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half,
            "per_seed": dict(zip(seeds, d, strict=True))}


def said(diff: dict[str, Any] | None) -> str:
    """The verdict of a difference oriented so that > 0 is the claim: yes when its 95% interval is
    above 0, no when below, else can't tell (or no difference at all)."""
    if diff is None:
        return "not measured"
    if diff["n"] < 2:
        return "one seed: no verdict"
    if diff["low"] > 0:
        return "yes"
    if diff["high"] < 0:
        return "no"
    seeds = diff["per_seed"].values()
    if all(d == 0 for d in seeds):
        return "no difference on any seed"
    lean = "; every seed above 0" if all(d > 0 for d in seeds) else "; every seed below 0" if all(
        d < 0 for d in seeds) else ""
    return f"can't tell (the interval spans 0{lean})"


def fmt_diff(diff: dict[str, Any] | None, digits: int = 4) -> str:
    if diff is None:
        return "-"
    seeds = ", ".join(f"{v:+.{digits}f}" for v in diff["per_seed"].values())
    if diff["n"] < 2:
        return f"{diff['mean']:+.{digits}f}"
    return f"{diff['mean']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}] (seeds {seeds})"


# ---------------------------------------------------------------------------------- the report


def markdown(result: dict[str, Any], s: Any = None) -> str:
    settings = result["settings"]
    env = result["environment"]
    quick = " — quick run (not results)" if settings["quick"] else ""
    tasks = tasks_run(result)
    seeds = sorted({r["seed"] for r in result["runs"] if r["section"] == "train"})
    out = [f"# Optimizers for LoRA: LoFT vs AdamW LoRA vs LoRA+ vs full fine-tuning (issue 19){quick}", "",
           environment_line(env), "",
           f"LoRA r={settings['rank']}, alpha={2 * settings['rank']} on query/value (MiniLM) or q_proj/v_proj "
           f"(SmolLM2), head trained in full (head_lr 1e-2); seeds {seeds}; MiniLM "
           f"{settings['minilm_steps']} steps, SmolLM2 {settings['smollm2_steps']} steps; one torch thread per run. "
           "Mean ± std over seeds. Every run is `splice.train.Trainer` in its own interpreter (bench/bench_optim.py "
           "says how each arm is built).", ""]
    out += invocations(result)
    out += rates(result, tasks)
    out += verdicts(result, tasks)
    for task in tasks:
        out += task_tables(result, task)
    out += timing_tables(result)
    out += sweep_table(result, tasks)
    out += alpha_table(result)
    out += loft_wins_losses(result, tasks)
    out += oddities(result)
    return "\n".join(out)


def tasks_run(result: dict[str, Any]) -> list[str]:
    """The tasks with training runs, in the bench's order."""
    return [t for t in result["tasks"] if any(r.get("task") == t for r in result["runs"])]


def alphas_run(result: dict[str, Any], task: str) -> list[float]:
    """The alphas that AdamW LoRA and LoFT ran at on `task` (2r, the main runs', included)."""
    return sorted({r["alpha"] for r in result["runs"] if r["section"] == "train" and r["task"] == task
                   and r["arm"] in ("adamw", "loft") and "error" not in r})


def invocations(result: dict[str, Any]) -> list[str]:
    lines = []
    for inv in result.get("invocations", []):
        runtime = f", ran {inv['runtime_s'] / 60:.0f} min" if inv.get("runtime_s") else ""
        merge = "--merge, " if inv["merge"] else ""
        lines.append(f"- {inv['date']} (splice {inv['source']}, load {inv['loadavg'][0]:.1f}{runtime}): "
                     f"{merge}kept {inv['kept']} earlier run(s), dropped {inv['dropped']}")
    not_run = result.get("not_run", [])
    if not_run:
        lines.append(f"- not run ({len(not_run)}): " + "; ".join(
            f"{n.get('section') or 'train'} {n.get('task') or n.get('model')} {n.get('arm') or ''} seed "
            f"{n.get('seed')} ({n['why']})" for n in not_run[:12]) + (" ..." if len(not_run) > 12 else ""))
    return (["Invocations:", "", *lines, ""]) if lines else []


def rates(result: dict[str, Any], tasks: list[str]) -> list[str]:
    s = result["settings"]
    rows = []
    for task in tasks:
        chosen = chosen_lrs(result["runs"], s, task)
        base = result["tasks"][task]["lr"]
        plus = chosen["loraplus"] if chosen["loraplus"] is not None else base
        rows.append([TASK_NAMES[task], f"{base:g}",
                     f"{_rate(plus, s.get('loraplus_lrs') or [base])} (B {plus * s['loraplus_ratio']:g})",
                     _rate(chosen["loft"], s["loft_lrs"]), _rate(chosen["full"], s["full_lrs"])])
    return ["## Learning rates", "",
            "AdamW LoRA at the repo's LoRA rate for the task; LoRA+ (A's rate), LoFT and full fine-tuning at the "
            f"rate their sweep (seed {s['sweep_seed']}, best validation) picked; seed {s['sweep_seed']}'s main run of "
            "those *is* the winning sweep run, so they had a choice of rates on validation AdamW LoRA did not (it "
            "favours them, on validation more than on test).", "",
            table(["task", "AdamW LoRA", "LoRA+", "LoFT", "full FT"], rows), ""] if rows else []


def _rate(chosen: float | None, listed: list[float]) -> str:
    if chosen is None:
        return "sweep incomplete"
    if len(listed) == 1:
        return f"{chosen:g} (fixed)"
    edge = ", at the grid's edge: a wider sweep might pick another" if chosen in (min(listed), max(listed)) else ""
    return f"{chosen:g} (of {', '.join(f'{x:g}' for x in sorted(listed))}{edge})"


def verdicts(result: dict[str, Any], tasks: list[str]) -> list[str]:
    lines = ["## Verdicts", "",
             "Paired by seed (same data order and head); the interval is the 95% t-interval of the mean "
             "per-seed difference (3 seeds: t = 4.30, wide by design); yes / no only when it excludes 0.", ""]
    rows = []
    for task in tasks:
        m = metrics(result, task)
        for key in ("test_best", "val_loss_final"):
            label, higher, value = m[key]
            vals = {arm: per_seed(main_runs(result, task, arm), value) for arm in ("adamw", "loft", "full")}
            if not all(vals.values()):
                continue
            gap_adamw = {sd: abs(v - vals["full"][sd]) for sd, v in vals["adamw"].items() if sd in vals["full"]}
            gap_loft = {sd: abs(v - vals["full"][sd]) for sd, v in vals["loft"].items() if sd in vals["full"]}
            diff = paired(gap_adamw, gap_loft)
            rows.append([TASK_NAMES[task], label, mean_sd(vals["adamw"], 4), mean_sd(vals["loft"], 4),
                         mean_sd(vals["full"], 4), fmt_diff(diff), said(diff)])
    if rows:
        lines += ["**Claim 1: LoFT narrows the gap to full fine-tuning of the same layers** (difference = |AdamW "
                  "- full| - |LoFT - full|, > 0 means LoFT is closer):", "",
                  table(["task", "metric", "AdamW LoRA", "LoFT", "full FT", "gap difference [95% CI]", "verdict"],
                        rows), ""]
    lines += claim_alpha(result)
    rows = []
    for task in tasks:
        m = metrics(result, task)
        for key in ("loss_50", "loss_25"):
            label, _, value = m[key]
            a = per_seed(main_runs(result, task, "adamw"), value)
            b = per_seed(main_runs(result, task, "loraplus"), value)
            diff = paired(a, b)
            if diff is None:
                continue
            rows.append([TASK_NAMES[task], label, mean_sd(a, 4), mean_sd(b, 4), fmt_diff(diff),
                         said(diff) if key == "loss_50" else f"({said(diff)})"])
    if rows:
        lines += ["**Claim 3: LoRA+ trains faster than LoRA** (loss at a fixed step; difference = AdamW - LoRA+, "
                  "> 0 means LoRA+ is lower; the verdict is on steps 40-50%, 15-25% in brackets):", "",
                  table(["task", "window", "AdamW LoRA", "LoRA+", "difference [95% CI]", "verdict"], rows), ""]
    lines += ratio_lines(result, tasks)
    return lines


def claim_alpha(result: dict[str, Any]) -> list[str]:
    r = result["settings"]["rank"]
    rows, spans = [], set()
    for task in tasks_run(result):
        alphas = alphas_run(result, task)
        if len(alphas) < 2:
            continue
        low, high = alphas[0], alphas[-1]
        spans.add(f"{low / r:g}r and {high / r:g}r")
        m = metrics(result, task)
        for key in ("test_best", "val_loss_final"):
            label, _, value = m[key]
            change = {}
            for arm in ("adamw", "loft"):
                lo = per_seed(main_runs(result, task, arm, alpha=low), value)
                hi = per_seed(main_runs(result, task, arm, alpha=high), value)
                change[arm] = {sd: abs(hi[sd] - lo[sd]) for sd in lo if sd in hi}
            if not change["adamw"] or not change["loft"]:
                continue
            diff = paired(change["adamw"], change["loft"])
            rows.append([TASK_NAMES[task], label, mean_sd(change["adamw"], 4), mean_sd(change["loft"], 4),
                         fmt_diff(diff), said(diff)])
    head = (f"**Claim 2: LoFT needs no alpha tuning** (the change of each arm's result between alpha = "
            f"{', '.join(sorted(spans)) or 'r and 4r'}; difference = AdamW's change - LoFT's, > 0 means LoFT "
            "changes less):")
    if not rows:
        return [head + " not run (budget, or `--alpha-tasks` empty).", ""]
    return [head, "", table(["task", "metric", "|Δ| AdamW LoRA", "|Δ| LoFT", "difference [95% CI]", "verdict"],
                            rows), ""]


def timing_runs(result: dict[str, Any]) -> list[Run]:
    return [r for r in result["runs"] if r["section"] == "timing" and "error" not in r and r.get("timing")]


def ratio_lines(result: dict[str, Any], tasks: list[str]) -> list[str]:
    """Step time and optimizer state of each arm as ratios to AdamW LoRA (the timing section's paired
    rounds; the runs' own state bytes)."""
    rows = []
    for t in timing_runs(result):
        ratios = t["timing"]["timing"]["ratios"]
        for arm, a in t["per_arm"].items():
            if arm == "adamw":
                continue
            r = ratios.get(f"{arm}/adamw")
            base = t["per_arm"]["adamw"]
            rows.append([t["model"], ARMS[arm].split(" (")[0],
                         f"{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}]" if r else "-",
                         f"{a['optimizer_step_ratio_median']:.1f}" if a.get("optimizer_step_ratio_median") else "-",
                         f"{a['state_bytes']:,} / {base['state_bytes']:,} = "
                         f"{a['state_bytes'] / base['state_bytes']:.2f}",
                         f"{a['adapter_state_bytes'] / base['adapter_state_bytes']:.2f}"])
    if not rows:
        return ["**Step time and optimizer state vs AdamW LoRA**: the timing section did not run.", ""]
    s = result["settings"]
    r = s["rank"]
    return ["**Step time and optimizer state vs AdamW LoRA** (paired interleaved training steps of the arms' "
            "trainers in one process, median of per-round ratios [IQR]; optimizer `step()` alone, median of "
            "per-round ratios; state bytes measured by `splice.optim.optimizer_state_bytes` after the steps, all "
            f"and without the head's AdamW state. LoFT keeps per factor its first moment, an r x r second moment per "
            f"column of A / row of B (r = {r} times the factor) and a copy: (r + 2) / 2 = {(r + 2) / 2:g}x AdamW's "
            "two moments):", "",
            table(["model", "arm", "training step x AdamW", "optimizer step x AdamW", "state bytes (all)",
                   "state x AdamW without head"], rows), ""]


def task_tables(result: dict[str, Any], task: str) -> list[str]:
    s, t = result["settings"], result["tasks"][task]
    m = metrics(result, task)
    steps = s["minilm_steps"] if t["model"] == "minilm" else s["smollm2_steps"]
    lines = [f"## {TASK_NAMES[task]} ({t['model']}, {steps} steps, batch {t['batch_size']}, max_length "
             f"{t['max_length']})", ""]
    keys = ["test_best", "test_final", "test_loss", "val_best", "val_loss_final", "loss_25", "loss_50", "loss_end",
            "delta_w"]
    rows = []
    base = {key: per_seed(main_runs(result, task, "adamw"), m[key][2]) for key in m}
    for arm in ARMS:
        runs = main_runs(result, task, arm)
        failed = main_runs(result, task, arm, failed=True)
        if not runs and not failed:
            continue
        diverged = sum(r["status"] != "finished" for r in runs)
        seeds = f"{len(runs)}" + (f" ({len(failed)} failed)" if failed else "") + (
            f" ({diverged} diverged)" if diverged else "")
        lr = runs[0]["lr"] if runs else failed[0]["lr"]
        rows.append([ARMS[arm].split(" (")[0], f"{lr:g}", seeds]
                    + [mean_sd(per_seed(runs, m[k][2]), 4) for k in keys])
    lines += ["Quality (the best-validation state is what the trainer restores and saves; the final state is the "
              "last step's):", "", table(["arm", "lr", "seeds", *[m[k][0] for k in keys]], rows), ""]
    rows = []
    for arm in ARMS:
        runs = main_runs(result, task, arm)
        if not runs:
            continue
        cells = [ARMS[arm].split(" (")[0], f"{runs[0]['trainable']:,}"]
        for key, digits in (("adapter_state_bytes", 0), ("step_s", 3), ("optimizer_ms", 2)):
            vals = per_seed(runs, m[key][2])
            ratio = paired_ratio(vals, base[key])
            cells += [mean_sd(vals, digits), ratio]
        rows.append(cells)
    lines += ["Cost (per run; step times of separate processes on a shared machine are unpaired: read the timing "
              "section's paired ratios; x AdamW is the median over seeds of the per-seed ratio):", "",
              table(["arm", "trainable params (head incl.)", "optimizer state bytes without head", "x AdamW",
                     "step s (mean, no eval steps)", "x AdamW", "optimizer step ms (median)", "x AdamW"], rows), ""]
    return lines


def paired_ratio(a: dict[int, float], b: dict[int, float]) -> str:
    ratios = [a[sd] / b[sd] for sd in a if sd in b and b[sd]]
    return f"{statistics.median(ratios):.2f}" if ratios else "-"


def timing_tables(result: dict[str, Any]) -> list[str]:
    rows = []
    for t in timing_runs(result):
        timing = t["timing"]["timing"]
        for arm, a in t["per_arm"].items():
            ab = timing["absolute"][arm]
            r = timing["ratios"].get(f"{arm}/adamw")
            rows.append([t["model"], ARMS[arm].split(" (")[0], f"{ab['median_s'] * 1e3:.0f}",
                         f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}], CPU {r['cpu_median']:.3f}" if r else "1",
                         f"{a['optimizer_step_median_s'] * 1e3:.2f}" if a.get("optimizer_step_median_s") else "-",
                         f"{a['state_bytes']:,}", f"{a['adapter_state_bytes']:,}", f"{a['trainable']:,}"])
    if not rows:
        return []
    n = timing_runs(result)[0]
    return ["## Step time, paired (timing section)", "",
            f"Each model's arms as trainers in one process, {n['rounds']} interleaved rounds after {n['warmup']} "
            f"warm-up (the order rotates), on the same batches; load average at the end "
            f"{n['loadavg'][0]:.1f}. A training step is the trainer's whole `step()`: batch, forward, backward, "
            "clipping and checks, optimizer, schedule.", "",
            table(["model", "arm", "step ms (median)", "x AdamW (median [IQR])", "optimizer step ms (median)",
                   "state bytes", "without head", "trainable params"], rows), ""]


def sweep_table(result: dict[str, Any], tasks: list[str]) -> list[str]:
    s = result["settings"]
    rows = []
    for task in tasks:
        chosen = chosen_lrs(result["runs"], s, task)
        m = metrics(result, task)
        for arm in SWEPT:
            if len(s.get(SWEPT[arm]) or []) < 2:
                continue
            for r in sorted(sweep_runs(result["runs"], s, task, arm), key=lambda r: r["lr"]):
                if "error" in r:
                    rows.append([TASK_NAMES[task], arm, f"{r['lr']:g}", f"failed: {r['error']}", "", "", "", "", ""])
                    continue
                pick = " (picked)" if r["lr"] == chosen[arm] else ""
                rows.append([TASK_NAMES[task], arm, f"{r['lr']:g}{pick}",
                             f"{m['val_best'][2](r):.4f}", str(r["best_step"]), _num(m["val_loss_final"][2](r)),
                             _num(m["loss_end"][2](r)), _num(m["test_best"][2](r)), r["status"]])
    if not rows:
        return []
    return [f"## Sweeps (seed {s['sweep_seed']})", "",
            table(["task", "arm", "lr", "best validation (accuracy, or loss)", "best step", "final validation loss",
                   "training loss, last 10%", "test (best state)", "status"], rows), ""]


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def alpha_table(result: dict[str, Any]) -> list[str]:
    r = result["settings"]["rank"]
    rows = []
    for task in tasks_run(result):
        alphas = alphas_run(result, task)
        if len(alphas) < 2:
            continue
        m = metrics(result, task)
        for arm in ("adamw", "loft"):
            for alpha in alphas:
                runs = main_runs(result, task, arm, alpha=alpha)
                if runs:
                    rows.append([TASK_NAMES[task], ARMS[arm].split(" (")[0], f"{alpha:g} ({alpha / r:g}r)",
                                 str(len(runs)), *[mean_sd(per_seed(runs, m[k][2]), 4)
                                                   for k in ("test_best", "val_loss_final", "loss_50", "delta_w")]])
    if not rows:
        return []
    return ["## Alpha runs (claim 2)", "",
            table(["task", "arm", "alpha", "seeds", "test (best state)", "final validation loss",
                   "training loss 40-50%", "|ΔW|"], rows), ""]


def loft_wins_losses(result: dict[str, Any], tasks: list[str]) -> list[str]:
    rows = []
    for task in tasks:
        m = metrics(result, task)
        for key in ("test_best", "test_final", "test_loss", "val_loss_final", "loss_25", "loss_50", "loss_end",
                    "step_s", "adapter_state_bytes"):
            label, higher, value = m[key]
            diff = paired(per_seed(main_runs(result, task, "loft"), value),
                          per_seed(main_runs(result, task, "adamw"), value))
            if diff is None:
                continue
            oriented = diff if higher else {**diff, "mean": -diff["mean"], "low": -diff["high"], "high": -diff["low"],
                                            "per_seed": {sd: -d for sd, d in diff["per_seed"].items()}}
            word = said(oriented)  # > 0: LoFT better
            outcome = {"yes": "LoFT wins", "no": "LoFT loses"}.get(word, word)
            outcome = outcome.replace("every seed above 0", "LoFT better on every seed")
            outcome = outcome.replace("every seed below 0", "LoFT worse on every seed")
            rows.append([TASK_NAMES[task], label, fmt_diff(diff, 4 if key != "adapter_state_bytes" else 0), outcome])
    if not rows:
        return []
    return ["## Where LoFT loses and where it wins (LoFT - AdamW LoRA, paired by seed)", "",
            "Step times here are of separate processes (unpaired); the timing section's paired ratio is the number "
            "to quote.", "", table(["task", "metric", "LoFT - AdamW [95% CI]", "reading"], rows), ""]


def oddities(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["runs"]:
        if r["section"] != "train":
            continue
        what = f"{r['task']} {r['arm']} lr {r['lr']:g} alpha {r['alpha']:g} seed {r['seed']}"
        if "error" in r:
            lines.append(f"- {what}: failed: {r['error']}")
        elif r["status"] != "finished" or r.get("skipped_steps"):
            lines.append(f"- {what}: {r['status']} after {r['steps_done']} steps, {r['skipped_steps']} skipped: "
                         f"{r['message'][:200]}")
        elif any(x is None for x in r["loss"]):
            lines.append(f"- {what}: non-finite training losses")
    return (["## Failed, diverged or non-finite runs", "", *lines, ""]) if lines else []


# ------------------------------------------------------------------------------------ the plot


def draw(result: dict[str, Any], path: Path) -> Path | None:
    """Per task: the training loss of each arm (moving average, mean over seeds, band from the
    lowest to the highest seed) and its validation loss at every evaluation (dashed, mean over seeds)."""
    from splice.io.figures import pyplot, save_png

    tasks = [t for t in tasks_run(result) if any(main_runs(result, t, arm) for arm in ARMS)]
    if not tasks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm in ARMS:
            runs = [r for r in main_runs(result, task, arm) if r["loss"]]
            if not runs:
                continue
            n = min(len(r["loss"]) for r in runs)
            width = max(1, n // 15)
            curves = [smooth(r["loss"][:n], width) for r in runs]
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            steps = list(range(1, n + 1))
            line = ax.plot(steps, mean, label=f"{ARMS[arm].split(' (')[0]} (lr {runs[0]['lr']:g})")[0]
            if len(curves) > 1:
                ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                                [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.15)
            evals = [[{"step": 0, **r["before"]["validation"]}, *r["evals"]] for r in runs]  # step 0: untrained
            at = sorted({e["step"] for each in evals for e in each})
            val = [statistics.fmean(e["loss"] for each in evals for e in each if e["step"] == st) for st in at]
            ax.plot(at, val, linestyle="--", marker="o", markersize=3, color=line.get_color())
        ax.set(title=f"{TASK_NAMES[task]}: training loss (solid, moving average), validation loss (dashed)",
               xlabel="optimizer step", ylabel="loss")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def smooth(values: list[float | None], width: int) -> list[float]:
    """Trailing moving average over `width` steps (non-finite values left out)."""
    out, window_values = [], []
    for v in values:
        window_values.append(v if v is not None and math.isfinite(v) else None)
        part = [x for x in window_values[-width:] if x is not None]
        out.append(statistics.fmean(part) if part else math.nan)
    return out
