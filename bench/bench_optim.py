"""Optimizers for LoRA (issue 19): LoFT vs AdamW LoRA vs LoRA+, and full fine-tuning of the same
layers as the reference LoFT claims to approach; MiniLM on Rotten Tomatoes and BBC News, SmolLM2
on arithmetic, 3 seeds; accuracy, loss curves, step time, optimizer memory and a verdict per claim.

Arms, each run through `splice.train.Trainer` in a fresh interpreter, one torch thread:

    adamw     LoRA r=8, alpha=16 on the task's targets, torch's AdamW at the repo's LoRA rate
    loraplus  the same LoRA, `optimizer: loraplus` (HF PEFT's LoRA+ groups, B at 16x A's rate), A's rate
              swept like LoFT's (the task's LoRA rate is in the grid: at it, B's 16x did not train RT)
    loft      the same LoRA, `optimizer: loft` (AdamW steps of W projected onto the factors, one
              factor per step, W-space clipping) at the rate the sweep picks
    full      the Linear weights the LoRA targets (MiniLM query/value, SmolLM2 q_proj/v_proj; weights,
              not biases) trained in full with AdamW at the rate the sweep picks

The classification head (MiniLM's `classifier`, fresh) trains in full with AdamW at head_lr 1e-2 in
every arm. Full fine-tuning goes through the same trainer: `load_run` attaches the task's LoRA as in
the other arms (so the seed gives the same head and data order), its factors are frozen (B stays
zero: the adapter adds exactly 0) and the target weights made trainable before the `Trainer` is
built; the trainer trains what requires grad (`adapter_parameters`): the weights in the adapter's
group (lr, weight decay 0.01, clipping 1.0, warm-up + cosine) and the head in its own (head_lr).
`train_also` would not do: it trains what it lists at head_lr, the head's rate. The frozen rank-8
product still runs (two thin matmuls per target, forward and backward: under 1% of a step).

Tasks (the repo's defaults for LoRA on each, TrainConfig and examples/*.yaml):

    rotten_tomatoes  MiniLM, 2 classes, max_length 64, batch 16, LoRA lr 2e-3 (TrainConfig default,
                     examples/rotten_tomatoes_lora.yaml), warm-up 6%, 300 steps (1.2 epochs),
                     evaluation every 50 steps on all 486 validation rows, test all 488
    bbc_news         MiniLM, 5 classes, the same settings (the brief's max_length 64: the headline and
                     first lines of each article), 300 steps (2.7 epochs), 222 / 223 rows
    arithmetic       SmolLM2-135M-Instruct as a generator, examples/smollm2_arithmetic.yaml: q_proj,
                     v_proj, max_length 48, batch 8, lr 1e-3, warm-up 10%, 40 steps, evaluation every
                     10 steps on 48 rows (loss), test loss and greedy exact match on 48 test rows

Learning rates. AdamW and LoRA+ take the repo's LoRA rates above. LoFT's step is AdamW's step of W
projected onto the factors, so its rate is a W-space rate like full fine-tuning's, not LoRA's 2e-3;
and a rank-8 projection keeps only part of a sign-like Adam step of a 384- or 576-wide weight, so the
upper end of the full-FT range is expected to suit it. Both are chosen per task by a sweep at seed 0
(`--loft-lrs`, default 1e-4 3e-4 1e-3; `--full-lrs`, default 3e-5 1e-4 3e-4): the rate whose best
state scores best on validation (accuracy, ties by loss; the arithmetic task by loss, as the trainer
keeps its best) is used for every seed, and seed 0's main run is that sweep run. The tuned arms thus
got a choice of three on seed 0's validation rows that AdamW and LoRA+ did not: the report says so.
A single rate in the list fixes it (no sweep).

alpha   claim 2: LoFT and AdamW LoRA on Rotten Tomatoes at alpha = r and 4r (the main runs are 2r),
        3 seeds. LoFT's W trajectory does not depend on the scale s = alpha/r in exact arithmetic
        (its gradients are rescaled by the factors' Gram matrices, B̃ = s B carries the scale), so
        LoFT should barely move; AdamW's effective rate scales with s.
timing  paired, interleaved training steps (bench/README.md) of the four arms' trainers in one
        process on the same batches (MiniLM on Rotten Tomatoes, SmolLM2 on arithmetic): per-round
        ratios to AdamW LoRA, and the optimizer's own `step()` time, the optimizer state bytes
        (`splice.optim.optimizer_state_bytes`) and trainable parameters of each.

Per run: the loss of every step, validation metrics at every evaluation, the best state's validation
and test metrics (the trainer keeps the best on validation), the final state's, the mean and median
time of a training step (the first and the evaluating ones left out) and of the optimizer's `step()`,
the optimizer's state bytes (all, and the adapter's part
without the head), trainable parameters, |ΔW| (Frobenius norm of the weight change, summed over
targets, final state) and the run's status (a non-finite loss stops it: "diverged").

Claims (verdicts from paired per-seed differences: the same seed gives every arm the same data order
and head; "yes" when the 95% t-interval of the mean difference is on the claim's side of 0, "no" when
it is on the other, else "can't tell"; one seed: no verdict):

1. LoFT narrows the gap to full fine-tuning: |AdamW - full| - |LoFT - full| > 0, on test accuracy
   (exact match for arithmetic) of the best state and on the final validation loss.
2. LoFT needs no alpha tuning: |AdamW(4r) - AdamW(r)| - |LoFT(4r) - LoFT(r)| > 0 (test accuracy and
   final validation loss), Rotten Tomatoes.
3. LoRA+ trains faster than LoRA: AdamW's training loss - LoRA+'s at a fixed step (the mean over the
   steps 40-50% of the run; 15-25% shown too) > 0.
Plus the measured step-time and optimizer-state ratios to AdamW LoRA (timing section, paired), and
where LoFT loses next to where it wins.

    .venv/bin/python bench/bench_optim.py                          # everything, budget 480 min
    .venv/bin/python bench/bench_optim.py --merge --budget-min 240 # continue it (keeps finished runs)
    .venv/bin/python bench/bench_optim.py --tasks arithmetic --merge
    .venv/bin/python bench/bench_optim.py --sections timing --merge
    .venv/bin/python bench/bench_optim.py --quick                  # smoke run: RT, 1 seed, 8 steps
    .venv/bin/python bench/bench_optim.py --render bench/results/optim.json   # redo .md and .png

Time. Measured on this 2-core VM at load 5-7 (another bench running), one thread per run: --quick
4.3 min wall (1.6 min CPU: the wall is mostly waiting for a core; ~2 min when idle); a MiniLM Rotten
Tomatoes training step 0.49 s (AdamW LoRA), 0.67 s (LoFT), 0.53 s (full FT), 0.44 s (LoRA+); a child's
start (imports) ~20 s; a SmolLM2 arithmetic step ~5.5 s wall (2 s CPU) and a 48-row generation pass
~20 s in smoke runs. Extrapolated (BBC rows fill all 64 tokens, ~1.7x RT's grouped batches; evaluation
~15% of a MiniLM run, ~45% of a SmolLM2 run): a run ~4 min (RT; LoFT ~5), ~6 min (BBC), ~7.5 min
(arithmetic); 20 runs per task (10 sweep: LoFT 3, full 3, LoRA+ 4; 1 more at seed 0, 9 at seeds 1-2)
+ 12 alpha runs + timing (~8 min): ~70 children, ~6.5 h at this load, ~3 h on an idle core. The default budget (480 min)
should cover it; otherwise continue with --merge.

Results: bench/results/optim.{json,md} and optim.png (loss curves); `optim_quick.*` for --quick
(git-ignored: far too few steps to mean anything). Runs are recorded with their settings; `--merge`
keeps the finished runs of the result already in --out-dir whose settings equal this invocation's and
runs only the rest; a run expected to end past `--budget-min` (per invocation) is not started and is
listed "not run". Order: timing, then per task the sweep, then seed 0 of every arm, the alpha runs,
then seed 1, seed 2. The JSON, markdown and PNG are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Candidate,
    Phases,
    bench_main,
    bench_parser,
    budgeted_children,
    continuable,
    continued_result,
    json_child,
    result_saver,
    settings_from,
    source_version,
    versus_baseline,
)
from optim_report import ARMS, SWEPT, chosen_lrs, draw, markdown

SCRIPT = Path(__file__).resolve()
SECTIONS = ["timing", "runs"]


@dataclass(frozen=True)
class Task:
    """One task with the repo's LoRA recipe for it."""

    model: str
    data: str
    kind: str  # TrainConfig.task
    targets: tuple[str, ...]
    lr: float  # AdamW LoRA's (and LoRA+'s A) rate
    head_lr: float
    max_length: int
    batch_size: int
    warmup_ratio: float


