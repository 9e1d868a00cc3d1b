"""bench_moe.py's rendering: the markdown report and the figure from the result JSON alone (`--render`
needs no model and measures nothing; a partial result, written while the benchmark runs, renders too)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from common_report import fmt_ratio, fmt_s, heading, mean_std, table, verdict

if TYPE_CHECKING:
    from bench_moe import Settings

BASELINE = "LoRA"
MOE_PATHS = ("dense", "grouped", "naive")
GOAL = 1.5  # the goal: a top-2-of-8 MoELoRA step at most 1.5x a LoRA step of the same total rank
TASKS = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News", "arithmetic": "SmolLM2 arithmetic"}
METRICS = {"rotten_tomatoes": "test accuracy", "bbc_news": "test accuracy", "arithmetic": "test exact match"}
PATH_NOTES = {"dense": 'compute="dense"', "grouped": 'compute="grouped"', "naive": "per-expert loop (Mixtral)"}


def when(section: dict[str, Any]) -> list[str]:
    """The date a section started, its load average at start and end, and the source it ran."""
    start, end = section["started"], section["ended"]
    return [start["date"], f"{start['loadavg'][0]:.2f} / {end['loadavg'][0]:.2f}",
            start.get("source", "not recorded")]


def load_range(result: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest 1-minute load average recorded: at the start and end of this invocation
    and of every section."""
    env = result["environment"]
    loads = [env["loadavg_start"][0], env.get("loadavg_end", env["loadavg_start"])[0]]
    loads += [sec[k]["loadavg"][0] for sec in result["sections"].values() for k in ("started", "ended") if k in sec]
    return min(loads), max(loads)


def shared_note(result: dict[str, Any]) -> str:
    """Which sections ran next to other work (a load average above this benchmark's threads + 0.5)."""
    threads = result["environment"]["torch_threads"]
    busy = [k for k, v in result["sections"].items()
            if max(v["started"]["loadavg"][0], v["ended"]["loadavg"][0]) > threads + 0.5]
    if not busy:
        return "no section ran next to other busy processes."
    return f"other processes (other benchmarks) shared the machine during {', '.join(busy)}."


def ratio_of(timing: dict[str, Any], num: str, den: str = BASELINE) -> dict[str, float] | None:
    return timing.get("ratios", {}).get(f"{num}/{den}")


# ----------------------------------------------------------------------------------- verdicts


def goal_lines(speed: dict[str, Any]) -> list[str]:
    """The 1.5x goal per target set at total rank 16: met when the IQR of the better MoE path's
    step ratio lies below 1.5."""
    lines = []
    for g in speed["groups"].values():
        if g["r"] != 16:
            continue
        train = g["train"]
        cells = []
        for path in ("dense", "grouped"):
            r = ratio_of(train, path)
            cells.append(f"{path} {r['median']:.2f}x [{r['q1']:.2f}-{r['q3']:.2f}]: {verdict(r['q1'], r['q3'], GOAL)}")
        best = min(("dense", "grouped"), key=lambda p: ratio_of(train, p)["median"])
        r = ratio_of(train, best)
        lines.append(f"- **{g['targets']}**, total rank 16: step at most {GOAL}x LoRA's? "
                     f"**{verdict(r['q1'], r['q3'], GOAL)}** with the {best} path. ({'; '.join(cells)}.)")
    return lines


def dmep_lines(dmep: dict[str, Any]) -> list[str]:
    lines = []
    for key, t in dmep["targets"].items():
        for compute in ("dense", "grouped"):
            r = ratio_of(t, f"{compute} after", f"{compute} before")
            lines.append(f"- **{key}, {compute}**: steps/s after pruning >= before (time ratio after/before <= 1)? "
                         f"**{verdict(r['q1'], r['q3'], 1.0)}**: {1 / r['median']:.2f}x the steps per second "
                         f"(time ratio {fmt_ratio(r)}).")
    return lines


