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
import copy
import gc
import importlib
import json
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    HEAD,
    Batch,
    Candidate,
    LoraSpec,
    Peft,
    Phases,
    Splice,
    bench_main,
    bench_parser,
    compare,
    copy_lora,
    environment,
    finish,
    interleaved,
    load_minilm_classifier,
    memory_marks,
    minilm_dir,
    parameter_storages,
    pool_runs,
    proc_status_mb,
    reset_peak_rss,
    review_batch,
    run_child,
    run_sections,
    seed_everything,
    seed_summary,
    settings_from,
    trainable,
)
from torch import nn

MB = 2**20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # memory children: RSS follows live memory (bench/README.md)
DATASETS = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News"}
BASELINE = "LoRA"


@dataclass(frozen=True)
class Form:
    """One adapter form: its adapter mapping for `splice.config_from_dict` / TrainConfig, the
    module that registers its method, its learning rate (None: the shared one) and why."""

    name: str
    adapter: dict[str, Any]
    module: str
    lr: float | None = None
    why: str = ""


# Same placement for every weight-level form: query and value of all 6 layers (BERT's default
# targets); LoReFT edits the hidden states each of the 6 layers outputs. Ranks and scales as LoRA's
# where the form has them; DiaBlo's block count gives LoRA r=8's parameter count.
FORMS: list[Form] = [
    Form("LoRA", {"method": "lora", "r": 8, "alpha": 16}, "splice.methods.lora",
         why="r=8, alpha=16 (scale 2), query,value"),
    Form("rsLoRA", {"method": "lora", "r": 8, "alpha": 16, "rslora": True}, "splice.methods.lora",
         why="LoRA with scale alpha/sqrt(r) = 5.66"),
    Form("DoRA", {"method": "dora", "r": 8, "alpha": 16}, "splice.methods.dora",
         why="LoRA r=8, alpha=16 plus a trained magnitude per output row"),
    Form("DiaBlo", {"method": "diablo", "blocks": 24}, "splice.methods.diablo",
         why="24 diagonal blocks of 16x16 per layer: LoRA r=8's parameter count (the paper's N=64 is for 4096-wide"
             " layers)"),
    Form("LoReFT", {"method": "loreft", "r": 4, "positions": "f1+l1"}, "splice.methods.loreft", lr=6e-3,
         why="r=4 at every layer's output, first ([CLS], what BERT's pooler reads) and last token, separate"
             " interventions, as examples/rotten_tomatoes_loreft.yaml; a higher lr than LoRA's, as ReFT recipes use"
             " (that example's 6e-3; in a pilot, Rotten Tomatoes seed 0, 80 steps of 8, 5e-3 gave 55% test accuracy"
             " and 1.5e-2 49%)"),
    Form("Flexi-LoRA", {"method": "flexilora", "ranks": [2, 4, 8], "alpha": 16, "scorer": "length",
                        "bins": [20, 32]}, "splice.methods.flexilora",
         why="nested ranks 2/4/8 (LoRA r=8's storage), rank from the prompt length: < 20 tokens -> 2, 20-31 -> 4,"
             " 32 (a review cut at the max length) -> 8; Rotten Tomatoes reviews are 14-43 tokens (10th-90th"
             " percentile), BBC articles are always cut at 32 tokens, so BBC always uses rank 8"),
    Form("TT-LoRA", {"method": "ttlora", "r": 8, "alpha": 16}, "splice.methods.ttlora",
         why="tensor train of bond 8 (rank <= 8, scale alpha/r = 2 as LoRA), modes 384 -> 8x8x6"),
]
FORM_BY_NAME = {f.name: f for f in FORMS}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    jobs: int = 2
    sections: list[str] = field(default_factory=lambda: ["memory", "accuracy", "step_time", "dora_peft"])
    forms: list[str] = field(default_factory=lambda: [f.name for f in FORMS])
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 80
    batch: int = 8
    max_length: int = 64  # of the fixed batch the step-time, memory and DoRA sections use
    # Tokens per training example, per data set: 32 keeps the full run near 20 minutes on two
    # idle cores; it holds ~80% of the reviews whole, and an article's headline and first words.
    train_max_length: dict[str, int] = field(default_factory=lambda: {"rotten_tomatoes": 32, "bbc_news": 32})
    lr: float = 2e-3
    # The trainer's default head lr is 1e-2; with it, most Rotten Tomatoes runs of a 60-step trial
    # kept their step-0 checkpoint (the random head). 3e-2 is the same for every form.
    head_lr: float = 3e-2
    eval_examples: int = 128
    warmup: int = 2
    rounds: int = 12
    dora_rounds: int = 12
    dora_targets: list[str] = field(default_factory=lambda: ["qv", "all-linear"])
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(seeds=[0], steps=3, max_length=32, train_max_length={"rotten_tomatoes": 32, "bbc_news": 32},
                   eval_examples=16, warmup=1, rounds=2, dora_rounds=2, quick=True, **overrides)