TASKS = {
    "rotten_tomatoes": Task("minilm", "rotten_tomatoes", "classification", ("query", "value"), 2e-3, 1e-2, 64, 16,
                            0.06),
    "bbc_news": Task("minilm", "bbc_news", "classification", ("query", "value"), 2e-3, 1e-2, 64, 16, 0.06),
    "arithmetic": Task("smollm2", "arithmetic", "causal_lm", ("q_proj", "v_proj"), 1e-3, 1e-2, 48, 8, 0.1),
}
TIMING_TASK = {"minilm": "rotten_tomatoes", "smollm2": "arithmetic"}  # the task each model is timed on
# What makes two runs the same run (every setting, not the outcome), per section.
TRAIN_KEYS = ("section", "task", "arm", "seed", "lr", "alpha", "r", "optimizer", "model", "data", "kind", "targets",
              "head_lr", "max_length", "batch_size", "warmup_ratio", "steps", "eval_every", "eval_examples",
              "threads")
TIMING_KEYS = ("section", "model", "task", "arms", "lrs", "r", "alpha", "optimizers", "rounds", "warmup", "threads")


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    rank: int = 8
    loraplus_ratio: float = 16.0
    loraplus_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 2e-3])  # A's rate
    loft_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])  # swept at sweep_seed
    full_lrs: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    sweep_seed: int = 0
    alpha_tasks: list[str] = field(default_factory=lambda: ["rotten_tomatoes"])
    alpha_arms: list[str] = field(default_factory=lambda: ["adamw", "loft"])
    alpha_multiples: list[float] = field(default_factory=lambda: [1.0, 4.0])  # alpha = multiple x r (main: 2)
    minilm_steps: int = 300
    minilm_eval_every: int = 50
    minilm_eval_examples: int | None = None  # None: every validation and test row
    smollm2_steps: int = 40
    smollm2_eval_every: int = 10
    smollm2_eval_examples: int | None = 48
    timing_models: list[str] = field(default_factory=lambda: list(TIMING_TASK))
    timing_rounds: int = 12
    timing_warmup: int = 2
    budget_min: float = 480.0

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, seeds=[0], tasks=["rotten_tomatoes"], loft_lrs=[1e-4, 1e-3],
                   loraplus_lrs=[2e-3], full_lrs=[1e-4], alpha_tasks=[], minilm_steps=8, minilm_eval_every=4,
                   minilm_eval_examples=16,
                   timing_models=["minilm"], timing_rounds=3, timing_warmup=1, budget_min=15.0)