def losses(sec: dict[str, Any]) -> list[str]:
    """Where MoELoRA loses to LoRA (and where not), read off the numbers."""
    lines = []
    if "speed" in sec:
        for name, g in sec["speed"]["groups"].items():
            parts = []
            for path in MOE_PATHS:
                t, i = ratio_of(g["train"], path), ratio_of(g["inference"], path)
                parts.append(f"{path} step {t['median']:.2f}x, inference {i['median']:.2f}x")
            lines.append(f"- Speed, {name}: {'; '.join(parts)} (LoRA = 1; slower where above 1).")
    if "memory" in sec:
        children = sec["memory"]["children"]
        for key in sorted({c.get("targets") for c in children.values() if "targets" in c}):
            base = children.get(f"{BASELINE} {key}", {})
            parts = [f"{path} {c['saved_mb'] / base['saved_mb']:.2f}x activations, "
                     f"{c['peak_mb'] / base['peak_mb']:.2f}x peak RSS"
                     for path in MOE_PATHS if "saved_mb" in (c := children.get(f"{path} {key}", {}))
                     and "saved_mb" in base]
            if parts:
                lines.append(f"- Memory, {key}, total rank 16: {'; '.join(parts)}.")
    if "accuracy" in sec:
        acc = sec["accuracy"]
        for data in acc["settings"]["tasks"]:
            b = acc["summary"].get(BASELINE, {}).get(data, {})
            if "mean" not in b:
                continue
            parts = []
            for name, row in acc["summary"].items():
                a = row.get(data, {})
                if name == BASELINE or "mean" not in a:
                    continue
                diff, spread = a["mean"] - b["mean"], a["std"] + b["std"]
                word = ("one seed: not resolved" if min(a["n"], b["n"]) < 2 else
                        "loses" if diff < 0 and -diff > spread else "wins" if diff > spread
                        else "within the seeds' spread")
                seeds = f", {a['n']} seed(s)" if a["n"] != b["n"] else ""
                parts.append(f"{name} {100 * diff:+.1f} points ({word}{seeds})")
            rows = acc["settings"]["eval_rows"][data]
            error = np.sqrt(b["mean"] * (1 - b["mean"]) / rows)  # of one run's rate on `rows` test rows
            lines.append(f"- {TASKS[data]} ({METRICS[data]}, LoRA {b['mean']:.1%} over {b['n']} seed(s); one run's"
                         f" binomial standard error on {rows} test rows: {100 * error:.1f} points): "
                         + "; ".join(parts) + ".")
    return lines


# ------------------------------------------------------------------------------------ sections


def speed_md(speed: dict[str, Any]) -> list[str]:
    st = speed["settings"]
    lines = [f"MiniLM sequence classification, one batch of {speed['batch'][0]} x {speed['batch'][1]} tokens of"
             f" real Rotten Tomatoes reviews ({speed['real_token_share']:.0%} real tokens, the rest padding; the"
             " compute is that of the full batch), head trained. *Step*: forward + backward + AdamW, train mode,"
             " the balancing loss added; *inference*: one forward in eval mode under `torch.inference_mode`"
             f" ({st['infer_calls']} per round). All four models in one process, {st['train_rounds']} training and"
             f" {st['infer_rounds']} inference rounds in rotating order after {st['warmup']} warm-up; the ratio is"
             " the median of per-round ratios to LoRA of the same total rank [Q1-Q3]. Every MoELoRA is top-2 of 8"
             " experts; its total rank r is split into experts of rank r/8.", ""]
    rows = []
    for name, g in speed["groups"].items():
        for path in ("LoRA", *MOE_PATHS):
            params = g["parameters"][path]["adapter"]
            t, i = g["train"], g["inference"]
            cells = (["1 (baseline)", "1", "1 (baseline)"] if path == BASELINE else
                     [fmt_ratio(ratio_of(t, path)), f"{ratio_of(t, path)['cpu_median']:.2f}",
                      fmt_ratio(ratio_of(i, path))])
            label = f"LoRA r={g['r']}" if path == BASELINE else PATH_NOTES[path]
            rows.append([name, label, *cells, fmt_s(t["absolute"][path]), fmt_s(i["absolute"][path]),
                         f"{params:,}"])
    lines += [table(["total rank, targets", "candidate", "step vs LoRA [IQR]", "(CPU time)",
                     "inference vs LoRA [IQR]", "step ms (min / med)", "inference ms (min / med)",
                     "adapter params"], rows), ""]
    for name, g in speed["groups"].items():
        gd, nd = ratio_of(g["train"], "grouped", "dense"), ratio_of(g["train"], "naive", "dense")
        gi, ni = ratio_of(g["inference"], "grouped", "dense"), ratio_of(g["inference"], "naive", "dense")
        lines.append(f"- {name}: grouped / dense step {fmt_ratio(gd)}, inference {fmt_ratio(gi)}; naive loop /"
                     f" dense step {fmt_ratio(nd)}, inference {fmt_ratio(ni)}. Loss at equal weights: the three"
                     f" MoELoRA paths differ by at most {g['max_loss_diff_vs_dense']:.1e}.")
    return lines + [""]


