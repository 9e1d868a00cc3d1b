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

Each (setup, seed) is a child interpreter (`--child`). Results: bench/results/multitask.{json,md}
and multitask_<setup>_transfer.png (`_quick` for --quick, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import Phases, bench_main, bench_parser, environment, finish, parse_settings, run_child
from multitask_report import markdown, merged, plot

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

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, seeds=[0], setups=["minilm", "smollm2"], step_scale=1 / 30,
                   train_examples=256, eval_examples=8, transfer=["minilm"])  # 4 and 2 steps a task


def config_for(setup: str, seed: int, s: Settings, folder: str) -> Any:
    """The example's config with this seed, folder and budget."""
    from splice.multitask import MultitaskConfig

    base = MultitaskConfig.from_yaml(SETUPS[setup])
    steps = max(1, round(base.train["max_steps"] * s.step_scale))
    train = {"max_steps": steps, "max_train_examples": s.train_examples, "max_eval_examples": s.eval_examples,
             "max_length": s.max_length}
    return MultitaskConfig.from_yaml(SETUPS[setup], seeds=[seed], output_dir=folder, train=train,
                                     transfer=setup in s.transfer)


def child(args: argparse.Namespace, s: Settings) -> bool:
    """--child SETUP --seed S: the job for one seed, printed as one JSON line."""
    if not args.child:
        return False
    import torch
    from rich.console import Console

    from splice.multitask import run_multitask
    from splice.multitask.report import as_dict

    torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="multitask-") as folder:
        config = config_for(args.child, args.seed, s, folder)
        result = run_multitask(config, console=Console(quiet=True), quiet=True)
        print(json.dumps({"setup": args.child, "seed": args.seed, **as_dict(result)}))
    return True


def run(s: Settings, out_dir: Path) -> dict[str, Any]:
    """Every setup and seed, one child at a time; the transfer heatmaps drawn into `out_dir`."""
    phase = Phases()
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "jobs": []}
    flags = ["--threads", str(s.threads), "--settings-json", json.dumps(asdict(s))]
    for setup in s.setups:
        for seed in s.seeds:
            phase(f"[{setup}] seed {seed}")
            started = time.perf_counter()
            try:
                job = run_child(Path(__file__).resolve(), ["--child", setup, "--seed", str(seed), *flags])
            except RuntimeError as err:
                job = {"setup": setup, "seed": seed, "error": str(err).strip().splitlines()[-1][:300]}
            job["process_s"] = time.perf_counter() - started
            result["jobs"].append(job)
            print(f"  {setup} seed {seed}: " + (job["error"] if "error" in job else ", ".join(
                f"{r['name']} {json.dumps({k: round(v, 3) for k, v in r['scores'].items()})}" for r in job["runs"])),
                flush=True)
    result["setups"] = {setup: merged(result, setup) for setup in s.setups}
    out_dir.mkdir(parents=True, exist_ok=True)
    for setup, data in result["setups"].items():
        if data and data.get("transfer"):
            plot(data, out_dir / f"multitask{'_quick' if s.quick else ''}_{setup}_transfer.png")
    return finish(result, phase)


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
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    return parse_settings(p, argv, Settings)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s, args.out_dir), markdown, "multitask", child=child)


if __name__ == "__main__":
    main()
