"""PARA on real trained adapters: how much of a LoRA can be cut after training, without data?

The claim checked (PARA, arXiv 2604.27796, ../shared/methods/volume-1.md §7): a LoRA trained at a
generous rank can lose 75-90% of its parameters to a data-free SVD with one global threshold
while keeping its accuracy (the summary says: losing under 1%).

What it does:

train        `splice.train.run` (the project's trainer) on the bundled models and data:
             MiniLM (BERT, 6 layers, hidden 384) with LoRA on all linear layers (query, key,
             value, attention output, intermediate, output of every layer and the pooler: 37
             modules), classification head trained, on Rotten Tomatoes and BBC News; SmolLM2-135M
             (30 layers) with LoRA on all linear layers (q, k, v, o, gate, up, down: 210 modules)
             on the bundled arithmetic word problems (causal-LM SFT, loss on the answer only).
             Ranks 16 and 32, alpha = 2r. Runs go to `--jobs` worker processes of one thread each.
compress     each adapter at budgets 0.25 and 0.1 of its factor parameters (75% and 90% fewer),
             three ways:
               global      PARA: one threshold over all modules' singular values
               per-module  each module keeps the same fraction f of its own energy, f chosen as
                           the largest that fits in the global result's parameter count
               uniform     plain truncation to the same rank k everywhere, k = round(budget * r)
                           (r=16, budget 0.1: k=2, 12.5% of the parameters, more than the others)
             plus the global sweep 0.5 / 0.25 / 0.1 / 0.05 for the curve (SmolLM2: 0.5 / 0.25 / 0.1).
evaluate     the test split of each data set (all rows for MiniLM; SmolLM2: `--lm-eval-rows`
             rows), each compressed adapter attached to the base model with
             `splice.io.peft_format.attach_state`: accuracy and loss (classification; the
             project's metric code `splice.train.tasks.stats_from_logits`) plus the share of
             rows whose predicted class is the uncompressed adapter's (agreement, a far less
             noisy measure of change than an accuracy difference on a few hundred rows); for
             the causal LM the project's `splice.train.loop.evaluate` (answer loss and greedy
             exact match).

Results: bench/results/para.{json,md} and para.png (metric against parameters kept, one panel per
adapter). `--quick` is a smoke run (few steps, few rows): para_quick.*, not to be read as results.

    .venv/bin/python bench/bench_para.py            # 37.5 min measured at load average 4-5 on 2 cores
    .venv/bin/python bench/bench_para.py --quick    # ~4-6 min (BBC News and SmolLM2 only)
    .venv/bin/python bench/bench_para.py --render bench/results/para.json   # redo .md and .png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, Phases, environment, environment_line, seed_everything, table, write_results

MODELS = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M"}
DATA = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News", "arithmetic": "arithmetic"}
METHODS = ("global", "per-module", "uniform")


@dataclass
class Settings:
    """What to train and how much to measure; `--quick` shrinks it to a smoke run."""

    jobs: int = 2
    ranks: list[int] = field(default_factory=lambda: [16, 32])
    runs: list[tuple[str, str]] = field(default_factory=lambda: [
        ("minilm", "rotten_tomatoes"), ("minilm", "bbc_news"), ("smollm2", "arithmetic")])
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.1])
    curve: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1, 0.05])
    lm_curve: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])  # SmolLM2: each eval ~45 s
    steps: dict[str, int] = field(default_factory=lambda: {"rotten_tomatoes": 120, "bbc_news": 100,
                                                           "arithmetic": 60})
    batch: int = 16
    max_length: dict[str, int] = field(default_factory=lambda: {"rotten_tomatoes": 40, "bbc_news": 48,
                                                                "arithmetic": 48})
    lr: dict[str, float] = field(default_factory=lambda: {"minilm": 1e-3, "smollm2": 1e-3})
    head_lr: float = 1e-2
    eval_rows: int | None = None  # MiniLM test rows (None: the whole split)
    lm_eval_rows: int = 64  # SmolLM2 test rows (greedy generation is the slow part)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Settings:
        # BBC News only for MiniLM: in a few steps its validation accuracy beats step 0's, while on
        # Rotten Tomatoes the trainer may keep its step-0 checkpoint (B = 0: nothing to compress)
        return cls(ranks=[16], runs=[("minilm", "bbc_news"), ("smollm2", "arithmetic")],
                   steps={"rotten_tomatoes": 10, "bbc_news": 6, "arithmetic": 4}, batch=8,
                   curve=[0.5, 0.25, 0.1], lm_curve=[0.5], eval_rows=48, lm_eval_rows=8, quick=True)


# ----------------------------------------------------------------------------------- one adapter


def evaluator(model_name: str, data: str, s: Settings):
    """(base model, evaluate(state) -> metrics and predictions) for one model and data set."""
    from torch.utils.data import DataLoader

    from splice.core.api import detach
    from splice.io.peft_format import attach_state
    from splice.train import TrainConfig
    from splice.train.data import collator, load_eval_rows
    from splice.train.loop import evaluate
    from splice.train.tasks import load_model, stats_from_logits

    task = "causal_lm" if model_name == "smollm2" else "classification"
    config = TrainConfig(model=model_name, task=task, data=data, batch_size=32, max_length=s.max_length[data],
                         max_eval_examples=s.lm_eval_rows if task == "causal_lm" else s.eval_rows)
    rows = load_eval_rows(config, "test")
    model, tokenizer = load_model(config, rows.label_names)
    model.eval()
    collate = collator(task, tokenizer, config.max_length)
    loader = DataLoader(rows.test, batch_size=config.batch_size, collate_fn=collate)

    def score(state: Any) -> dict[str, Any]:
        attach_state(model, state, "para")
        try:
            if task == "causal_lm":
                return evaluate(model, tokenizer, rows.test, config)
            stats, predictions = {"loss": [], "correct": []}, []
            with torch.inference_mode():
                for batch in loader:
                    out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    for key, value in stats_from_logits(task, out, batch["labels"]).items():
                        stats[key].append(value)
                    predictions.append(out.argmax(-1))
            return {"loss": torch.cat(stats["loss"]).mean().item(),
                    "accuracy": torch.cat(stats["correct"]).mean().item(), "predictions": torch.cat(predictions)}
        finally:
            detach(model, "para")

    return task, len(rows.test), score


def matched_per_module(state: Any, parameters: int) -> Any:
    """Per-module energy allocation: the largest common energy fraction whose factor parameters fit
    in `parameters` (found by bisection over the fractions where some module's rank changes)."""
    from splice.compression.para import compress, module_svd

    cuts = set()
    for update in state.modules.values():
        energy = module_svd(update).S.square()
        if energy.sum() > 0:
            cuts.update((energy.cumsum(0) / energy.sum()).clamp(max=1.0).tolist())
    cuts = sorted(c for c in cuts if c > 0)
    low, high = 0, len(cuts) - 1
    best = compress(state, energy=cuts[0], allocation="per-module")
    while low <= high:
        mid = (low + high) // 2
        result = compress(state, energy=cuts[mid], allocation="per-module")
        if result.factor_parameters_after <= parameters:
            best, low = result, mid + 1
        else:
            high = mid - 1
    return best


def entry(result: Any, metrics: dict[str, Any], reference: dict[str, Any], task: str) -> dict[str, Any]:
    """One compressed adapter's numbers; classification adds agreement with the uncompressed one."""
    row = {"parameters": result.parameters_after, "factor_parameters": result.factor_parameters_after,
           "kept": result.factor_parameters_after / result.factor_parameters_before,
           "retained_energy": result.retained_energy, "threshold": result.threshold,
           "ranks_by_type": result.ranks_by_type(), "dropped": len(result.dropped),
           "metrics": {k: v for k, v in metrics.items() if k != "predictions"}}
    if task == "classification":
        row["agreement"] = (metrics["predictions"] == reference["predictions"]).float().mean().item()
    if result.target == "energy":
        row["energy_fraction"] = result.value
    if result.target == "rank":
        row["uniform_rank"] = int(result.value)
    return row


def one_adapter(model_name: str, data: str, r: int, s: Settings) -> dict[str, Any]:
    """Train one LoRA, compress it every way, evaluate everything (in a worker process)."""
    from rich.console import Console

    from splice.compression.para import compress, sweep
    from splice.io.state import adapter_state
    from splice.train import TrainConfig, run

    torch.set_num_threads(1)
    seed_everything(s.seed)
    out: dict[str, Any] = {"model": model_name, "data": data, "r": r}
    try:
        task = "causal_lm" if model_name == "smollm2" else "classification"
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            config = TrainConfig(
                model=model_name, task=task, data=data,
                adapter={"method": "lora", "r": r, "alpha": 2 * r, "targets": "all-linear"},
                max_length=s.max_length[data], batch_size=s.batch if task == "classification" else 8,
                lr=s.lr[model_name], head_lr=s.head_lr if task == "classification" else None,
                warmup_ratio=0.1, max_steps=s.steps[data], eval_every=s.steps[data],
                # the trainer's own evaluations pick between step 0 and the last step; kept small
                max_eval_examples=32 if task == "causal_lm" else 200, seed=s.seed, output_dir=run_dir)
            trained = run(config, console=Console(quiet=True), force=True)
            state = adapter_state(trained.paths["adapter"])
        out["train"] = {"steps": s.steps[data], "train_s": trained.timings["train_s"],
                        "validation_before": trained.metrics["before"].get("validation"),
                        "validation_after": trained.metrics["after"].get("validation"),
                        "best_step": trained.best_step}
        tick = time.perf_counter()
        task, rows, score = evaluator(model_name, data, s)
        reference = score(state)
        out["rows"] = rows
        out["modules"] = len(state.modules)
        out["parameters"] = state.parameters
        out["uncompressed"] = {k: v for k, v in reference.items() if k != "predictions"}
        # the global compressions of every budget, data-free; each is evaluated once below
        budgets = s.lm_curve if task == "causal_lm" else s.curve
        curve = sweep(state, sorted(set(budgets) | set(s.budgets), reverse=True))
        scored = {budget: entry(point.result, score(point.result.state), reference, task)
                  for budget, point in curve.items()}
        out["curve"] = [{"budget": budget, **row} for budget, row in scored.items()]
        out["budgets"] = {}
        for budget in s.budgets:
            others = {"per-module": matched_per_module(state, curve[budget].result.factor_parameters_after),
                      "uniform": compress(state, rank=max(1, round(budget * r)))}
            out["budgets"][str(budget)] = {"global": scored[budget]} | {
                name: entry(result, score(result.state), reference, task) for name, result in others.items()}
        out["eval_s"] = time.perf_counter() - tick
        out["total_s"] = time.perf_counter() - started
    except Exception as err:  # one failing run must not lose the others
        out["error"] = f"{type(err).__name__}: {err}"[:500]
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


# ---------------------------------------------------------------------------------------- report


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
    lines = ["# PARA: post-training rank compression of real LoRAs (CPU)", "", environment_line(env),
             f"Runtime {runtime / 60:.1f} min, {s.jobs} worker processes of 1 torch thread each."
             + (" **Quick smoke run: too little training and too few rows to read anything into.**"
                if s.quick else ""), ""]
    lines += [
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
    failed = [r for r in runs if "error" in r]
    good = [r for r in runs if "error" not in r]
    header = ["model / data", "r", "uncompressed", "budget", "method", "kept", "energy", "metric", "change",
              "agree / loss"]
    rows = []
    for run in good:
        task = "causal_lm" if run["model"] == "smollm2" else "classification"
        key, label = metric_of(task)
        base = run["uncompressed"]
        name = f"{MODELS[run['model']]} / {DATA[run['data']]}"
        for budget, variants in run["budgets"].items():
            for method in METHODS:
                v = variants[method]
                value = v["metrics"].get(key)
                change = None if value is None else (value - base[key]) * 100
                extra = (f"{v['agreement']:.1%}" if task == "classification"
                         else f"{v['metrics']['loss']:.3f} (was {base['loss']:.3f})")
                rows.append([name, str(run["r"]), f"{label} {fmt_metric(base[key])}", budget, method,
                             f"{v['kept']:.1%}", f"{v['retained_energy']:.1%}", fmt_metric(value),
                             f"{change:+.1f} pt", extra])
    lines += ["## Accuracy after compression", "", table(header, rows), ""]

    lines += ["## Ranks PARA chose (global), mean per module type", ""]
    rank_rows = []
    for run in good:
        for budget, variants in run["budgets"].items():
            rank_rows.append([f"{MODELS[run['model']]} / {DATA[run['data']]}", str(run["r"]), budget,
                              ranks_line(variants["global"]["ranks_by_type"])
                              + (f"; {variants['global']['dropped']} modules dropped"
                                 if variants["global"]["dropped"] else "")])
    lines += [table(["model / data", "r", "budget", "mean rank by module type"], rank_rows), ""]

    lines += ["## Budget curve (global)", "", "`para.png`: the metric against the factor parameters kept.", ""]
    curve_rows = []
    for run in good:
        task = "causal_lm" if run["model"] == "smollm2" else "classification"
        key, _ = metric_of(task)
        cells = [f"{p['budget']:g}: {fmt_metric(p['metrics'].get(key))}" for p in run["curve"]]
        curve_rows.append([f"{MODELS[run['model']]} / {DATA[run['data']]}", str(run["r"]),
                           fmt_metric(run["uncompressed"].get(key)), "; ".join(cells)])
    lines += [table(["model / data", "r", "uncompressed", "budget: metric"], curve_rows), ""]

    lines += ["## Training", ""]
    train_rows = []
    for run in good:
        t = run["train"]
        train_rows.append([f"{MODELS[run['model']]} / {DATA[run['data']]}", str(run["r"]), str(t["steps"]),
                           f"{run['parameters']:,}", f"{t['train_s']:.0f} s", f"{run['eval_s']:.0f} s",
                           str(t["best_step"])])
    lines += [table(["model / data", "r", "steps", "adapter parameters", "training", "evaluations",
                     "best step"], train_rows), ""]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r['model']} / {r['data']} r={r['r']}: {r['error']}" for r in failed]
        lines.append("")
    lines += ["## Verdict", ""] + verdict(good, s) + [""]
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps and rows")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--render", metavar="JSON", help="only redo the .md and .png from a results JSON")
    args = parser.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        settings = data["settings"]
        settings["runs"] = [tuple(run) for run in settings["runs"]]
        s = Settings(**settings)
        stem = Path(args.render).stem
        text = render(data["runs"], s, data["environment"], data["runtime_s"])
        plot(data["runs"], RESULTS / f"{stem}.png")
        (RESULTS / f"{stem}.md").write_text(text + "\n")
        print(text)
        return
    s = Settings.quick_run() if args.quick else Settings()
    s.jobs = args.jobs
    phase = Phases()
    env = environment(threads=1)
    jobs = [(m, d, r) for m, d in s.runs for r in s.ranks]
    jobs.sort(key=lambda j: j[0] != "smollm2")  # the slowest first, so the pool finishes together
    phase(f"{len(jobs)} adapters: train, compress, evaluate ({s.jobs} at a time)")
    with ProcessPoolExecutor(s.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(one_adapter, m, d, r, s) for m, d, r in jobs]
        runs = []
        for future in futures:
            result = future.result()
            runs.append(result)
            status = result.get("error") or f"done in {result.get('total_s', 0):.0f} s"
            print(f"  {result['model']} / {result['data']} r={result['r']}: {status}", flush=True)
    env["loadavg_end"] = os.getloadavg()
    stem = "para_quick" if s.quick else "para"
    runtime = phase.total()
    text = render(runs, s, env, runtime)
    plot(runs, RESULTS / f"{stem}.png")
    write_results(RESULTS, stem, {"environment": env, "settings": asdict(s), "runs": runs,
                                  "runtime_s": runtime, "phase_s": phase.seconds()}, text)
    for run in runs:
        if "traceback" in run:
            print(run["traceback"])


if __name__ == "__main__":
    main()
