"""Where to put the adapter: DomLoRA (PAGE's top module) vs LoRA on query,value vs LoRA on every
linear layer, same trainer and budget, on the bundled MiniLM; and PAGE on SmolLM2 (CPU).

What it measures:

accuracy      `splice.train.run` on Rotten Tomatoes (2 classes) and BBC News (5 topics) for every
              placement: the same steps, batch, max length, learning rates, schedule, seeds and
              evaluation rows; the classification head is trained in full in all of them. Test
              accuracy of the checkpoint the trainer keeps (the better on validation of step 0 and
              the last step), mean and standard deviation over the seeds; trainable parameters
              (adapter / head); training speed; and the module(s) DomLoRA chose, read from the
              `target_modules` of the adapter the run saved. DomLoRA probes the first batches of its
              own training order (the trainer's `with_probe`).
page_minilm   PAGE of every linear layer of MiniLM (the classifier excluded) on the same probe
              batches and the same seeded head as each training run's DomLoRA, run apart: the top-5
              per data set and seed, and whether its top module is the one the trainer chose.
page_smollm2  PAGE of every linear layer of SmolLM2-135M-Instruct (30 layers, lm_head excluded) on
              the causal-LM task of examples/smollm2_arithmetic.yaml (loss on the answer only), and
              on packed Rotten Tomatoes review text as plain language modelling (loss on every
              token): the top-10, the shares summed by module type and by depth, and whether the top
              module is an FFN down-projection in the shallow layers, as arXiv 2605.06183 reports for
              8B Llama/Qwen models. Heatmaps: bench/results/placement_smollm2*.png.

Everything runs in a pool of `--jobs` worker processes with one torch thread each. A run that fails
is reported as "failed: <error>" and the others go on.

Run `python bench/bench_placement.py` (~15 minutes on two cores; bench/README.md); `--quick` is a
smoke run of ~2-3 minutes. Results: bench/results/placement.{json,md} (`placement_quick` for --quick).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    DATASETS,
    Phases,
    bench_main,
    bench_parser,
    environment,
    finish,
    guarded,
    minilm_dir,
    review_chunks,
    seed_summary,
    settings_from,
    smollm2_dir,
    worker_pool,
)

HERE = Path(__file__).resolve().parent
SMOLLM2_EXAMPLE = HERE.parent / "examples" / "smollm2_arithmetic.yaml"
BASELINE = "LoRA q,v"
DOMLORA = "DomLoRA top-1"


@dataclass(frozen=True)
class Variant:
    """One placement: its adapter mapping for TrainConfig and what it means."""

    name: str
    adapter: dict[str, Any]
    why: str


VARIANTS: list[Variant] = [
    Variant("LoRA q,v", {"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]},
            "LoRA r=8, alpha=16 on query and value of all 6 layers (BERT's default targets)"),
    Variant("LoRA all-linear", {"method": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
            "LoRA r=8, alpha=16 on every Linear but the classifier: 6 x 6 layer modules and the pooler"),
    Variant(DOMLORA, {"method": "domlora", "r": 8, "alpha": 16, "top_k": 1},
            "LoRA r=8, alpha=16 on the one module with the largest PAGE (expected score) among all-linear's"
            " candidates, probed on the run's first training batches"),
    Variant("DomLoRA top-3", {"method": "domlora", "r": 8, "alpha": 16, "top_k": 3},
            "the same on the three best modules"),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    jobs: int = 2
    sections: list[str] = field(default_factory=lambda: ["accuracy", "page_minilm", "page_smollm2"])
    variants: list[str] = field(default_factory=lambda: [v.name for v in VARIANTS])
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # 60 steps of 16 at 48 tokens and 150 evaluation rows: the whole run takes ~27 CPU-minutes (~14 min on two
    # idle cores, 31 at load average 3-4); a pilot of 100 steps at 64 tokens and 200 rows took twice that.
    steps: int = 60
    batch: int = 16
    max_length: int = 48
    lr: float = 2e-3
    # bench_forms.py found the trainer's default head lr (1e-2) too slow for a short run (most
    # Rotten Tomatoes runs kept their step-0 checkpoint); the same 3e-2 for every placement.
    head_lr: float = 3e-2
    eval_examples: int = 150
    probe_batches: int = 8  # DomLoRA's default, and the MiniLM / SmolLM2 PAGE runs
    top_minilm: int = 5
    top_smollm2: int = 10
    review_lm: bool = True  # also PAGE on packed review text (SmolLM2, plain LM)
    review_length: int = 64
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(seeds=[0], steps=3, max_length=32, eval_examples=16, probe_batches=2, quick=True, **overrides)


def train_config(data: str, seed: int, adapter: dict[str, Any], s: Settings, output_dir: str) -> Any:
    from splice.train import TrainConfig

    return TrainConfig(model="minilm", task="classification", data=data, adapter=dict(adapter),
                       max_length=s.max_length, batch_size=s.batch, lr=s.lr, head_lr=s.head_lr, max_steps=s.steps,
                       eval_every=s.steps, max_eval_examples=s.eval_examples, seed=seed, output_dir=output_dir)


# ------------------------------------------------------------------------------- a. accuracy


def adapter_for(variant: Variant, s: Settings) -> dict[str, Any]:
    adapter = dict(variant.adapter)
    if adapter["method"] == "domlora":
        adapter["probe_batches"] = s.probe_batches
    return adapter


def train_one(variant_name: str, data: str, seed: int, s: Settings) -> dict[str, Any]:
    """One `splice.train.run`; the saved adapter's target modules are read before its folder goes."""
    from rich.console import Console
    from transformers import AutoConfig

    from splice import assets
    from splice.train import run

    variant = VARIANT_BY_NAME[variant_name]
    cpu = time.process_time()  # this worker's CPU time: unlike wall time, not inflated by other jobs
    with tempfile.TemporaryDirectory() as run_dir:
        result = run(train_config(data, seed, adapter_for(variant, s), s, run_dir), console=Console(quiet=True),
                     force=True)
        cpu = time.process_time() - cpu
        saved = json.loads((Path(run_dir) / "adapter" / "adapter_config.json").read_text())
    labels = len(assets.dataset(data).label_names)
    head = (AutoConfig.from_pretrained(minilm_dir()).hidden_size + 1) * labels  # the classifier, trained in full
    after, before = result.metrics["after"], result.metrics["before"]
    losses = [h["loss"] for h in result.history]
    targets = saved.get("target_modules")
    return {"test_accuracy": after["test"]["accuracy"], "validation_accuracy": after["validation"]["accuracy"],
            "test_accuracy_before": before["test"]["accuracy"], "best_step": result.best_step,
            "trainable": result.parameters["trainable"], "head": head,
            "adapter": result.parameters["trainable"] - head,
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "last_loss": float(np.mean(losses[-5:])) if losses else None,
            "train_s": result.timings["train_s"], "examples_per_s": result.timings["examples_per_s"],
            "load_s": result.timings["load_s"], "total_s": result.timings["total_s"], "cpu_s": cpu}


