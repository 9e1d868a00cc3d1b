"""Boosting adapters (issue 20): BoostLoRA against one TinyLoRA and LoRA r=8 at equal total optimizer
steps (MiniLM on Rotten Tomatoes and BBC News, SmolLM2 on arithmetic), and BoostLLM against the same
LLM fine-tuned once and against logistic regression and gradient-boosted trees on sklearn's bundled
tables at 16 / 64 / 256 shots. Every run is a fresh interpreter with one torch thread.

Section `boostlora` (3 seeds). Arms, all on the same targets (MiniLM query/value with the fresh
classification head trained in full at head_lr 1e-2; SmolLM2 q_proj/v_proj), the same total optimizer
steps T, batch, max length, schedule shape and evaluation rows:

    boost        `splice.boost.boostlora(config, rounds=K, r=2, u=4, mine="errors", mix_correct=0.1)`:
                 K rounds of T/K steps, each a TinyLoRA(r, u) in the next singular slice of W0 (ROTATE),
                 on every training row until a round is kept (splice's F_0 rule), then on the rows still
                 wrong (+ 10% right ones); a round is kept (merged) when validation improves, else
                 undone. patience = K, so every run trains all K rounds (T steps) unless no training
                 row is left wrong. lr 3e-2 (examples/rotten_tomatoes_boostlora.yaml's TinyLoRA rate).
    boost_fixed  the same with `rotate=False` (the CLI's --no-rotate): every round in W0's top slice;
                 the rank control, seed 0 only, `--no-rotate-tasks` (default Rotten Tomatoes)
    tiny_wide    one TinyLoRA(r = K r, u = K u) trained once for all T steps, lr 3e-2
                 (`splice.train` with `adapter: {method: tinylora, r: K r, u: K u}`)
    tiny_round   one TinyLoRA(r, u), a single round's size, trained for all T steps, lr 3e-2
    lora         LoRA r=8, alpha 16, lr 2e-3 (MiniLM, the repo's default) / 1e-3 (SmolLM2,
                 examples/smollm2_arithmetic.yaml), all T steps

MiniLM: K = 8 rounds, T = 480 steps (60 a round), batch 16, max_length 64, warm-up 6% (of each round's
steps for BoostLoRA), every validation and test row (Rotten Tomatoes 486 / 488, BBC News 222 / 223).
SmolLM2 arithmetic (examples/smollm2_arithmetic.yaml): K = 4 rounds (fewer: a SmolLM2 step and the
mining pass over the 1,600 training problems are slow on a CPU), T = 80 steps (20 a round), batch 8,
max_length 48, warm-up 10%; 64 validation and test rows, greedy exact match. Validation: each
BoostLoRA round evaluates before and after (the trainer keeps the better of its start and its end);
the one-adapter arms evaluate every T/K steps and keep the best state, so every arm picks among K + 1
states on validation. Rates are not swept (the repo's rates above).

Reported per task and arm (mean ± std over seeds): test accuracy (exact match for arithmetic), the
trainable numbers of a round and in all (TinyLoRA's u numbers per module span min(u, r²) directions of
its r x r core: at r = 2, u = 4 all four are independent; the table says where not), the
stored numbers (the saved adapter file's tensors, measured: BoostLoRA's whole change as a rank-K r
LoRA + head; TinyLoRA's file keeps its singular-vector buffers), kept rounds, steps trained, the rank
of W - W0 (singular values above 1e-6 σ₁, per module: mean [min-max]), and the inference cost
computed from the layer shapes: multiply-adds per token an unmerged adapter adds (Σ r (in + out) over
its modules) next to the base's Linear layers' (Σ in x out, the LM head included, attention products
not); BoostLoRA is merged into the base weights, 0 extra (LoRA and TinyLoRA could be merged as well:
then 0 too). Also the CPU seconds of each run and BoostLoRA's rounds.

Claims (paired by seed, 95% t-interval of the mean difference; 3 seeds: t = 4.30):
1. "BoostLoRA beats one TinyLoRA at equal steps": boost - tiny_wide > 0 (and boost - tiny_round).
2. "BoostLoRA reaches LoRA r=8's accuracy": boost - lora; yes when the interval's low end is above
   -margin (default 1 point; "beats it" above 0), no when its high end is below -margin, else can't tell.
3. "rank grows as K r with ROTATE, stays r with --no-rotate": every boost run's rank (min and max over
   modules) = kept rounds x r, every boost_fixed run's <= r (deterministic; one seed suffices).

Section `boostllm` (5 seeded draws of the shots each). SmolLM2-135M-Instruct, bare (no LM head),
`splice.boost.tabular_llm.boostllm` on the same `draw_shots` split and the same scored test rows:

    boostllm   3 rounds of LoRA r=8 (alpha 16, all-linear) + a zero head on the mean of the two
               views (features as "The <column> is <value>." sentences, and a depth-3 tree's path),
               shrinkage 0.5, 20 steps a round, batch 8, lr 1e-3, head lr 1e-2, validation log-loss
               every 5 steps (the best state of a round is kept)
    once       the same LLM fine-tuned once on the serialised rows (TabLLM-style): views=("features",),
               rounds=1, shrinkage 1, the same LoRA, 60 steps (= rounds x steps: equal optimizer steps;
               one view instead of two, so about half of BoostLLM's training compute)
    baselines  `splice.boost.baselines.fit_baselines`: logistic regression (standardised), sklearn's
               HistGradientBoosting and XGBoost (CPU, n_jobs 1), fitted on all the shots (training and
               validation rows), scored on the same test rows

Tables: breast_cancer (569 rows, 30 columns, 2 classes), then wine (178, 13, 3) and iris (150, 4, 3).
A table with fewer rows than shots + 1 is skipped at that count (wine and iris at 256: `draw_shots`
refuses), and the report lists it. digits is left out by default: its 64 pixel columns make a
~780-token feature view, about twice breast_cancer's (~380 tokens), so a SmolLM2 step costs several
times more, cut at any affordable max_length the row loses most of its pixels, and pixel intensities
written as sentences are not where a language model's prior helps; `--tables digits` runs it anyway.
CPU caps (reported in the markdown): max_length 160 tokens per view (breast_cancer's feature view is cut
to its first columns; the report gives the share of rows cut and the columns kept), and 64 scored test
rows per draw (a seeded sample, `tabular_llm.scored_rows`, the same rows for every method).
Reported: accuracy, AUC (one-vs-rest macro for 3 classes) and log-loss, mean ± std over draws.

Claims (paired by draw, 95% t-interval; 5 draws: t = 2.78), per table and shots count, on accuracy
and on AUC:
4. "BoostLLM >= fine-tuned once": boostllm - once; yes when the low end is above -margin.
5. "BoostLLM matches or beats XGBoost": boostllm - xgboost, the same rule.
Every paired comparison (BoostLoRA: test metric, validation metric, CPU seconds and stored numbers
against each other arm; BoostLLM: accuracy, AUC and log-loss against each other method) is listed under
"where ... loses and where it wins", losses first, each read from its 95% interval.

    .venv/bin/python bench/bench_boosting.py                          # both sections, budget 1200 min
    .venv/bin/python bench/bench_boosting.py --merge --budget-min 240  # continue (keeps finished runs)
    .venv/bin/python bench/bench_boosting.py --sections boostlora --tasks rotten_tomatoes --merge
    .venv/bin/python bench/bench_boosting.py --sections boostllm --tables breast_cancer --merge
    .venv/bin/python bench/bench_boosting.py --jobs 2 --merge         # two children at a time (idle 2 cores)
    .venv/bin/python bench/bench_boosting.py --quick                   # smoke run (not results)
    .venv/bin/python bench/bench_boosting.py --render bench/results/boosting.json   # redo .md and .png

Time. Measured on this 2-core VM at load ~4 (two other benches running), OMP_NUM_THREADS=1: --quick
took 10.9 min wall, 6.5 min CPU (18 children, one at a time; wall per child: the baselines 14 s, a MiniLM
run 17-28 s, a SmolLM2 BoostLoRA-section run 30-53 s, a BoostLLM iris run 74-94 s, fine-tuned once 34-45
s). Unit costs, CPU seconds at one thread, same load: a MiniLM training step 0.27 (TinyLoRA r=8) / 0.29
(LoRA) on Rotten Tomatoes and 0.69 / 0.62 on BBC News; scoring 160 training rows (BoostLoRA's mining)
1.9 / 2.9; evaluating 64 rows 0.8 / 1.0; a SmolLM2 arithmetic step 1.4, scoring 64 problems 5.5,
evaluating 16 with greedy exact match 3.6 (1.5 without); a SmolLM2 LoRA (all-linear) step on 16 sequences
5.5 s at 64 tokens and 15 s at 160. Extrapolated from those (not measured whole), CPU per run: BoostLoRA
~12 min on Rotten Tomatoes (over half of it the 9 mining passes over 3,892 reviews), ~12 on BBC News, ~16
on arithmetic (~11 of them the 5 passes over 1,600 problems); one adapter ~4 / ~6 / ~4 min; BoostLLM on
breast_cancer ~12 / 15 / 25 min at 16 / 64 / 256 shots (validation every 5 steps on a quarter of the
shots and each round's logits of every shot grow with the shots), fine-tuned once ~9 / 10 / 14 min; wine
about as breast_cancer at 16 and 64 shots; iris ~7 / 8 min, once ~4. Totals: boostlora (37 runs) ~4.3 h,
boostllm breast_cancer (30 runs) ~7 h, wine (20) ~4 h, iris (20) ~2 h, plus ~0.5 h of interpreter starts:
~17-18 h on one core at this load (an idle core: somewhat less), ~9-10 h with --jobs 2 on two idle cores
(two one-thread children; not quite 2x, they share memory bandwidth). The default budget (1200 min) is
meant to cover it; otherwise continue with --merge.

Order: the baselines (cheap), then seed 0 of every BoostLoRA task and arm (and the rank control) and
draw 0 of the first table at every shots count, then the other seeds and draws of those, then the
other tables; so a budget-cut run already has one seed of everything. Runs are recorded with their
settings; `--merge` keeps the finished runs of the result in --out-dir whose settings equal this
invocation's and runs only the rest; a run expected to end past `--budget-min` (per invocation) is not
started and is listed "not run". The JSON, markdown and PNG are rewritten after every run.
Results: bench/results/boosting.{json,md} and boosting.png; `boosting_quick.*` for --quick
(git-ignored: a few steps, the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Phases,
    bench_main,
    bench_parser,
    budgeted_children,
    continuable,
    continued_result,
    environment_line,
    json_child,
    result_saver,
    settings_from,
    source_version,
    table,
)
from optim_report import fmt_diff, mean_sd, paired, per_seed, said

SCRIPT = Path(__file__).resolve()
SECTIONS = ["boostlora", "boostllm"]
Run = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """One BoostLoRA task with the repo's recipe for it."""

    model: str
    data: str
    kind: str  # TrainConfig.task
    targets: tuple[str, ...]
    lora_lr: float
    tiny_lr: float  # TinyLoRA's (and BoostLoRA's rounds') rate
    head_lr: float
    max_length: int
    batch_size: int
    warmup_ratio: float


