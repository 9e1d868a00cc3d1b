"""Merging adapters, splice `merge_adapters` vs HF PEFT `add_weighted_adapter`, on the bundled
MiniLM (CPU): correctness against the true weight change, merge time, and accuracy of merges.

correctness  Two random adapters (A, B, lora_B bias and DoRA magnitudes seeded non-zero) on
             query,value of MiniLM, built in PEFT and saved as PEFT directories, for each case:
             plain LoRA (r=8 both), rsLoRA, different ranks (r=8 and r=4), per-module ranks
             (rank_pattern), lora_bias and DoRA. The TRUE change of adapter i, ΔW_i, is measured
             by merging it alone into a copy of the base (PEFT `merge_and_unload`) and diffing
             every parameter. Per combination rule the target is
               cat, linear, svd at rank Σ r_i    Σ w_i ΔW_i (unambiguous)
               svd at rank 8                     Σ w_i ΔW_i with each weight matrix truncated to its
                                                 best rank-8 approximation (bias exact)
               ties, density 0.5                 PEFT's own `merge_utils.ties` on the dense changes
                                                 [ΔW_i | Δb_i] (the rule as splice's docstring defines it)
             PEFT: `add_weighted_adapter` on the model holding both adapters, then the new
             adapter merged (`merge_and_unload`) and diffed. splice: `merge_adapters` on the
             two saved PEFT directories (base=model for DoRA), `attach_state`, `unload`, diffed.
             Reported: ‖Δ_lib − Δ_target‖_F / ‖Δ_target‖_F over all parameters (and the worst
             single tensor), and max |logits − target logits| on real Rotten Tomatoes reviews.
             Where a library raises, its message is reported.
timing       `merge_adapters(states, "linear")` vs `add_weighted_adapter(..., "linear")` and both
             libraries' `svd` at rank Σ r_i, in memory (adapters already loaded), paired and
             interleaved; median of the per-round ratios splice / PEFT. Note that PEFT's
             "linear" combines A and B separately (no SVD), splice's re-factors Σ w_i ΔW_i.
accuracy     Two LoRA r=8 (query,value, head trained) from the same seed on the two halves of
             the Rotten Tomatoes training split (`splice.train.run`), merged by splice with
             linear, task_arithmetic, ties and dare_linear (heads averaged); test accuracy of
             each input and each merge on the full test split (488 reviews).

Run `python bench/bench_merge.py` (about 6-8 minutes on 2 cores); `--quick` is a ~1-2 minute
smoke run. Results: bench/results/merge.{json,md} (`merge_quick` for --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from common import (
    Candidate,
    Phases,
    bench_main,
    bench_parser,
    compare,
    environment,
    finish,
    interleaved,
    load_minilm_classifier,
    review_batch,
    settings_from,
)
from merge_report import markdown
from merge_setup import (
    CASES,
    FULL,
    RULES,
    TARGETS,
    Delta,
    Rule,
    Settings,
    delta,
    peft_merged_delta,
    peft_pair,
    target_of,
    weighted_sum,
    weights_of,
)
from torch import nn


def one_line_error(err: BaseException) -> str:
    """The exception as one line of at most 300 characters, pipes replaced: it goes into a table."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return text[:300]


# ------------------------------------------------------------------------------- a. correctness


def errors(got: Delta, want: Delta) -> dict[str, float]:
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    den = sum(float(want[k].pow(2).sum()) for k in want)
    worst = max((float((got[k] - want[k]).norm() / want[k].norm()) for k in want if want[k].norm() > 0), default=0.0)
    stray = max((float(got[k].abs().max()) for k in want if want[k].norm() == 0), default=0.0)
    return {"rel_error": math.sqrt(num / den), "worst_tensor_rel_error": worst, "stray_change_max": stray}


