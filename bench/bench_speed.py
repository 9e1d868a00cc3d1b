"""Speed where users feel it: splice vs HF PEFT and the base model on the three hot paths (CPU).

What it measures, LoRA r=8, alpha=16, every lora_B seeded non-zero and copied from splice into
PEFT (identical adapters; outputs compared):

training   one training step (forward + backward + AdamW) on MiniLM sequence classification,
           8 x 64 review tokens, head trained: LoRA dropout 0, LoRA dropout 0.1 and DoRA, on q,v
           and all-linear; splice / PEFT time, median of per-round ratios [IQR].
inference  unmerged eval forward (`torch.inference_mode`), MiniLM encoder 8 x 64, all-linear
           (pooler included), one adapter: overhead over the base model of splice and of PEFT,
           against the FLOPs the adapter adds (`torch.utils.flop_counter`), the limit. Per-layer breakdown: one real
           layer of each adapted shape alone (its real input): base, splice host, PEFT layer, and
           splice's two GEMMs alone (`add_low_rank_` into a ready output: the cost without hook
           and dispatch).
mixed      MiniLM encoder, batch 32 x 48, row i -> adapter i mod 16, q,v and all-linear:
           overhead over the base of `splice.route`, of PEFT `adapter_names`, and of one
           splice adapter on every row (the single-adapter overhead, the limit); ratio of the
           splice and PEFT overheads with a 95% bootstrap interval.
decode     SmolLM2-135M greedy `generate`, 8 prompts of 32 tokens, one adapter per row (8), 32 new
           tokens, KV cache: tokens/s of the base (as loaded, and a frozen copy), splice and PEFT,
           the same tokens, and the memory floor: a decode step reads every base weight and every
           row's adapter factors, so at equal bandwidth splice can reach at most
           base / (1 + factor bytes / weight bytes).

Columns: torch's default thread count (what users get; the headline) and one thread. Every
comparison is paired and interleaved in this one process (bench/README.md): each round runs
every candidate once, the order rotates, the report gives medians of per-round ratios or
overheads with their spread, and the load average at start and end.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_speed.py            # full run (see bench/README.md)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_speed.py --quick    # smoke run, few rounds
    .venv/bin/python bench/bench_speed.py --render bench/results/speed.json

Results go to bench/results/speed.{json,md} (`_quick` suffix for --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from bench_forms import PeftDora, SpliceDora
from common import (
    Batch,
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
    twins,
)
from multi_adapter_setup import B_STD, CAUSAL, TARGETS, load_smollm2, lora_only
from speed_report import markdown
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it: what a user's process gets
TRAIN_FORMS = {"LoRA dropout 0": (Splice, Peft, 0.0), "LoRA dropout 0.1": (Splice, Peft, 0.1),
               "DoRA": (SpliceDora, PeftDora, 0.0)}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1  # the second column's thread count (the first is torch's default)
    columns: list[str] = field(default_factory=lambda: ["default", "fixed"])
    sections: list[str] = field(default_factory=lambda: ["training", "inference", "mixed", "decode"])
    targets: list[str] = field(default_factory=lambda: ["qv", "all-linear"])
    warmup: int = 2
    train_pairs: int = 20
    infer_rounds: int = 20
    infer_calls: int = 3  # forwards per candidate and round
    layer_rounds: int = 15
    layer_calls: int = 20
    mixed_rounds: int = 20
    mixed_adapters: int = 16
    decode_rounds: int = 4
    new_tokens: int = 32
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(columns=["fixed"], targets=["qv"], warmup=1, train_pairs=2, infer_rounds=3, infer_calls=1,
                   layer_rounds=2, layer_calls=3, mixed_rounds=2, decode_rounds=1, new_tokens=4, quick=True,
                   **overrides)

    def thread_count(self, column: str) -> int:
        return DEFAULT_THREADS if column == "default" else self.threads


def repeated(fn: Any, calls: int) -> Any:
    """A candidate's run: `calls` calls of fn() under `torch.inference_mode` (short calls, summed)."""
    def run(_: object) -> None:
        with torch.inference_mode():
            for _ in range(calls):
                fn()
    return run


