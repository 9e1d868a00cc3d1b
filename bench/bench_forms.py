"""Adapter forms side by side on the bundled MiniLM, same data and budget: LoRA, rsLoRA, DoRA,
DiaBlo, LoReFT, Flexi-LoRA, TT-LoRA; and one DoRA training step, splice vs HF PEFT (CPU).

What it measures (every form trains the freshly initialised classification head too):

accuracy     `splice.train.run` on Rotten Tomatoes (2 classes) and BBC News (5 topics): the same
             steps, batch, max length, schedule, seeds and evaluation rows for every form; test
             accuracy of the checkpoint the trainer keeps (best validation accuracy of step 0 and
             the last step), mean and standard deviation over the seeds. The runs go to a pool of
             worker processes (`--jobs`), one torch thread each.
step_time    one training step (forward + backward + AdamW, the trainer's auxiliary loss added
             where a form has one) on a fixed batch of reviews, every form in ONE process, paired
             and interleaved: each round runs every form once in rotating order; reported is the
             median of the per-round ratios form / LoRA with its interquartile range.
memory       one fresh process per form: the bytes autograd saves for backward (deterministic,
             weights excluded), the RSS increase of one step (high-water mark reset after a
             warm-up step) and the process's peak RSS, each relative to LoRA.
dora_peft    splice DoRA, HF PEFT DoRA, splice LoRA and PEFT LoRA, one training step each on the
             same batch, paired and interleaved, for LoRA on query,value and on all-linear; both
             libraries hold the same factors (lora_B seeded non-zero, copied from splice to PEFT)
             and their losses at equal weights are compared.

A form whose module fails to import, attach or train is reported as "failed: <error>" and the
others go on. Timing on this shared 2-core machine is noisy: compare the paired ratios, not the
absolute times (bench/README.md, "How to read the numbers").

Run `python bench/bench_forms.py` (see bench/README.md for its runtime); `--quick` is a smoke
run of ~2-3 minutes. Results: bench/results/forms.{json,md} (`forms_quick` for --quick).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    DATASETS,
    MB,
    RSS_FOLLOWS_LIVE,
    Candidate,
    LoraSpec,
    Peft,
    Phases,
    Splice,
    bench_main,
    bench_parser,
    compare,
    environment,
    finish,
    guarded,
    interleaved,
    load_minilm_classifier,
    memory_children,
    memory_marks,
    minilm_dir,
    parameter_storages,
    run_sections,
    saved_for_backward,
    seed_everything,
    seed_runs,
    seed_summary,
    settings_from,
    short_error,
    step_memory,
    train_step,
    trainable,
    twins,
    versus_baseline,
)
from forms_report import failed_forms, markdown
from forms_setup import (
    BASELINE,
    FORM_BY_NAME,
    FORMS,
    Form,
    Settings,
    adapter_config,
    attach_form,
    count_parameters,
    fixed_batch,
    form_step,
    lr_of,
)

# ------------------------------------------------------------------------------- a. accuracy


def train_one(form_name: str, data: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One `splice.train.run` (in a worker process); never raises: a failure is returned."""
    return guarded({"form": form_name, "data": data, "seed": seed}, trained, FORM_BY_NAME[form_name], data, seed,
                   Settings(**s))


def trained(form: Form, data: str, seed: int, s: Settings) -> dict[str, Any]:
    """The run itself, in a temporary output folder: accuracies, losses, trainable count, seconds."""
    from rich.console import Console

    from splice.train import TrainConfig, run

    importlib.import_module(form.module)
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(model="minilm", task="classification", data=data, adapter=dict(form.adapter),
                             max_length=s.train_max_length[data], batch_size=s.batch, lr=lr_of(form, s),
                             head_lr=s.head_lr, max_steps=s.steps, eval_every=s.steps,
                             max_eval_examples=s.eval_examples, seed=seed, output_dir=run_dir)
        result = run(config, console=Console(quiet=True), force=True)
    after, before = result.metrics["after"], result.metrics["before"]
    losses = [h["loss"] for h in result.history]
    return {"test_accuracy": after["test"]["accuracy"], "validation_accuracy": after["validation"]["accuracy"],
            "test_accuracy_before": before["test"]["accuracy"], "best_step": result.best_step,
            "trainable": result.parameters["trainable"], "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-5:])) if losses else None,
            "train_s": result.timings["train_s"], "total_s": result.timings["total_s"]}


