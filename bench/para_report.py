"""bench_para.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench_para import DATA, METHODS, MODELS
from common_report import heading, table

if TYPE_CHECKING:
    from bench_para import Settings


def metric_of(task: str) -> tuple[str, str]:
    return ("accuracy", "accuracy") if task == "classification" else ("exact_match", "exact match")


def fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def type_label(kind: str) -> str:
    """`bert.encoder.layer.N.attention.self.query` -> `attention.self.query`."""
    return kind.split(".N.", 1)[-1]


def ranks_line(ranks_by_type: dict[str, list[int]]) -> str:
    return ", ".join(f"{type_label(k)} {sum(v) / len(v):.1f}" for k, v in ranks_by_type.items())


def render(runs: list[dict[str, Any]], s: Settings, env: dict[str, Any], runtime: float) -> str:
    good = [r for r in runs if "error" not in r]
    lines = [*heading("PARA: post-training rank compression of real LoRAs (CPU)", env),
             f"Runtime {runtime / 60:.1f} min, {s.jobs} worker processes of 1 torch thread each."
             + (" **Quick smoke run: too little training and too few rows to read anything into.**"
                if s.quick else ""), "", *method_md(s)]
    lines += ["## Accuracy after compression", "", accuracy_table(good), ""]
    lines += ["## Ranks PARA chose (global), mean per module type", "", ranks_table(good), ""]
    lines += ["## Budget curve (global)", "", "`para.png`: the metric against the factor parameters kept.", "",
              curve_table(good), ""]
    lines += ["## Training", "", training_table(good), ""]
    failed = [r for r in runs if "error" in r]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r['model']} / {r['data']} r={r['r']}: {r['error']}" for r in failed]
        lines.append("")
    lines += ["## Verdict", ""] + verdict(good, s) + [""]
    return "\n".join(lines)


def method_md(s: Settings) -> list[str]:
    """How the adapters were trained, compressed and evaluated."""
    return [
        "**Setup.** `splice.train.run`, LoRA on all linear layers, alpha = 2r, AdamW with 10% warm-up and a "
        f"cosine schedule, seed {s.seed}. MiniLM (37 modules) with a classification head trained in full: "
        f"Rotten Tomatoes {s.steps['rotten_tomatoes']} steps and BBC News {s.steps['bbc_news']} steps of batch "
        f"{s.batch}, max length {s.max_length['rotten_tomatoes']} / {s.max_length['bbc_news']} tokens, lr "
        f"{s.lr['minilm']:g}, head lr {s.head_lr:g}. SmolLM2-135M (210 modules) on the arithmetic word problems: "
        f"{s.steps['arithmetic']} steps of batch 8, max length {s.max_length['arithmetic']}, lr {s.lr['smollm2']:g}. "
        "Training is kept short so the whole benchmark runs in about 30 minutes on two cores; the adapters "
        "are therefore not converged (see the uncompressed metric).",
        "",
        "**Compression** (data-free, `splice.compression.para`). *global*: PARA, one threshold over the pooled "
        "singular values, largest set within the budget. *per-module*: every module keeps the same fraction of "
        "its own energy, the largest fraction that fits in the global result's parameter count. *uniform*: rank "
        "k = round(budget * r) in every module. Parameters are the LoRA factors (heads, trained in full, are kept "
        "and not counted). *kept*: share of the factor parameters kept; *energy*: share of sum sigma^2 kept.",
        "",
        "**Evaluation.** Test split: "
        + (f"first {s.eval_rows} rows" if s.eval_rows else "all rows (Rotten Tomatoes 488, BBC News 223)")
        + f" for MiniLM, the first {s.lm_eval_rows} arithmetic problems for SmolLM2 (greedy exact match of "
        "the answer, and the loss on the answer tokens). *agree*: share of rows whose predicted class equals "
        "the uncompressed adapter's. Differences of a point or two in accuracy on a few hundred rows are "
        "within noise (one row of Rotten Tomatoes is 0.2 points, of BBC News 0.45, of arithmetic "
        f"{100 / max(s.lm_eval_rows, 1):.1f}); agreement and loss are the sensitive measures.",
        "",
    ]


def run_label(run: dict[str, Any]) -> str:
    return f"{MODELS[run['model']]} / {DATA[run['data']]}"


def accuracy_table(runs: list[dict[str, Any]]) -> str:
    """Every adapter, budget and method: what was kept and the metric against the uncompressed one."""
    rows = []
    for run in runs:
        task = "causal_lm" if run["model"] == "smollm2" else "classification"
        key, label = metric_of(task)
        base = run["uncompressed"]
        for budget, variants in run["budgets"].items():
            for method in METHODS:
                v = variants[method]
                value = v["metrics"].get(key)
                change = None if value is None else (value - base[key]) * 100
                extra = (f"{v['agreement']:.1%}" if task == "classification"
                         else f"{v['metrics']['loss']:.3f} (was {base['loss']:.3f})")
                rows.append([run_label(run), str(run["r"]), f"{label} {fmt_metric(base[key])}", budget, method,
                             f"{v['kept']:.1%}", f"{v['retained_energy']:.1%}", fmt_metric(value),
                             f"{change:+.1f} pt", extra])
    return table(["model / data", "r", "uncompressed", "budget", "method", "kept", "energy", "metric", "change",
                  "agree / loss"], rows)


def ranks_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        for budget, variants in run["budgets"].items():
            rows.append([run_label(run), str(run["r"]), budget,
                         ranks_line(variants["global"]["ranks_by_type"])
                         + (f"; {variants['global']['dropped']} modules dropped"
                            if variants["global"]["dropped"] else "")])
    return table(["model / data", "r", "budget", "mean rank by module type"], rows)


def curve_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        task = "causal_lm" if run["model"] == "smollm2" else "classification"
        key, _ = metric_of(task)
        cells = [f"{p['budget']:g}: {fmt_metric(p['metrics'].get(key))}" for p in run["curve"]]
        rows.append([run_label(run), str(run["r"]), fmt_metric(run["uncompressed"].get(key)), "; ".join(cells)])
    return table(["model / data", "r", "uncompressed", "budget: metric"], rows)


def training_table(runs: list[dict[str, Any]]) -> str:
    rows = [[run_label(run), str(run["r"]), str(run["train"]["steps"]), f"{run['parameters']:,}",
             f"{run['train']['train_s']:.0f} s", f"{run['eval_s']:.0f} s", str(run["train"]["best_step"])]
            for run in runs]
    return table(["model / data", "r", "steps", "adapter parameters", "training", "evaluations", "best step"], rows)


def verdict(runs: list[dict[str, Any]], s: Settings) -> list[str]:
    """Sentences read off the numbers: is global PARA within 1 point at 75% / 90% fewer parameters,
    how far do its predictions move, and is it better than uniform truncation?"""
    out = []
    for budget in map(str, s.budgets):
        drops, wins, agreements, losses = [], 0, [], []
        for run in runs:
            task = "causal_lm" if run["model"] == "smollm2" else "classification"
            key, _ = metric_of(task)
            variants = run["budgets"][budget]
            base = run["uncompressed"][key]
            drops.append((f"{MODELS[run['model']]}/{DATA[run['data']]} r={run['r']}",
                          (variants["global"]["metrics"][key] - base) * 100))
            wins += variants["global"]["metrics"][key] >= variants["uniform"]["metrics"][key]
            if task == "classification":
                agreements.append(variants["global"]["agreement"])
            else:
                losses.append(f"{run['uncompressed']['loss']:.3f} -> {variants['global']['metrics']['loss']:.3f}"
                              f" (r={run['r']})")
        within = [n for n, d in drops if d >= -1.0]
        worst = min(drops, key=lambda x: x[1])
        line = (f"- budget {budget} ({1 - float(budget):.0%} fewer factor parameters): global PARA is within 1 "
                f"point of the uncompressed metric in {len(within)} of {len(drops)} adapters; largest drop "
                f"{worst[1]:+.1f} points ({worst[0]}); at least as good as uniform truncation in {wins} of "
                f"{len(drops)}")
        if agreements:
            line += f"; MiniLM predictions agree with the uncompressed adapter's on {min(agreements):.1%}-" \
                    f"{max(agreements):.1%} of the rows"
        if losses:
            line += "; SmolLM2 answer loss " + ", ".join(losses)
        out.append(line + ".")
    return out


def plot(runs: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in runs if "error" not in r]
    panels = sorted({(r["model"], r["data"]) for r in good}, key=lambda k: list(DATA).index(k[1]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False, layout="constrained")
    for ax, (model_name, data) in zip(axes.flat, panels, strict=True):
        task = "causal_lm" if model_name == "smollm2" else "classification"
        key, label = metric_of(task)
        for run in (r for r in good if (r["model"], r["data"]) == (model_name, data)):
            color = "C0" if run["r"] == 16 else "C1"
            points = sorted([(p["kept"], p["metrics"][key]) for p in run["curve"]] + [(1.0, run["uncompressed"][key])])
            ax.plot(*zip(*points, strict=True), marker="o", color=color, label=f"r={run['r']} global")
            for method, marker in (("uniform", "s"), ("per-module", "^")):
                pts = [(v[method]["kept"], v[method]["metrics"][key]) for v in run["budgets"].values()]
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, facecolors="none",
                           label=f"r={run['r']} {method}")
            ax.axhline(run["uncompressed"][key], ls="--", lw=0.7, color=color)
        ax.set_xscale("log")
        ax.set(xlabel="share of factor parameters kept", ylabel=label, title=f"{MODELS[model_name]} / {DATA[data]}")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