def lr_of(form: Form, s: Settings) -> float:
    return form.lr if form.lr is not None else s.lr


def short_error(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def adapter_config(form: Form) -> Any:
    """The form's splice config with the classifier trained in full (importing its module registers it)."""
    importlib.import_module(form.module)
    from splice.core.registry import config_from_dict

    return config_from_dict({**form.adapter, "train_also": [HEAD]})


def attach_form(base: nn.Module, form: Form) -> nn.Module:
    import splice

    model = copy.deepcopy(base)
    splice.attach(model, adapter_config(form))
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable numbers of the adapter and of the trained classification head, apart."""
    params = trainable(model)
    head = sum(p.numel() for n, p in params.items() if n.startswith(f"{HEAD}."))
    return {"adapter": sum(p.numel() for p in params.values()) - head, "head": head}


def form_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    """One training step as the trainer takes it: task loss plus the adapters' auxiliary loss."""
    import splice

    loss = model(**batch).loss
    extra = splice.auxiliary_loss(model)
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ------------------------------------------------------------------------------- a. accuracy


def train_one(form_name: str, data: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One `splice.train.run` (in a worker process); never raises: a failure is returned."""
    from rich.console import Console

    from splice.train import TrainConfig, run

    form = FORM_BY_NAME[form_name]
    out: dict[str, Any] = {"form": form_name, "data": data, "seed": seed}
    try:
        importlib.import_module(form.module)
        with tempfile.TemporaryDirectory() as run_dir:
            config = TrainConfig(model="minilm", task="classification", data=data, adapter=dict(form.adapter),
                                 max_length=s["train_max_length"][data], batch_size=s["batch"],
                                 lr=lr_of(form, Settings(**s)), head_lr=s["head_lr"], max_steps=s["steps"],
                                 eval_every=s["steps"], max_eval_examples=s["eval_examples"], seed=seed,
                                 output_dir=run_dir)
            result = run(config, console=Console(quiet=True), force=True)
        after, before = result.metrics["after"], result.metrics["before"]
        losses = [h["loss"] for h in result.history]
        out.update({"test_accuracy": after["test"]["accuracy"], "validation_accuracy": after["validation"]["accuracy"],
                    "test_accuracy_before": before["test"]["accuracy"], "best_step": result.best_step,
                    "trainable": result.parameters["trainable"], "first_loss": losses[0] if losses else None,
                    "last_loss": float(np.mean(losses[-5:])) if losses else None,
                    "train_s": result.timings["train_s"], "total_s": result.timings["total_s"]})
    except Exception as err:  # a form still being written must not stop the others
        out["error"] = short_error(err)
        out["traceback"] = traceback.format_exc()[-2000:]
    return out


def accuracy(s: Settings, phase: Phases) -> dict[str, Any]:
    """Every (form, data set, seed) through the trainer, `s.jobs` runs at a time."""
    from splice import assets

    jobs = [(f, d, seed) for d in s.datasets for seed in s.seeds for f in s.forms]
    phase(f"[accuracy] {len(jobs)} training runs, {s.jobs} at a time")

    def describe(row: dict[str, Any]) -> str:
        status = f"failed: {row['error']}" if "error" in row else (
            f"test acc {row['test_accuracy']:.3f} ({row['train_s']:.0f} s training)")
        return f"  {row['form']:<11} {row['data']:<16} seed {row['seed']}: {status}"

    runs = pool_runs(train_one, [(*job, asdict(s)) for job in jobs], s.jobs, s.threads, describe)
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


def fixed_batch(s: Settings) -> Batch:
    batch, _ = review_batch(s.batch, s.max_length)
    return batch


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
    names = [c.name for c in candidates]
    if BASELINE in names and len(names) > 1:
        phase(f"[step time] {s.rounds} interleaved rounds of {len(names)} forms")
        samples = interleaved(candidates, s.rounds, s.warmup)
        out["timing"] = compare(samples, [(n, BASELINE) for n in names if n != BASELINE])
    return out


# --------------------------------------------------------------------------------- c. memory


def memory(s: Settings, phase: Phases) -> dict[str, Any]:
    """One fresh interpreter per form, one after another (never concurrently)."""
    out: dict[str, Any] = {"children": {}, "malloc_env": MALLOC_ENV}
    for name in s.forms:
        phase(f"[memory] {name}")
        args = ["--mem-child", name, "--threads", str(s.threads), "--batch", str(s.batch),
                "--max-length", str(s.max_length)]
        try:
            row = run_child(Path(__file__).resolve(), args, env=MALLOC_ENV)
        except RuntimeError as err:
            lines = [x for x in str(err).strip().splitlines() if x.strip()]
            row = {"error": lines[-1][:300] if lines else "child failed"}
        out["children"][name] = row
        if "error" in row:
            print(f"  failed: {row['error']}", flush=True)
        else:
            print(f"  saved {row['saved_mb']:6.1f} MB, step +{row['step_delta_mb']:6.1f} MB,"
                  f" peak {row['peak_mb']:6.0f} MB", flush=True)
    return out


def memory_child(name: str, s: Settings) -> dict[str, Any]:
    """Inside a fresh interpreter: model, adapter, optimizer, one warm-up step; reset the RSS
    high-water mark; one step; then one forward under `saved_for_backward`."""
    from common import saved_for_backward

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
    torch.manual_seed(0)
    form_step(model, optimizer, batch)
    after_setup = memory_marks()
    rss_before = proc_status_mb("VmRSS") or 0.0
    reset_ok = reset_peak_rss()
    form_step(model, optimizer, batch)
    after_step = memory_marks()
    with saved_for_backward(parameter_storages(model)) as saved:
        loss = model(**batch).loss
    loss.backward()
    key = "vmhwm_mb" if "vmhwm_mb" in after_step else "ru_maxrss_mb"
    return {"form": name, **count_parameters(model), "saved_mb": saved["bytes"] / MB,
            "saved_tensors": saved["tensors"], "hwm_reset_worked": reset_ok,
            "step_delta_mb": after_step[key] - rss_before if reset_ok else float("nan"),
            "peak_mb": max(after_setup[key], after_step[key]), "after_import_mb": after_import[key],
            "after_setup_mb": after_setup[key]}


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
DORA_LIBS: dict[str, Callable[[LoraSpec], Any]] = {
    "splice_lora": Splice, "peft_lora": Peft, "splice_dora": SpliceDora, "peft_dora": PeftDora}
DORA_PAIRS = [("splice_dora", "peft_dora"), ("splice_dora", "splice_lora"), ("peft_dora", "peft_lora"),
              ("splice_lora", "peft_lora"), ("splice_dora", "peft_lora")]


def dora_peft(s: Settings, phase: Phases) -> dict[str, Any]:
    """Splice and PEFT, LoRA and DoRA: one training step each, paired and interleaved."""
    from common import saved_for_backward, train_step

    seed_everything(0)
    base = load_minilm_classifier(minilm_dir())
    batch = fixed_batch(s)
    spec = LoraSpec()
    out: dict[str, Any] = {"configs": {}, "batch": list(batch["input_ids"].shape)}
    for key in s.dora_targets:
        phase(f"[DoRA vs PEFT] {key}")
        try:
            models = {name: lib(spec).attach(copy.deepcopy(base), DORA_TARGETS[key]) for name, lib in DORA_LIBS.items()}
            generator = torch.Generator().manual_seed(3)
            with torch.no_grad():  # the same non-zero lora_B in the splice models, then copied into PEFT's
                b_values = {n: torch.randn(p.shape, generator=generator) * 0.02
                            for n, p in sorted(models["splice_lora"].named_parameters()) if n.endswith(".lora_B")}
                for name in ("splice_lora", "splice_dora"):
                    for n, p in models[name].named_parameters():
                        if n in b_values:
                            p.copy_(b_values[n])
                copied = copy_lora(models["splice_lora"], models["peft_lora"])
                copy_lora(models["splice_dora"], models["peft_dora"])
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


def markdown(result: dict[str, Any], s: Settings) -> str:
    """The report; forms_report.py holds it and imports this module, so it is imported only here."""
    from forms_report import markdown as render

    return render(result, s)


# -------------------------------------------------------------------------------------- main


SECTIONS: dict[str, Callable[[Settings, Phases], dict[str, Any]]] = {
    "memory": memory, "accuracy": accuracy, "step_time": step_time, "dora_peft": dora_peft}


def run(s: Settings) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "sections": {},
                              "forms": {f.name: asdict(f) for f in FORMS}}
    run_sections(result, s, phase, SECTIONS, untimed=("memory", "accuracy"), timed=("step_time", "dora_peft"))
    from forms_report import failed_forms

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