def overhead_summary(samples: dict[str, Any]) -> dict[str, Any]:
    """Per-round overheads of every candidate over "base" (median, quartiles) and the absolute times."""
    return {"overhead": {k: quartiles(v) for k, v in overheads(samples, "base").items()},
            "absolute": compare(samples, [])["absolute"]}


# -------------------------------------------------------------------------------- a. training


def training(s: Settings) -> dict[str, Any]:
    """splice / PEFT time of one training step, per form and target set."""
    seed_everything(0)
    base = load_minilm_classifier(minilm_dir())
    batch, _ = review_batch(8, 64)
    out: dict[str, Any] = {}
    for key in s.targets:
        for label, (splice_lib, peft_lib, p) in TRAIN_FORMS.items():
            spec = LoraSpec(dropout=p)
            s_model, p_model, copied = twins(base, splice_lib(spec), peft_lib(spec), TARGETS["minilm"][key],
                                             ["default"], 3, B_STD)
            with torch.no_grad():  # identical weights, eval (no dropout): the same loss
                loss_diff = abs(s_model.eval()(**batch).loss.item() - p_model.eval()(**batch).loss.item())
            steps = [Candidate(name, _step(model, batch)) for name, model in (("splice", s_model), ("peft", p_model))]
            result = compare(interleaved(steps, s.train_pairs, s.warmup), [("splice", "peft")])
            out[f"{label}, {key}"] = {**result, "loss_diff": loss_diff, "lora_tensors": copied}
            del s_model, p_model, steps
            gc.collect()
    return out


def _step(model: nn.Module, batch: Batch) -> Any:
    model.train()
    optimizer = optimizer_for(model)
    return lambda _: train_step(model, optimizer, batch)


# ------------------------------------------------------------------------------- b. inference


def inference(s: Settings) -> dict[str, Any]:
    """Whole-model unmerged forward overhead over the base, and the per-layer breakdown."""
    seed_everything(0)
    base = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    inputs = inputs_only(review_batch(8, 64)[0])
    spec = lora_only(LoraSpec())
    s_model, p_model, _ = twins(base, Splice(spec), Peft(spec), "all-linear", ["default"], 3, B_STD)
    models = {"base": base, "splice": s_model.eval(), "peft": p_model.eval()}
    with torch.inference_mode():
        hidden = {name: m(**inputs).last_hidden_state for name, m in models.items()}
    flops = {name: _flops(m, inputs) for name, m in (("base", base), ("splice", s_model))}
    samples = interleaved([Candidate(name, repeated(lambda m=m: m(**inputs), s.infer_calls))
                           for name, m in models.items()], s.infer_rounds, s.warmup)
    return {"model": {**overhead_summary(samples), "flop_overhead": flops["splice"] / flops["base"] - 1,
                      "splice_vs_peft_max_diff": max_abs_diff(hidden["splice"], hidden["peft"]),
                      "adapter_vs_base_max_diff": max_abs_diff(hidden["splice"], hidden["base"])},
            "layers": layer_breakdown(s, s_model, inputs)}


def _flops(model: nn.Module, inputs: Batch) -> int:
    """Matmul FLOPs of one forward, with autograd on: splice's adapters then run the plain
    (out-of-place) formula, whose two GEMMs the counter sees (it does not count `addmm_`)."""
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model(**inputs)
    return counter.get_total_flops()


def layer_breakdown(s: Settings, s_model: nn.Module, inputs: Batch) -> dict[str, Any]:
    """One adapted layer of each (in, out) shape, alone with its real input: base, splice, PEFT, GEMMs."""
    from splice.core.host import hosts

    firsts: dict[tuple[int, int], tuple[str, nn.Module]] = {}
    for name, module, host in hosts(s_model):
        firsts.setdefault((host.info.in_features, host.info.out_features), (name, module))
    seen = _inputs_of([m for _, m in firsts.values()], s_model, inputs)
    out = {}
    for (n_in, n_out), (name, module) in firsts.items():
        x = seen[id(module)]
        samples = interleaved(_layer_candidates(module, x, s.layer_calls), s.layer_rounds, s.warmup)
        out[f"{n_in} -> {n_out}"] = {"example": name, "rows": x.numel() // n_in, **overhead_summary(samples),
                                     "flop_overhead": 8 * (n_in + n_out) / (n_in * n_out)}
    return out


