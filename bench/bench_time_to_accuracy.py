"""Time to accuracy: the main job (`splice train`: LoRA r=8 alpha=16 on query/value of the bundled
MiniLM, classifier head trained, Rotten Tomatoes, batch 16, 64 tokens, AdamW lr 2e-3 / head 1e-2,
weight decay 0.01, 6% warm-up then cosine over 2 epochs, clipping 1.0) trained until its
validation accuracy reaches fixed targets, by splice's trainer and by HF PEFT + HF `Trainer`.

Targets (validation accuracy, all 486 rows, evaluated every 10 optimizer steps): 0.75, on the
steep early part of the curve (HF PEFT + HF Trainer got there in 60 steps, a quarter epoch, in a
calibration run, seed 0), and 0.78, the main target, close to where the curve flattens (the same
run: 160 steps, two thirds of an epoch; it ended the two epochs at 0.776, 80.1% test). A run
stops once it has reached every target. The time to each target comes from the same run.

Candidates, each run in a fresh interpreter (`--child`), one torch thread (`--threads`):

splice          `splice.train.Trainer` with `group_by_length=True` (length-grouped batches), otherwise
                its defaults
splice_plain    the same with `group_by_length=False` (plain shuffle, the order it always had)
peft_hf         `peft.get_peft_model` (LoraConfig r=8, alpha=16, query/value, dropout 0, task SEQ_CLS,
                so `classifier` is in modules_to_save) + `transformers.Trainer` with its defaults:
                random sampler, `DataCollatorWithPadding` (pads to the batch's longest row), the
                reviews tokenised once by `datasets.map` (truncated at 64 tokens)
peft_hf_grouped the same with HF's length grouping (`train_sampling_strategy="group_by_length"`,
                transformers 5's name for `group_by_length=True`)

Fairness: every candidate starts from the same seeded MiniLM and head (`set_seed(seed)` then
`splice.train.tasks.load_model`, as the splice trainer loads it) and gets the same optimizer: AdamW
over the adapter (lr 2e-3) and the head (lr 1e-2) with weight decay 0.01, and the same schedule
object (`get_cosine_schedule_with_warmup`, warm-up int(0.06 x 488) = 29 of 488 steps: 2 epochs of
244 batches) handed to HF's Trainer through `optimizers=`; clipping at 1.0 is both trainers' default.
Evaluation is the bench's own, identical for all: every `eval_every` optimizer steps (and at the
last step) the validation accuracy on the same rows, batched 16 at a time in the same order (by
length) and padded to each batch's longest row, called from the step loop for splice and from a
`TrainerCallback.on_step_end` for HF. **Evaluation time is excluded**: the
wall and CPU clocks of a run start just before its first training batch (splice: after
`Trainer.begin`; HF: `on_train_begin`) and stop during each evaluation, so time to target is the
training time up to the end of the first step at which the validation accuracy reached it.
Everything else the trainers do on the way is counted (data loading and collation, clipping,
non-finite checks, splice's periodic checkpoints every 100 steps). The splice trainer is given no
evaluation split of its own, so it evaluates nothing itself.

Per run and target: time to it (wall and process CPU seconds), optimizer steps, training tokens
up to it (real tokens and padded slots, counted by a forward pre-hook on the encoder in train
mode) and the test accuracy (all 488 test reviews) of the state that reached it; the validation
accuracy at every evaluation. `--to-end` goes on to the end of the main job's two epochs and
adds the test accuracy of the final state (where length grouping should change nothing beyond
seed noise). The report gives per-seed ratios against `peft_hf` (each seed's runs are paired; the
order of the candidates rotates from seed to seed, so load drift on a shared machine falls on all
of them) and their median. A run that misses a target runs the whole two epochs and is reported
as not reaching it.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_time_to_accuracy.py           # 3 seeds x 4 candidates
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_time_to_accuracy.py --quick   # smoke run, ~3 min
    .venv/bin/python bench/bench_time_to_accuracy.py --render bench/results/time_to_accuracy.json

Results: bench/results/time_to_accuracy.{json,md} (`_quick` for --quick, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import Phases, bench_main, bench_parser, environment, finish, parse_settings, run_child, short_error
from time_to_accuracy_report import markdown

CANDIDATES = {
    "splice": "splice Trainer, group_by_length",
    "splice_plain": "splice Trainer, plain shuffle",
    "peft_hf": "HF PEFT + HF Trainer, defaults",
    "peft_hf_grouped": "HF PEFT + HF Trainer, group_by_length",
}
BASELINE = "peft_hf"


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    candidates: list[str] = field(default_factory=lambda: list(CANDIDATES))
    targets: list[float] = field(default_factory=lambda: [0.75, 0.78])  # validation accuracy; the last is the goal's
    eval_every: int = 10  # optimizer steps between evaluations
    eval_examples: int | None = None  # validation rows (None: all 486)
    max_steps: int | None = None  # cap on a run's steps (None: the main job's 2 epochs)
    to_end: bool = False  # go on after the targets to the end of the run (for the final accuracy)

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, seeds=[0], targets=[0.55, 0.6], eval_every=10, eval_examples=160,
                   max_steps=40)


# ------------------------------------------------------------------------ what every run shares


class Probe:
    """A run's clocks, token counts and evaluations: `start` before the first batch, `check` after
    every optimizer step (evaluates every `eval_every` steps and at the last, with the clocks
    stopped, and the test split too when a target is first reached; True once every target is
    reached, when the run should stop, unless `to_end`)."""

    def __init__(self, encoder: torch.nn.Module, batches: dict[str, list[dict[str, torch.Tensor]]],
                 s: Settings) -> None:
        self.batches, self.s = batches, s
        self.tokens = {"real": 0, "padded": 0}
        self.evals: list[dict[str, float]] = []
        self.reached: dict[str, dict[str, Any]] = {}  # by target, as a string (a JSON key)
        self.paused = {"wall": 0.0, "cpu": 0.0}
        encoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if module.training:
            mask = kwargs["attention_mask"]
            self.tokens["real"] += int(mask.sum())
            self.tokens["padded"] += mask.numel()

    def start(self) -> None:
        self.started = {"wall": time.perf_counter(), "cpu": time.process_time()}

    def clocks(self) -> dict[str, float]:
        """Training seconds so far: wall and process CPU time, evaluations left out."""
        now = {"wall": time.perf_counter(), "cpu": time.process_time()}
        return {k: now[k] - self.started[k] - self.paused[k] for k in now}

    def check(self, model: torch.nn.Module, step: int, last: bool) -> bool:
        if step % self.s.eval_every and not last:
            return False
        trained = self.clocks()
        before = {"wall": time.perf_counter(), "cpu": time.process_time()}
        accuracy = self.accuracy(model, "validation")
        self.evals.append({"step": step, "accuracy": accuracy, "wall_s": trained["wall"]})
        new = [str(t) for t in self.s.targets if accuracy >= t and str(t) not in self.reached]
        if new:
            hit = {"step": step, "wall_s": trained["wall"], "cpu_s": trained["cpu"], **self.tokens,
                   "test_accuracy": self.accuracy(model, "test")}
            self.reached.update({t: hit for t in new})
        self.paused = {k: self.paused[k] + v - before[k]
                       for k, v in (("wall", time.perf_counter()), ("cpu", time.process_time()))}
        return len(self.reached) == len(self.s.targets) and not self.s.to_end

    def accuracy(self, model: torch.nn.Module, split: str) -> float:
        was_training = model.training
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in self.batches[split]:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
        model.train(was_training)
        return correct / total

    def result(self, model: torch.nn.Module, steps: int, total_steps: int) -> dict[str, Any]:
        """What the run reports, with the test accuracy of the state it ended in."""
        end = self.clocks()
        at_end = [hit for hit in self.reached.values() if hit["step"] == steps]
        test = at_end[0]["test_accuracy"] if at_end else self.accuracy(model, "test")
        return {"targets": self.reached, "steps_run": steps,
                "total_steps": total_steps, "eval_s": self.paused["wall"], "evals": self.evals,
                "end": {"wall_s": end["wall"], "cpu_s": end["cpu"], **self.tokens, "test_accuracy": test}}


def main_job(seed: int, s: Settings, folder: str, **fields: Any) -> Any:
    """The main job's TrainConfig (the defaults of `splice train`) with this run's seed, into `folder`."""
    from splice.train import TrainConfig

    return TrainConfig(seed=seed, max_steps=s.max_steps, output_dir=folder, **fields)


def evaluation_batches(config: Any, tokenizer: Any, splits: Any, s: Settings) -> dict[str, list[dict]]:
    """Validation (first `eval_examples` rows) and test rows in batches of the run's size, padded to
    each batch's longest row; sorted by length, which makes the evaluations (not timed, the same for
    every candidate) cheaper and leaves each row's logits as they are, up to float rounding."""
    from splice.train.data import collator

    collate = collator("classification", tokenizer, config.max_length)
    batches = {}
    for name, rows in (("validation", splits.validation[: s.eval_examples]), ("test", splits.test)):
        lengths = collate.lengths(rows)
        rows = [rows[i] for i in sorted(range(len(rows)), key=lengths.__getitem__)]
        batches[name] = [collate(rows[i: i + config.batch_size]) for i in range(0, len(rows), config.batch_size)]
    return batches