def layer_md(layer: dict[str, Any]) -> list[str]:
    st = layer["settings"]
    n_in, n_out = layer["shape"]
    lines = [f"One Linear {n_in} -> {n_out} alone (MiniLM's intermediate shape), {layer['rows']} rows of random"
             f" input, forward + backward of the layer's output (no optimizer), {st['layer_rounds']} rounds of"
             f" {st['layer_calls']} call(s) per candidate. Median per-round ratio [Q1-Q3].", ""]
    rows = []
    for r, res in layer["ranks"].items():
        rows.append([f"{r} (experts of rank {int(r) // 8})", *[fmt_ratio(ratio_of(res, p)) for p in MOE_PATHS],
                     fmt_ratio(ratio_of(res, "grouped", "dense")), fmt_s(res["absolute"][BASELINE]),
                     f"{res['max_diff_vs_dense']:.1e}"])
    return lines + [table(["total rank", "dense / LoRA", "grouped / LoRA", "naive / LoRA", "grouped / dense",
                           "LoRA ms (min / med)", "max output diff vs dense"], rows), ""]


def dmep_md(dmep: dict[str, Any]) -> list[str]:
    st = dmep["settings"]
    lines = [f"MiniLM, the speed section's batch, MoELoRA top-2 of 8, total rank 16 (dense and grouped) as built,"
             f" and a copy with {dmep['kept']} of the 8 routed experts of every module kept"
             f" (`prune_experts`); one training step each, {st['dmep_rounds']} interleaved rounds. Time ratio ="
             " median of per-round (after / before) [Q1-Q3]; steps/s from the median times.", ""]
    rows = []
    for key, t in dmep["targets"].items():
        for compute in ("dense", "grouped"):
            before, after = t["absolute"][f"{compute} before"], t["absolute"][f"{compute} after"]
            r = ratio_of(t, f"{compute} after", f"{compute} before")
            rows.append([key, compute, f"{t['parameters'][f'{compute} before']['adapter']:,} ->"
                         f" {t['parameters'][f'{compute} after']['adapter']:,}",
                         f"{1 / before['median_s']:.2f}", f"{1 / after['median_s']:.2f}", fmt_ratio(r),
                         verdict(r["q1"], r["q3"], 1.0)])
    return lines + [table(["targets", "compute", "adapter params before -> after", "steps/s before",
                           "steps/s after", "time after / before [IQR]", "faster after?"], rows), ""]


def memory_md(mem: dict[str, Any]) -> list[str]:
    children = mem["children"]
    rows = []
    for kind, c in children.items():
        if "error" in c:
            rows.append([kind, f"failed: {c['error']}", "", "", ""])
            continue
        base = children.get(f"{BASELINE} {c['targets']}", {})
        saved, peak = (f" ({c[k] / base[k]:.2f}x)" if k in base else "" for k in ("saved_mb", "peak_mb"))
        rows.append([kind, f"{c['saved_mb']:.1f}{saved}", f"{c['step_delta_mb']:.1f}", f"{c['peak_mb']:.0f}{peak}",
                     f"{c['adapter']:,}"])
    return [f"One fresh process per configuration (total rank 16), the speed section's batch: a warm-up step, the"
            f" RSS high-water mark reset, {mem['steps']} training step(s), then one forward under"
            " `saved_for_backward`. *Saved for backward*: the bytes autograd keeps for one step's backward"
            " (weights excluded; deterministic). *Step increase*: VmHWM during the steps minus the RSS before them."
            " *Peak RSS*: the process's high-water mark (VmHWM; imports, model, optimizer and the steps)."
            f" ({', '.join(f'{k}={v}' for k, v in mem['malloc_env'].items())}.)", "",
            table(["configuration", "saved for backward MB (vs LoRA)", "step increase MB", "peak RSS MB (vs LoRA)",
                   "adapter params"], rows), ""]