def _layer_candidates(module: nn.Module, x: torch.Tensor, calls: int) -> list[Candidate]:
    """A copy of the base layer `module`, it with a splice and with a PEFT adapter (the same factors), and
    splice's two GEMMs alone (`add_low_rank_` into a ready output), each called `calls` times a round."""
    from splice.core.lowrank import add_low_rank_

    plain = nn.Sequential(nn.Linear(module.in_features, module.out_features))
    plain[0].load_state_dict({"weight": module.weight, "bias": module.bias})
    spec = lora_only(LoraSpec())
    splice_layer, peft_layer, _ = twins(plain, Splice(spec), Peft(spec), ["0"], ["default"], 5, B_STD)
    factors = splice_layer[0].splice["default"].low_rank_factors()
    with torch.inference_mode():
        ready = plain(x)
    runs = {"base": lambda: plain(x), "splice": lambda: splice_layer(x), "peft": lambda: peft_layer(x),
            "gemms": lambda: add_low_rank_(ready, x, factors)}
    return [Candidate(k, repeated(f, calls)) for k, f in runs.items()]


def _inputs_of(modules: list[nn.Module], model: nn.Module, inputs: Batch) -> dict[int, torch.Tensor]:
    """The input each module sees in one forward of `model`, by id(module)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0].detach().clone()))
               for m in modules]
    with torch.inference_mode():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


# ---------------------------------------------------------------------------- c. mixed batch


def mixed(s: Settings) -> dict[str, Any]:
    """MiniLM forward of one batch whose rows use different adapters, splice vs PEFT vs base."""
    seed_everything(0)
    base = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    inputs = inputs_only(review_batch(32, 48)[0])
    names = [f"t{i}" for i in range(s.mixed_adapters)]
    out: dict[str, Any] = {}
    for key in s.targets:
        spec = lora_only(LoraSpec())
        s_model, p_model, copied = twins(base, Splice(spec), Peft(spec), TARGETS["minilm"][key], names, 1, B_STD)
        out[key] = {**mixed_one(s, base, s_model.eval(), p_model.eval(), names, inputs), "lora_tensors": copied,
                    "adapters": len(names)}
        del s_model, p_model
        gc.collect()
    return out


def mixed_one(s: Settings, base: nn.Module, s_model: nn.Module, p_model: nn.Module, names: list[str],
              inputs: Batch) -> dict[str, Any]:
    """Row i -> adapter i mod N in both libraries, the base, and splice with one adapter on every row
    (outside `route`, the single-adapter overhead: the limit)."""
    import splice

    ids = [names[i % len(names)] for i in range(inputs["input_ids"].shape[0])]
    splice.activate(s_model, names[0])

    def routed() -> torch.Tensor:
        with splice.route(s_model, ids):
            return s_model(**inputs).last_hidden_state

    runs = {"base": lambda: base(**inputs).last_hidden_state, "splice": routed,
            "peft": lambda: p_model(**inputs, adapter_names=ids).last_hidden_state,
            "splice_one_adapter": lambda: s_model(**inputs).last_hidden_state}
    with torch.inference_mode():
        diff = max_abs_diff(runs["splice"](), runs["peft"]())
    samples = interleaved([Candidate(k, repeated(f, 1)) for k, f in runs.items()], s.mixed_rounds, s.warmup)
    over = overheads(samples, "base")
    return {**overhead_summary(samples), "overhead_ratio": median_ratio_ci(over["splice"], over["peft"]),
            "splice_vs_peft_max_diff": diff}


# ---------------------------------------------------------------------------------- d. decode


def decode(s: Settings) -> dict[str, Any]:
    """SmolLM2 greedy generation, every row with its own adapter: tokens/s vs base and PEFT."""
    seed_everything(0)
    base = load_smollm2(smollm2_dir()).eval()
    prompts = review_chunks(smollm2_dir(), 8, 32, seed=0)
    gen = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts), "max_new_tokens": s.new_tokens,
           "min_new_tokens": s.new_tokens, "do_sample": False, "num_beams": 1, "use_cache": True,
           "pad_token_id": base.generation_config.pad_token_id}
    names = [f"t{i}" for i in range(8)]
    out: dict[str, Any] = {}
    for key in s.targets:
        s_model, p_model, copied = twins(base, Splice(lora_only(CAUSAL)), Peft(lora_only(CAUSAL)),
                                         TARGETS["smollm2"][key], names, 2, B_STD)
        out[key] = {**decode_one(s, base, s_model.eval(), p_model.eval(), names, gen), "lora_tensors": copied,
                    "bytes": _bytes(base, s_model)}
        del s_model, p_model
        gc.collect()
    return out


def decode_one(s: Settings, base: nn.Module, s_model: nn.Module, p_model: nn.Module, names: list[str],
               gen: dict[str, Any]) -> dict[str, Any]:
    """Base, splice (`route`) and PEFT (`adapter_names`) `generate`, interleaved; tokens/s and parity.

    The base runs twice: as loaded, and as a frozen copy like the adapted models' base. Frozen
    weights change one kernel: torch's matmul folds the prefill's last-token slice into one mm
    only when the weight requires grad, else it runs a bmm over an 8x expanded lm_head."""
    import splice

    frozen = copy.deepcopy(base).requires_grad_(False)

    def routed() -> torch.Tensor:
        with splice.route(s_model, names):
            return s_model.generate(**gen)

    runs = {"base": lambda: base.generate(**gen), "base_frozen": lambda: frozen.generate(**gen), "splice": routed,
            "peft": lambda: p_model.generate(**gen, adapter_names=names)}
    prompt = gen["input_ids"].shape[1]
    with torch.inference_mode():  # also the warm-up: the timed rounds follow without one
        tokens = {k: f()[:, prompt:] for k, f in runs.items()}
    samples = interleaved([Candidate(k, repeated(f, 1)) for k, f in runs.items()], s.decode_rounds, 0)
    timing = compare(samples, [("base", "splice"), ("base_frozen", "splice"), ("peft", "splice"),
                               ("base", "base_frozen")])
    made = gen["input_ids"].shape[0] * s.new_tokens
    return {"timing": timing, "tokens_per_s": {k: made / a["median_s"] for k, a in timing["absolute"].items()},
            "same_tokens_splice_peft": (tokens["splice"] == tokens["peft"]).float().mean().item(),
            "tokens_changed_vs_base": (tokens["splice"] != tokens["base"]).float().mean().item()}


def _bytes(base: nn.Module, s_model: nn.Module) -> dict[str, int]:
    """Weight bytes a decode step reads (every base parameter once; tied ones once) and adapter factor bytes."""
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in base.parameters()}
    factors = sum(p.numel() * p.element_size() for n, p in s_model.named_parameters() if ".splice." in n)
    return {"base_weights": sum(weights.values()), "adapter_factors": factors}


# -------------------------------------------------------------------------------------- main

SECTIONS = {"training": training, "inference": inference, "mixed": mixed, "decode": decode}


def run(s: Settings, phase: Phases) -> dict[str, Any]:
    """Every chosen section in every column (thread count), timed sections with malloc keeping freed memory."""
    result: dict[str, Any] = {"environment": environment(DEFAULT_THREADS), "settings": asdict(s), "sections": {},
                              "threads": {c: s.thread_count(c) for c in s.columns}}
    result["environment"]["malloc_keeps_freed_memory"] = keep_freed_memory()
    for key in s.sections:
        result["sections"][key] = {}
        for column in s.columns:
            torch.set_num_threads(s.thread_count(column))
            phase(f"[{key}] {s.thread_count(column)} thread(s)")
            result["sections"][key][column] = SECTIONS[key](s)
            gc.collect()
    torch.set_num_threads(DEFAULT_THREADS)
    return finish(result, phase)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run: one thread, q,v only, few rounds, 4 new tokens (numbers not trustworthy)")
    p.add_argument("--columns", nargs="+", choices=["default", "fixed"],
                   help="thread columns: torch's default count and/or --threads (default both)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="subset of sections")
    p.add_argument("--targets", nargs="+", choices=["qv", "all-linear"], help="subset of target sets")
    for name in ("warmup", "train-pairs", "infer-rounds", "layer-rounds", "mixed-rounds", "decode-rounds",
                 "new-tokens"):
        p.add_argument(f"--{name}", type=int, help=f"override the setting {name.replace('-', '_')}")
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s, Phases()), markdown, "speed")


if __name__ == "__main__":
    main()