def accuracy(s: Settings, phase: Phases) -> dict[str, Any]:
    """Every (form, data set, seed) through the trainer, `s.jobs` runs at a time."""
    from splice import assets

    def describe(row: dict[str, Any]) -> str:
        status = f"failed: {row['error']}" if "error" in row else (
            f"test acc {row['test_accuracy']:.3f} ({row['train_s']:.0f} s training)")
        return f"  {row['form']:<11} {row['data']:<16} seed {row['seed']}: {status}"

    runs = seed_runs(train_one, s.forms, s, phase, describe)
    summary = seed_summary(runs, "form", s.forms, s.datasets, lambda ok: {
        "before_mean": float(np.mean([r["test_accuracy_before"] for r in ok])),
        "kept_step_0": sum(r["best_step"] == 0 for r in ok),
        "last_loss_mean": float(np.mean([r["last_loss"] for r in ok])),
        "trainable": ok[0]["trainable"], "train_s_mean": float(np.mean([r["train_s"] for r in ok])),
    })
    labels = {d: len(assets.dataset(d).label_names) for d in s.datasets}
    return {"runs": runs, "summary": summary, "labels": labels,
            "eval_rows": {d: min(s.eval_examples, len(assets.dataset(d).test)) for d in s.datasets}}


# ------------------------------------------------------------------------------ b. step time


def step_time(s: Settings, phase: Phases) -> dict[str, Any]:
    """One training step of every form, paired and interleaved in this process."""
    seed_everything(0)
    base = load_minilm_classifier(minilm_dir())
    batch = fixed_batch(s)
    out: dict[str, Any] = {"forms": {}, "batch": list(batch["input_ids"].shape)}
    candidates = []
    for name in s.forms:
        form = FORM_BY_NAME[name]
        phase(f"[step time] attach {name}")
        try:
            torch.manual_seed(0)
            model = attach_form(base, form)
            model.train()
            optimizer = torch.optim.AdamW(trainable(model).values(), lr=lr_of(form, s))
            loss = form_step(model, optimizer, batch)  # also checks that the step runs
            out["forms"][name] = {**count_parameters(model), "first_loss": loss}
            candidates.append(Candidate(name, lambda _, m=model, o=optimizer: form_step(m, o, batch)))
        except Exception as err:
            out["forms"][name] = {"error": short_error(err)}
            print(f"  {name} failed: {out['forms'][name]['error']}", flush=True)
    del base
    gc.collect()
    return out | versus_baseline(candidates, BASELINE, s.rounds, s.warmup, phase, "forms")


# --------------------------------------------------------------------------------- c. memory


def memory(s: Settings, phase: Phases) -> dict[str, Any]:
    """One fresh interpreter per form, one after another (never concurrently); a form whose child
    fails is reported as failed."""
    kinds = {name: ["--mem-child", name, "--threads", str(s.threads), "--batch", str(s.batch),
                    "--max-length", str(s.max_length)] for name in s.forms}
    children = memory_children(Path(__file__).resolve(), kinds, RSS_FOLLOWS_LIVE, phase, keep_going=True)
    return {"children": children, "malloc_env": RSS_FOLLOWS_LIVE}


def memory_child(name: str, s: Settings) -> dict[str, Any]:
    """Inside a fresh interpreter: model, adapter and optimizer, then `common.step_memory` (a
    warm-up step, the RSS high-water mark reset, one step, one forward under `saved_for_backward`)."""
    import splice  # its import footprint is the same for every form

    torch.set_num_threads(s.threads)
    form = FORM_BY_NAME[name]
    importlib.import_module(form.module)
    after_import = memory_marks()
    model = load_minilm_classifier(minilm_dir())
    batch = fixed_batch(s)
    splice.attach(model, adapter_config(form))
    model.train()
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=lr_of(form, s))
    return {"form": name, **count_parameters(model),
            **step_memory(model, batch, lambda: form_step(model, optimizer, batch), after_import)}


# ------------------------------------------------------------------------------ d. DoRA vs PEFT


class SpliceDora(Splice):
    def config(self, targets: str | list[str]) -> Any:
        s = self.spec
        return self.lib.DoRA(r=s.r, alpha=s.alpha, dropout=s.dropout, targets=targets,
                             train_also=[s.head] if s.head else [])


class PeftDora(Peft):
    def config(self, targets: str | list[str]) -> Any:
        s = self.spec
        return self.lib.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
                                   task_type=s.task_type, use_dora=True)