TASKS = {
    "rotten_tomatoes": Task("minilm", "rotten_tomatoes", "classification", ("query", "value"), 2e-3, 3e-2, 1e-2, 64,
                            16, 0.06),
    "bbc_news": Task("minilm", "bbc_news", "classification", ("query", "value"), 2e-3, 3e-2, 1e-2, 64, 16, 0.06),
    "arithmetic": Task("smollm2", "arithmetic", "causal_lm", ("q_proj", "v_proj"), 1e-3, 3e-2, 1e-2, 48, 8, 0.1),
}
TASK_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News", "arithmetic": "SmolLM2 arithmetic"}
LORA_ARMS = {
    "boost": "BoostLoRA (K rounds, ROTATE, merged)",
    "tiny_wide": "one TinyLoRA (r = K r, u = K u)",
    "tiny_round": "one TinyLoRA (a round's r, u)",
    "lora": "LoRA r=8",
}
CONTROL = "boost_fixed"  # BoostLoRA with rotate=False: the rank control
ARM_NAMES = {**LORA_ARMS, CONTROL: "BoostLoRA --no-rotate (control)"}
LLM_ARMS = {"boostllm": "BoostLLM", "once": "fine-tuned once (TabLLM-style)"}
BASELINES = {"logistic_regression": "logistic regression", "hist_gradient_boosting": "HistGradientBoosting",
             "xgboost": "XGBoost"}
TABLES = ("breast_cancer", "wine", "iris", "digits")
TABLE_ROWS = {"breast_cancer": 569, "wine": 178, "iris": 150, "digits": 1797}  # sklearn's bundled tables
METHOD_NAMES = {**LLM_ARMS, **BASELINES}
LLM_METRICS = {"accuracy": ("accuracy", True), "auc": ("AUC", True), "log_loss": ("log-loss", False)}
# What makes two runs the same run (every setting, not the outcome), per kind of job.
LORA_KEYS = ("section", "task", "arm", "seed", "model", "data", "kind", "targets", "adapter", "lr", "head_lr",
             "max_length", "batch_size", "warmup_ratio", "steps", "rounds", "r", "u", "rotate", "mine", "mix_correct",
             "patience", "eval_every", "eval_examples", "train_examples", "threads")
LLM_KEYS = ("section", "table", "shots", "seed", "arm", "model", "views", "rounds", "steps", "shrinkage", "r", "alpha",
            "lr", "head_lr", "batch_size", "eval_every", "tree_depth", "max_length", "test_rows", "threads")
BASELINE_KEYS = ("section", "table", "shots", "arm", "draws", "test_rows", "threads")


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    jobs: int = 1  # children at a time
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    budget_min: float = 1200.0
    margin: float = 0.01  # "reaches" / "matches": the difference's 95% interval above -margin
    # -- boostlora
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    arms: list[str] = field(default_factory=lambda: list(LORA_ARMS))
    no_rotate_tasks: list[str] = field(default_factory=lambda: ["rotten_tomatoes"])
    boost_r: int = 2  # u = 4 = r²: every trained number an independent direction of the r x r core
    boost_u: int = 4
    mine: str = "errors"
    mix_correct: float = 0.1
    lora_rank: int = 8
    minilm_rounds: int = 8
    minilm_steps: int = 480  # total: BoostLoRA's K rounds, or the one adapter's run
    minilm_eval_examples: int | None = None  # None: every validation and test row
    minilm_train_examples: int | None = None
    smollm2_rounds: int = 4
    smollm2_steps: int = 80
    smollm2_eval_examples: int | None = 64
    smollm2_train_examples: int | None = None
    smollm2_seeds: int | None = None  # how many of `seeds` the SmolLM2 task runs (None: all)
    # -- boostllm
    tables: list[str] = field(default_factory=lambda: ["breast_cancer", "wine", "iris"])
    shots: list[int] = field(default_factory=lambda: [16, 64, 256])
    draws: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    llm_arms: list[str] = field(default_factory=lambda: list(LLM_ARMS))
    llm_model: str = "smollm2"
    llm_rounds: int = 3
    llm_steps: int = 20  # per BoostLLM round; "once" trains rounds x steps
    llm_r: int = 8
    llm_lr: float = 1e-3
    llm_head_lr: float = 1e-2
    llm_batch: int = 8
    llm_eval_every: int = 5
    shrinkage: float = 0.5
    tree_depth: int = 3
    llm_max_length: int = 160
    test_rows: int | None = 64

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        """Every arm of both sections end to end, a few steps each: Rotten Tomatoes at 2 seeds (so the
        paired verdicts compute) and arithmetic at one, iris at 16 shots and 2 draws."""
        return cls(quick=True, threads=threads, budget_min=60.0, seeds=[0, 1],
                   tasks=["rotten_tomatoes", "arithmetic"], minilm_rounds=2, minilm_steps=4,
                   minilm_eval_examples=32, minilm_train_examples=64, smollm2_rounds=2, smollm2_steps=2,
                   smollm2_eval_examples=4, smollm2_train_examples=16, smollm2_seeds=1, tables=["iris"], shots=[16],
                   draws=[0, 1], llm_rounds=2, llm_steps=2, llm_eval_every=1, llm_max_length=64, test_rows=8)