class LogitProbe:
    """One model whose weights are set to base + a change; logits on a fixed batch of reviews."""

    def __init__(self, base: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model = copy.deepcopy(base).eval()
        self.base = weights_of(base)
        self.dtypes = {k: v.dtype for k, v in base.state_dict().items()}
        self.inputs = {k: v for k, v in batch.items() if k != "labels"}

    def __call__(self, change: Delta) -> torch.Tensor:
        state = {k: (self.base[k] + change[k]).to(self.dtypes[k]) for k in self.base}
        self.model.load_state_dict(state)
        with torch.inference_mode():
            return self.model(**self.inputs).logits.double()


def splice_merged_delta(dirs: list[Path], rule: Rule, weights: list[float], base: nn.Module,
                        base_weights: dict[str, torch.Tensor], dora: bool) -> tuple[Delta, dict[str, Any]]:
    import splice
    from splice.io.peft_format import attach_state
    from splice.merging import merge_adapters

    result = merge_adapters(dirs, rule.splice, weights=weights, base=base if dora else None, **rule.splice_kwargs)
    model = splice.unload(attach_state(copy.deepcopy(base), result.state, "mix"))
    info = {"reported_max_error": max(result.errors.values(), default=0.0),
            "ranks": sorted({u.rank for u in result.state.modules.values()}),
            "dora": any(u.magnitude is not None for u in result.state.modules.values())}
    return delta(weights_of(model), base_weights), info


def peft_weighted_delta(model: nn.Module, rule: Rule, weights: list[float],
                        base_weights: dict[str, torch.Tensor]) -> Delta:
    m = copy.deepcopy(model)
    m.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=rule.peft, **rule.peft_kwargs)
    return peft_merged_delta(m, "mix", base_weights)


