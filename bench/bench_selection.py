"""GAST's data and layer selection (volume-2 §11) against plain LoRA training, on the bundled MiniLM
and Rotten Tomatoes with 30% of the training labels flipped (CPU).

What it measures: for every variant and seed, one `splice.train.Trainer` run (LoRA r=8, alpha=16 on
query and value, the classification head trained in full at its own rate) on the training split of
Rotten Tomatoes with a seeded 30% of its labels swapped; validation and test rows stay clean. The
trainer keeps the better on (clean) validation of step 0 and the last step, as in
bench_placement.py. Reported: clean test accuracy, mean and standard deviation over the seeds;
training seconds per step and its ratio to plain LoRA of the same seed (median over seeds; the
runs share the CPU with each other, so read the ratio, not the seconds); for GAST, how often each
layer was updated and the mean share of samples each layer kept (from the runs' history entries).

Variants (`--variants`):
    LoRA                 plain training on the noisy labels (the baseline)
    GAST                 selection {name: gast}: each layer keeps the best-aligned half of the
                         batch (alignment with the batch's mean gradient direction), all layers
    GAST top-2 layers    the same, and only the 2 layers of largest update move each step
    GAST batch mean      alignment with the plain batch mean (the spec's inferred rule)
    LoRA clean labels    plain training on the original labels: the ceiling

Run `python bench/bench_selection.py` (full: 3 seeds x 5 variants x 150 steps, ~45 CPU-minutes,
~25 min on two idle cores; bench/README.md) or `--quick` (1 seed, LoRA and GAST, 12 steps: a smoke
run of ~1-2.5 minutes whose numbers mean nothing).
Results: bench/results/selection.{json,md} (`selection_quick` for --quick).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    Phases,
    bench_main,
    bench_parser,
    environment,
    finish,
    guarded,
    heading,
    settings_from,
    table,
    worker_pool,
)

BASELINE = "LoRA"
ADAPTER = {"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]}


@dataclass(frozen=True)
class Variant:
    """One way of training: its `selection` for TrainConfig (None: plain), whether its labels are noisy."""

    name: str
    selection: dict[str, Any] | None
    noisy: bool = True


VARIANTS = [
    Variant("LoRA", None),
    Variant("GAST", {"name": "gast"}),
    Variant("GAST top-2 layers", {"name": "gast", "layers": 2}),
    Variant("GAST batch mean", {"name": "gast", "reference": "batch"}),
    Variant("LoRA clean labels", None, noisy=False),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks it to a smoke run."""

    threads: int = 1
    jobs: int = 2
    variants: list[str] = field(default_factory=lambda: [v.name for v in VARIANTS])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    noise: float = 0.3  # share of the training labels flipped
    steps: int = 150
    batch: int = 16
    max_length: int = 48
    lr: float = 2e-3
    head_lr: float = 3e-2  # bench_placement.py's: the default head rate is slow for a short run
    eval_examples: int = 200
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(seeds=[0], variants=["LoRA", "GAST"], steps=12, eval_examples=32, quick=True, **overrides)


def noisy_splits(seed: int, s: Settings, noisy: bool) -> tuple[Any, int]:
    """Rotten Tomatoes with a seeded share `s.noise` of the training labels swapped (the same rows
    for every variant of a seed); the first `eval_examples` clean validation and test rows."""
    from splice import assets

    data = assets.dataset("rotten_tomatoes")
    train = [dict(r) for r in data.train]
    flipped = sorted(random.Random(1000 + seed).sample(range(len(train)), round(s.noise * len(train)))) if noisy else []
    for i in flipped:
        train[i]["label"] = 1 - train[i]["label"]
    splits = assets.DatasetSplits(train, data.validation[: s.eval_examples], data.test[: s.eval_examples],
                                  task="classification", label_names=data.label_names)
    return splits, len(flipped)


