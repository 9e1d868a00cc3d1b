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
from common import RESULTS, Phases, environment, seed_everything, write_results

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
    from splice.io.adapter_states import adapter_state
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


# ------------------------------------------------------------------------------------------ main


def train_all(s: Settings, phase: Phases) -> list[dict[str, Any]]:
    """Every (model, data, rank) adapter trained, compressed and evaluated, `s.jobs` at a time."""
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
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps and rows")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, metavar="JSON", help="only redo the .md and .png from a results JSON")
    args = parser.parse_args()
    from para_report import plot, render  # it imports this module: imported only here

    if args.render:
        data = json.loads(args.render.read_text())
        settings = data["settings"]
        settings["runs"] = [tuple(run) for run in settings["runs"]]
        text = render(data["runs"], Settings(**settings), data["environment"], data["runtime_s"])
        plot(data["runs"], args.render.with_suffix(".png"))
        args.render.with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    s = Settings.quick_run() if args.quick else Settings()
    s.jobs = args.jobs
    phase = Phases()
    env = environment(threads=1)
    runs = train_all(s, phase)
    env["loadavg_end"] = os.getloadavg()
    stem = "para_quick" if s.quick else "para"
    runtime = phase.total()
    text = render(runs, s, env, runtime)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out_dir / f"{stem}.png")
    write_results(args.out_dir, stem, {"environment": env, "settings": asdict(s), "runs": runs,
                                       "runtime_s": runtime, "phase_s": phase.seconds()}, text)
    for run in runs:
        if "traceback" in run:
            print(run["traceback"])


if __name__ == "__main__":
    main()
