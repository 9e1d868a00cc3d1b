"""Multi-task PEFT (volume 2 §9): one shared adapter on a mixture of tasks against one adapter per
task, with the pairwise transfer matrix, on real models and data, 3 seeds.

Setups (the example files, run as they are but for the seed, the folder and the budget flags):

    minilm    examples/multitask_minilm.yaml: MiniLM, a head per task, Rotten Tomatoes (2 classes)
              + BBC News (5), proportional mixing, 120 steps per task, accuracy on 200 test rows
    smollm2   examples/multitask_smollm2.yaml: SmolLM2-135M as one generator, every prompt tagged
              with its task: RT sentiment and BBC topic as label words, arithmetic word problems;
              temperature mixing (T = 2), 60 steps per task, greedy exact match on 100 test rows

Each seed of a setup trains the shared adapter ("joint", the sum of the tasks' budgets), one
adapter per task and every pair (the pair of two tasks is the joint run). Reported per setup:
each task's score shared vs own adapter (mean ± std over seeds), the stored parameters (adapters
+ heads), the compute (optimizer steps, training examples, seconds: a ratio measured on the same
machine in one run), the transfer matrix Δ_ij = acc_i(i+j) - acc_i(i) with its std, and a heatmap.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_multitask.py                   # both setups, 3 seeds
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_multitask.py --setups minilm
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_multitask.py --quick           # smoke run (~4 min)

Each (setup, seed) is a fresh interpreter, and the results are rewritten after each:
`--merge` keeps the finished seeds of the result in --out-dir whose settings equal this
invocation's, `--budget-min` starts none expected to end past it, so a long run continues:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_multitask.py --setups smollm2 --merge --budget-min 120

Results: bench/results/multitask.{json,md} and multitask_<setup>_transfer.png (`_quick` for
--quick, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Phases,
    bench_main,
    bench_parser,
    budgeted_children,
    continuable,
    continued_result,
    result_saver,
    settings_from,
)
from multitask_report import markdown, plot, setups_of

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SETUPS = {"minilm": EXAMPLES / "multitask_minilm.yaml", "smollm2": EXAMPLES / "multitask_smollm2.yaml"}


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    setups: list[str] = field(default_factory=lambda: list(SETUPS))
    step_scale: float = 1.0  # each task's max_steps times this
    train_examples: int | None = None  # cap on each task's training rows (None: all)
    eval_examples: int | None = None  # cap on each task's evaluation rows (None: the file's)
    max_length: int | None = None  # None: the file's
    transfer: list[str] = field(default_factory=lambda: list(SETUPS))  # setups that train the pairs
    budget_min: float = 600.0  # no (setup, seed) starts that is expected to end later

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, seeds=[0], setups=["minilm", "smollm2"], step_scale=1 / 30,
                   train_examples=256, eval_examples=8, transfer=["minilm"])  # 4 and 2 steps a task


def config_for(setup: str, seed: int, s: Settings, folder: str) -> Any:
    """The example's config with this seed, folder and budget."""
    from splice.multitask import MultitaskConfig

    base = MultitaskConfig.from_yaml(SETUPS[setup])
    steps = max(1, round(base.train["max_steps"] * s.step_scale))
    given = {"max_train_examples": s.train_examples, "max_eval_examples": s.eval_examples, "max_length": s.max_length}
    train = {"max_steps": steps, **{k: v for k, v in given.items() if v is not None}}  # None: the file's
    return MultitaskConfig.from_yaml(SETUPS[setup], seeds=[seed], output_dir=folder, train=train,
                                     transfer=setup in s.transfer)


JOB_KEYS = ("setup", "seed", "step_scale", "train_examples", "eval_examples", "max_length", "transfer", "threads")


def make_job(s: Settings, setup: str, seed: int) -> dict[str, Any]:
    """One (setup, seed): everything that makes two runs the same run."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}")
    return {"setup": setup, "seed": seed, "step_scale": s.step_scale, "train_examples": s.train_examples,
            "eval_examples": s.eval_examples, "max_length": s.max_length, "transfer": setup in s.transfer,
            "threads": s.threads}


def job_key(job: dict[str, Any]) -> str:
    return json.dumps({k: job.get(k) for k in JOB_KEYS}, sort_keys=True)


def child(args: argparse.Namespace, s: Settings) -> bool:
    """--run-child JOB: one (setup, seed), printed as one JSON line."""
    if not args.run_child:
        return False
    import torch
    from rich.console import Console

    from splice.multitask import run_multitask
    from splice.multitask.report import as_dict

    job = json.loads(args.run_child)
    torch.set_num_threads(job["threads"])
    settings = Settings(threads=job["threads"], step_scale=job["step_scale"], train_examples=job["train_examples"],
                        eval_examples=job["eval_examples"], max_length=job["max_length"],
                        transfer=[job["setup"]] if job["transfer"] else [])
    with tempfile.TemporaryDirectory(prefix="multitask-") as folder:
        config = config_for(job["setup"], job["seed"], settings, folder)
        result = run_multitask(config, console=Console(quiet=True), quiet=True)
        print(json.dumps(as_dict(result)))
    return True


def draw(result: dict[str, Any], target: Path) -> None:
    """Every setup's transfer heatmap (multitask[_quick]_<setup>_transfer.png), its seeds merged."""
    for setup, data in setups_of(result).items():
        if data and data.get("transfer"):
            plot(data, target.with_name(f"{target.stem}_{setup}_transfer.png"))


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Every (setup, seed) not yet in the result, one child at a time, the results rewritten after
    each; with `--merge`, the finished seeds of the result in `--out-dir` with the same settings are
    kept."""
    phase = Phases()
    target = args.out_dir / f"multitask{'_quick' if s.quick else ''}.json"
    result = continued_result(target, bool(args.merge), s, lambda r: make_job(s, r["setup"], r["seed"]), job_key, {})
    save = result_saver(result, target, phase, markdown, draw)
    jobs = (make_job(s, setup, seed) for setup in s.setups for seed in s.seeds)
    skipped = budgeted_children(Path(__file__).resolve(), jobs, result["runs"], key=job_key,
                                group=lambda j: j["setup"], budget_min=s.budget_min, phase=phase,
                                label=lambda j: f"[{j['setup']}] seed {j['seed']}", save=save,
                                env={"OMP_NUM_THREADS": str(s.threads)})
    result["not_run"] = [{"setup": j["setup"], "seed": j["seed"], "why": "budget"} for j in skipped]
    save()
    return result


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run (both setups, 1 seed, 1/30 of the steps, 256 training and 8 "
                              "evaluation rows a task, no pairs for smollm2)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), help="subset of setups")
    p.add_argument("--step-scale", type=float, help="multiply every task's max_steps (default 1)")
    p.add_argument("--train-examples", type=int, help="cap every task's training rows")
    p.add_argument("--eval-examples", type=int, help="cap every task's evaluation rows")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the file's)")
    p.add_argument("--transfer", nargs="*", choices=list(SETUPS), help="setups that train every pair (default all)")
    args = continuable(p).parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, run, markdown, "multitask", child=child, draw=draw)


if __name__ == "__main__":
    main()