def train_one(variant_name: str, seed: int, s: Settings) -> dict[str, Any]:
    """One run of the trainer, built by hand (as `Trainer.from_config`) on the noisy splits."""
    from accelerate.utils import set_seed
    from rich.console import Console

    import splice
    from splice.train import TrainConfig, Trainer, tasks

    variant = VARIANT_BY_NAME[variant_name]
    splits, flipped = noisy_splits(seed, s, variant.noisy)
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(model="minilm", task="classification", data="rotten_tomatoes", adapter=dict(ADAPTER),
                             selection=variant.selection, max_length=s.max_length, batch_size=s.batch, lr=s.lr,
                             head_lr=s.head_lr, max_steps=s.steps, eval_every=s.steps, seed=seed,
                             checkpoint_every=None, output_dir=run_dir)
        set_seed(seed)
        model, tokenizer = tasks.load_model(config, splits.label_names)
        splice.attach(model, tasks.adapter_config(config, model))
        cpu = time.process_time()
        trainer = Trainer(model, tokenizer, config, splits=splits, console=Console(quiet=True))
        result = trainer.fit()
        cpu = time.process_time() - cpu
    after, before = result.metrics["after"], result.metrics["before"]
    chosen = [h["selection"] for h in result.history if "selection" in h]
    blocks = trainer.gradient_rule.blocks if trainer.gradient_rule is not None else []
    return {"test_accuracy": after["test"]["accuracy"], "validation_accuracy": after["validation"]["accuracy"],
            "test_accuracy_before": before["test"]["accuracy"], "best_step": result.best_step, "flipped": flipped,
            "train_rows": len(splits.train), "last_loss": float(np.mean([h["loss"] for h in result.history[-5:]])),
            "train_s": result.timings["train_s"], "cpu_s": cpu,
            "train_s_per_step": result.timings["train_s"] / max(len(result.history), 1), "blocks": blocks,
            "layer_updates": dict(Counter(i for c in chosen for i in c["layers"])),
            "kept_mean": [float(np.mean([c["kept"][i] for c in chosen if c["kept"][i] is not None]))
                          for i in range(len(blocks))] if chosen else []}


# -------------------------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Per variant: clean test accuracy over seeds, step time and its ratio to LoRA of the same seed."""
    summary: dict[str, Any] = {}
    base = {r["seed"]: r for r in runs if r["variant"] == BASELINE and "error" not in r}
    for name in s.variants:
        rows = [r for r in runs if r["variant"] == name]
        ok = [r for r in rows if "error" not in r]
        if not ok:
            summary[name] = {"error": rows[0]["error"] if rows else "not run"}
            continue
        acc = np.array([r["test_accuracy"] for r in ok])
        ratios = [r["train_s_per_step"] / base[r["seed"]]["train_s_per_step"] for r in ok if r["seed"] in base]
        summary[name] = {
            "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "n": len(ok),
            "per_seed": acc.tolist(), "failed_seeds": len(rows) - len(ok),
            "validation_mean": float(np.mean([r["validation_accuracy"] for r in ok])),
            "kept_step_0": sum(r["best_step"] == 0 for r in ok),
            "s_per_step": float(np.mean([r["train_s_per_step"] for r in ok])),
            "step_ratio": float(np.median(ratios)) if ratios else None,
            "layer_updates": dict(sum((Counter(r["layer_updates"]) for r in ok), Counter())),
            "kept_mean": np.mean([r["kept_mean"] for r in ok], axis=0).round(3).tolist() if ok[0]["kept_mean"] else [],
        }
    return summary