# ----------------------------------------------------------------------------------------- jobs


def model_budget(s: Settings, model: str) -> tuple[int, int, int | None, int | None]:
    """(rounds K, total steps T, evaluation rows, training rows) of a model's BoostLoRA task."""
    prefix = "minilm" if model == "minilm" else "smollm2"
    return (getattr(s, f"{prefix}_rounds"), getattr(s, f"{prefix}_steps"), getattr(s, f"{prefix}_eval_examples"),
            getattr(s, f"{prefix}_train_examples"))


def make_lora_job(s: Settings, task: str, arm: str, seed: int) -> dict[str, Any]:
    """One BoostLoRA-section run: `arm` on `task` at `seed`."""
    t = TASKS[task]
    if arm not in ARM_NAMES:
        raise KeyError(arm)
    rounds, steps, eval_examples, train_examples = model_budget(s, t.model)
    boosting = arm in ("boost", CONTROL)
    adapter: dict[str, Any] = {
        "boost": {"method": "lora"}, CONTROL: {"method": "lora"},  # a boost config's adapter gives only places
        "tiny_wide": {"method": "tinylora", "r": rounds * s.boost_r, "u": rounds * s.boost_u, "seed": seed},
        "tiny_round": {"method": "tinylora", "r": s.boost_r, "u": s.boost_u, "seed": seed},
        "lora": {"method": "lora", "r": s.lora_rank, "alpha": 2.0 * s.lora_rank},
    }[arm]
    return {"section": "boostlora", "task": task, "arm": arm, "seed": seed, "model": t.model, "data": t.data,
            "kind": t.kind, "targets": list(t.targets), "adapter": adapter,
            "lr": t.lora_lr if arm == "lora" else t.tiny_lr, "head_lr": t.head_lr, "max_length": t.max_length,
            "batch_size": t.batch_size, "warmup_ratio": t.warmup_ratio, "steps": steps, "rounds": rounds,
            "r": s.boost_r, "u": s.boost_u, "rotate": arm != CONTROL if boosting else None,
            "mine": s.mine if boosting else None, "mix_correct": s.mix_correct if boosting else None,
            "patience": rounds if boosting else None, "eval_every": max(1, steps // rounds),
            "eval_examples": eval_examples, "train_examples": train_examples, "threads": s.threads}


def make_llm_job(s: Settings, table_name: str, shots: int, seed: int, arm: str) -> dict[str, Any]:
    """One BoostLLM-section LLM run: `arm` (boostllm or once) on one draw of `shots` rows."""
    if arm not in LLM_ARMS or table_name not in TABLES:
        raise KeyError(arm if arm not in LLM_ARMS else table_name)
    boost = arm == "boostllm"
    return {"section": "boostllm", "table": table_name, "shots": shots, "seed": seed, "arm": arm,
            "model": s.llm_model, "views": ["features", "path"] if boost else ["features"],
            "rounds": s.llm_rounds if boost else 1, "steps": s.llm_steps if boost else s.llm_steps * s.llm_rounds,
            "shrinkage": s.shrinkage if boost else 1.0, "r": s.llm_r, "alpha": 2.0 * s.llm_r, "lr": s.llm_lr,
            "head_lr": s.llm_head_lr, "batch_size": s.llm_batch, "eval_every": s.llm_eval_every,
            "tree_depth": s.tree_depth, "max_length": s.llm_max_length, "test_rows": s.test_rows,
            "threads": s.threads}


def make_baselines_job(s: Settings, table_name: str, shots: int) -> dict[str, Any]:
    """The three baselines on every draw of one table and shots count (one child: they take seconds)."""
    if table_name not in TABLES:
        raise KeyError(table_name)
    return {"section": "boostllm", "table": table_name, "shots": shots, "arm": "baselines", "draws": list(s.draws),
            "test_rows": s.test_rows, "threads": s.threads}


def job_key(job: dict[str, Any]) -> str:
    keys = LORA_KEYS if job["section"] == "boostlora" else BASELINE_KEYS if job["arm"] == "baselines" else LLM_KEYS
    return json.dumps({k: job.get(k) for k in keys}, sort_keys=True)


def rebuild(s: Settings, run: Run) -> dict[str, Any]:
    """The job this invocation would make for an earlier run's identity (--merge)."""
    if run["section"] == "boostlora":
        return make_lora_job(s, run["task"], run["arm"], run["seed"])
    if run["arm"] == "baselines":
        return make_baselines_job(s, run["table"], run["shots"])
    return make_llm_job(s, run["table"], run["shots"], run["seed"], run["arm"])


def fits(table_name: str, shots: int) -> bool:
    """Whether `draw_shots` can draw `shots` rows of the table and leave test rows."""
    return shots < TABLE_ROWS[table_name]


def lora_seed_jobs(s: Settings, seed: int) -> Iterator[dict[str, Any]]:
    """Every BoostLoRA-section run of one seed, task by task (the rank control at the first seed)."""
    for task in s.tasks:
        if TASKS[task].model == "smollm2" and s.smollm2_seeds is not None and seed not in s.seeds[:s.smollm2_seeds]:
            continue
        for arm in s.arms:
            yield make_lora_job(s, task, arm, seed)
        if seed == s.seeds[0] and task in s.no_rotate_tasks:
            yield make_lora_job(s, task, CONTROL, seed)


def llm_draw_jobs(s: Settings, table_name: str, draws: list[int]) -> Iterator[dict[str, Any]]:
    for seed in draws:
        for shots in s.shots:
            if fits(table_name, shots):
                for arm in s.llm_arms:
                    yield make_llm_job(s, table_name, shots, seed, arm)


def plan(s: Settings) -> Iterator[dict[str, Any]]:
    """Every job, in an order whose prefixes are useful: the baselines, seed 0 of everything BoostLoRA
    and draw 0 of the first table, the other seeds and draws of those, then the other tables."""
    lora = "boostlora" in s.sections
    tables = s.tables if "boostllm" in s.sections else []
    for table_name in tables:
        for shots in s.shots:
            if fits(table_name, shots):
                yield make_baselines_job(s, table_name, shots)
    if lora and s.seeds:
        yield from lora_seed_jobs(s, s.seeds[0])
    if tables:
        yield from llm_draw_jobs(s, tables[0], s.draws[:1])
    if lora:
        for seed in s.seeds[1:]:
            yield from lora_seed_jobs(s, seed)
    if tables:
        yield from llm_draw_jobs(s, tables[0], s.draws[1:])
    for table_name in tables[1:]:
        yield from llm_draw_jobs(s, table_name, s.draws)


def skipped_combinations(s: Settings) -> list[dict[str, Any]]:
    """The (table, shots) pairs `plan` leaves out, and why."""
    out = []
    if "boostllm" in s.sections:
        for table_name in s.tables:
            for shots in s.shots:
                if not fits(table_name, shots):
                    out.append({"section": "boostllm", "table": table_name, "shots": shots,
                                "why": f"{table_name} has {TABLE_ROWS[table_name]} rows: {shots} shots leave no test "
                                       "rows (draw_shots refuses)"})
    return out


def describe(job: dict[str, Any]) -> str:
    if job["section"] == "boostlora":
        return f"[{job['task']}] {job['arm']} seed {job['seed']} ({job['steps']} steps)"
    if job["arm"] == "baselines":
        return f"[{job['table']} {job['shots']} shots] baselines, draws {job['draws']}"
    return (f"[{job['table']} {job['shots']} shots] {job['arm']} draw {job['seed']} "
            f"({job['rounds']} x {job['steps']} steps)")


def group(job: dict[str, Any]) -> tuple[Any, ...]:
    """What a run's expected time is estimated from: the finished runs of the same group."""
    return (job["section"], job.get("task") or job.get("table"), job["arm"], job.get("shots"))


# ----------------------------------------------------------------------------------- measuring


def adapter_file_numbers(folder: str | Path | None, head: str | None = None) -> dict[str, int]:
    """Numbers stored in an adapter folder's safetensors files: all, the head's (tensor names that
    hold `head`), and the LoRA factors' (lora_A / lora_B: an unmerged LoRA's multiply-adds per token)."""
    from safetensors import safe_open

    out = {"stored": 0, "stored_head": 0, "lora_factors": 0}
    if folder is None or not Path(folder).is_dir():
        return out
    for path in Path(folder).rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                n = math.prod(f.get_slice(name).get_shape())
                out["stored"] += n
                out["stored_head"] += n if head and head in name else 0
                out["lora_factors"] += n if "lora_A" in name or "lora_B" in name else 0
    return out


def delta_ranks(model: Any) -> dict[str, float]:
    """Rank of each adapted module's W - W0 (an attached adapter's delta_weight; singular values above
    BoostLoRA's tolerance x σ₁): mean, min, max over modules."""
    import torch

    from splice.boost.rounds import RANK_TOLERANCE
    from splice.core.host import hosts

    ranks = []
    for _, _, host in hosts(model):
        for name in host:
            delta = host[name].delta_weight()
            if delta is None:
                continue
            values = torch.linalg.svdvals(delta.detach().double())
            ranks.append(int((values > RANK_TOLERANCE * values[0]).sum()) if values.numel() and values[0] > 0 else 0)
    return rank_summary(ranks)


def rank_summary(ranks: list[int]) -> dict[str, float]:
    if not ranks:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": statistics.fmean(ranks), "min": float(min(ranks)), "max": float(max(ranks))}


def linear_macs(model: Any, targets: list[str]) -> dict[str, int]:
    """Multiply-adds per token of the model's Linear layers (Σ in x out; adapters' hooks aside), and the
    weights of the target layers (what a merge changes)."""
    from torch import nn

    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and "splice" not in name]  # not splice's copies of a trained head
    return {"macs_base": sum(m.in_features * m.out_features for _, m in linears),
            "target_weights": sum(m.in_features * m.out_features for name, m in linears
                                  if name.rsplit(".", 1)[-1] in targets)}


