"""QLoRA on CPU (issue 18): what a 4-bit NF4 base saves in memory, costs in step time, and does to quality.

memory  One LoRA r=16 all-linear training setup of SmolLM2-135M-Instruct per base, each in a fresh
        interpreter (`--mem-child BASE`, glibc returning freed buffers to the OS so RSS follows live
        memory): fp32; bf16 (`model.to(bfloat16)`); NF4 through torchao in an fp32 model with fp32
        compute (the CPU choice) and in a bf16 model with bf16 compute (QLoRA's recipe); NF4
        through bitsandbytes' CPU backend (fp32 model and compute). Per base: the bytes of the
        frozen Linear weights as stored (4-bit codes with every scale) against bf16 and fp32, the
        whole model's bytes, the peak RSS while training steps run (after the loading peak is reset),
        the activation bytes saved for backward, and the median step time (forward, backward, AdamW)
        on a fixed batch of arithmetic prompts and answers. Goal (issue 18): NF4 Linear bytes <= 0.3x
        bf16 and a clearly lower training peak; the step time ratio NF4/bf16 is reported, not hidden.
study   LoRA vs QLoRA (the same LoRA on the NF4 torchao base, fp32 compute) at equal rank (16,
        all-linear), steps, data order and seed, through `splice.train.run` (what `splice train`
        does): SmolLM2 on arithmetic word problems (loss, perplexity, greedy exact match) and on
        Rotten Tomatoes review text as language modelling (loss, perplexity), 3 seeds; verdict per
        task: QLoRA's mean test loss within 3% of LoRA's (volume-1 §15's claim, QLoRA close to the
        full-precision base's quality).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_qlora.py                       # both sections
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_qlora.py --sections memory     # one
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_qlora.py --quick               # smoke run

Results: bench/results/qlora.{json,md}. The study's runs are children too (`--run-child`), one at a
time, one thread each (bench/README.md: on this 2-core VM a second thread slows a run that shares
the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    RSS_FOLLOWS_LIVE,
    Phases,
    bench_main,
    bench_parser,
    environment,
    finish,
    memory_marks,
    parse_settings,
    run_child,
    smollm2_dir,
    step_memory,
    table,
    verdict,
    write_results,
)

SCRIPT = Path(__file__).resolve()
BASES = {  # name: (how the rest of the model is held, splice.quantize options or None)
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "nf4-torchao": ("fp32", {"backend": "torchao", "compute_dtype": "float32"}),
    "nf4-torchao-bf16": ("bf16", {"backend": "torchao", "compute_dtype": "bfloat16"}),  # QLoRA's recipe
    "nf4-bitsandbytes": ("fp32", {"backend": "bitsandbytes", "compute_dtype": "float32"}),
}
TASKS = ("arithmetic", "reviews")
VARIANTS = {"lora": None, "qlora": {"scheme": "nf4", "backend": "torchao", "compute_dtype": "float32"}}
LOSS_GOAL = 1.03  # QLoRA's test loss at most 3% above LoRA's


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    sections: list[str] = field(default_factory=lambda: ["memory", "study"])
    bases: list[str] = field(default_factory=lambda: list(BASES))
    rank: int = 16
    batch_rows: int = 8  # memory section: rows of the fixed batch
    timed_steps: int = 3  # memory section: steps timed after the measured ones
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    steps: int = 40
    eval_examples: int = 48
    train_reviews: int = 1200  # review rows to sample training batches from

    @classmethod
    def quick_run(cls, threads: int = 1) -> Settings:
        return cls(quick=True, threads=threads, bases=["fp32", "nf4-torchao"], rank=4, batch_rows=2, timed_steps=1,
                   seeds=[0], tasks=["arithmetic"], steps=2, eval_examples=4, train_reviews=64)


# ------------------------------------------------------------------------------------ memory


def memory_child(base: str, s: Settings) -> dict[str, Any]:
    """One base's bytes, training peak and step time, in this (fresh) interpreter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splice

    after_import = memory_marks()
    torch.set_num_threads(s.threads)
    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    batch = arithmetic_batch(AutoTokenizer.from_pretrained(folder), s.batch_rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        reference = model(**inputs).logits
    held, options = BASES[base]
    if held == "bf16":
        model.to(torch.bfloat16)
    if options is not None:
        splice.quantize(model, "nf4", **options)
    with torch.no_grad():  # what holding the base this way does to its outputs (before any adapter)
        logits = model(**inputs).logits.float()
    mask = batch["attention_mask"].bool()
    shift = {"logit_shift": ((logits - reference)[mask].norm() / reference[mask].norm()).item(),
             "top1_agreement": (logits.argmax(-1) == reference.argmax(-1))[mask].float().mean().item()}
    del reference, logits
    sizes = splice.base_bytes(model)
    sizes["linear_bytes"] = sizes["quantized_bytes"] + sizes["dense_linear_bytes"]
    splice.attach(model, splice.LoRA(r=s.rank, alpha=2 * s.rank, targets="all-linear"))
    optimizer = torch.optim.AdamW(splice.trainable_parameters(model).values(), lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    memory = step_memory(model, batch, step, after_import, steps=1, detail=True)
    times = []
    for _ in range(s.timed_steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = memory["rss_before_steps_mb"] + memory["step_delta_mb"]
    return {"base": base, **sizes, **shift, **memory, "train_peak_mb": peak, "step_s": statistics.median(times),
            "step_times_s": times}


def arithmetic_batch(tokenizer: Any, rows: int) -> dict[str, Any]:
    """The first `rows` training problems as `splice train` batches them: prompt + answer + eos,
    the loss on the answer."""
    from splice import assets
    from splice.train.data import collator

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return collator("causal_lm", tokenizer, 64)(assets.arithmetic().train[:rows])


# ------------------------------------------------------------------------------------- study


def review_rows(s: Settings) -> dict[str, list[dict[str, str]]]:
    """Rotten Tomatoes reviews as language modelling: prompt "Review:", the text as completion."""
    from splice import assets

    splits = assets.rotten_tomatoes()

    def rows(source: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"prompt": "Review:", "completion": " " + r["text"]} for r in source]

    return {"train": rows(splits.train[: s.train_reviews]), "validation": rows(splits.validation),
            "test": rows(splits.test)}


def study_child(task: str, variant: str, seed: int, s: Settings) -> dict[str, Any]:
    """One training run of `splice.train.run`, in this (fresh) interpreter."""
    import torch
    from rich.console import Console

    from splice.train import TrainConfig, run
    from splice.train.evaluation import evaluate
    from splice.train.run_setup import load_run

    torch.set_num_threads(s.threads)
    common = dict(model="smollm2", task="causal_lm", adapter={"method": "lora", "r": s.rank, "alpha": 2 * s.rank,
                                                              "targets": "all-linear"},
                  batch_size=8, lr=1e-3, warmup_ratio=0.1, max_steps=s.steps, eval_every=s.steps,
                  max_eval_examples=s.eval_examples, seed=seed, quantize=VARIANTS[variant], checkpoint_every=None)
    with tempfile.TemporaryDirectory(prefix="qlora-") as folder:
        if task == "arithmetic":
            config = TrainConfig(data="arithmetic", max_length=48, output_dir=folder, **common)
            test = None
        else:
            rows = review_rows(s)
            config = TrainConfig(data=rows["train"], validation=rows["validation"], max_length=64,
                                 output_dir=folder, **common)
            test = rows["test"][: s.eval_examples]
        started = time.perf_counter()
        result = run(config, console=Console(quiet=True), force=True)
        seconds = time.perf_counter() - started
        metrics = result.metrics["after"]
        if test is not None:  # data in memory has no test split: evaluate the adapter on the test rows
            setup = load_run(config)
            splice_load(setup.model, result.paths["adapter"])
            metrics = {**metrics, "test": evaluate(setup.model, setup.tokenizer, test, config)}
    return {"task": task, "variant": variant, "seed": seed, "after": metrics,
            "before": result.metrics["before"], "train_s": seconds, "best_step": result.best_step}


def splice_load(model: Any, adapter: Path) -> None:
    import splice

    splice.detach(model, "default")
    splice.load(model, adapter)


# ------------------------------------------------------------------------------- the driver


def child(args: argparse.Namespace, s: Settings) -> bool:
    if args.mem_child:
        print(json.dumps(memory_child(args.mem_child, s)))
        return True
    if args.run_child:
        task, variant, seed = args.run_child.split(":")
        print(json.dumps(study_child(task, variant, int(seed), s)))
        return True
    return False


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    phase = Phases()
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "memory": [],
                              "study": []}
    flags = ["--settings-json", json.dumps(asdict(s))]
    partial = args.out_dir / "qlora_partial.json"  # every finished row so far, for --merge if stopped

    def keep() -> None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(result, indent=2, default=str) + "\n")

    if "memory" in s.sections:
        for base in s.bases:
            phase(f"[memory] {base}")
            result["memory"].append(_child_row(["--mem-child", base, *flags], {"base": base}, RSS_FOLLOWS_LIVE))
            print(f"  {json.dumps(result['memory'][-1])}", flush=True)
            keep()
    if "study" in s.sections:
        for seed in s.seeds:
            for task in s.tasks:
                for variant in VARIANTS:
                    phase(f"[study] {task}, {variant}, seed {seed}")
                    row = _child_row(["--run-child", f"{task}:{variant}:{seed}", *flags],
                                     {"task": task, "variant": variant, "seed": seed})
                    result["study"].append(row)
                    print(f"  {json.dumps(row)[:400]}", flush=True)
                    keep()
    return finish(result, phase)