def correctness(s: Settings, phase: Phases) -> dict[str, Any]:
    base = load_minilm_classifier()
    base_weights = weights_of(base)
    batch, _ = review_batch(s.reviews, s.seq_len, seed=0)
    probe = LogitProbe(base, batch)
    out: dict[str, Any] = {"cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in [c for c in CASES if c.name in s.cases]:
            phase(f"[correctness] {case.name}")
            row: dict[str, Any] = {"what": case.what, "rules": {}}
            model = peft_pair(base, case)
            dirs = []
            for name in "ab":
                path = Path(tmp) / case.name
                model.save_pretrained(path, selected_adapters=[name])
                dirs.append(path / name)
            deltas = [peft_merged_delta(model, name, base_weights) for name in "ab"]
            row["input_change_norms"] = [math.sqrt(sum(float(v.pow(2).sum()) for v in d.values())) for d in deltas]
            dora = "use_dora" in case.configs[0]
            plain = weighted_sum(deltas, s.weights)
            zero_logits = probe({k: torch.zeros_like(v) for k, v in plain.items()})
            for rule in RULES:
                want = target_of(rule, deltas, s.weights)
                want_logits = probe(want)
                res: dict[str, Any] = {"target_logit_change_max": float((want_logits - zero_logits).abs().max()),
                                       "target_vs_sum": errors(want, plain)["rel_error"]}
                for lib in ("peft", "splice"):
                    try:
                        if lib == "peft":
                            got, info = peft_weighted_delta(model, rule, s.weights, base_weights), {}
                        else:
                            got, info = splice_merged_delta(dirs, rule, s.weights, base, base_weights, dora)
                        res[lib] = {**errors(got, want), **info, "rel_error_vs_sum": errors(got, plain)["rel_error"],
                                    "logits_max_abs_diff": float((probe(got) - want_logits).abs().max())}
                    except Exception as err:  # a library refusing a case is a result
                        res[lib] = {"error": one_line_error(err), "traceback": traceback.format_exc()[-1500:]}
                row["rules"][rule.name] = res
                print(f"  {rule.name:32s} " + "  ".join(
                    f"{lib} {res[lib]['rel_error']:.2e}" if "rel_error" in res[lib] else f"{lib} raised"
                    for lib in ("peft", "splice")), flush=True)
            out["cases"][case.name] = row
            del model
    return out


# ------------------------------------------------------------------------------------ b. timing


def timing(s: Settings, phase: Phases) -> dict[str, Any]:
    from splice.io.adapter_states import adapter_state
    from splice.merging import merge_adapters

    phase(f"[timing] {s.rounds} interleaved rounds")
    base = load_minilm_classifier()
    model = peft_pair(base, CASES[0])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in "ab":
            model.save_pretrained(tmp, selected_adapters=[name])
        states = [adapter_state(Path(tmp) / name) for name in "ab"]

    def drop_mix() -> None:
        if "mix" in model.peft_config:
            model.delete_adapter("mix")
            model.set_adapter("a")

    candidates = []
    for rule, kwargs, splice_kwargs in (("linear", {}, {}), ("svd", {"svd_rank": FULL}, {"rank": FULL})):
        candidates += [
            Candidate(f"splice {rule}", lambda _, r=rule, k=splice_kwargs: merge_adapters(states, r, weights=s.weights,
                                                                                        **k)),
            Candidate(f"peft {rule}", lambda _, r=rule, k=kwargs: model.add_weighted_adapter(
                ["a", "b"], s.weights, "mix", combination_type=r, **k), setup=drop_mix),
        ]
    samples = interleaved(candidates, s.rounds, s.warmup)
    out = compare(samples, [("splice linear", "peft linear"), ("splice svd", "peft svd")])
    out["modules"] = len(states[0].modules)
    return out


# ---------------------------------------------------------------------------------- c. accuracy


def train_half(half: int, data_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    """One `splice.train.run` on half `half` of the training split (in a worker process)."""
    from rich.console import Console

    from splice.train import TrainConfig, run

    torch.set_num_threads(s["threads"])
    config = TrainConfig(model="minilm", task="classification", data=f"{data_dir}/train{half}.jsonl",
                         validation=f"{data_dir}/validation.jsonl",
                         adapter={"method": "lora", "r": 8, "alpha": 16, "targets": TARGETS},
                         max_length=s["train_max_length"], batch_size=s["batch"], lr=s["lr"], head_lr=s["head_lr"],
                         max_steps=s["steps"], eval_every=s["steps"], max_eval_examples=s["eval_examples"], seed=0,
                         output_dir=f"{data_dir}/run{half}")
    result = run(config, console=Console(quiet=True), force=True)
    return {"half": half, "adapter": str(result.paths["adapter"]), "best_step": result.best_step,
            "validation_accuracy": result.metrics["after"]["validation"]["accuracy"],
            "train_s": result.timings["train_s"]}


MERGES = [
    ("linear", "linear", {"weights": [0.5, 0.5]}),
    ("task_arithmetic", "task_arithmetic", {"weights": [1.0, 1.0]}),
    ("ties d=0.5", "ties", {"density": 0.5, "weights": [1.0, 1.0]}),
    ("dare_linear d=0.5", "dare_linear", {"density": 0.5, "weights": [0.5, 0.5]}),
]


def accuracy(s: Settings, phase: Phases) -> dict[str, Any]:
    from splice import assets
    from splice.merging import merge_adapters
    from splice.train import TrainConfig
    from splice.train.loop import evaluate_adapter

    phase(f"[accuracy] 2 training runs of {s.steps} steps, {s.jobs} at a time")
    splits = assets.rotten_tomatoes()
    half = len(splits.train) // 2
    out: dict[str, Any] = {"train_rows": [half, len(splits.train) - half], "runs": [], "test": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in (("train0", splits.train[:half]), ("train1", splits.train[half:]),
                           ("validation", splits.validation)):
            Path(tmp, f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with ProcessPoolExecutor(s.jobs) as pool:
            runs = list(pool.map(train_half, [0, 1], [tmp] * 2, [asdict(s)] * 2))
        out["runs"] = runs
        phase("[accuracy] merging and evaluating on the test split")
        config = TrainConfig(model="minilm", task="classification", data="rotten_tomatoes",
                             max_length=s.train_max_length, batch_size=32, max_eval_examples=s.test_examples)
        adapters = [r["adapter"] for r in runs]
        for i, path in enumerate(adapters):
            out["test"][f"input {i} (half {i})"] = evaluate_adapter(config, path)["accuracy"]
        for label, method, kwargs in MERGES:
            try:
                result = merge_adapters(adapters, method, heads="average", **kwargs)
                path = Path(tmp) / f"merge_{method}"
                result.save(path, overwrite=True)
                out["test"][label] = evaluate_adapter(config, path)["accuracy"]
            except Exception as err:
                out["test"][label] = one_line_error(err)
            print(f"  {label}: {out['test'][label]}", flush=True)
        out["test_rows"] = len(splits.test[: s.test_examples])
    return out


SECTIONS = {"correctness": correctness, "timing": timing, "accuracy": accuracy}


def run(s: Settings) -> dict[str, Any]:
    torch.set_num_threads(s.threads)
    phase = Phases()
    result: dict[str, Any] = {"settings": asdict(s), "environment": environment(s.threads), "sections": {}}
    for name in s.sections:
        result["sections"][name] = SECTIONS[name](s, phase)
    return finish(result, phase, keys=("phase_seconds", "total_s"))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "~1-2 minute smoke run (numbers not trustworthy)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="subset of sections")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="subset of correctness cases")
    p.add_argument("--rounds", type=int, help="timed rounds")
    p.add_argument("--steps", type=int, help="optimizer steps per training run")
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "merge")


if __name__ == "__main__":
    main()