def adapter_macs(model: Any) -> int:
    """Multiply-adds per token an unmerged low-rank adapter adds: Σ r (in + out) over its modules (x A,
    then B; TinyLoRA's r x r core is per forward, not per token)."""
    from splice.core.host import hosts

    return sum(host[name].r * (base.in_features + base.out_features)
               for _, base, host in hosts(model) for name in host)


def train_config(job: dict[str, Any], folder: str) -> Any:
    from splice.train import TrainConfig

    return TrainConfig(model=job["model"], task=job["kind"], data=job["data"],
                       adapter={**job["adapter"], "targets": job["targets"]}, max_length=job["max_length"],
                       batch_size=job["batch_size"], lr=job["lr"], head_lr=job["head_lr"],
                       warmup_ratio=job["warmup_ratio"], max_steps=job["steps"], eval_every=job["eval_every"],
                       max_eval_examples=job["eval_examples"], max_train_examples=job["train_examples"],
                       seed=job["seed"], output_dir=f"{folder}/run", checkpoint_every=None)


def head_name(job: dict[str, Any]) -> str | None:
    return "classifier" if job["kind"] == "classification" else None


def boost_child(job: dict[str, Any]) -> dict[str, Any]:
    """BoostLoRA (or its --no-rotate control) in this fresh interpreter."""
    from rich.console import Console

    from splice.boost import boostlora

    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="boost-bench-") as folder:
        config = train_config(job, folder)
        result = boostlora(config, rounds=job["rounds"], r=job["r"], u=job["u"], mine=job["mine"],
                           mix_correct=job["mix_correct"], rotate=job["rotate"],
                           steps_per_round=job["steps"] // job["rounds"], patience=job["patience"],
                           console=Console(quiet=True))
        stored = adapter_file_numbers(result.adapter, head_name(job))
        shapes = linear_macs(result.model, job["targets"])
    data = result.to_dict()
    rounds = data["rounds"]
    last_rank = rounds[-1]["rank"] if rounds else rank_summary([])
    return {"test": data["test"], "validation": data["validation"], "round_records": rounds, "kept": data["kept"],
            "stop": data["stop"], "stop_reason": data["stop_reason"], "train_error": data["train_error"],
            "steps_per_round": data["settings"]["steps_per_round"], "steps_trained": sum(r["steps"] for r in rounds),
            "trainable_round": rounds[0]["trainable"] if rounds else 0,
            "adapter_round": rounds[0]["adapter_parameters"] if rounds else 0,
            "adapter_total": sum(r["adapter_parameters"] for r in rounds),
            "adapter_kept": sum(r["adapter_parameters"] for r in rounds if r["kept"]),
            "head": rounds[0]["trainable"] - rounds[0]["adapter_parameters"] if rounds else 0,
            "rank": last_rank, "rank_by_round": [r["rank"] for r in rounds], **stored, **shapes,
            "macs_unmerged": stored["lora_factors"], "macs_merged": 0,
            "rounds_s": sum(r["seconds"] for r in rounds), "wall_s": data["wall_seconds"],
            "child_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
            "source": source_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


def train_child(job: dict[str, Any]) -> dict[str, Any]:
    """One adapter (TinyLoRA or LoRA) trained once for all the steps, in this fresh interpreter."""
    from rich.console import Console

    from splice.train import Trainer

    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="boost-bench-") as folder:
        trainer = Trainer.from_config(train_config(job, folder), console=Console(quiet=True))
        result = trainer.fit()
        model = trainer.plain_model
        adapter = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and ".splice." in name)
        stored = adapter_file_numbers(result.paths.get("adapter"), head_name(job))
        out = {"test": result.metrics["after"].get("test", {}), "validation": result.metrics["after"]["validation"],
               "before": result.metrics["before"], "best_step": result.best_step, "status": result.status,
               "message": result.message, "steps_trained": trainer.step_count,
               "trainable_round": result.parameters["trainable"], "adapter_round": adapter, "adapter_total": adapter,
               "adapter_kept": adapter, "head": result.parameters["trainable"] - adapter,
               "rank": delta_ranks(model), **stored, **linear_macs(model, job["targets"]),
               "macs_unmerged": adapter_macs(model), "macs_merged": 0, "train_s": result.timings["train_s"]}
    return {**out, "wall_s": time.perf_counter() - started, "child_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu, "source": source_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


def view_lengths(job: dict[str, Any], table_obj: Any, split: Any, rows: list[int]) -> dict[str, Any]:
    """Token counts of each view of `rows` (uncut), the share of them cut at max_length, and for the
    feature view the columns a cut row keeps (mean)."""
    from transformers import AutoTokenizer

    from splice.boost.tabular import fit_path_tree, serialize_row
    from splice.boost.tabular_llm import view_texts
    from splice.train import tasks

    tokenizer = AutoTokenizer.from_pretrained(tasks.model_path(job["model"]))
    tree = fit_path_tree(table_obj, split.train, depth=job["tree_depth"], seed=job["seed"])
    out: dict[str, Any] = {}
    for view, texts in zip(job["views"], view_texts(table_obj, tree, tuple(job["views"])), strict=True):
        lengths = [len(tokenizer(texts[i])["input_ids"]) for i in rows]
        out[view] = {"mean_tokens": statistics.fmean(lengths), "max_tokens": max(lengths),
                     "cut_share": sum(n > job["max_length"] for n in lengths) / len(lengths)}
    if "features" in out and out["features"]["cut_share"] > 0:
        kept = []
        for i in rows[:20]:
            sentences = serialize_row(table_obj, i).split(". ")
            prefix = [len(tokenizer(". ".join(sentences[:k + 1]))["input_ids"]) for k in range(len(sentences))]
            kept.append(sum(n <= job["max_length"] for n in prefix))
        out["features"]["columns_kept_mean"] = statistics.fmean(kept)
        out["features"]["columns"] = len(table_obj.columns)
    return out


def llm_child(job: dict[str, Any]) -> dict[str, Any]:
    """BoostLLM or the fine-tuned-once LLM on one draw, in this fresh interpreter."""
    from splice.boost.tabular import draw_shots, load_table
    from splice.boost.tabular_llm import boostllm, scored_rows

    started, cpu = time.perf_counter(), time.process_time()
    table_obj = load_table(job["table"])
    split = draw_shots(table_obj, job["shots"], job["seed"])
    # seed= also picks the scored test rows (tabular_llm.scored_rows): the draw's seed, as the baselines'
    result = boostllm(job["model"], table_obj, split, rounds=job["rounds"], shrinkage=job["shrinkage"],
                      tree_depth=job["tree_depth"], views=tuple(job["views"]), max_length=job["max_length"],
                      test_rows=job["test_rows"], r=job["r"], alpha=job["alpha"], steps=job["steps"], lr=job["lr"],
                      head_lr=job["head_lr"], batch_size=job["batch_size"], eval_every=job["eval_every"],
                      seed=job["seed"])
    fit_s = time.perf_counter() - started
    test = scored_rows(split, job["test_rows"], job["seed"])
    data = result.to_dict()
    return {"test": data["test"], "history": data["history"], "train_rows": len(split.train),
            "validation_rows": data["validation_rows"], "test_rows_scored": data["test_rows"], "note": split.note,
            "adapter_round": data["adapter_parameters"], "adapter_total": data["adapter_parameters"] * job["rounds"],
            "forwards_per_row": job["rounds"] * len(job["views"]), "rounds_s": sum(
                r["seconds"] for r in data["history"]["rounds"]), "fit_s": fit_s,
            "views_tokens": view_lengths(job, table_obj, split, test), "wall_s": data["seconds"],
            "child_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu, "source": source_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


def baselines_child(job: dict[str, Any]) -> dict[str, Any]:
    """The baselines on every draw of one table and shots count, on the rows the LLM runs score."""
    from splice.boost.baselines import fit_baselines
    from splice.boost.tabular import draw_shots, load_table
    from splice.boost.tabular_llm import scored_rows

    started, cpu = time.perf_counter(), time.process_time()
    table_obj = load_table(job["table"])
    per_draw = {}
    for seed in job["draws"]:
        split = draw_shots(table_obj, job["shots"], seed)
        test = scored_rows(split, job["test_rows"], seed)
        per_draw[str(seed)] = {"scored": fit_baselines(table_obj, split, test, seed),
                               "all_test_rows": fit_baselines(table_obj, split, split.test.tolist(), seed),
                               "test_rows_scored": len(test), "test_rows_all": len(split.test)}
    return {"per_draw": per_draw, "child_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
            "source": source_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


def child_run(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    if job["section"] == "boostlora":
        return boost_child(job) if job["arm"] in ("boost", CONTROL) else train_child(job)
    return baselines_child(job) if job["arm"] == "baselines" else llm_child(job)


# ------------------------------------------------------------------------------------ the loop


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Every job in a fresh interpreter (`s.jobs` at a time), the results rewritten after each; with
    `--merge`, the finished runs of the result in `--out-dir` with the same settings are kept."""
    phase = Phases()
    target = args.out_dir / f"boosting{'_quick' if s.quick else ''}.json"
    result = continued_result(target, bool(args.merge), s, lambda r: rebuild(s, r), job_key,
                              {"tasks": {name: asdict(t) for name, t in TASKS.items()}}, jobs=s.jobs)
    save = result_saver(result, target, phase, lambda r: markdown(r, s), draw)

    skipped = budgeted_children(SCRIPT, plan(s), result["runs"], key=job_key, group=group, budget_min=s.budget_min,
                                phase=phase, label=describe, save=save, env={"OMP_NUM_THREADS": str(s.threads)},
                                workers=s.jobs)
    result["not_run"] = [{k: j.get(k) for k in ("section", "task", "table", "shots", "arm", "seed")} | {"why": "budget"}
                         for j in skipped] + skipped_combinations(s)
    save()
    return result


# ---------------------------------------------------------------------------------- the report


def quality(kind: str) -> str:
    """The headline test metric of a BoostLoRA task: accuracy, or greedy exact match."""
    return "accuracy" if kind == "classification" else "exact_match"


def lora_runs(result: dict[str, Any], task: str, arm: str, failed: bool = False) -> list[Run]:
    return [r for r in result["runs"] if r["section"] == "boostlora" and r["task"] == task and r["arm"] == arm
            and ("error" in r) == failed]


def llm_runs(result: dict[str, Any], table_name: str, shots: int, arm: str, failed: bool = False) -> list[Run]:
    return [r for r in result["runs"] if r["section"] == "boostllm" and r["table"] == table_name
            and r["shots"] == shots and r["arm"] == arm and ("error" in r) == failed]


def method_scores(result: dict[str, Any], table_name: str, shots: int, method: str, metric: str) -> dict[int, float]:
    """Per draw, a method's score on the scored test rows (LLM arm or baseline)."""
    if method in LLM_ARMS:
        return per_seed(llm_runs(result, table_name, shots, method), lambda r: r["test"].get(metric))
    out = {}
    for run in llm_runs(result, table_name, shots, "baselines"):
        for seed, scores in run["per_draw"].items():
            value = scores["scored"].get(method, {}).get(metric)
            if value is not None and math.isfinite(value):
                out[int(seed)] = value
    return out


def reaches(diff: dict[str, Any] | None, margin: float) -> str:
    """Non-inferiority of a difference (> 0: the claim's side): yes when the 95% interval's low end is
    above -margin (beats: above 0), no when its high end is below -margin, else can't tell."""
    if diff is None:
        return "not measured"
    if diff["n"] < 2:
        return "one seed: no verdict"
    if diff["low"] > 0:
        return "yes (beats it)"
    if diff["low"] >= -margin:
        return f"yes (within {margin:g})"
    if diff["high"] < -margin:
        return "no (worse beyond the margin)"
    if diff["high"] < 0:
        return "can't tell (worse on every bound, but not beyond the margin everywhere)"
    return "can't tell (the interval spans the margin)"


ORDER = ["loses", "worse on the mean", "one seed, worse", "tie", "one seed, better", "better on the mean", "wins"]


def reading(diff: dict[str, Any], higher: bool, who: str) -> str:
    """A paired difference (`who` - other) read for `who`: wins / loses when the 95% interval excludes 0
    (on the good / bad side), else better or worse on the mean; `higher`: whether more is better."""
    sign = 1 if higher else -1
    mean, low, high = sign * diff["mean"], sign * (diff["low"] if higher else diff["high"]), sign * (
        diff["high"] if higher else diff["low"])
    if mean == 0:
        return "tie"
    if diff["n"] < 2:
        return f"one seed, {'better' if mean > 0 else 'worse'}"
    if low > 0:
        return f"wins: {who} better"
    if high < 0:
        return f"loses: {who} worse"
    return f"{'better' if mean > 0 else 'worse'} on the mean (interval spans 0)"


def lora_value(kind: str, key: str) -> Callable[[Run], float | None]:
    q = quality(kind)
    return {"test": lambda r: r["test"].get(q), "validation": lambda r: r["validation"].get(
        "accuracy" if q == "accuracy" else "loss")}[key]


def fmt_int(values: dict[int, float]) -> str:
    vals = sorted(set(values.values()))
    if not vals:
        return "-"
    return f"{vals[0]:,.0f}" if len(vals) == 1 else f"{vals[0]:,.0f}-{vals[-1]:,.0f}"


def markdown(result: dict[str, Any], s: Any = None) -> str:
    settings, env = result["settings"], result["environment"]
    quick = " — quick run (not results)" if settings["quick"] else ""
    out = [f"# Boosting adapters: BoostLoRA and BoostLLM (issue 20){quick}", "", environment_line(env), "",
           "Every run is a fresh interpreter with one torch thread (bench/bench_boosting.py says how each arm is "
           "built). Mean ± std over seeds (BoostLoRA) or draws (BoostLLM); verdicts from paired differences with "
           f"their 95% t-interval; margin for \"reaches\" / \"matches\": {settings['margin']:g}.", ""]
    if settings["quick"]:
        out += ["**--quick smoke run: a few steps per run, tiny evaluation sets; the numbers mean nothing.**", ""]
    out += invocations(result)
    if any(r["section"] == "boostlora" for r in result["runs"]):
        out += lora_report(result)
    if any(r["section"] == "boostllm" for r in result["runs"]):
        out += llm_report(result)
    out += failures(result)
    return "\n".join(out)


def invocations(result: dict[str, Any]) -> list[str]:
    lines = []
    for inv in result.get("invocations", []):
        runtime = f", ran {inv['runtime_s'] / 60:.0f} min" if inv.get("runtime_s") else ""
        lines.append(f"- {inv['date']} (splice {inv['source']}, load {inv['loadavg'][0]:.1f}, {inv.get('jobs', 1)} "
                     f"child(ren) at a time{runtime}): {'--merge, ' if inv['merge'] else ''}kept {inv['kept']} "
                     f"earlier run(s), dropped {inv['dropped']}")
    not_run = result.get("not_run", [])
    if not_run:
        shown = "; ".join(" ".join(str(n[k]) for k in ("section", "task", "table", "shots", "arm", "seed")
                                   if n.get(k) is not None) + f" ({n['why']})" for n in not_run[:12])
        lines.append(f"- not run ({len(not_run)}): {shown}{' ...' if len(not_run) > 12 else ''}")
    return ["Invocations:", "", *lines, ""] if lines else []


# -- BoostLoRA -------------------------------------------------------------------------------------


def lora_tasks(result: dict[str, Any]) -> list[str]:
    return [t for t in TASKS if any(r["section"] == "boostlora" and r["task"] == t for r in result["runs"])]


def lora_report(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = ["## BoostLoRA vs one TinyLoRA vs LoRA r=8 at equal total steps", "",
             f"BoostLoRA: K rounds of TinyLoRA r={s['boost_r']}, u={s['boost_u']} (MiniLM K={s['minilm_rounds']}, "
             f"SmolLM2 K={s['smollm2_rounds']}), mine {s['mine']!r}, mix_correct {s['mix_correct']}, patience K; "
             f"total steps T: MiniLM {s['minilm_steps']}, SmolLM2 {s['smollm2_steps']} (BoostLoRA T/K a round, the "
             f"one-adapter arms T in one run); evaluation rows: MiniLM "
             f"{s['minilm_eval_examples'] or 'all'}, SmolLM2 {s['smollm2_eval_examples'] or 'all'}. The test metric "
             "is the kept model's (BoostLoRA: the merged rounds; one adapter: its best-validation state).", ""]
    lines += lora_verdicts(result)
    for task in lora_tasks(result):
        lines += lora_task_table(result, task)
    lines += rank_table(result)
    lines += rounds_table(result)
    lines += lora_wins_losses(result)
    return lines


def lora_verdicts(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    rows = []
    for task in lora_tasks(result):
        kind = result["tasks"][task]["kind"]
        value = lora_value(kind, "test")
        boost = per_seed(lora_runs(result, task, "boost"), value)
        label = "test accuracy" if kind == "classification" else "test exact match"
        for other, claim in (("tiny_wide", "1. beats one TinyLoRA (r = K r, u = K u)"),
                             ("tiny_round", "1. beats one TinyLoRA (a round's r, u)"),
                             ("lora", "2. reaches LoRA r=8")):
            values = per_seed(lora_runs(result, task, other), value)
            diff = paired(boost, values)
            if diff is None:
                continue
            word = reaches(diff, s["margin"]) if other == "lora" else said(diff)
            rows.append([TASK_NAMES[task], claim, label, mean_sd(boost, 4), mean_sd(values, 4), fmt_diff(diff), word])
    lines = ["### Verdicts", ""]
    if rows:
        lines += ["Difference = BoostLoRA - the other arm, paired by seed, mean [95% t-interval] (per seed).", "",
                  table(["task", "claim", "metric", "BoostLoRA", "other arm", "difference", "verdict"], rows), ""]
    lines += rank_verdict(result)
    return lines


def rank_verdict(result: dict[str, Any]) -> list[str]:
    """Claim 3 from every run's measured rank of W - W0 against its kept rounds x r."""
    r = result["settings"]["boost_r"]
    rows = []
    for task in lora_tasks(result):
        for arm in ("boost", CONTROL):
            runs = lora_runs(result, task, arm)
            if not runs:
                continue
            ok = []
            for run in runs:
                want = run["kept"] * r if arm == "boost" else min(run["kept"], 1) * r
                ok.append(run["rank"]["min"] == run["rank"]["max"] == want)
            seen = "; ".join(f"seed {run['seed']}: {run['kept']} kept, rank {run['rank']['min']:g}-"
                             f"{run['rank']['max']:g}" for run in runs)
            word = "no" if not all(ok) else "yes" if any(run["kept"] >= 2 for run in runs) else (
                "untested (no run kept 2 rounds)")
            rows.append([TASK_NAMES[task], ARM_NAMES[arm], f"kept rounds x {r}" if arm == "boost" else f"{r}",
                         seen, word])
    if not rows:
        return []
    return ["**Claim 3: the rank of W - W0 grows as K r with ROTATE and stays r with --no-rotate** (every target "
            "module's rank, min-max over modules, after the last round; the expected value is the kept rounds x r, "
            "or r for the control once a round is kept):", "",
            table(["task", "arm", "expected rank", "measured", "verdict"], rows), ""]


def lora_task_table(result: dict[str, Any], task: str) -> list[str]:
    t = result["tasks"][task]
    s = result["settings"]
    kind = t["kind"]
    rounds = s["minilm_rounds"] if t["model"] == "minilm" else s["smollm2_rounds"]
    steps = s["minilm_steps"] if t["model"] == "minilm" else s["smollm2_steps"]
    label = "accuracy" if kind == "classification" else "exact match"
    rows = []
    for arm in [*LORA_ARMS, CONTROL]:
        runs, failed = lora_runs(result, task, arm), lora_runs(result, task, arm, failed=True)
        if not runs and not failed:
            continue
        seeds = f"{len(runs)}" + (f" ({len(failed)} failed)" if failed else "")
        if not runs:
            rows.append([ARM_NAMES[arm], seeds, *["-"] * 11])
            continue
        first = runs[0]

        def get(key: str, runs: list[Run] = runs) -> dict[int, float]:
            return per_seed(runs, lambda run: run.get(key))

        if arm in ("boost", CONTROL):
            core = min(s["boost_u"], s["boost_r"] ** 2)
            per_round = f"{first['adapter_round']:,} ({core} per module effective) + head {first['head']:,}"
            kept = mean_sd(get("kept"), 1)
        else:
            a = first["adapter"]
            core = min(a["u"], a["r"] ** 2) if a["method"] == "tinylora" else None
            note = f" ({core} per module effective)" if core is not None else ""
            per_round = f"{first['adapter_round']:,}{note} + head {first['head']:,} (one run)"
            kept = "-"
        rank = per_seed(runs, lambda r: r["rank"]["mean"])
        rank_span = f"{min(r['rank']['min'] for r in runs):g}-{max(r['rank']['max'] for r in runs):g}"
        unmerged = mean_sd(get("macs_unmerged"), 0)
        share = statistics.fmean(r["macs_unmerged"] / r["macs_base"] for r in runs if r["macs_base"])
        rows.append([ARM_NAMES[arm], seeds, mean_sd(per_seed(runs, lora_value(kind, "test")), 4),
                     mean_sd(per_seed(runs, lora_value(kind, "validation")), 4), kept, fmt_int(get("steps_trained")),
                     per_round, fmt_int(get("adapter_total")), fmt_int(get("stored")),
                     f"{mean_sd(rank, 1)} [{rank_span}]", f"{unmerged} ({share:.2%})",
                     "0 (merged)" if arm in ("boost", CONTROL) else "0 if merged", mean_sd(get("cpu_s"), 0)])
    base = next((r for arm in ARM_NAMES for r in lora_runs(result, task, arm)), None)
    scale = (f" The base's Linear layers: {base['macs_base']:,} multiply-adds per token; a merge rewrites "
             f"{base['target_weights']:,} target weights in place." if base else "")
    validation = "accuracy" if kind == "classification" else "loss"
    return [f"### {TASK_NAMES[task]} ({t['model']}, K = {rounds}, T = {steps} steps, batch {t['batch_size']}, "
            f"max_length {t['max_length']})", "",
            "Trainable numbers per round: the adapter's (and the effective directions of TinyLoRA's r x r core) "
            "plus the head trained in full; in all: the adapter numbers trained over every round (undone rounds "
            "included); stored: the numbers in the saved adapter file (BoostLoRA: its change as a rank-K r LoRA, "
            "head included). Inference: multiply-adds per token an unmerged adapter adds (computed from the layer "
            "shapes, share of the base's Linear layers)." + scale, "",
            table(["arm", "seeds", f"test {label}", f"validation {validation}", "kept rounds", "steps trained",
                   "trainable per round", "trained in all", "stored", "rank of W - W0 mean [min-max]",
                   "extra MACs/token unmerged", "merged", "CPU s"], rows), ""]


def rank_table(result: dict[str, Any]) -> list[str]:
    rows = []
    for task in lora_tasks(result):
        for arm in ("boost", CONTROL):
            for run in sorted(lora_runs(result, task, arm), key=lambda r: r["seed"])[:1]:
                ranks = ", ".join(f"{'' if rd['kept'] else '('}{rk['mean']:g}{'' if rd['kept'] else ')'}"
                                  for rd, rk in zip(run["round_records"], run["rank_by_round"], strict=True))
                rows.append([TASK_NAMES[task], ARM_NAMES[arm], str(run["seed"]), ranks])
    if not rows:
        return []
    return ["### Rank of W - W0 after each round (first seed; in brackets: after an undone round)", "",
            table(["task", "arm", "seed", "mean rank over modules, round 0, 1, ..."], rows), ""]


def rounds_table(result: dict[str, Any]) -> list[str]:
    rows = []
    for task in lora_tasks(result):
        for run in sorted(lora_runs(result, task, "boost"), key=lambda r: r["seed"])[:1]:
            for rd in run["round_records"]:
                before, after = rd["validation_before"], rd["validation_after"]
                rows.append([TASK_NAMES[task], str(run["seed"]), str(rd["round"]), str(rd["offset"]),
                             f"{rd['failing']:,} ({rd['train_error_before']:.1%})", f"{rd['trained_rows']:,}",
                             str(rd["steps"]), "-" if before is None else f"{before:.4f}",
                             "-" if after is None else f"{after:.4f}", "yes" if rd["kept"] else "no",
                             f"{rd['seconds']:.0f}"])
    if not rows:
        return []
    mining = []
    for task in lora_tasks(result):
        runs = lora_runs(result, task, "boost")
        if runs:
            other = statistics.fmean(r["wall_s"] - r["rounds_s"] for r in runs)
            mining.append(f"{TASK_NAMES[task]} {other:.0f} s of {statistics.fmean(r['wall_s'] for r in runs):.0f} s")
    return ["### BoostLoRA's rounds (first seed)", "",
            "Validation metric before and after each round (accuracy, or loss for the causal LM: what the keep "
            "decision reads); rows wrong = training rows the model got wrong before the round (round 0 trains on "
            "every row).", "",
            table(["task", "seed", "round", "slice", "rows wrong", "trained on", "steps", "validation before",
                   "after", "kept", "s"], rows), "",
            "Outside the rounds (mining: scoring every training row before each round, and the final evaluation), "
            "mean per run: " + "; ".join(mining) + ".", ""]


def lora_wins_losses(result: dict[str, Any]) -> list[str]:
    rows = []
    for task in lora_tasks(result):
        kind = result["tasks"][task]["kind"]
        checks = [("test", True, lora_value(kind, "test")), ("validation", kind == "classification",
                                                              lora_value(kind, "validation")),
                  ("CPU s", False, lambda r: r.get("cpu_s")), ("stored numbers", False, lambda r: r.get("stored"))]
        boost = lora_runs(result, task, "boost")
        for other in ("tiny_wide", "tiny_round", "lora"):
            for label, higher, value in checks:
                diff = paired(per_seed(boost, value), per_seed(lora_runs(result, task, other), value))
                if diff is None:
                    continue
                rows.append([TASK_NAMES[task], LORA_ARMS[other], label, fmt_diff(diff, 4 if label != "stored numbers"
                                                                                     else 0),
                             reading(diff, higher, "BoostLoRA")])
    if not rows:
        return []
    rows.sort(key=lambda row: ORDER.index(row[-1].split(" (")[0].split(":")[0]))
    return ["### Where BoostLoRA loses and where it wins (BoostLoRA - other arm, paired by seed)", "",
            "Worse rows first. CPU seconds are of separate processes on a shared machine (unpaired in time).", "",
            table(["task", "other arm", "metric", "difference [95% CI]", "reading"], rows), ""]


# -- BoostLLM --------------------------------------------------------------------------------------


def llm_tables(result: dict[str, Any]) -> list[str]:
    return [t for t in TABLES if any(r["section"] == "boostllm" and r["table"] == t for r in result["runs"])]


def llm_shots(result: dict[str, Any], table_name: str) -> list[int]:
    return sorted({r["shots"] for r in result["runs"] if r["section"] == "boostllm" and r["table"] == table_name})


def llm_report(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = ["## BoostLLM vs the LLM fine-tuned once vs logistic regression and trees", "",
             f"{s['llm_model']} (bare, pooled at the last real token); BoostLLM: {s['llm_rounds']} rounds x "
             f"{s['llm_steps']} steps, LoRA r={s['llm_r']} all-linear, lr {s['llm_lr']:g}, head lr "
             f"{s['llm_head_lr']:g}, batch {s['llm_batch']}, shrinkage {s['shrinkage']}, views features + path "
             f"(tree depth {s['tree_depth']}); fine-tuned once: features only, 1 round of "
             f"{s['llm_rounds'] * s['llm_steps']} steps, shrinkage 1. **CPU caps: max_length {s['llm_max_length']} "
             f"tokens per view, {s['test_rows'] or 'all'} scored test rows per draw** (a seeded sample, the same "
             "rows for every method). digits is not run by default (64 pixel columns, a ~780-token feature view: "
             "see the script's docstring).", ""]
    lines += truncation_lines(result)
    lines += llm_verdicts(result)
    for table_name in llm_tables(result):
        lines += llm_table(result, table_name)
    lines += llm_cost(result)
    lines += llm_wins_losses(result)
    return lines


def truncation_lines(result: dict[str, Any]) -> list[str]:
    rows = []
    for table_name in llm_tables(result):
        runs = [r for r in result["runs"] if r["section"] == "boostllm" and r["table"] == table_name
                and r["arm"] == "boostllm" and "error" not in r] or [
            r for r in result["runs"] if r["section"] == "boostllm" and r["table"] == table_name
            and r["arm"] == "once" and "error" not in r]
        if not runs:
            continue
        for view, v in runs[0]["views_tokens"].items():
            kept = (f"{v['columns_kept_mean']:.1f} of {v['columns']}" if "columns_kept_mean" in v
                    else "all" if view == "features" else "-")
            rows.append([table_name, view, f"{v['mean_tokens']:.0f}", str(v["max_tokens"]), f"{v['cut_share']:.0%}",
                         kept])
    if not rows:
        return []
    return ["Token lengths of the scored rows' views (SmolLM2 tokenizer, first draw of each table) against the "
            "max_length cap:", "",
            table(["table", "view", "mean tokens", "max", "rows cut", "columns kept (feature view)"], rows), ""]


def llm_verdicts(result: dict[str, Any]) -> list[str]:
    margin = result["settings"]["margin"]
    rows = []
    for table_name in llm_tables(result):
        for shots in llm_shots(result, table_name):
            for other, claim in (("once", "4. BoostLLM >= fine-tuned once"),
                                 ("xgboost", "5. BoostLLM matches or beats XGBoost")):
                for metric in ("accuracy", "auc"):
                    a = method_scores(result, table_name, shots, "boostllm", metric)
                    b = method_scores(result, table_name, shots, other, metric)
                    diff = paired(a, b)
                    if diff is None:
                        continue
                    rows.append([table_name, str(shots), claim, LLM_METRICS[metric][0], mean_sd(a, 3), mean_sd(b, 3),
                                 fmt_diff(diff, 3), reaches(diff, margin)])
    if not rows:
        return []
    return ["### Verdicts", "", "Difference = BoostLLM - the other method, paired by draw (same shots, same scored "
            "rows), mean [95% t-interval] (per draw).", "",
            table(["table", "shots", "claim", "metric", "BoostLLM", "other", "difference", "verdict"], rows), ""]


def llm_table(result: dict[str, Any], table_name: str) -> list[str]:
    rows = []
    for shots in llm_shots(result, table_name):
        for method, name in METHOD_NAMES.items():
            scores = {m: method_scores(result, table_name, shots, method, m) for m in LLM_METRICS}
            failed = (llm_runs(result, table_name, shots, method, failed=True) if method in LLM_ARMS
                      else llm_runs(result, table_name, shots, "baselines", failed=True))
            if not scores["accuracy"] and not failed:
                continue
            n = f"{len(scores['accuracy'])}" + (f" ({len(failed)} failed)" if failed else "")
            rows.append([str(shots), name, n, *[mean_sd(scores[m], 3) for m in LLM_METRICS]])
    all_rows = []
    for shots in llm_shots(result, table_name):
        for run in llm_runs(result, table_name, shots, "baselines"):
            for method in BASELINES:
                vals = [d["all_test_rows"][method]["accuracy"] for d in run["per_draw"].values()
                        if "accuracy" in d["all_test_rows"].get(method, {})]
                if vals:
                    all_rows.append(f"{BASELINES[method]} {shots} shots {statistics.fmean(vals):.3f}")
    note = (["Baselines' mean accuracy on all test rows instead of the scored sample (how much the cap moves "
             "them): " + "; ".join(all_rows) + ".", ""] if all_rows else [])
    return [f"### {table_name}", "", table(["shots", "method", "draws", "accuracy", "AUC", "log-loss"], rows), "",
            *note]


def llm_cost(result: dict[str, Any]) -> list[str]:
    rows = []
    for table_name in llm_tables(result):
        for shots in llm_shots(result, table_name):
            for arm in LLM_ARMS:
                runs = llm_runs(result, table_name, shots, arm)
                if not runs:
                    continue
                r = runs[0]
                rows.append([table_name, str(shots), LLM_ARMS[arm], f"{r['adapter_round']:,}",
                             f"{r['adapter_total']:,}", str(r["forwards_per_row"]),
                             mean_sd(per_seed(runs, lambda x: x["rounds_s"]), 0),
                             mean_sd(per_seed(runs, lambda x: x["cpu_s"]), 0)])
    if not rows:
        return []
    return ["### Cost of the LLM arms", "",
            "Trainable per round = the round's LoRA + head; stored = every round's (BoostLLM keeps its rounds "
            "unmerged: a prediction runs each row once per round and view, in one routed pass). Seconds: the rounds' "
            "training and validation, and the child's CPU time (loading, scoring included).", "",
            table(["table", "shots", "arm", "trainable per round", "stored", "forwards per row at inference",
                   "rounds s", "CPU s"], rows), ""]


def llm_wins_losses(result: dict[str, Any]) -> list[str]:
    rows = []
    for table_name in llm_tables(result):
        for shots in llm_shots(result, table_name):
            for other in ("once", *BASELINES):
                for metric, (label, higher) in LLM_METRICS.items():
                    diff = paired(method_scores(result, table_name, shots, "boostllm", metric),
                                  method_scores(result, table_name, shots, other, metric))
                    if diff is None:
                        continue
                    rows.append([table_name, str(shots), METHOD_NAMES[other], label, fmt_diff(diff, 3),
                                 reading(diff, higher, "BoostLLM")])
    if not rows:
        return []
    rows.sort(key=lambda row: ORDER.index(row[-1].split(" (")[0].split(":")[0]))
    return ["### Where BoostLLM loses and where it wins (BoostLLM - other, paired by draw)", "", "Worse rows first.",
            "", table(["table", "shots", "other", "metric", "difference [95% CI]", "reading"], rows), ""]


def failures(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["runs"]:
        what = " ".join(str(r[k]) for k in ("section", "task", "table", "shots", "arm", "seed") if r.get(k) is not None)
        if "error" in r:
            lines.append(f"- {what}: failed: {r['error']}")
        elif r.get("status") not in (None, "finished"):
            lines.append(f"- {what}: {r['status']}: {r.get('message', '')[:200]}")
    return ["## Failed or diverged runs", "", *lines, ""] if lines else []


# ------------------------------------------------------------------------------------- the plot


def draw(result: dict[str, Any], path: Path) -> Path | None:
    """The rank of W - W0 after each BoostLoRA round (ROTATE and the control), and per table the
    accuracy of every method against the shots (mean over draws, bars: std)."""
    from splice.io.figures import pyplot, save_png

    tasks = [t for t in lora_tasks(result) if lora_runs(result, t, "boost")]
    tables = [t for t in llm_tables(result) if any(method_scores(result, t, n, m, "accuracy")
                                                   for n in llm_shots(result, t) for m in METHOD_NAMES)]
    panels = ([None] if tasks else []) + tables
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel is None:
            for task in tasks:
                for arm, style in (("boost", "-"), (CONTROL, "--")):
                    for run in sorted(lora_runs(result, task, arm), key=lambda r: r["seed"])[:1]:
                        ranks = [rk["mean"] for rk in run["rank_by_round"]]
                        ax.plot(range(len(ranks)), ranks, style, marker="o", markersize=3,
                                label=f"{TASK_NAMES[task]}, {ARM_NAMES[arm]}")
            ax.set(title="BoostLoRA: rank of W - W0 after each round (first seed)", xlabel="round",
                   ylabel="mean rank over target modules")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            shots = llm_shots(result, panel)
            for method, name in METHOD_NAMES.items():
                means, stds, xs = [], [], []
                for n in shots:
                    vals = list(method_scores(result, panel, n, method, "accuracy").values())
                    if vals:
                        xs.append(n)
                        means.append(statistics.fmean(vals))
                        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
                if xs:
                    ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, label=name,
                                linestyle="-" if method in LLM_ARMS else ":")
            ax.set_xscale("log", base=2)
            ax.set_xticks(shots, [str(n) for n in shots])
            ax.set(title=f"{panel}: test accuracy (scored rows) vs shots", xlabel="shots", ylabel="accuracy")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run: Rotten Tomatoes (2 seeds) and arithmetic (1 seed), every arm, a few steps; "
                              "iris at 16 shots, 2 draws, 2 x 2 steps (not results)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="subset of sections")
    p.add_argument("--jobs", type=int, help="children at a time (default 1; 2 on an idle 2-core machine)")
    p.add_argument("--seeds", nargs="+", type=int, help="BoostLoRA seeds (default 0 1 2)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="BoostLoRA tasks")
    p.add_argument("--arms", nargs="+", choices=list(LORA_ARMS), help="BoostLoRA-section arms")
    p.add_argument("--no-rotate-tasks", nargs="*", choices=list(TASKS), help="tasks of the --no-rotate control "
                   "(seed 0; default rotten_tomatoes; none: none)")
    p.add_argument("--minilm-steps", type=int, help="total steps of a MiniLM run (default 480)")
    p.add_argument("--minilm-rounds", type=int, help="BoostLoRA rounds on MiniLM (default 8)")
    p.add_argument("--smollm2-steps", type=int, help="total steps of a SmolLM2 run (default 80)")
    p.add_argument("--smollm2-rounds", type=int, help="BoostLoRA rounds on SmolLM2 (default 4)")
    p.add_argument("--smollm2-seeds", type=int, help="how many of --seeds the SmolLM2 task runs (default all)")
    p.add_argument("--tables", nargs="+", choices=list(TABLES), help="BoostLLM tables (default breast_cancer wine "
                   "iris)")
    p.add_argument("--shots", nargs="+", type=int, help="shots counts (default 16 64 256)")
    p.add_argument("--draws", nargs="+", type=int, help="seeds of the shots draws (default 0-4)")
    p.add_argument("--llm-arms", nargs="+", choices=list(LLM_ARMS), help="BoostLLM-section LLM arms")
    p.add_argument("--llm-steps", type=int, help="steps per BoostLLM round (default 20)")
    p.add_argument("--llm-max-length", type=int, help="tokens per view (default 160)")
    p.add_argument("--test-rows", type=int, help="scored test rows per draw (default 64; 0: all)")
    p.add_argument("--margin", type=float, help="non-inferiority margin of 'reaches' / 'matches' (default 0.01)")
    args = continuable(p).parse_args(argv)
    settings = settings_from(args, Settings)
    if settings.test_rows == 0:
        settings.test_rows = None
    return args, settings


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bench_main(argv, parse_args, Settings, run, markdown, "boosting", child=json_child(child_run), draw=draw)


if __name__ == "__main__":
    main()
