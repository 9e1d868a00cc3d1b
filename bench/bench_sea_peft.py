"""SEA-PEFT (audited adapter selection) vs fixed placements at one parameter budget, on the bundled
MiniLM: Rotten Tomatoes and BBC News (CPU).

Every variant holds at most BUDGET = 82,944 adapter parameters (the classification head, trained in
full everywhere, is not counted):

LoRA q,v r=9          query and value of all 6 layers: 12 x 9 x 768 = 82,944 exactly
LoRA all-linear r=2   every layer's q, k, v, attention output, FFN in and out (the pooler left out):
                      6 x (4 x 1,536 + 2 x 3,840) = 82,944 exactly
DomLoRA at budget     LoRA r=8 (alpha 16) on PAGE's top-k modules (DomLoRA's placement, the expected
                      score on the run's first training batches, as the trainer's DomLoRA probes),
                      k the largest whose modules fit the budget
SEA-PEFT              the search of examples/rotten_tomatoes_sea_peft.yaml (186 units: 6 sites x 6
                      layers x {LoRA r=4,8,16, DoRA r=8, DiaBlo 64 blocks} + LoReFT per layer) on the
                      run's training data, audited on its first `audit_eval` validation rows; then the
                      exported choice fine-tuned from a fresh model exactly like the other variants

All fine-tunes: the same steps, batch, max length, learning rates (lr 2e-3, head 3e-2), schedule,
seeds and evaluation rows; the checkpoint kept is the better on validation of step 0 and the last
step; test accuracy reported as mean and std over the seeds. SEA-PEFT's search comes on top of its
fine-tune: its seconds, training and probe steps and evaluations are reported apart.

Runs go to a pool of `--jobs` worker processes with one torch thread each; a failed run is reported
as "failed: <error>" and the others go on. `python bench/bench_sea_peft.py` is the full run (~30-40
minutes on two cores, mostly SEA-PEFT's searches); `--quick` is a smoke run of ~2-4 minutes on a
small candidate space. Results: bench/results/sea_peft.{json,md} (`sea_peft_quick` for --quick).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from common import (
    DATASETS,
    Phases,
    bench_main,
    bench_parser,
    environment,
    finish,
    guarded,
    heading,
    mean_std,
    minilm_dir,
    seed_summary,
    seed_table,
    settings_from,
    table,
    worker_pool,
)

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "rotten_tomatoes_sea_peft.yaml"
BUDGET = 82_944
SEA = "SEA-PEFT"
DOMLORA = "DomLoRA at budget"
VARIANTS: dict[str, str] = {
    "LoRA q,v r=9": "LoRA r=9, alpha 18 on query and value of all 6 layers",
    "LoRA all-linear r=2": "LoRA r=2, alpha 4 on every layer's 6 linear modules (pooler excluded)",
    DOMLORA: "LoRA r=8, alpha 16 on PAGE's top-k modules, k the largest that fits the budget",
    SEA: "the audited choice among 186 units (examples/rotten_tomatoes_sea_peft.yaml), fine-tuned afresh",
}
FIXED = {
    "LoRA q,v r=9": {"method": "lora", "r": 9, "alpha": 18, "targets": ["query", "value"]},
    "LoRA all-linear r=2": {"method": "lora", "r": 2, "alpha": 4, "targets": "all-linear",
                            "exclude": ["pooler.dense"]},
}
# A small space for --quick: 3 sites of the last layer x {LoRA r=4, 8; DoRA} + LoReFT = 10 units.
QUICK_SPACE = {"layers": [5], "sites": {"q": ["attention.self.query"], "v": ["attention.self.value"],
                                        "ffn_in": ["intermediate.dense"]},
               "families": [{"method": "lora", "r": [4, 8]}, {"method": "dora", "r": 8},
                            {"method": "loreft", "r": 4, "positions": "f1+l1"}]}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    jobs: int = 2
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 60  # fine-tuning steps, as bench_placement.py
    batch: int = 16
    max_length: int = 48
    lr: float = 2e-3
    head_lr: float = 3e-2
    eval_examples: int = 150
    budget: int = BUDGET
    probe_batches: int = 8  # DomLoRA's PAGE probe
    # SEA-PEFT's search: the example's space and loop, with these overrides
    audits: int = 5
    audit_every: int = 10
    warmup: int = 10
    audit_eval: int = 64
    space: dict[str, Any] = field(default_factory=dict)  # overrides of the example's sea_peft section
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(seeds=[0], steps=3, max_length=32, eval_examples=16, probe_batches=2, audits=2, audit_every=2,
                   warmup=2, audit_eval=16, space=QUICK_SPACE, quick=True, **overrides)


def train_config(data: str, seed: int, adapter: dict[str, Any], s: Settings, output_dir: str) -> Any:
    from splice.train import TrainConfig

    return TrainConfig(model="minilm", task="classification", data=data, adapter=dict(adapter),
                       max_length=s.max_length, batch_size=s.batch, lr=s.lr, head_lr=s.head_lr, max_steps=s.steps,
                       eval_every=s.steps, max_eval_examples=s.eval_examples, seed=seed, output_dir=output_dir,
                       checkpoint_every=None)


def sea_space(s: Settings) -> Any:
    from splice.selection.sea_peft import SeaPeftConfig

    section = yaml.safe_load(EXAMPLE.read_text())["sea_peft"]
    section.update(s.space)
    section.update(budget=s.budget, audits=s.audits, audit_every=s.audit_every, warmup=s.warmup,
                   eval_examples=s.audit_eval)
    return SeaPeftConfig.from_dict(section)


def domlora_targets(data: str, seed: int, s: Settings) -> list[str]:
    """PAGE's ranking as the trainer's DomLoRA sees it for this seed (same seeded head, same probe
    batches: `bench_placement.page_minilm`), cut at the largest k whose LoRA r=8 fits the budget."""
    from accelerate.utils import set_seed

    from splice.placement import page
    from splice.train import tasks
    from splice.train.data import collator, load_splits, probe_loader

    with tempfile.TemporaryDirectory() as run_dir:
        config = train_config(data, seed, {"method": "lora", "r": 8, "alpha": 16}, s, run_dir)
    set_seed(config.seed)
    splits = load_splits(config)
    model, tokenizer = tasks.load_model(config, splits.label_names)
    loader = probe_loader(splits.train, config, collator(config.task, tokenizer, config.max_length))
    batches = (batch for _, batch in zip(range(s.probe_batches), loader, strict=False))
    placement = page(model, batches, "all-linear", r=8, alpha=16)
    chosen, used = [], 0
    for site in placement.sites:
        module = model.get_submodule(site.name)
        cost = 8 * (module.in_features + module.out_features)
        if used + cost > s.budget:
            break
        chosen.append(site.name)
        used += cost
    return chosen


def train_one(variant: str, data: str, seed: int, s: Settings) -> dict[str, Any]:
    """One variant's run; SEA-PEFT's search first, in the same worker."""
    from rich.console import Console
    from transformers import AutoConfig

    from splice import assets
    from splice.selection.sea_peft import finetune, search

    cpu = time.process_time()
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if variant == SEA:
            config = train_config(data, seed, {"method": "lora"}, s, str(Path(tmp) / "search"))
            selection = search(config, sea_space(s))
            adapters = selection.adapters
            extra = {"search_s": selection.seconds, "search_cpu_s": time.process_time() - cpu,
                     "search_steps": selection.steps, "units": len(selection.units),
                     "chosen": selection.chosen, "selected_params": selection.params,
                     "families": dict(Counter(u.family for u in selection.units if u.name in selection.chosen)),
                     "sites": dict(Counter(u.site.split(".", 1)[-1] for u in selection.units
                                           if u.name in selection.chosen)),
                     "active_params_per_audit": [a["active_params"] for a in selection.audits],
                     "switches": sum(len(a["on"]) + len(a["off"]) for a in selection.audits),
                     "adapters": adapters}
        elif variant == DOMLORA:
            targets = domlora_targets(data, seed, s)
            adapters = {"lora": {"method": "lora", "r": 8, "alpha": 16, "targets": targets}}
            extra = {"targets": targets}
        else:
            adapters = {"lora": FIXED[variant]}
        tuned = time.process_time()
        result = finetune(train_config(data, seed, {"method": "lora"}, s, str(Path(tmp) / "run")), adapters,
                          console=Console(quiet=True))
        cpu_tune = time.process_time() - tuned
    labels = len(assets.dataset(data).label_names)
    head = (AutoConfig.from_pretrained(minilm_dir()).hidden_size + 1) * labels
    after, before = result.metrics["after"], result.metrics["before"]
    return {"test_accuracy": after["test"]["accuracy"], "validation_accuracy": after["validation"]["accuracy"],
            "test_accuracy_before": before["test"]["accuracy"], "best_step": result.best_step,
            "trainable": result.parameters["trainable"], "head": head,
            "adapter": result.parameters["trainable"] - head, "train_s": result.timings["train_s"],
            "cpu_finetune_s": cpu_tune, "cpu_s": time.process_time() - cpu, **extra}


def describe(row: dict[str, Any]) -> str:
    label = f"{row['variant']} / {row['data']} / seed {row['seed']}"
    if "error" in row:
        return f"  {label}: failed: {row['error']}"
    more = (f", search {row['search_s']:.0f} s, {len(row['chosen'])} units {row['families']}"
            if row["variant"] == SEA else "")
    return f"  {label}: test acc {row['test_accuracy']:.3f}, adapter {row['adapter']:,}{more}"


def run(s: Settings, out_dir: Path) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s),
                              "variants": {v: VARIANTS[v] for v in s.variants},
                              "space": sea_space(s).to_dict() if SEA in s.variants else None}
    jobs = [({"variant": v, "data": d, "seed": seed}, (v, d, seed, s))
            for v in sorted(s.variants, key=lambda v: v != SEA)  # the long searches first
            for d in s.datasets for seed in s.seeds]
    phase(f"{len(jobs)} runs, {s.jobs} at a time")
    rows = []
    with worker_pool(s.jobs, s.threads) as pool:
        futures = [pool.submit(guarded, job, train_one, *args) for job, args in jobs]
        for future in as_completed(futures):
            rows.append(future.result())
            print(describe(rows[-1]), flush=True)
    rows.sort(key=lambda r: (s.variants.index(r["variant"]), s.datasets.index(r["data"]), r["seed"]))
    result["runs"] = rows
    result["summary"] = seed_summary(rows, "variant", s.variants, s.datasets, lambda ok: {
        "adapter": sorted({r["adapter"] for r in ok}), "head": ok[0]["head"],
        "cpu_finetune_s": float(np.mean([r["cpu_finetune_s"] for r in ok])),
        "cpu_s": float(np.mean([r["cpu_s"] for r in ok])),
        "kept_step_0": sum(r["best_step"] == 0 for r in ok)})
    result["failed"] = [describe(r).strip() for r in rows if "error" in r]
    return finish(result, phase)


# ------------------------------------------------------------------------------------ report


def markdown(result: dict[str, Any], s: Settings) -> str:
    lines = heading("SEA-PEFT vs fixed placements at one parameter budget (MiniLM)", result["environment"])
    lines += ["", f"Budget: {s.budget:,} adapter parameters; head (trained in full, not counted) as every variant. "
              f"Fine-tuning: {s.steps} steps of {s.batch} at {s.max_length} tokens, lr {s.lr}, head lr {s.head_lr}, "
              f"{s.eval_examples} validation and test rows, seeds {s.seeds}."]
    if result.get("space"):
        sp = result["space"]
        lines += [f"SEA-PEFT search: sites {list(sp['sites']) if isinstance(sp['sites'], dict) else sp['sites']} x "
                  f"layers {sp['layers']} x families {[f.get('method') for f in sp['families']]}; warm-up "
                  f"{sp['warmup']} steps, {sp['audits']} audits every {sp['audit_every']} steps, "
                  f"{sp['audit_fraction']:.0%} of the units each, {sp['probe_steps']} probe steps, metric "
                  f"{sp['metric']} on {sp['eval_examples']} validation rows."]
    if s.quick:
        lines += ["", "**--quick smoke run: a 10-unit space, a few steps; the numbers mean nothing.**"]
    summary = result["summary"]
    lines += ["", "## Test accuracy", ""]
    header = ["variant", "data", "adapter params", "test acc.", "kept step 0", "CPU s (fine-tune / all)"]
    lines.append(seed_table(header, summary, s.variants, s.datasets, lambda a: [
                                " or ".join(f"{p:,}" for p in a["adapter"]), mean_std(a), str(a["kept_step_0"]),
                                f"{a['cpu_finetune_s']:.0f} / {a['cpu_s']:.0f}"]))
    sea_rows = [r for r in result["runs"] if r["variant"] == SEA and "error" not in r]
    if sea_rows:
        lines += ["", "## SEA-PEFT's searches", ""]
        rows = []
        for r in sea_rows:
            st = r["search_steps"]
            rows.append([DATASETS[r["data"]], str(r["seed"]), f"{len(r['chosen'])} of {r['units']}",
                         f"{r['selected_params']:,}", ", ".join(f"{k} {v}" for k, v in sorted(r["families"].items())),
                         ", ".join(f"{k} {v}" for k, v in sorted(r["sites"].items())),
                         f"{st['train']} / {st['probe']} / {st['evaluations']}", str(r["switches"]),
                         f"{r['search_s']:.0f}"])
        lines.append(table(["data", "seed", "units chosen", "params", "families", "sites", "steps: train / probe / "
                            "evaluations", "switches", "search s"], rows))
    dom = [r for r in result["runs"] if r["variant"] == DOMLORA and "error" not in r]
    if dom:
        def modules(targets: list[str]) -> str:
            shown = ", ".join(t.removeprefix("bert.encoder.") for t in targets[:4])
            return f"{len(targets)} ({shown}{', ...' if len(targets) > 4 else ''})"

        lines += ["", "DomLoRA's modules: " + "; ".join(
            f"{DATASETS[r['data']]} seed {r['seed']}: {modules(r['targets'])}" for r in dom)]
    if result.get("failed"):
        lines += ["", "Failed: " + "; ".join(result["failed"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~2-4 minute smoke run on a 10-unit space (numbers not trustworthy)")
    p.add_argument("--jobs", type=int, help="worker processes (default 2)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run")
    p.add_argument("--audits", type=int, help="SEA-PEFT audits per search")
    p.add_argument("--budget", type=int, help=f"adapter parameters (default {BUDGET:,}; the fixed variants do not "
                   "change with it)")
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    result = bench_main(argv, parse_args, Settings, lambda s, args: run(s, args.out_dir), markdown, "sea_peft")
    if result and result["failed"]:
        print("\nfailed:\n" + "\n".join(result["failed"]))


if __name__ == "__main__":
    main()
