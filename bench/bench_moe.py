"""MoELoRA (a mixture of LoRA experts) against LoRA of the same total rank on CPU: the speed of its
two compute paths and of a naive per-expert loop, DMEP's pruning speed-up, memory, and accuracy of
its initialisations and of DMEP on real models and data.

MoELoRA here: 8 experts, top-2, total rank r split evenly (r_e = r / 8), alpha = 2r (scale
alpha / r_e); LoRA: rank r, alpha = 2r. The MiniLM classification head is trained in full.

speed      MiniLM (BERT, 6 layers, hidden 384), one batch of 8 x 64 tokens of Rotten Tomatoes
           reviews, targets query/value and all-linear, total rank 16 (r_e = 2) and a wide case,
           128 (r_e = 16). One training step (forward + backward + AdamW, train mode, the balancing
           loss added as the trainer adds it) and one inference forward (`torch.inference_mode`,
           eval) of LoRA, MoELoRA compute="dense", compute="grouped" and a naive per-expert loop
           (Mixtral's: `torch.where` over the top-k indices, the expert on those rows, `index_add`
           back; written here as `NaiveLoop`, not in splice). All four in one process, interleaved
           rounds in rotating order; medians of per-round ratios to LoRA [IQR]. The three MoELoRA
           paths hold the same factors: their losses must agree.
layer      one Linear 384 -> 1536 alone, 512 rows of random input, forward + backward, total rank
           16 / 64 / 256 (r_e = 2 / 8 / 32): where the grouped path overtakes the dense one.
dmep       DMEP spec test (d)5: training steps per second of a MoELoRA before and after pruning half
           of the routed experts of every module (`splice.methods.moelora.prune_experts`), dense
           and grouped, paired and interleaved.
memory     one fresh interpreter per configuration (total rank 16): bytes saved for backward and
           peak RSS of a few training steps (`common.step_memory`), the MoELoRA paths vs LoRA.
accuracy   `splice.train.run`: MiniLM on Rotten Tomatoes and BBC News (test accuracy), SmolLM2-135M
           on the bundled arithmetic word problems (greedy exact match of the answer): LoRA r=16,
           MoELoRA default, GOAT, GSE (one shared expert) and default + DMEP, all at total rank 16
           with the same steps, batch, lengths and evaluation rows. One fresh process per run, one
           run at a time, one thread; the JSON and markdown are rewritten after every run, and
           `--merge` continues from them (finished runs with the same settings are kept). Runs
           that would end past `--budget-min` minutes are not started (the report lists them).

Timing on this shared 2-core machine is noisy: compare the paired ratios, not absolute times
(bench/README.md, "How to read the numbers").

    .venv/bin/python bench/bench_moe.py --sections speed layer dmep memory     # 10-15 min
    .venv/bin/python bench/bench_moe.py --sections accuracy --merge            # ~80 min (budget 90)
    .venv/bin/python bench/bench_moe.py --quick                                # smoke run, 2-5 min
    .venv/bin/python bench/bench_moe.py --render bench/results/moe.json        # redo .md and .png

Results: bench/results/moe.{json,md} and moe.png (`moe_quick.*` for --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_speed import repeated
from common import (
    HEAD,
    RSS_FOLLOWS_LIVE,
    Batch,
    Candidate,
    Phases,
    bench_main,
    bench_parser,
    compare,
    environment,
    finish,
    inputs_only,
    interleaved,
    load_minilm_classifier,
    memory_children,
    memory_marks,
    minilm_dir,
    review_batch,
    run_child,
    run_sections,
    seed_everything,
    seed_lora_b,
    seed_summary,
    settings_from,
    short_error,
    source_version,
    step_memory,
    trainable,
)
from forms_setup import count_parameters, form_step
from moe_report import draw, markdown
from multi_adapter_setup import B_STD
from torch import nn

import splice
from splice.methods.moelora import MoELoRAAdapter, moe_adapters, prune_experts

EXPERTS, TOP_K = 8, 2
BASELINE = "LoRA"
PATHS = (BASELINE, "dense", "grouped", "naive")  # the speed candidates; "naive" is `NaiveLoop`
TARGETS: dict[str, str | list[str]] = {"qv": ["query", "value"], "all-linear": "all-linear"}
LAYER_SHAPE = (384, 1536)  # MiniLM's intermediate.dense, the widest Linear it has
MODEL_OF = {"rotten_tomatoes": "minilm", "bbc_news": "minilm", "arithmetic": "smollm2"}
SECTIONS = ("memory", "accuracy", "speed", "layer", "dmep")


# ------------------------------------------------------------------------------ the candidates


@dataclass(frozen=True)
class Variant:
    """One adapter of the accuracy section: its adapter mapping, learning rate, schedule and why."""

    name: str
    adapter: dict[str, Any]
    lr: float
    schedule: dict[str, Any] | None = None
    why: str = ""


MOE = {"method": "moelora", "experts": EXPERTS, "top_k": TOP_K, "r": 16, "alpha": 32}
VARIANTS = [
    Variant("LoRA", {"method": "lora", "r": 16, "alpha": 32}, 2e-3,
            why="rank 16, scale alpha/r = 2; the trainer's default lr, not tuned (pilot, Rotten Tomatoes seed 0,"
                " 150 steps: 75.5% validation accuracy)"),
    Variant("MoE default", MOE, 2e-3,
            why="8 experts of rank 2, top-2, LoRA's init per expert, scale alpha/r_e = 16, balancing loss 0.01;"
                " LoRA's lr, not tuned (pilot: 77.0% validation accuracy)"),
    Variant("GOAT", MOE | {"init": "goat"}, 2e-3,
            why="experts from 8 segments of W's singular spectrum, aligned scale sqrt(3n/r_e) (24 on MiniLM, 29 on"
                " SmolLM2's q/v: 12-15x LoRA's scale 2, but only 1.5-1.8x MoE default's 16). lr from a pilot, Rotten"
                " Tomatoes seed 0, these 150 steps, validation accuracy (200 rows): 2e-4 (the tenth of LoRA's lr"
                " the aligned scale suggests) 59.5%, 6e-4 71.5%, 2e-3 73.0%, 6e-3 57.0% (kept its step-0 state)"),
    Variant("GSE", MOE | {"init": "gse", "shared_experts": 1}, 2e-3,
            why="1 shared (always on) + 7 routed experts from W's leading 16 singular triplets, aligned scale. lr"
                " from the same pilot: 2e-4 62.5%, 6e-4 71.0%, 2e-3 72.0% validation accuracy"),
    Variant("MoE + DMEP", MOE, 2e-3, schedule={"name": "dmep", "prune_at": 0.15, "keep_mass": 0.9},
            why="MoE default; at 15% of the steps each module keeps the fewest experts holding 90% of the"
                " routed slots (at least 2), then trains on without the balancing loss (pilot: 70.5% validation"
                " accuracy)"),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    ranks: list[int] = field(default_factory=lambda: [16, 128])  # total ranks of the speed section
    batch: int = 8
    seq_len: int = 64
    warmup: int = 2
    train_rounds: int = 20
    infer_rounds: int = 20
    infer_calls: int = 2  # inference forwards per candidate and round
    layer_ranks: list[int] = field(default_factory=lambda: [16, 64, 256])
    layer_rounds: int = 15
    layer_calls: int = 5
    dmep_rounds: int = 20
    mem_steps: int = 3
    variants: list[str] = field(default_factory=lambda: [v.name for v in VARIANTS])
    tasks: list[str] = field(default_factory=lambda: list(MODEL_OF))
    # Seeds per task: 3 on the MiniLM tasks; SmolLM2 runs take ~4-5 min each (a third of it greedy
    # generation for exact match), so a second seed there only if the budget allows.
    seeds: dict[str, list[int]] = field(default_factory=lambda: {
        "rotten_tomatoes": [0, 1, 2], "bbc_news": [0, 1, 2], "arithmetic": [0, 1]})
    steps: dict[str, int] = field(default_factory=lambda: {"rotten_tomatoes": 150, "bbc_news": 150, "arithmetic": 60})
    max_length: dict[str, int] = field(default_factory=lambda: {
        "rotten_tomatoes": 64, "bbc_news": 64, "arithmetic": 48})
    eval_rows: dict[str, int] = field(default_factory=lambda: {
        "rotten_tomatoes": 200, "bbc_news": 200, "arithmetic": 64})
    train_batch: int = 8
    head_lr: float = 3e-2  # bench_forms.py's: the trainer's 1e-2 leaves short runs at their random head
    budget_min: float = 90.0  # the accuracy section starts no run expected to end past this
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(targets=["qv"], ranks=[16], warmup=1, train_rounds=2, infer_rounds=2, infer_calls=1,
                   layer_ranks=[16], layer_rounds=2, layer_calls=1, dmep_rounds=2, mem_steps=1,
                   tasks=["rotten_tomatoes"], seeds={"rotten_tomatoes": [0]}, steps={"rotten_tomatoes": 4},
                   eval_rows={"rotten_tomatoes": 16}, budget_min=15.0, quick=True, **overrides)


class NaiveLoop(MoELoRAAdapter):
    """The reference both compute paths are measured against, Mixtral's per-expert loop: for each
    routed expert, `torch.where` over the top-k indices, the expert on those rows, its gated output
    `index_add`-ed back; the shared experts on every row. `use_naive_loop` puts it on built adapters."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        top_w, top_i = self.route_tokens(x)
        flat = x.to(self.lora_A.dtype).reshape(-1, x.shape[-1])
        top_w, top_i = top_w.reshape(-1, top_w.shape[-1]), top_i.reshape(-1, top_i.shape[-1])
        out = torch.zeros(flat.shape[0], self.info.out_features, dtype=flat.dtype, device=flat.device)
        for expert in range(self.shared + self.routed):
            rows = self._rows(expert)
            if expert < self.shared:
                hidden = F.linear(F.linear(flat, self.lora_A[rows]), self.lora_B[:, rows])
                out = out + hidden * (self.expert_scales[expert] / self.shared)
                continue
            token, slot = torch.where(top_i == expert - self.shared)
            hidden = F.linear(F.linear(flat[token], self.lora_A[rows]), self.lora_B[:, rows])
            out = out.index_add(0, token, hidden * (top_w[token, slot, None] * self.expert_scales[expert]))
        return out.view(*x.shape[:-1], self.info.out_features)