# --------------------------------------------------------------------------------- the runs


def splice_run(name: str, seed: int, s: Settings, folder: str) -> dict[str, Any]:
    """splice's Trainer on the main job, stepped until the probe says stop or the epochs end."""
    from rich.console import Console

    from splice.assets import DatasetSplits
    from splice.train import Trainer
    from splice.train.run_setup import load_run

    config = main_job(seed, s, folder, group_by_length=name == "splice")
    setup = load_run(config)
    probe = Probe(setup.model.bert, evaluation_batches(config, setup.tokenizer, setup.splits, s), s)
    splits = setup.splits
    trainer = Trainer(setup.model, setup.tokenizer, config, console=Console(quiet=True),
                      splits=DatasetSplits(splits.train, [], [], splits.task, splits.label_names))
    trainer.begin()
    probe.start()
    while not trainer.done:
        trainer.step()
        if probe.check(trainer.model, trainer.step_count, trainer.done):
            break
    return probe.result(trainer.model, trainer.step_count, trainer.total_steps)


def hf_run(name: str, seed: int, s: Settings, folder: str) -> dict[str, Any]:
    """HF PEFT + HF Trainer on the same model, optimizer and schedule; a callback runs the probe."""
    import datasets
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup

    from splice.train import tasks
    from splice.train.data import load_splits

    config = main_job(seed, s, folder)
    set_seed(seed)
    splits = load_splits(config)
    model, tokenizer = tasks.load_model(config, splits.label_names)
    probe = Probe(model.bert, evaluation_batches(config, tokenizer, splits, s), s)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                  lora_dropout=0.0, task_type="SEQ_CLS"))
    datasets.disable_progress_bars()
    train = datasets.Dataset.from_list(splits.train).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=config.max_length), batched=True)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    head = [p for n, p in peft_model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": config.lr}, {"params": head, "lr": config.head_lr}],
                                  weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)

    class Target(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            probe.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if probe.check(kw["model"], state.global_step, state.global_step >= state.max_steps):
                control.should_training_stop = True

    strategy = "group_by_length" if name == "peft_hf_grouped" else "random"
    args = TrainingArguments(output_dir=config.output_dir, per_device_train_batch_size=config.batch_size,
                             num_train_epochs=config.epochs, max_steps=config.max_steps or -1, seed=seed,
                             max_grad_norm=config.max_grad_norm, train_sampling_strategy=strategy)
    trainer = Trainer(model=peft_model, args=args, train_dataset=train, processing_class=tokenizer,
                      optimizers=(optimizer, schedule), callbacks=[Target()])
    trainer.train()
    return probe.result(peft_model, trainer.state.global_step, total)


RUNS: dict[str, Callable[[str, int, Settings, str], dict[str, Any]]] = {
    "splice": splice_run, "splice_plain": splice_run, "peft_hf": hf_run, "peft_hf_grouped": hf_run}


def child(args: argparse.Namespace, settings: Settings) -> bool:
    """`--child NAME --seed S`: one run in this fresh interpreter; its JSON on the last line."""
    if not args.child:
        return False
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    row: dict[str, Any] = {"candidate": args.child, "seed": args.seed}
    try:
        with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as folder:
            row.update(RUNS[args.child](args.child, args.seed, settings, folder))
    except Exception as err:
        row["error"] = short_error(err)
    row["process_s"] = time.perf_counter() - started
    print(json.dumps(row))
    return True


def run(s: Settings) -> dict[str, Any]:
    """Every candidate and seed in its own interpreter, one at a time; the order of the
    candidates rotates from seed to seed. Each finished run is printed whole (JSON) as well."""
    phase = Phases()
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "runs": [],
                              "candidates": {k: CANDIDATES[k] for k in s.candidates}}
    settings_args = ["--threads", str(s.threads), "--settings-json", json.dumps(asdict(s))]
    for i, seed in enumerate(s.seeds):
        order = s.candidates[i % len(s.candidates):] + s.candidates[: i % len(s.candidates)]
        for name in order:
            phase(f"[seed {seed}] {name}")
            try:
                row = run_child(Path(__file__).resolve(), ["--child", name, "--seed", str(seed), *settings_args])
            except RuntimeError as err:
                row = {"candidate": name, "seed": seed, "error": short_error(err)}
            result["runs"].append(row)
            print(f"  {describe(row)}\n  {json.dumps(row)}", flush=True)  # a stopped bench keeps its runs in the log
    return finish(result, phase)