def accuracy_md(acc: dict[str, Any]) -> list[str]:
    st = acc["settings"]
    tasks = st["tasks"]
    runs = acc["runs"]
    lines = [budget_paragraph(st), "", *[f"- **{name}** `{v['adapter']}`"
                                         f"{', schedule `' + str(v['schedule']) + '`' if v['schedule'] else ''},"
                                         f" lr {v['lr']:g}: {v['why']}." for name, v in acc["variants"].items()], ""]
    rows = []
    for name, row in acc["summary"].items():
        cells, params, times = [], [], []
        for data in tasks:
            a = row[data]
            cells.append(seed_cell(a))
            params.append(f"{a['trainable']:,}" if "trainable" in a else "-")
            t = a.get("train_time_vs_lora")
            times.append("1" if name == BASELINE and "mean" in a else f"{t:.2f}x" if t else "-")
        rows.append([name, f"{acc['variants'][name]['lr']:g}", *cells, " / ".join(params), " / ".join(times)])
    header = ["variant", "lr", *[f"{TASKS[d]} {METRICS[d]}" for d in tasks],
              f"trainable params ({' / '.join(TASKS[d] for d in tasks)})", "training time vs LoRA (same order)"]
    lines += [table(header, rows), "",
              "Trainable parameters include the classification head on MiniLM ((384 + 1) x classes); DMEP's count"
              " is after its pruning (the mean over seeds; before pruning it is MoE default's)."
              " *Training time vs LoRA*: the median over seeds of the run's"
              " training seconds over the LoRA run of the same task and seed, which ran just before it in another"
              " process: unpaired within a run, so the load of the moment moves it; the speed section's paired"
              " ratios are the trustworthy cost.", ""]
    lines += pruning_md(runs, tasks)
    lines += ["### Runs in detail", "", table(
        ["variant", "task", "seed", "test", "validation", "test before training", "kept step", "train loss (last 5)",
         "training s", "run s"],
        [[r["variant"], TASKS[r["data"]], str(r["seed"]), *([f"failed: {r['error']}"] + [""] * 5 if "error" in r else
          [f"{r['test_accuracy']:.1%}", f"{r['validation']:.1%}", f"{r['test_before']:.1%}", str(r["best_step"]),
           f"{r['last_loss']:.3f}", f"{r['train_s']:.0f}"]), f"{r.get('total_s', 0):.0f}"] for r in runs]), ""]
    ran = {}
    for r in runs:
        if "error" not in r:
            ran.setdefault((r["data"], r["variant"]), []).append(r["seed"])
    sources: dict[str, int] = {}
    for r in runs:
        key = r.get("source", "a source not recorded (see the notes)")
        sources[key] = sources.get(key, 0) + 1
    lines += ["**Splice source of the runs**: " + "; ".join(f"{n} run(s) on {k}" for k, n in sources.items()) + ".",
              ""]
    lines += ["**What ran**: " + "; ".join(
        f"{TASKS[d]}: " + ", ".join(f"{v} seeds {sorted(seeds)}" for (dd, v), seeds in ran.items() if dd == d)
        for d in tasks if any(dd == d for dd, _ in ran)) + "."]
    if acc["not_run"]:
        lines += ["", f"**Not run** (the {st['budget_min']:g}-minute budget): " + "; ".join(
            f"{j['variant']} on {TASKS[j['data']]} seed {j['seed']}" for j in acc["not_run"]) + "."]
    return lines + [""]


def seed_cell(a: dict[str, Any]) -> str:
    """"mean ± std (n=3)" of a `seed_summary` cell; one seed has no spread to show."""
    if "mean" in a and a["n"] == 1:
        return f"{a['mean']:.1%} (1 seed)"
    return f"{mean_std(a)} (n={a['n']})" if "mean" in a else mean_std(a)