def use_naive_loop(model: nn.Module) -> None:
    """Make every MoELoRA module of `model` compute with `NaiveLoop` (same parameters and routing)."""
    for adapter in moe_adapters(model)[1].values():
        if adapter.config.dropout:
            raise ValueError("NaiveLoop has no expert dropout; build the MoELoRA with dropout=0")
        adapter.__class__ = NaiveLoop


def attach_path(model: nn.Module, path: str, r: int, targets: str | list[str], head: bool = True) -> nn.Module:
    """`model` (changed in place) with LoRA of rank r or a top-2-of-8 MoELoRA of total rank r
    computed by `path`, seeded: the same factors for every MoELoRA path, lora_B non-zero."""
    train_also = [HEAD] if head else []
    if path == BASELINE:
        config = splice.LoRA(r=r, alpha=2 * r, targets=targets, train_also=train_also)
    else:
        config = splice.MoELoRA(experts=EXPERTS, top_k=TOP_K, r=r, alpha=2 * r, targets=targets,
                                train_also=train_also, compute="grouped" if path == "grouped" else "dense")
    torch.manual_seed(0)
    splice.attach(model, config)
    if path == "naive":
        use_naive_loop(model)
    seed_lora_b(model, 3, B_STD)
    return model


def stamp() -> dict[str, Any]:
    """When a section ran, the load average then and the source it ran (sections of one report, and
    the training runs of one section, may come from several invocations while src changes)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg(), "source": source_version()}


def timed_section(fn: Callable[[Settings, Phases], dict[str, Any]]) -> Callable[[Settings, Phases], dict[str, Any]]:
    """`fn` with the settings it ran with and its start and end (`stamp`) recorded in its result."""
    def section(s: Settings, phase: Phases) -> dict[str, Any]:
        started = stamp()
        return {**fn(s, phase), "settings": asdict(s), "started": started, "ended": stamp()}
    return section


# ------------------------------------------------------------------------------------ a. speed


def speed(s: Settings, phase: Phases) -> dict[str, Any]:
    """Training step and inference forward of every path, per total rank and target set."""
    seed_everything(0)
    base = load_minilm_classifier(minilm_dir())
    batch, real = review_batch(s.batch, s.seq_len)
    out: dict[str, Any] = {"batch": list(batch["input_ids"].shape), "real_token_share": real, "groups": {}}
    for r in s.ranks:
        for key in s.targets:
            phase(f"[speed] total rank {r}, {key}")
            models = {path: attach_path(copy.deepcopy(base), path, r, TARGETS[key]) for path in PATHS}
            out["groups"][f"r={r} {key}"] = {"r": r, "targets": key, **speed_group(models, batch, s)}
            del models
            gc.collect()
    return out


SPEED_PAIRS = [(p, BASELINE) for p in PATHS[1:]] + [("grouped", "dense"), ("naive", "dense")]


def speed_group(models: dict[str, nn.Module], batch: Batch, s: Settings) -> dict[str, Any]:
    """Losses at equal weights (eval), then training steps, then inference forwards, interleaved."""
    with torch.no_grad():
        losses = {name: m.eval()(**batch).loss.item() for name, m in models.items()}
    steps = []
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-4)
        steps.append(Candidate(name, lambda _, m=model, o=optimizer: form_step(m, o, batch)))
    train = compare(interleaved(steps, s.train_rounds, s.warmup), SPEED_PAIRS)
    inputs = inputs_only(batch)
    for model in models.values():
        model.eval()
    forwards = [Candidate(name, repeated(lambda m=m: m(**inputs), s.infer_calls)) for name, m in models.items()]
    inference = compare(interleaved(forwards, s.infer_rounds, s.warmup), SPEED_PAIRS)
    return {"train": train, "inference": inference, "loss_at_equal_weights": losses,
            "parameters": {name: count_parameters(m) for name, m in models.items()},
            "max_loss_diff_vs_dense": max(abs(losses[p] - losses["dense"]) for p in ("grouped", "naive"))}


# ------------------------------------------------------------------------------------ b. layer


def layer(s: Settings, phase: Phases) -> dict[str, Any]:
    """One Linear alone, forward + backward of every path per total rank (no optimizer, no head)."""
    seed_everything(0)
    n_in, n_out = LAYER_SHAPE
    x = torch.randn(s.batch * s.seq_len, n_in)
    out: dict[str, Any] = {"shape": [n_in, n_out], "rows": x.shape[0], "ranks": {}}
    for r in s.layer_ranks:
        phase(f"[layer] total rank {r}")
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(n_in, n_out))
        layers = {path: attach_path(copy.deepcopy(plain), path, r, ["0"], head=False) for path in PATHS}
        with torch.no_grad():
            outputs = {path: m(x) for path, m in layers.items()}
        candidates = [Candidate(path, lambda _, m=m: backward_calls(m, x, s.layer_calls)) for path, m in layers.items()]
        out["ranks"][str(r)] = {**compare(interleaved(candidates, s.layer_rounds, s.warmup), SPEED_PAIRS),
                                "max_diff_vs_dense": max((outputs[p] - outputs["dense"]).abs().max().item()
                                                         for p in ("grouped", "naive"))}
    return out


def backward_calls(model: nn.Module, x: torch.Tensor, calls: int) -> None:
    for _ in range(calls):
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- c. DMEP


def dmep(s: Settings, phase: Phases) -> dict[str, Any]:
    """DMEP (d)5: steps per second before and after pruning half of every module's routed experts."""
    seed_everything(0)
    base = load_minilm_classifier(minilm_dir())
    batch, _ = review_batch(s.batch, s.seq_len)
    out: dict[str, Any] = {"batch": list(batch["input_ids"].shape), "kept": EXPERTS // 2, "targets": {}}
    for key in s.targets:
        phase(f"[dmep] {key}")
        candidates, parameters = [], {}
        for compute in ("dense", "grouped"):
            for when in ("before", "after"):
                model = attach_path(copy.deepcopy(base), compute, 16, TARGETS[key])
                if when == "after":
                    prune_experts(model, {m: range(EXPERTS // 2) for m in moe_adapters(model)[1]})
                model.train()
                optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-4)
                name = f"{compute} {when}"
                parameters[name] = count_parameters(model)
                candidates.append(Candidate(name, lambda _, m=model, o=optimizer: form_step(m, o, batch)))
        pairs = [(f"{c} after", f"{c} before") for c in ("dense", "grouped")]
        out["targets"][key] = {**compare(interleaved(candidates, s.dmep_rounds, s.warmup), pairs),
                               "parameters": parameters}
        del candidates
        gc.collect()
    return out


# ----------------------------------------------------------------------------------- d. memory


def memory(s: Settings, phase: Phases) -> dict[str, Any]:
    """One fresh interpreter per path and target set, one after another (each measures its own peak)."""
    kinds = {f"{path} {key}": ["--mem-child", path, "--mem-targets", key, "--threads", str(s.threads),
                               "--mem-steps", str(s.mem_steps)] for key in s.targets for path in PATHS}
    children = memory_children(Path(__file__).resolve(), kinds, RSS_FOLLOWS_LIVE, phase, keep_going=True)
    return {"children": children, "malloc_env": RSS_FOLLOWS_LIVE, "r": 16, "steps": s.mem_steps}


def memory_child(path: str, key: str, s: Settings) -> dict[str, Any]:
    """Inside a fresh interpreter: model, adapter, optimizer, then `common.step_memory`."""
    torch.set_num_threads(s.threads)
    after_import = memory_marks()
    model = attach_path(load_minilm_classifier(minilm_dir()), path, 16, TARGETS[key])
    batch, _ = review_batch(s.batch, s.seq_len)
    model.train()
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-4)
    return {"path": path, "targets": key, **count_parameters(model),
            **step_memory(model, batch, lambda: form_step(model, optimizer, batch), after_import, steps=s.mem_steps)}


# --------------------------------------------------------------------------------- e. accuracy


def accuracy_jobs(s: Settings) -> list[dict[str, Any]]:
    """Every (task, seed, variant) run with its full training settings, the first seed of every task
    first, then the remaining seeds task by task: what the budget cuts is the extra seeds."""
    order = [(t, s.seeds[t][0]) for t in s.tasks] + [(t, seed) for t in s.tasks for seed in s.seeds[t][1:]]
    jobs = []
    for data, seed in order:
        classification = MODEL_OF[data] == "minilm"
        for name in s.variants:
            v = VARIANT_BY_NAME[name]
            jobs.append({"variant": name, "data": data, "seed": seed, "model": MODEL_OF[data],
                         "adapter": v.adapter, "lr": v.lr, "schedule": v.schedule, "steps": s.steps[data],
                         "batch_size": s.train_batch, "max_length": s.max_length[data],
                         "eval_rows": s.eval_rows[data], "head_lr": s.head_lr if classification else None,
                         "threads": s.threads})
    return jobs


def train_child(job: dict[str, Any]) -> dict[str, Any]:
    """One `splice.train.run` (in a fresh interpreter): test, validation and before-training metric
    (accuracy or exact match), trainable count, timings, and DMEP's pruning record."""
    from rich.console import Console

    from splice.train import TrainConfig, run

    torch.set_num_threads(job["threads"])
    source = source_version()
    task = "classification" if job["model"] == "minilm" else "causal_lm"
    metric = "accuracy" if task == "classification" else "exact_match"
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(model=job["model"], task=task, data=job["data"], adapter=dict(job["adapter"]),
                             max_length=job["max_length"], batch_size=job["batch_size"], lr=job["lr"],
                             head_lr=job["head_lr"], max_steps=job["steps"], eval_every=job["steps"],
                             max_eval_examples=job["eval_rows"], seed=job["seed"], output_dir=run_dir,
                             checkpoint_every=None, schedule=job["schedule"])
        result = run(config, console=Console(quiet=True), force=True)
        record = Path(run_dir) / "dmep.json"
        pruning = pruning_summary(json.loads(record.read_text())) if record.exists() else None
    after, before = result.metrics["after"], result.metrics["before"]
    losses = [h["loss"] for h in result.history if h.get("loss") is not None]
    return {"metric": metric, "test_accuracy": after["test"][metric], "validation": after["validation"][metric],
            "test_before": before["test"][metric], "test_loss": after["test"]["loss"],
            "best_step": result.best_step, "trainable": result.parameters["trainable"],
            "last_loss": float(np.mean(losses[-5:])) if losses else None, "status": result.status,
            "train_s": result.timings["train_s"], "total_s": result.timings["total_s"], "pruning": pruning,
            "source": source}


def pruning_summary(record: dict[str, Any]) -> dict[str, Any]:
    """DMEP's dmep.json in brief: the step, adapter parameters before and after, experts kept per module kind."""
    removed = record["parameters_removed"]
    kept: dict[str, list[int]] = {}
    for module, experts in record["keep"].items():
        kept.setdefault(module.rsplit(".", 1)[-1], []).append(len(experts))
    return {"step": record["step"], "before": sum(v["before"] for v in removed.values()),
            "after": sum(v["after"] for v in removed.values()),
            "mean_experts_kept": {kind: float(np.mean(n)) for kind, n in kept.items()}}


def accuracy(s: Settings, phase: Phases, previous: list[dict[str, Any]],
             progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every job in a fresh interpreter, one at a time; a job whose settings match a finished run of
    `previous` is taken from it. `progress` gets the section after every run."""
    jobs = accuracy_jobs(s)
    finished = {job_key(r): r for r in previous if "error" not in r}
    started = stamp()
    clock = time.perf_counter()
    runs: list[dict[str, Any]] = []
    not_run: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        if job_key(job) in finished:
            runs.append(finished[job_key(job)])
            continue
        elapsed = (time.perf_counter() - clock) / 60
        if elapsed + expected_minutes(runs, job) > s.budget_min:
            not_run.append(job)
            continue
        phase(f"[accuracy] run {i + 1}/{len(jobs)}: {job['variant']}, {job['data']}, seed {job['seed']}")
        row = dict(job)
        try:
            row.update(run_child(Path(__file__).resolve(), ["--train-child", json.dumps(job)]))
        except RuntimeError as err:
            lines = [x for x in str(err).strip().splitlines() if x.strip()]
            row["error"] = lines[-1][:300] if lines else short_error(err)
        runs.append(row)
        print("  " + (f"failed: {row['error']}" if "error" in row else
                      f"test {row['metric']} {row['test_accuracy']:.3f}, {row['train_s']:.0f} s training,"
                      f" {row['total_s']:.0f} s in all"), flush=True)
        progress(accuracy_section(s, runs, not_run, started))
    return accuracy_section(s, runs, not_run, started)


def job_key(job: dict[str, Any]) -> str:
    """What makes two runs the same run: every training setting (not the outcome)."""
    keys = ("variant", "data", "seed", "model", "adapter", "lr", "schedule", "steps", "batch_size", "max_length",
            "eval_rows", "head_lr", "threads")
    return json.dumps({k: job[k] for k in keys}, sort_keys=True)


def expected_minutes(runs: list[dict[str, Any]], job: dict[str, Any]) -> float:
    """A run's expected length: the mean of the finished runs on its data set (0 before the first)."""
    same = [r["total_s"] for r in runs if r["data"] == job["data"] and "total_s" in r]
    return float(np.mean(same)) / 60 if same else 0.0


def accuracy_section(s: Settings, runs: list[dict[str, Any]], not_run: list[dict[str, Any]],
                     started: dict[str, Any]) -> dict[str, Any]:
    """The runs so far, per variant and task the `seed_summary`, and each run's training time over
    the LoRA run of the same task and seed (run next to it)."""
    def extra(ok: list[dict[str, Any]]) -> dict[str, Any]:
        lora = {(r["data"], r["seed"]): r["train_s"] for r in runs
                if r["variant"] == BASELINE and "train_s" in r}
        ratios = [r["train_s"] / lora[(r["data"], r["seed"])] for r in ok if (r["data"], r["seed"]) in lora]
        prunings = [r["pruning"] for r in ok if r.get("pruning")]
        return {"trainable": round(float(np.mean([r["trainable"] for r in ok]))),
                "train_s_mean": float(np.mean([r["train_s"] for r in ok])),
                "train_time_vs_lora": float(np.median(ratios)) if ratios else None,
                "train_time_vs_lora_range": [min(ratios), max(ratios)] if ratios else None,
                "before_mean": float(np.mean([r["test_before"] for r in ok])),
                "seeds": [r["seed"] for r in ok],
                "pruned_parameters": [p["before"] - p["after"] for p in prunings] or None,
                "pruned_share_mean": float(np.mean([1 - p["after"] / p["before"] for p in prunings]))
                if prunings else None}

    return {"runs": runs, "not_run": [{k: j[k] for k in ("variant", "data", "seed")} for j in not_run],
            "summary": seed_summary(runs, "variant", s.variants, s.tasks, extra),
            "variants": {name: asdict(VARIANT_BY_NAME[name]) for name in s.variants},
            "settings": asdict(s), "started": started, "ended": stamp()}


# ------------------------------------------------------------------------------------------ main


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The chosen sections (memory children and training runs first, then the timed ones with malloc
    keeping freed memory); with `--merge`, the other sections and the finished training runs come
    from the results already written. The results are rewritten after every section and run."""
    phase = Phases()
    torch.set_num_threads(s.threads)
    stem = "moe_quick" if s.quick else "moe"
    target = args.out_dir / f"{stem}.json"
    result: dict[str, Any] = {"sections": {}}
    if args.merge and target.exists():
        result = json.loads(target.read_text())
    result.update(environment=environment(s.threads), settings=asdict(s))
    if args.note:
        result.setdefault("notes", []).append({"date": stamp()["date"], "text": args.note})

    def save(key: str, section: dict[str, Any]) -> None:
        result["sections"][key] = section
        finish(result, phase)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=str) + "\n")
        target.with_suffix(".md").write_text(markdown(result, s) + "\n")

    def saving(key: str, fn: Callable[[Settings, Phases], dict[str, Any]]) -> Callable[[Settings, Phases], Any]:
        def section(s: Settings, phase: Phases) -> dict[str, Any]:
            out = timed_section(fn)(s, phase)
            save(key, out)
            return out
        return section

    previous = result["sections"].get("accuracy", {}).get("runs", [])
    sections = {"memory": saving("memory", memory), "speed": saving("speed", speed),
                "layer": saving("layer", layer), "dmep": saving("dmep", dmep),
                "accuracy": lambda s, phase: accuracy(s, phase, previous, lambda sec: save("accuracy", sec))}
    run_sections(result, s, phase, sections, untimed=("memory", "accuracy"), timed=("speed", "layer", "dmep"))
    finish(result, phase)
    draw(result, args.out_dir / f"{stem}.png")
    return result


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "2-5 minute smoke run: q,v, rank 16, 2 rounds, Rotten Tomatoes 4 steps (not results)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="subset of sections")
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), help="target sets of the timed sections")
    p.add_argument("--ranks", nargs="+", type=int, help="total ranks of the speed section (multiples of 8)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANT_BY_NAME), help="accuracy variants (keep LoRA)")
    p.add_argument("--tasks", nargs="+", choices=list(MODEL_OF), help="accuracy tasks")
    p.add_argument("--seed-list", nargs="+", type=int, help="accuracy seeds for every chosen task")
    p.add_argument("--budget-min", type=float, help="start no accuracy run expected to end past this (minutes)")
    for name in ("train-rounds", "infer-rounds", "layer-rounds", "dmep-rounds", "warmup", "mem-steps"):
        p.add_argument(f"--{name}", type=int, help=f"override the setting {name.replace('-', '_')}")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections and the finished runs of the results already in --out-dir")
    p.add_argument("--note", help="a sentence for the report's notes (context the numbers cannot carry)")
    p.add_argument("--mem-child", help=argparse.SUPPRESS)
    p.add_argument("--mem-targets", help=argparse.SUPPRESS)
    p.add_argument("--train-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    s = settings_from(args, Settings)
    if args.seed_list:
        s.seeds = {t: args.seed_list for t in s.tasks}
    unknown = [t for t in s.tasks if t not in s.seeds]
    if unknown:
        p.error(f"no seeds for tasks {unknown}: give --seed-list")
    return args, s


def child(args: argparse.Namespace, s: Settings) -> bool:
    """Answer a memory or training child call (one JSON line on stdout); False when this is none."""
    if args.mem_child:
        print(json.dumps(memory_child(args.mem_child, args.mem_targets, s)))
    elif args.train_child:
        print(json.dumps(train_child(json.loads(args.train_child))))
    return bool(args.mem_child or args.train_child)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, run, markdown, "moe", child=child, draw=draw)


if __name__ == "__main__":
    main()