# ----------------------------------------------------------------------------------------- jobs


def model_budget(s: Settings, model: str) -> tuple[int, int, int | None]:
    """(steps, eval_every, eval_examples) of a model's runs."""
    prefix = "minilm" if model == "minilm" else "smollm2"
    return getattr(s, f"{prefix}_steps"), getattr(s, f"{prefix}_eval_every"), getattr(s, f"{prefix}_eval_examples")


def optimizer_spec(s: Settings, arm: str) -> str | dict[str, Any]:
    return {"adamw": "adamw", "full": "adamw", "loft": "loft",
            "loraplus": {"name": "loraplus", "lr_ratio": s.loraplus_ratio}}[arm]


def make_job(s: Settings, task: str, arm: str, seed: int, lr: float | None = None,
             alpha: float | None = None) -> dict[str, Any]:
    """One training run; `lr` None: the task's LoRA rate (adamw, loraplus); `alpha` None: 2r."""
    t = TASKS[task]
    if arm not in ARMS:
        raise KeyError(arm)
    if lr is None and arm in SWEPT:
        raise ValueError(f"{arm} needs a learning rate")
    steps, eval_every, eval_examples = model_budget(s, t.model)
    return {"section": "train", "task": task, "arm": arm, "seed": seed,
            "lr": t.lr if lr is None else lr, "alpha": 2.0 * s.rank if alpha is None else float(alpha), "r": s.rank,
            "optimizer": optimizer_spec(s, arm), "model": t.model, "data": t.data, "kind": t.kind,
            "targets": list(t.targets), "head_lr": t.head_lr, "max_length": t.max_length,
            "batch_size": t.batch_size, "warmup_ratio": t.warmup_ratio, "steps": steps, "eval_every": eval_every,
            "eval_examples": eval_examples, "threads": s.threads}