def pruning_md(runs: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """DMEP's pruning per task: the share of adapter parameters removed per seed and the experts
    kept per module kind (mean over modules and seeds)."""
    lines = []
    for data in tasks:
        pruned = [r for r in runs if r["data"] == data and r.get("pruning")]
        if not pruned:
            continue
        kinds: dict[str, list[float]] = {}
        for r in pruned:
            for kind, kept in r["pruning"]["mean_experts_kept"].items():
                kinds.setdefault(kind, []).append(kept)
        shares = ", ".join(f"{1 - r['pruning']['after'] / r['pruning']['before']:.0%}" for r in pruned)
        lines.append(f"- {TASKS[data]}: pruned at step {pruned[0]['pruning']['step']}; adapter parameters removed"
                     f" per seed {shares}; routed experts kept per module (of 8), mean: "
                     + ", ".join(f"{kind} {np.mean(v):.1f}" for kind, v in kinds.items()) + ".")
    if lines:
        lines = ["DMEP's pruning. With keep_mass 0.9 a module loses experts only when the others hold 90% of its"
                 " routed slots; while the balancing loss is on, routing stays near uniform (12.5% each: 7 of 8"
                 " hold 87.5%), so little goes:", "", *lines, ""]
    return lines


def budget_paragraph(st: dict[str, Any]) -> str:
    per_task = "; ".join(
        f"{TASKS[d]}: {st['steps'][d]} steps, max length {st['max_length'][d]}, first {st['eval_rows'][d]}"
        f" validation and test rows, seeds {', '.join(map(str, st['seeds'][d]))}" for d in st["tasks"])
    return ("**Budget, the same for every variant**: `splice.train.run`, batch"
            f" {st['train_batch']}, AdamW (weight decay 0.01), cosine schedule with 6% warm-up, gradient clipping"
            f" 1.0, evaluation at step 0 and at the end, the better on validation kept (DMEP restarts that"
            f" choice when it prunes); MiniLM's fresh head trained at lr {st['head_lr']:g}. {per_task}. One fresh"
            f" process per run, one at a time, {st['threads']} thread. All adapters on the architectures' default"
            " targets (query/value on MiniLM, q_proj/v_proj on SmolLM2), total rank 16. SmolLM2's metric is greedy"
            " exact match of the answer (loss on the answer only in training); the trainer keeps its checkpoint by"
            " validation loss there, by validation accuracy on MiniLM.")


def markdown(result: dict[str, Any], s: Settings | None = None) -> str:
    sec = result["sections"]
    env = result["environment"]
    low, high = load_range(result)
    out = [*heading("MoELoRA (mixture of LoRA experts) vs LoRA of the same total rank on CPU", env),
           f"This invocation ran {result.get('runtime_s', 0) / 60:.1f} min (sections from earlier invocations are"
           f" kept with `--merge`; each says when it ran). "
           f"{'QUICK smoke run: too few steps and rounds to trust. ' if result['settings']['quick'] else ''}"
           f"**Load**: 1-minute load averages from {low:.1f} to {high:.1f} on {env['cpu_count']} cores (per section"
           f" below). This benchmark keeps {env['torch_threads']} core(s) busy, so more than that is other work:"
           f" {shared_note(result)} Paired, interleaved ratios are robust to sharing; absolute times and the"
           " unpaired training times are not.", "",
           table(["section", "started", "load average at start / end", "splice source (git)"],
                 [[k, *when(v)] for k, v in sec.items()]), ""]
    if result.get("notes"):
        out += ["**Notes**:", "", *[f"- {n['date']}: {n['text']}" for n in result["notes"]], ""]
    if "speed" in sec or "dmep" in sec:
        out += ["## Verdicts", ""]
        if "speed" in sec:
            out += [f"Goal of the issue: a top-2-of-8 MoELoRA training step at most {GOAL}x a LoRA step of the"
                    " same total rank (16) on CPU; met only if the whole IQR of the better path is below it.", "",
                    *goal_lines(sec["speed"]), ""]
        if "dmep" in sec:
            out += ["DMEP spec test (d)5: steps per second after pruning half the routed experts >= before.", "",
                    *dmep_lines(sec["dmep"]), ""]
    if any(k in sec for k in ("speed", "memory", "accuracy")):
        out += ["## Where MoELoRA loses, and where not", "",
                "Accuracy: a loss or a win when the difference of means exceeds the sum of the two standard"
                " deviations; otherwise it is within the seeds' spread (not resolved).", "", *losses(sec), ""]
    if "speed" in sec:
        out += ["## Speed: training step and inference, MoELoRA paths vs LoRA", "", *speed_md(sec["speed"])]
    if "layer" in sec:
        out += ["## One layer: where each compute path wins", "", *layer_md(sec["layer"])]
    if "dmep" in sec:
        out += ["## DMEP (d)5: steps per second before and after pruning", "", *dmep_md(sec["dmep"])]
    if "memory" in sec:
        out += ["## Memory of a few training steps", "", *memory_md(sec["memory"])]
    if "accuracy" in sec:
        out += ["## Accuracy at equal total rank 16", "", *accuracy_md(sec["accuracy"])]
    if "speed" in sec or "accuracy" in sec:
        stem = "moe_quick" if result["settings"]["quick"] else "moe"
        out += [f"![step time ratios and accuracies]({stem}.png)", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------- figure


def draw(result: dict[str, Any], path: Path) -> Path | None:
    """Training step time vs LoRA per path (IQR bars), the one-layer sweep over total ranks and
    accuracy per variant (std bars), as far as the sections ran; None when none did."""
    from splice.io.figures import pyplot, save_png

    sec = result["sections"]
    panels = {"speed": speed_panel, "layer": layer_panel, "accuracy": accuracy_panel}
    shown = [k for k in panels if k in sec]
    if not shown:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.4), squeeze=False)
    for ax, key in zip(axes[0], shown, strict=True):
        panels[key](ax, sec[key])
    fig.tight_layout()
    return save_png(fig, path)