DORA_TARGETS: dict[str, str | list[str]] = {"qv": ["query", "value"], "all-linear": "all-linear"}
DORA_PAIRS = [("splice_dora", "peft_dora"), ("splice_dora", "splice_lora"), ("peft_dora", "peft_lora"),
              ("splice_lora", "peft_lora"), ("splice_dora", "peft_lora")]


def dora_peft(s: Settings, phase: Phases) -> dict[str, Any]:
    """Splice and PEFT, LoRA and DoRA: one training step each, paired and interleaved."""
    seed_everything(0)
    base = load_minilm_classifier(minilm_dir())
    batch = fixed_batch(s)
    spec = LoraSpec()
    out: dict[str, Any] = {"configs": {}, "batch": list(batch["input_ids"].shape)}
    for key in s.dora_targets:
        phase(f"[DoRA vs PEFT] {key}")
        try:
            # The same seeded non-zero lora_B in both splice models, copied into their PEFT twins.
            targets = DORA_TARGETS[key]
            splice_lora, peft_lora, copied = twins(base, Splice(spec), Peft(spec), targets, ["default"], 3)
            splice_dora, peft_dora, _ = twins(base, SpliceDora(spec), PeftDora(spec), targets, ["default"], 3)
            models = {"splice_lora": splice_lora, "peft_lora": peft_lora, "splice_dora": splice_dora,
                      "peft_dora": peft_dora}
            with torch.no_grad():
                losses = {name: m.eval()(**batch).loss.item() for name, m in models.items()}
            counts = {name: sum(p.numel() for p in trainable(m).values()) for name, m in models.items()}
            saved_mb = {}
            for name, model in models.items():
                model.train()
                with saved_for_backward(parameter_storages(model)) as saved:
                    loss = model(**batch).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
                saved_mb[name] = saved["bytes"] / MB
            candidates = []
            for name, model in models.items():
                model.train()
                optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-4)
                candidates.append(Candidate(name, lambda _, m=model, o=optimizer: train_step(m, o, batch)))
            result = compare(interleaved(candidates, s.dora_rounds, s.warmup), DORA_PAIRS)
            result.update({"lora_tensors": copied, "trainable": counts, "loss_at_equal_weights": losses,
                           "saved_for_backward_mb": saved_mb,
                           "dora_loss_diff": abs(losses["splice_dora"] - losses["peft_dora"]),
                           "lora_loss_diff": abs(losses["splice_lora"] - losses["peft_lora"])})
            out["configs"][key] = result
            del models, candidates
        except Exception as err:
            out["configs"][key] = {"error": short_error(err)}
            print(f"  failed: {out['configs'][key]['error']}", flush=True)
        gc.collect()
    return out


# -------------------------------------------------------------------------------------- main


SECTIONS: dict[str, Callable[[Settings, Phases], dict[str, Any]]] = {
    "memory": memory, "accuracy": accuracy, "step_time": step_time, "dora_peft": dora_peft}


def run(s: Settings) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "sections": {},
                              "forms": {f.name: asdict(f) for f in FORMS}}
    run_sections(result, s, phase, SECTIONS, untimed=("memory", "accuracy"), timed=("step_time", "dora_peft"))
    result["failed"] = failed_forms(result)
    return finish(result, phase)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~2-3 minute smoke run (numbers not trustworthy)")
    p.add_argument("--jobs", type=int, help="training runs at a time, each its own process (default 2)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="subset of sections")
    p.add_argument("--forms", nargs="+", choices=[f.name for f in FORMS], help="subset of forms (keep LoRA)")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="subset of data sets")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, help="optimizer steps per training run")
    p.add_argument("--batch", type=int, help="batch size (training and the timed step)")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--eval-examples", type=int, help="evaluation rows per split")
    p.add_argument("--rounds", type=int, help="timed rounds of the step-time section")
    p.add_argument("--dora-rounds", type=int, help="timed rounds of the DoRA-vs-PEFT section")
    p.add_argument("--warmup", type=int, help="untimed rounds before each timed section")
    p.add_argument("--mem-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def mem_child(args: argparse.Namespace, settings: Settings) -> bool:
    if args.mem_child:
        print(json.dumps(memory_child(args.mem_child, settings)))
    return bool(args.mem_child)


def main(argv: list[str] | None = None) -> None:
    result = bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "forms", child=mem_child)
    if result and result["failed"]:
        print("\nfailed: " + "; ".join(f"{n}: {e}" for n, e in result["failed"].items()))


if __name__ == "__main__":
    main()