def _child_row(child_args: list[str], identity: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        row = run_child(SCRIPT, child_args, env={"OMP_NUM_THREADS": "1", **(env or {})})
    except RuntimeError as err:
        row = {**identity, "error": str(err).strip().splitlines()[-1][:300]}
    row["process_s"] = time.perf_counter() - started
    return row


# ------------------------------------------------------------------------------------ report


def markdown(result: dict[str, Any], s: Settings | None = None) -> str:
    env = result["environment"]
    quick = " — quick run (not results)" if result["settings"]["quick"] else ""
    out = [f"# QLoRA on CPU: memory, step time and quality (issue 18){quick}",
           "",
           f"splice {env['splice']} ({env['git_commit']}), torch {env['torch']}, transformers {env['transformers']}, "
           f"{env['cpu']} x{env['cpu_count']}, {env['torch_threads']} thread(s); {env['date']}. Rank "
           f"{result['settings']['rank']}, LoRA on every Linear layer of SmolLM2-135M-Instruct.", ""]
    if result.get("note"):
        out += [result["note"], ""]
    if result.get("merged_from"):
        out += ["Joined from " + "; ".join(f"`{m['file']}` (started {m['environment']['date']})"
                                            for m in result["merged_from"]) + ": a base or run measured twice "
                "keeps its later reading.", ""]
    if result["memory"]:
        out += memory_table(result["memory"])
    if result["study"]:
        out += study_table(result["study"])
    return "\n".join(out)


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["base"]: r for r in rows if "error" not in r}
    bf16, fp32 = by.get("bf16"), by.get("fp32")
    lines = ["## Memory and step time (one fresh process per base)", "",
             "Linear weights: every Linear layer's weight as stored (4-bit: codes, block scales, double-quantized "
             "scales and code books), the LM head included, which stays dense (it is tied to the embeddings); x bf16 "
             "and bits/weight: the quantized projections alone against the same weights in bf16. "
             "Logits vs fp32: the base alone (no adapter) on the batch's real tokens, relative error and top-1 "
             "agreement with the fp32 base: the output shift an adapter trained on this base sees when moved to the "
             "fp32 base. "
             "Training peak: the highest RSS while training steps run, after the loading peak was reset; above "
             "imports: less the RSS after importing torch, transformers and splice (the ratios are of this part).", ""]
    header = ["base", "Linear weights MB", "x bf16", "bits/weight", "model MB", "logits vs fp32 (rel. error, top-1 "
              "agreement)", "training peak MB", "above imports MB", "x bf16", "x fp32", "saved for backward MB",
              "step s (median)", "x bf16 step", "x fp32 step"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["base"], f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        quantized = r.get("quantized_weights", 0)
        bits = f"{r['bits_per_weight']:.3f}" if quantized else "16" if r["base"] == "bf16" else "32"
        ratio_bytes = (r["quantized_bytes"] / r["quantized_as_bf16_bytes"] if quantized
                       else r["dense_linear_bytes"] / (2 * r["dense_linear_weights"]))
        body.append([r["base"], f"{r['linear_bytes'] / 2**20:.1f}", f"{ratio_bytes:.3f}", bits,
                     f"{r['model_bytes'] / 2**20:.1f}", f"{r['logit_shift']:.4f}, {r['top1_agreement']:.1%}",
                     f"{r['train_peak_mb']:.0f}", f"{_above(r):.0f}",
                     f"{_above(r) / _above(bf16):.2f}" if bf16 else "",
                     f"{_above(r) / _above(fp32):.2f}" if fp32 else "",
                     f"{r['saved_mb']:.0f}", f"{r['step_s']:.2f}", _ratio(r["step_s"], bf16, "step_s"),
                     _ratio(r["step_s"], fp32, "step_s")])
    lines += [table(header, body), ""]
    nf4 = by.get("nf4-torchao")
    if nf4 and bf16 and fp32:
        goal = nf4["quantized_bytes"] / nf4["quantized_as_bf16_bytes"]
        step = nf4["step_s"]
        recipe = by.get("nf4-torchao-bf16")
        lines += [f"Goal, NF4 Linear bytes <= 0.3x bf16: {'yes' if goal <= 0.3 else 'no'} ({goal:.3f}x). Training peak "
                  f"above imports, NF4 in an fp32 model / bf16 model: {_above(nf4) / _above(bf16):.2f}x, / fp32: "
                  f"{_above(nf4) / _above(fp32):.2f}x"
                  + (f"; NF4 in a bf16 model (QLoRA's recipe) / bf16: {_above(recipe) / _above(bf16):.2f}x"
                     if recipe else "")
                  + f". Step time NF4 (fp32 compute)/bf16: {step / bf16['step_s']:.2f}x, /fp32: "
                  f"{step / fp32['step_s']:.2f}x.", ""]
    return lines


def _above(row: dict[str, Any]) -> float:
    """Training peak above the interpreter's own memory after its imports (torch, transformers, splice)."""
    return row["train_peak_mb"] - row["after_import_mb"]


def _ratio(value: float, reference: dict[str, Any] | None, key: str) -> str:
    return f"{value / reference[key]:.2f}" if reference else ""


def study_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## LoRA vs QLoRA at equal rank, steps, data order and seed (splice.train.run)", ""]
    header = ["task", "variant", "seeds", "test loss", "test perplexity", "test exact match", "train s / run"]
    body, verdicts = [], []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        means = {}
        for variant in VARIANTS:
            ok = [r for r in rows if r["task"] == task and r["variant"] == variant and "error" not in r]
            failed = [r for r in rows if r["task"] == task and r["variant"] == variant and "error" in r]
            if not ok:
                body.append([task, variant, "0", f"failed: {failed[0]['error']}" if failed else "not run", "", "", ""])
                continue
            loss = [r["after"]["test"]["loss"] for r in ok]
            ppl = [r["after"]["test"]["perplexity"] for r in ok]
            em = [r["after"]["test"].get("exact_match") for r in ok]
            means[variant] = (statistics.mean(loss), statistics.stdev(loss) if len(loss) > 1 else 0.0, len(loss))
            body.append([task, variant, f"{len(ok)}{f' ({len(failed)} failed)' if failed else ''}",
                         _mean_sd(loss, 4), _mean_sd(ppl, 3), _mean_sd(em, 3) if task == "arithmetic" else "-",
                         f"{statistics.mean(r['train_s'] for r in ok):.0f}"])
        if len(means) == 2:
            (lora, lora_sd, lora_n), (qlora, qlora_sd, qlora_n) = means["lora"], means["qlora"]
            spread = lora_sd + qlora_sd
            ratio = qlora / lora
            says = (verdict((qlora - spread) / lora, (qlora + spread) / lora, LOSS_GOAL) if min(lora_n, qlora_n) > 1
                    else "one seed, no verdict")
            verdicts.append(f"- {task}: QLoRA test loss / LoRA's = {ratio:.3f} (± the seeds' spread "
                            f"{spread / lora:.3f}); within {LOSS_GOAL - 1:.0%}: {says}.")
    lines += [table(header, body), "", "Verdict (QLoRA's mean test loss within 3% of LoRA's, the spread of both "
              "taken into account):", "", *verdicts, ""]
    return lines


def _mean_sd(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run: fp32 and NF4 memory children at rank 4 on 2 rows, one arithmetic "
                              "study seed of 2 steps (not results)")
    p.add_argument("--sections", nargs="+", choices=["memory", "study"], help="subset of sections")
    p.add_argument("--bases", nargs="+", choices=list(BASES), help="memory section: bases")
    p.add_argument("--seeds", nargs="+", type=int, help="study seeds (default 0 1 2)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="study tasks")
    p.add_argument("--steps", type=int, help="study: optimizer steps per run (default 40)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="measure nothing: join result files (later files win for the same base or run) into --out-dir")
    p.add_argument("--note", help="with --merge: a sentence on how the parts were made, printed in the report")
    p.add_argument("--mem-child", help=argparse.SUPPRESS)
    p.add_argument("--run-child", help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    return parse_settings(p, argv, Settings)


def merge(paths: list[Path], note: str | None = None) -> dict[str, Any]:
    """Result files of several invocations (say, seed 0, then seeds 1 and 2) as one; a memory base
    or a study run measured twice keeps its later reading. Each part's environment is kept."""
    parts = [json.loads(p.read_text()) for p in paths]
    memory = {row["base"]: row for part in parts for row in part["memory"]}
    study = {(row["task"], row["variant"], row["seed"]): row for part in parts for row in part["study"]}
    settings = dict(parts[-1]["settings"])
    settings["seeds"] = sorted({row["seed"] for row in study.values()})
    return {"environment": parts[-1]["environment"], "settings": settings, "note": note,
            "memory": list(memory.values()),
            "study": sorted(study.values(), key=lambda r: (r["seed"], r["task"], r["variant"])),
            "merged_from": [{"file": str(p), "environment": part["environment"], "runtime_s": part.get("runtime_s")}
                            for p, part in zip(paths, parts, strict=True)]}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args, _ = parse_args(argv)
    if args.merge:
        result = merge(args.merge, args.note)
        write_results(args.out_dir, "qlora", result, markdown(result))
        return
    bench_main(argv, parse_args, Settings, run, markdown, "qlora", child=child)


if __name__ == "__main__":
    main()