def summarize_accuracy(runs: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    return seed_summary(runs, "variant", s.variants, s.datasets, lambda ok: {
        "before_mean": float(np.mean([r["test_accuracy_before"] for r in ok])),
        "kept_step_0": sum(r["best_step"] == 0 for r in ok),
        "adapter": sorted({r["adapter"] for r in ok}), "head": ok[0]["head"],
        "examples_per_s": float(np.mean([r["examples_per_s"] for r in ok])),
        "train_s": float(np.mean([r["train_s"] for r in ok])),
        "load_s": float(np.mean([r["load_s"] for r in ok])),
        "cpu_s": float(np.mean([r["cpu_s"] for r in ok])),
        "modules": dict(Counter(m for r in ok for m in (r["target_modules"] or [])).most_common()),
    })


# ---------------------------------------------------------------------------- b. PAGE, MiniLM


def site_rows(placement: Any, k: int) -> list[dict[str, Any]]:
    return [{"name": x.name, "layer": x.layer, "kind": x.kind, "share": x.share, "expected": x.expected,
             "sampled": x.sampled} for x in placement.sites[:k]]


def page_minilm(data: str, seed: int, s: Settings, heatmap: str | None) -> dict[str, Any]:
    """PAGE as the trainer's DomLoRA sees it for this seed: the same seeded head and probe batches."""
    from accelerate.utils import set_seed

    from splice.placement import page
    from splice.train import tasks
    from splice.train.data import collator, load_splits, probe_loader

    with tempfile.TemporaryDirectory() as run_dir:
        config = train_config(data, seed, {"method": "lora", "r": 8, "alpha": 16}, s, run_dir)
    set_seed(config.seed)  # as `splice.train.run` does before it loads the model: the same head init
    splits = load_splits(config)
    model, tokenizer = tasks.load_model(config, splits.label_names)
    loader = probe_loader(splits.train, config, collator(config.task, tokenizer, config.max_length))
    batches = (batch for _, batch in zip(range(s.probe_batches), loader, strict=False))
    placement = page(model, batches, "all-linear", r=8, alpha=16)
    if heatmap:
        placement.heatmap(heatmap)
    return {"batches": placement.batches, "candidates": len(placement.sites),
            "top": site_rows(placement, s.top_minilm), "by_kind": shares_by(placement, "kind")}


def shares_by(placement: Any, key: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for x in placement.sites:
        out[str(getattr(x, key))] += x.share
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- c. PAGE, SmolLM2


def page_smollm2(text: str, s: Settings, heatmap: str) -> dict[str, Any]:
    """PAGE of SmolLM2's linear layers on arithmetic SFT batches or packed review text."""
    from accelerate.utils import set_seed

    from splice.placement import page
    from splice.train import TrainConfig, tasks
    from splice.train.data import collator, load_splits, probe_loader

    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig.from_yaml(SMOLLM2_EXAMPLE, seed=0, output_dir=run_dir)
    set_seed(0)
    model, tokenizer = tasks.load_model(config)
    if text == "arithmetic":
        splits = load_splits(config)
        loader = probe_loader(splits.train, config, collator(config.task, tokenizer, config.max_length))
        batches = [batch for _, batch in zip(range(s.probe_batches), loader, strict=False)]
        shape = f"{config.batch_size} x <= {config.max_length} tokens, loss on the answer only"
    else:
        ids = review_chunks(smollm2_dir(), s.probe_batches * config.batch_size, s.review_length)
        batches = [{"input_ids": chunk, "labels": chunk} for chunk in ids.split(config.batch_size)]
        shape = f"{config.batch_size} x {s.review_length} tokens of packed reviews, loss on every token"
    placement = page(model, batches, "all-linear", r=8, alpha=16)
    placement.heatmap(heatmap)
    sampled_rank = {x.name: i for i, x in enumerate(sorted(placement.sites, key=lambda x: -x.sampled), 1)}
    layers = model.config.num_hidden_layers
    down = [i for i, x in enumerate(placement.sites, 1) if x.kind.endswith("down_proj")]
    best = placement.sites[0]
    return {"batches": placement.batches, "batch_shape": shape, "candidates": len(placement.sites),
            "layers": layers, "top": site_rows(placement, s.top_smollm2),
            "top_sampled_rank": sampled_rank[best.name],
            "sampled_top": max(placement.sites, key=lambda x: x.sampled).name,
            "first_down_proj_rank": down[0] if down else None,
            "by_kind": shares_by(placement, "kind"),
            "by_third": thirds(placement, layers), "heatmap": heatmap,
            "top_is_down_proj": best.kind.endswith("down_proj"), "top_layer": best.layer}


def thirds(placement: Any, layers: int) -> dict[str, float]:
    """Share of the layers in the first, middle and last third of the stack."""
    names = ["first third", "middle third", "last third"]
    out = dict.fromkeys(names, 0.0)
    for x in placement.sites:
        if x.layer is not None:
            out[names[min(2, 3 * x.layer // layers)]] += x.share
    return out


def markdown(result: dict[str, Any], s: Settings) -> str:
    """The report; placement_report.py holds it and imports this module, so it is imported only here."""
    from placement_report import markdown as render

    return render(result, s)


# -------------------------------------------------------------------------------------- pool


def png_path(out_dir: Path, name: str, s: Settings) -> str:
    """placement_<name>.png; a --quick run's end in _quick (git-ignored there, as its JSON and markdown)."""
    return str(out_dir / f"placement_{name}{'_quick' if s.quick else ''}.png")


def jobs_for(s: Settings, out_dir: Path) -> list[tuple[dict[str, Any], Any, tuple]]:
    """Every unit of work as (job label, function, arguments), the longest first."""
    jobs: list[tuple[dict[str, Any], Any, tuple]] = []
    if "page_smollm2" in s.sections:
        texts = ["arithmetic"] + (["reviews"] if s.review_lm else [])
        for text in texts:
            png = png_path(out_dir, "smollm2" if text == "arithmetic" else f"smollm2_{text}", s)
            jobs.append(({"section": "page_smollm2", "text": text}, page_smollm2, (text, s, png)))
    if "accuracy" in s.sections:
        for name in s.variants:
            for data in s.datasets:
                for seed in s.seeds:
                    jobs.append(({"section": "accuracy", "variant": name, "data": data, "seed": seed},
                                 train_one, (name, data, seed, s)))
    if "page_minilm" in s.sections:
        for data in s.datasets:
            for seed in s.seeds:
                png = png_path(out_dir, f"minilm_{data}", s) if seed == s.seeds[0] else None
                jobs.append(({"section": "page_minilm", "data": data, "seed": seed}, page_minilm, (data, seed, s, png)))
    return jobs


def describe_job(row: dict[str, Any]) -> str:
    label = {"accuracy": f"{row.get('variant')} / {row.get('data')} / seed {row.get('seed')}",
             "page_minilm": f"PAGE MiniLM / {row.get('data')} / seed {row.get('seed')}",
             "page_smollm2": f"PAGE SmolLM2 / {row.get('text')}"}[row["section"]]
    if "error" in row:
        return f"  {label}: failed: {row['error']}"
    if row["section"] == "accuracy":
        return (f"  {label}: test acc {row['test_accuracy']:.3f}, adapter {row['adapter']:,},"
                f" {row['train_s']:.0f} s training, modules {row['target_modules']}")
    return f"  {label}: top {row['top'][0]['name']} ({row['top'][0]['share']:.1%})"


def run(s: Settings, out_dir: Path) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s),
                              "variants": {v.name: asdict(v) for v in VARIANTS if v.name in s.variants},
                              "sections": {}}
    if "page_smollm2" in s.sections:
        smollm2_dir()  # converts the bundled GGUF once, before the workers need it
    jobs = jobs_for(s, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phase(f"{len(jobs)} jobs, {s.jobs} at a time")
    rows = []
    with worker_pool(s.jobs, s.threads) as pool:
        futures = [pool.submit(guarded, job, fn, *args) for job, fn, args in jobs]
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            print(describe_job(row), flush=True)
    sec = result["sections"]
    if "accuracy" in s.sections:
        runs = [r for r in rows if r["section"] == "accuracy"]
        runs.sort(key=lambda r: (s.variants.index(r["variant"]), s.datasets.index(r["data"]), r["seed"]))
        sec["accuracy"] = {"runs": runs, "summary": summarize_accuracy(runs, s)}
    if "page_minilm" in s.sections:
        pages = sorted((r for r in rows if r["section"] == "page_minilm"),
                       key=lambda r: (s.datasets.index(r["data"]), r["seed"]))
        sec["page_minilm"] = {"runs": pages}
    if "page_smollm2" in s.sections:
        sec["page_smollm2"] = {r["text"]: r for r in rows if r["section"] == "page_smollm2"}
    result["failed"] = [describe_job(r).strip() for r in rows if "error" in r]
    return finish(result, phase)


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~2-3 minute smoke run (numbers not trustworthy)")
    p.add_argument("--jobs", type=int, help="worker processes (default 2)")
    p.add_argument("--sections", nargs="+", choices=["accuracy", "page_minilm", "page_smollm2"])
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], help="placements (keep 'LoRA q,v')")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, help="optimizer steps per training run")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--eval-examples", type=int, help="validation and test rows")
    p.add_argument("--probe-batches", type=int, help="PAGE probe batches (DomLoRA and the PAGE sections)")
    p.add_argument("--no-review-lm", action="store_true", help="skip PAGE on review text (SmolLM2)")
    args = p.parse_args(argv)
    settings = settings_from(args, Settings)
    if args.no_review_lm:
        settings.review_lm = False
    return args, settings


def main(argv: list[str] | None = None) -> None:
    result = bench_main(argv, parse_args, Settings, lambda s, args: run(s, args.out_dir), markdown, "placement")
    if result and result["failed"]:
        print("\nfailed:\n" + "\n".join(result["failed"]))


if __name__ == "__main__":
    main()