def make_timing_job(s: Settings, model: str) -> dict[str, Any]:
    """The paired step timing of every arm on one model (LoFT and full at their sweeps' middle rate:
    the rate does not change what a step computes)."""
    task = TIMING_TASK[model]
    lrs = {"adamw": TASKS[task].lr, "loraplus": TASKS[task].lr, "loft": s.loft_lrs[len(s.loft_lrs) // 2],
           "full": s.full_lrs[len(s.full_lrs) // 2]}
    return {"section": "timing", "model": model, "task": task, "arms": list(s.arms),
            "lrs": {arm: lrs[arm] for arm in s.arms}, "r": s.rank, "alpha": 2.0 * s.rank,
            "optimizers": {arm: optimizer_spec(s, arm) for arm in s.arms}, "rounds": s.timing_rounds,
            "warmup": s.timing_warmup, "threads": s.threads}


def job_key(job: dict[str, Any]) -> str:
    keys = TIMING_KEYS if job["section"] == "timing" else TRAIN_KEYS
    return json.dumps({k: job.get(k) for k in keys}, sort_keys=True)


def rebuild(s: Settings, run: dict[str, Any]) -> dict[str, Any]:
    """The job this invocation would make for an earlier run's identity (--merge)."""
    if run["section"] == "timing":
        return make_timing_job(s, run["model"])
    lr = run["lr"] if run["arm"] in SWEPT else None
    return make_job(s, run["task"], run["arm"], run["seed"], lr=lr, alpha=run["alpha"])


def plan(s: Settings, runs: list[dict[str, Any]], pending: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every job in order (a generator: LoFT's and full FT's rate for the main runs is read from the
    sweep runs once they are in `runs`). Jobs that cannot be made yet (their sweep is incomplete)
    go to `pending`."""
    if "timing" in s.sections:
        for model in s.timing_models:
            yield make_timing_job(s, model)
    if "runs" not in s.sections:
        return
    sweeps = {arm: getattr(s, key) for arm, key in SWEPT.items()}
    for i, seed in enumerate(s.seeds):
        for task in s.tasks:
            if i == 0:
                for arm, lrs in sweeps.items():
                    if arm in s.arms and len(lrs) > 1:
                        yield from (make_job(s, task, arm, s.sweep_seed, lr=lr) for lr in lrs)
            chosen = chosen_lrs(runs, asdict(s), task)
            arms = [(arm, None) for arm in s.arms]
            if task in s.alpha_tasks:
                arms += [(arm, m * s.rank) for arm in s.alpha_arms for m in s.alpha_multiples]
            for arm, alpha in arms:
                if arm in sweeps and chosen.get(arm) is None:
                    pending.append({"task": task, "arm": arm, "seed": seed, "alpha": alpha,
                                    "why": f"the {arm} sweep of {task} is not complete"})
                    continue
                yield make_job(s, task, arm, seed, lr=chosen.get(arm), alpha=alpha)


def describe(job: dict[str, Any]) -> str:
    if job["section"] == "timing":
        return f"[timing] {job['model']}: {job['rounds']} interleaved rounds of {', '.join(job['arms'])}"
    return (f"[{job['task']}] {job['arm']} lr {job['lr']:g} alpha {job['alpha']:g} seed {job['seed']}"
            f" ({job['steps']} steps)")


# ---------------------------------------------------------------------------------- one run


def train_config(job: dict[str, Any], folder: str, steps: int | None = None, evaluate: bool = True) -> Any:
    from splice.train import TrainConfig

    return TrainConfig(model=job["model"], task=job["kind"], data=job["data"],
                       adapter={"method": "lora", "r": job["r"], "alpha": job["alpha"], "targets": job["targets"]},
                       max_length=job["max_length"], batch_size=job["batch_size"], lr=job["lr"],
                       head_lr=job["head_lr"], warmup_ratio=job["warmup_ratio"], max_steps=steps or job["steps"],
                       eval_every=job["eval_every"] if evaluate else None, max_eval_examples=job.get("eval_examples"),
                       seed=job["seed"], optimizer=job["optimizer"], output_dir=f"{folder}/run",
                       checkpoint_every=None)


def full_weights(model: Any, targets: list[str]) -> dict[str, Any]:
    """Freeze the attached LoRA's factors (B is zero: it adds nothing) and make the target Linear
    layers' weights trainable: full fine-tuning of the same layers. Returns a copy of those weights
    (to measure how far they move)."""
    import torch

    for name, p in model.named_parameters():
        if ".splice." in name:
            p.requires_grad_(False)
    initial = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            module.weight.requires_grad_(True)
            initial[name] = module.weight.detach().clone()
    if not initial:
        raise RuntimeError(f"no Linear layer named {targets} to fine-tune")
    return initial


def weight_change(model: Any, initial: dict[str, Any] | None) -> float:
    """sqrt(sum over targets of |ΔW|_F^2): the adapters' s B A, or the weights' change from `initial`."""
    from splice.optim import factor_pairs

    if initial is not None:
        modules = dict(model.named_modules())
        total = sum(float((modules[n].weight.detach() - w).pow(2).sum()) for n, w in initial.items())
    else:
        total = sum(float((pair.scaling * pair.B.detach() @ pair.A.detach()).pow(2).sum())
                    for pair in factor_pairs(model))
    return total ** 0.5


def timed_steps(optimizer: Any) -> list[float]:
    """Record the seconds of every `optimizer.step()` from now on (the list it returns fills)."""
    times: list[float] = []
    step = optimizer.step

    def timed(*args: Any, **kwargs: Any) -> Any:
        tick = time.perf_counter()
        out = step(*args, **kwargs)
        times.append(time.perf_counter() - tick)
        return out

    optimizer.step = timed
    return times


def seconds(times: list[float]) -> dict[str, float | int | None]:
    """Mean and median of a list of durations, and how many."""
    import statistics

    if not times:
        return {"mean_s": None, "median_s": None, "n": 0}
    return {"mean_s": statistics.fmean(times), "median_s": statistics.median(times), "n": len(times)}


def state_bytes(optimizer: Any, model: Any) -> dict[str, int]:
    """The optimizer's state bytes: all (`optimizer_state_bytes`) and without the head's part."""
    from splice.core.api import model_state
    from splice.optim import optimizer_state_bytes

    heads = tuple(f"{h}." for record in model_state(model).adapters.values() for h in record.heads)
    in_head = {id(p) for name, p in model.named_parameters() if name.startswith(heads)}
    head = sum(t.numel() * t.element_size() for p, state in optimizer.state.items() if id(p) in in_head
               for t in state.values() if hasattr(t, "numel"))
    total = optimizer_state_bytes(optimizer)
    return {"state_bytes": total, "adapter_state_bytes": total - head}


def build_trainer(job: dict[str, Any], folder: str, steps: int | None = None,
                  evaluate: bool = True) -> tuple[Any, dict[str, Any] | None]:
    """The job's trainer (quiet), and full fine-tuning's initial weights (None for the LoRA arms).
    `evaluate` False: no evaluation rows (the timing section)."""
    import dataclasses

    from rich.console import Console

    from splice.train.evaluation import make_accelerator
    from splice.train.run_setup import load_run
    from splice.train.trainer import Trainer

    config = train_config(job, folder, steps, evaluate)
    accelerator = make_accelerator(config)
    setup = load_run(config)
    initial = full_weights(setup.model, job["targets"]) if job["arm"] == "full" else None
    splits = setup.splits if evaluate else dataclasses.replace(setup.splits, validation=[], test=[])
    trainer = Trainer(setup.model, setup.tokenizer, config, splits=splits, console=Console(quiet=True),
                      accelerator=accelerator)
    return trainer, initial


def inner(trainer: Any) -> Any:
    """The trainer's optimizer (accelerate wraps it)."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def train_child(job: dict[str, Any]) -> dict[str, Any]:
    """One training run (in this fresh interpreter): the curves, metrics, times and memory."""
    import torch

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="optim-bench-") as folder:
        trainer, initial = build_trainer(job, folder)
        optimizer = inner(trainer)
        optimizer_s = timed_steps(optimizer)
        trainer.begin()
        step_s, evaluated = [], []
        while not trainer.done:
            tick = time.perf_counter()
            entry = trainer.step()
            if entry is None:
                break
            step_s.append(time.perf_counter() - tick)
            evaluated.append("eval" in entry)
        memory = state_bytes(optimizer, trainer.plain_model)
        delta = weight_change(trainer.plain_model, initial)
        last = trainer.state.step
        same_state = trainer.best.state is None or trainer.best.step == last
        final_test = None if same_state else trainer.evaluate(["test"])["test"]
        result = trainer.finish()
    history = result.history
    final_eval = next((e["eval"] for e in reversed(history) if "eval" in e), None)
    return {"loss": [None if e["loss"] is None else round(e["loss"], 5) for e in history],
            "evals": [{"step": e["step"], **e["eval"]} for e in history if "eval" in e],
            "before": result.metrics["before"], "best": result.metrics["after"], "best_step": result.best_step,
            "final": {"validation": final_eval,
                      "test": result.metrics["after"].get("test") if same_state else final_test},
            "steps_done": last, "status": result.status, "message": result.message,
            "skipped_steps": result.skipped_steps, "trainable": result.parameters["trainable"],
            "step_time": seconds([t for i, t in enumerate(step_s) if i > 0 and not evaluated[i]]),
            "optimizer_time": seconds(optimizer_s), **memory, "delta_w": delta,
            "child_s": time.perf_counter() - started, "source": source_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


def timing_child(job: dict[str, Any]) -> dict[str, Any]:
    """The arms' trainers on one model in this process, stepped in interleaved rounds on the same
    batches (one seed: the same data order), with their optimizers' own step times."""
    import statistics

    import torch

    torch.set_num_threads(job["threads"])
    s = Settings(quick=True, threads=job["threads"], rank=job["r"])
    steps = job["warmup"] + job["rounds"] + 2
    out: dict[str, Any] = {"per_arm": {}}  # not "arms": the job's own key
    with tempfile.TemporaryDirectory(prefix="optim-timing-") as folder:
        trainers, optimizer_s = {}, {}
        for arm in job["arms"]:
            run = {**make_job(s, job["task"], arm, 0, lr=job["lrs"][arm], alpha=job["alpha"]),
                   "optimizer": job["optimizers"][arm]}
            trainers[arm], _ = build_trainer(run, f"{folder}/{arm}", steps=steps, evaluate=False)
            trainers[arm].begin()
            optimizer_s[arm] = timed_steps(inner(trainers[arm]))
        candidates = [Candidate(arm, lambda _, t=trainer: t.step()) for arm, trainer in trainers.items()]
        out["timing"] = versus_baseline(candidates, "adamw", job["rounds"], job["warmup"], print, "training steps")
        for arm, trainer in trainers.items():
            times = optimizer_s[arm][job["warmup"]:]
            base = optimizer_s["adamw"][job["warmup"]:] if "adamw" in optimizer_s else None
            ratios = [a / b for a, b in zip(times, base, strict=False)] if base else []
            out["per_arm"][arm] = {"optimizer_step_median_s": statistics.median(times) if times else None,
                                "optimizer_step_ratio_median": statistics.median(ratios) if ratios else None,
                                "trainable": trainer.parameters.trainable,
                                **state_bytes(inner(trainer), trainer.plain_model)}
    out.update(source=source_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), loadavg=os.getloadavg())
    return out


# ------------------------------------------------------------------------------------ the loop


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Every job one at a time in a fresh interpreter, the results rewritten after each; with
    `--merge`, the finished runs of the result in `--out-dir` with the same settings are kept."""
    phase = Phases()
    target = args.out_dir / f"optim{'_quick' if s.quick else ''}.json"
    result = continued_result(target, bool(args.merge), s, lambda r: rebuild(s, r), job_key,
                              {"tasks": {name: asdict(t) for name, t in TASKS.items()}})
    save = result_saver(result, target, phase, lambda r: markdown(r, s), draw)

    pending: list[dict[str, Any]] = []
    skipped = budgeted_children(SCRIPT, plan(s, result["runs"], pending), result["runs"], key=job_key,
                                group=lambda j: (j["section"], j.get("task"), j.get("arm")),
                                budget_min=s.budget_min, phase=phase, label=describe, save=save,
                                env={"OMP_NUM_THREADS": str(s.threads)})
    result["not_run"] = [{k: j.get(k) for k in ("section", "task", "arm", "seed", "lr", "alpha", "model")}
                         | {"why": "budget"} for j in skipped] + pending
    save()
    return result


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run: Rotten Tomatoes, 1 seed, 8 steps, 16 evaluation rows, LoFT swept at "
                              "1e-4 and 1e-3, no alpha runs, MiniLM timing of 3 rounds (not results)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="subset of sections")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="subset of tasks")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="subset of arms")
    p.add_argument("--loft-lrs", nargs="+", type=float, help="LoFT rates to sweep (one: no sweep)")
    p.add_argument("--full-lrs", nargs="+", type=float, help="full fine-tuning rates to sweep (one: no sweep)")
    p.add_argument("--alpha-tasks", nargs="*", choices=list(TASKS), help="tasks of the alpha runs (none: none)")
    p.add_argument("--alpha-multiples", nargs="+", type=float, help="alpha = multiple x r in the alpha runs (1 4)")
    p.add_argument("--timing-models", nargs="*", choices=list(TIMING_TASK), help="models of the timing section")
    p.add_argument("--minilm-steps", type=int, help="steps of a MiniLM run (default 300)")
    p.add_argument("--smollm2-steps", type=int, help="steps of a SmolLM2 run (default 40)")
    p.add_argument("--timing-rounds", type=int, help="timed rounds of the timing section (default 12)")
    args = continuable(p).parse_args(argv)
    return args, settings_from(args, Settings)


def child_run(job: dict[str, Any]) -> dict[str, Any]:
    """One run child's row: a timing job or a training run."""
    return timing_child(job) if job["section"] == "timing" else train_child(job)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bench_main(argv, parse_args, Settings, run, markdown, "optim", child=json_child(child_run), draw=draw)


if __name__ == "__main__":
    main()