def describe(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    hits = [f"{t} at step {h['step']}: {h['wall_s']:.1f} s wall, {h['cpu_s']:.1f} s CPU, "
            f"{1 - h['real'] / h['padded']:.0%} padding, test {h['test_accuracy']:.3f}"
            for t, h in row["targets"].items()]
    return "; ".join(hits + [f"ended at step {row['steps_run']}, test {row['end']['test_accuracy']:.3f}"])


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run (1 seed, 40 steps, targets 0.55, 0.6): checks that it works, ~3 min")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2)")
    p.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), help="subset of candidates")
    p.add_argument("--targets", nargs="+", type=float, help="validation accuracies to reach (default 0.75 0.78)")
    p.add_argument("--eval-every", type=int, help="optimizer steps between evaluations (default 10)")
    p.add_argument("--eval-examples", type=int, help="validation rows evaluated (default all 486)")
    p.add_argument("--max-steps", type=int, help="cap on each run's steps (default: 2 epochs, 488)")
    p.add_argument("--to-end", action="store_true", default=None,
                   help="go on after the targets to the end of the main job (final accuracy too; ~2x longer)")
    p.add_argument("--child", choices=list(CANDIDATES), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    return parse_settings(p, argv, Settings)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "time_to_accuracy", child=child)


if __name__ == "__main__":
    main()