def markdown(result: dict[str, Any], s: Settings) -> str:
    summary = result["summary"]
    runs = result["runs"]
    lines = heading("GAST data/layer selection vs plain LoRA: MiniLM, Rotten Tomatoes, "
                    f"{s.noise:.0%} of the training labels flipped", result["environment"])
    flipped = next((r["flipped"] for r in runs if r.get("flipped")), 0)
    train_rows = next((r["train_rows"] for r in runs if "train_rows" in r), 0)
    lines += ["", f"{s.steps} steps of {s.batch} rows at {s.max_length} tokens, lr {s.lr:g} (head {s.head_lr:g}), "
              f"seeds {s.seeds}; {flipped:,} of {train_rows:,} training labels flipped; clean test and validation "
              f"sets of {s.eval_examples} rows. LoRA r=8 on query,value and the head trained in full in every variant."
              + (" **--quick: a smoke run; the numbers mean nothing.**" if s.quick else ""), ""]
    rows = []
    for name in s.variants:
        a = summary[name]
        if "error" in a:
            rows.append([name, f"failed: {a['error']}", "", "", "", "", ""])
            continue
        failed = f" ({a['failed_seeds']} failed)" if a["failed_seeds"] else ""
        ratio = "-" if a["step_ratio"] is None else f"{a['step_ratio']:.2f}x"
        rows.append([name, f"{a['mean']:.1%} ± {a['std']:.1%}{failed}", " / ".join(f"{x:.1%}" for x in a["per_seed"]),
                     f"{a['validation_mean']:.1%}", f"{a['kept_step_0']}/{a['n']}", f"{a['s_per_step']:.2f}", ratio])
    header = ["variant", "clean test acc. (mean ± std)", "per seed", "clean validation acc.",
              "runs that kept step 0", "training s per step", "step time vs LoRA (median over seeds)"]
    lines += [table(header, rows), ""]
    gast = [(n, summary[n]) for n in s.variants if "error" not in summary[n] and summary[n]["kept_mean"]]
    if gast:
        lines += ["GAST per layer (`bert.encoder.layer.N`, N = 0..5): optimizer steps that updated it (all seeds) and "
                  "the mean share of a batch's samples it kept.", ""]
        blocks = max(len(a["kept_mean"]) for _, a in gast)
        lines.append(table(["variant", *[f"layer {i}" for i in range(blocks)]],
                           [[n, *[f"{a['layer_updates'].get(str(i), a['layer_updates'].get(i, 0))} / "
                                  f"{a['kept_mean'][i]:.2f}" for i in range(blocks)]] for n, a in gast]))
        lines.append("")
    if result.get("failed"):
        lines += ["Failed runs:", "", *[f"- {f}" for f in result["failed"]], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- run


def describe(row: dict[str, Any]) -> str:
    label = f"{row['variant']} / seed {row['seed']}"
    if "error" in row:
        return f"  {label}: failed: {row['error']}"
    return (f"  {label}: clean test acc {row['test_accuracy']:.3f} (best step {row['best_step']}), "
            f"{row['train_s_per_step']:.2f} s/step")


def run(s: Settings, out_dir: Path) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s),
                              "variants": {v.name: asdict(v) for v in VARIANTS if v.name in s.variants}}
    jobs = [({"variant": name, "seed": seed}, train_one, (name, seed, s)) for seed in s.seeds for name in s.variants]
    phase(f"{len(jobs)} training runs, {s.jobs} at a time")
    rows = []
    with worker_pool(s.jobs, s.threads) as pool:
        futures = [pool.submit(guarded, job, fn, *args) for job, fn, args in jobs]
        for future in futures:
            rows.append(future.result())
            print(describe(rows[-1]), flush=True)
    rows.sort(key=lambda r: (s.variants.index(r["variant"]), r["seed"]))
    result["runs"] = rows
    result["summary"] = summarize(rows, s)
    result["failed"] = [describe(r).strip() for r in rows if "error" in r]
    return finish(result, phase)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~1-2 minute smoke run: 1 seed, LoRA and GAST, 12 steps (numbers not trustworthy)")
    p.add_argument("--jobs", type=int, help="worker processes (default 2)")
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], help="keep 'LoRA' for the ratios")
    p.add_argument("--seeds", nargs="+", type=int, help="training and label-noise seeds (default 0 1 2)")
    p.add_argument("--noise", type=float, help="share of the training labels flipped (default 0.3)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 150)")
    p.add_argument("--batch", type=int, help="batch size (default 16)")
    p.add_argument("--max-length", type=int, help="tokens per example (default 48)")
    p.add_argument("--eval-examples", type=int, help="clean validation and test rows (default 200)")
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    result = bench_main(argv, parse_args, Settings, lambda s, args: run(s, args.out_dir), markdown, "selection")
    if result and result["failed"]:
        print("\nfailed:\n" + "\n".join(result["failed"]))


if __name__ == "__main__":
    main()