def speed_panel(ax: Any, speed: dict[str, Any]) -> None:
    groups = list(speed["groups"])
    x = np.arange(len(groups))
    width = 0.8 / len(MOE_PATHS)
    for i, path in enumerate(MOE_PATHS):
        r = [ratio_of(speed["groups"][g]["train"], path) for g in groups]
        med = np.array([v["median"] for v in r])
        err = np.array([[m - v["q1"] for m, v in zip(med, r, strict=True)],
                        [v["q3"] - m for m, v in zip(med, r, strict=True)]])
        ax.bar(x + (i - 1) * width, med, width, yerr=err, capsize=3, label=PATH_NOTES[path])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(GOAL, color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL}x")
    ax.set_xticks(x, [g.replace(" ", "\n", 1) for g in groups])
    ax.set_ylabel("training step time / LoRA's (median, IQR)")
    ax.set_title("MiniLM training step, top-2 of 8 experts")
    ax.legend(fontsize=8)


def layer_panel(ax: Any, layer: dict[str, Any]) -> None:
    ranks = list(layer["ranks"])
    for path in MOE_PATHS:
        r = [ratio_of(layer["ranks"][k], path) for k in ranks]
        med = np.array([v["median"] for v in r])
        err = np.array([[m - v["q1"] for m, v in zip(med, r, strict=True)],
                        [v["q3"] - m for m, v in zip(med, r, strict=True)]])
        ax.errorbar(range(len(ranks)), med, yerr=err, marker="o", capsize=3, label=PATH_NOTES[path])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ranks)), [f"{k}\n(experts of rank {int(k) // 8})" for k in ranks])
    ax.set_xlabel("total rank")
    ax.set_ylabel("forward + backward time / LoRA's (median, IQR)")
    n_in, n_out = layer["shape"]
    ax.set_title(f"One Linear {n_in} -> {n_out}, {layer['rows']} rows")
    ax.legend(fontsize=8)


def accuracy_panel(ax: Any, acc: dict[str, Any]) -> None:
    tasks = acc["settings"]["tasks"]
    names = list(acc["summary"])
    x = np.arange(len(tasks))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        cells = [acc["summary"][name][d] for d in tasks]
        means = [c.get("mean", np.nan) for c in cells]
        stds = [c.get("std", 0.0) for c in cells]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(x, [f"{TASKS[d]}\n({METRICS[d]})" for d in tasks])
    ax.set_ylabel("mean over seeds (bars: std)")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy at total rank 16")
    ax.legend(fontsize=8)
