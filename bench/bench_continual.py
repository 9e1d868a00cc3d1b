"""Continual learning on real task sequences: every strategy of `splice.continual`, 3 seeds, both
sequences of issue 15, and the verdicts on the papers' claims.

Sequences (the example files, run as they are but for the strategy, the seed and the folder):

    minilm    examples/continual_minilm.yaml: MiniLM, Rotten Tomatoes sentiment -> BBC News topic
              (5 classes) -> BBC re-labelled business/tech vs the rest (it conflicts with the
              topic task: the shared representation must now merge business with tech), a head
              per task, accuracy on the first 200 test rows of each
    smollm2   examples/continual_smollm2.yaml: SmolLM2-135M as a generator, labels as words
              (review sentiment -> news topic -> arithmetic), greedy exact match on 100 test rows

Strategies: sequential, separate, olora, loda, condu with the sequence's LoRA (and loda@lr/10,
sequential@lr/10: at a tenth of the sequence's rate, see RATE_VARIANTS); core with LoReFT
(r=4, first and last prompt token, every layer: ReFT has no weight change, so it cannot take
the LoRA), hence a different trainable budget, which the table states.

Forgetting by parametrization (volume 2, §4): the `sequential` strategy on the MiniLM sequence
with each adapter form at about LoRA r=8's trainable budget on query/value of MiniLM's 6 layers
(73,728): LoRA r=8 (the `sequential` strategy's own runs: the sequence's adapter is that LoRA),
DiaBlo with 24 blocks (384²/24 per module), TT-LoRA with bond 14 (30r² + 14r per module),
LoRETTA_rep (r=8, tensor rank 14) and LoReFT r=8 at the first and last token of every layer's
output (2 x 6 x (2rd + r)); the table gives the parameters each run actually trained (head included).

Per run (strategy or form, seed): both accuracy matrices, average final accuracy, BWT, FWT, forgetting,
trainable parameters, stored bytes, time, and the switch angles paired with the forgetting they
preceded. The report gives mean ± std over seeds and the verdicts, each a difference paired by
seed with its 95% t-interval (3 seeds: t = 4.30), as the other benches' claims: held when the
interval is above 0, refuted when below, else can't tell:

- LoDA forgets less than plain LoRA (sequential): mean forgetting, task id given.
- ConDU beats sequential on task 1 after the last task: a[K-1][0], task id given.
- ConDU keeps zero-shot behaviour: on the generator sequence, the accuracy on the next unseen
  task a[j-1][j] against the base model's b[j] (the spec's "agnostic ensemble not below the
  pretrained model"), and the task-agnostic average accuracy against the task-incremental one.
- The Geometric Forgetting Law: F = a (1 - cos² θ_min) + b fitted over every switch of every run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_continual.py                       # both sequences
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_continual.py --sequences minilm    # one
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_continual.py --quick               # smoke run

Each run is a child interpreter (`--child`), so one run's memory and state never leak into the
next. Results: bench/results/continual.{json,md} and continual_matrices.png. On two cores the two
sequences can run side by side, one thread each, and be joined afterwards:

    .venv/bin/python bench/bench_continual.py --sequences minilm --out-dir /tmp/a &
    .venv/bin/python bench/bench_continual.py --sequences smollm2 --forms --out-dir /tmp/b
    .venv/bin/python bench/bench_continual.py --merge /tmp/a/continual.json /tmp/b/continual.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import Phases, bench_main, bench_parser, environment, finish, parse_settings, run_child, write_results
from continual_report import markdown, plot_matrices

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEQUENCES = {"minilm": EXAMPLES / "continual_minilm.yaml", "smollm2": EXAMPLES / "continual_smollm2.yaml"}
# A strategy run at a fraction of the sequence's learning rate, as its own row: LoDA's fixed
# down-projections (the top input-energy directions, orthonormal) project a decoder's inputs ~12x
# (median over SmolLM2's layers; MiniLM 7x) harder than a fresh LoRA A, so at LoRA's rate each of
# its steps moves the outputs that much more (`loda` itself runs at the sequence's rate). A smaller
# rate makes any strategy forget less, so `sequential@lr/10` is the control the LoDA variant is
# compared with.
RATE_VARIANTS = {"loda@lr/10": ("loda", 0.1), "sequential@lr/10": ("sequential", 0.1)}
STRATEGIES = ["sequential", "separate", "olora", "loda", "core", "condu", *RATE_VARIANTS]
REFT = {"method": "loreft", "r": 4, "positions": "f1+l1"}
QV = ["query", "value"]
FORMS = {
    "diablo": {"method": "diablo", "blocks": 24, "targets": QV},
    "ttlora": {"method": "ttlora", "r": 14, "alpha": 28, "targets": QV},
    "loretta": {"method": "loretta", "r": 8, "alpha": 16, "tensor_rank": 14, "targets": QV},
    "loreft": {"method": "loreft", "r": 8, "positions": "f1+l1"},
}
FORMS_SEQUENCE = "minilm"


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sequences: list[str] = field(default_factory=lambda: list(SEQUENCES))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    forms: list[str] = field(default_factory=lambda: list(FORMS))  # sequential on the MiniLM sequence
    step_scale: float = 1.0  # every task's max_steps times this
    eval_examples: int | None = None  # cap on each task's evaluation rows (None: the file's)

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, seeds=[0], sequences=["minilm"],
                   strategies=["sequential", "separate"], forms=["loretta"], step_scale=0.1, eval_examples=48)


def sequence_config(name: str, strategy: str, seed: int, s: Settings, folder: str, form: str | None = None) -> Any:
    """The example sequence with this strategy (or adapter form), seed, folder and budget."""
    from splice.continual import SequenceConfig

    base, rate = RATE_VARIANTS.get(strategy, (strategy, 1.0))
    config = SequenceConfig.from_yaml(SEQUENCES[name], strategy=base, seed=seed, output_dir=folder)
    if rate != 1.0:
        config.train = {**config.train, "lr": config.train["lr"] * rate}
    for task in config.tasks:
        task.max_steps = max(1, round((task.max_steps or 100) * s.step_scale))
        if s.eval_examples:
            task.max_eval_examples = s.eval_examples
    if strategy == "core":
        config.adapter = dict(REFT)
    if form is not None:
        config.adapter = dict(FORMS[form])
    return config


def child(args: argparse.Namespace, s: Settings) -> bool:
    """--child SEQUENCE:STRATEGY[:FORM]: one run, printed as one JSON line."""
    if not args.child:
        return False
    import torch
    from rich.console import Console

    from splice.continual import run_sequence
    from splice.continual.report import as_dict

    torch.set_num_threads(s.threads)
    name, strategy, *form = args.child.split(":")
    form = form[0] if form else None
    with tempfile.TemporaryDirectory(prefix="continual-") as folder:
        config = sequence_config(name, strategy, args.seed, s, folder, form)
        result = run_sequence(config, console=Console(quiet=True), quiet=True)
        row = {k: v for k, v in as_dict(result).items() if k != "config"}
    print(json.dumps({**row, "sequence": name, "strategy": strategy, "form": form, "seed": args.seed,
                      "adapter": config.adapter, "lr": config.train.get("lr")}))  # the bench's label, not the base's
    return True


def jobs(s: Settings) -> list[tuple[str, int, str]]:
    """(child key, seed, label) of every run: each sequence's strategies (rotating per seed), then
    the forms on the MiniLM sequence."""
    out = []
    for name in s.sequences:
        for i, seed in enumerate(s.seeds if s.strategies else []):
            order = s.strategies[i % len(s.strategies):] + s.strategies[: i % len(s.strategies)]
            out += [(f"{name}:{strategy}", seed, f"[{name} seed {seed}] {strategy}") for strategy in order]
    for i, seed in enumerate(s.seeds):
        order = s.forms[i % len(s.forms):] + s.forms[: i % len(s.forms)] if s.forms else []
        out += [(f"{FORMS_SEQUENCE}:sequential:{form}", seed, f"[forms seed {seed}] {form}") for form in order]
    return out


def run(s: Settings, out_dir: Path) -> dict[str, Any]:
    """Every sequence, seed and strategy, one child at a time (strategies rotate per seed); the
    mean matrices drawn into `out_dir`."""
    phase = Phases()
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "runs": []}
    flags = ["--threads", str(s.threads), "--settings-json", json.dumps(asdict(s))]
    for key, seed, label in jobs(s):
        phase(label)
        started = time.perf_counter()
        try:
            row = run_child(Path(__file__).resolve(), ["--child", key, "--seed", str(seed), *flags])
        except RuntimeError as err:
            name, strategy, *form = key.split(":")
            row = {"sequence": name, "strategy": strategy, "form": form[0] if form else None, "seed": seed,
                   "error": str(err).strip().splitlines()[-1][:300]}  # the child's own last line says why
        row["process_s"] = time.perf_counter() - started
        result["runs"].append(row)
        print(f"  {json.dumps(row)}", flush=True)  # a stopped bench keeps its runs in the log
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_matrices(result, out_dir / f"continual{'_quick' if s.quick else ''}_matrices.png")
    return finish(result, phase)


def merge(paths: list[Path], note: str | None = None) -> dict[str, Any]:
    """Results of processes run side by side as one: every run, the union of their settings, the
    longest runtime (they overlapped), each process's environment, and `note` (how they were made)."""
    parts = [json.loads(p.read_text()) for p in paths]
    settings = dict(parts[0]["settings"])
    for key in ("seeds", "sequences", "strategies", "forms"):
        settings[key] = list(dict.fromkeys(v for part in parts for v in part["settings"][key]))
    settings["quick"] = any(part["settings"]["quick"] for part in parts)
    return {"environment": parts[0]["environment"], "settings": settings,
            "runs": [run for part in parts for run in part["runs"]],
            "runtime_s": max(part["runtime_s"] for part in parts),
            "note": " ".join(n for n in [*(part.get("note") for part in parts), note] if n) or None,
            "merged_from": [entry for p, part in zip(paths, parts, strict=True)  # a merged part keeps its own parts
                            for entry in part.get("merged_from") or [{
                                "file": str(p), "settings": part["settings"], "environment": part["environment"],
                                "runtime_s": part["runtime_s"]}]]}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run (MiniLM sequence, sequential and separate, 10%% of the steps, 1 seed)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    p.add_argument("--sequences", nargs="+", choices=list(SEQUENCES), help="subset of sequences")
    p.add_argument("--strategies", nargs="*", choices=STRATEGIES, help="subset of strategies (none: no strategy runs)")
    p.add_argument("--forms", nargs="*", choices=list(FORMS), help="subset of adapter forms (none: no form runs)")
    p.add_argument("--step-scale", type=float, help="multiply every task's max_steps (default 1)")
    p.add_argument("--eval-examples", type=int, help="cap every task's evaluation rows")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="measure nothing: join result files of runs made side by side into --out-dir")
    p.add_argument("--note", help="with --merge: a sentence on how the parts were made, printed in the report")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    return parse_settings(p, argv, Settings)


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_args(argv)
    if args.merge:
        result = merge(args.merge, args.note)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plot_matrices(result, args.out_dir / "continual_matrices.png")
        write_results(args.out_dir, "continual", result, markdown(result))
        return
    bench_main(argv, parse_args, Settings, lambda s, args: run(s, args.out_dir), markdown, "continual", child=child)


if __name__ == "__main__":
    main()
