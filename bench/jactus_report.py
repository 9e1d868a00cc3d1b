"""bench_jactus.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common_report import DATASETS, fmt_ratio, fmt_s, heading, mean_std, table
from jactus_setup import BASELINE, TOY_D, TOY_SIGNAL, VARIANTS

if TYPE_CHECKING:
    from jactus_setup import Settings


def count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def markdown(result: dict[str, Any], s: Settings) -> str:
    sec = result["sections"]
    out = [
        *heading("JACTUS vs compress-then-LoRA vs LoRA on MiniLM (CPU)", result["environment"]),
        f"Runtime {result['runtime_s'] / 60:.1f} min."
        f" {'QUICK smoke run: too few steps to trust. ' if s.quick else ''}"
        "Other jobs may share the two cores (see the load average): paired ratios are robust to that, absolute"
        " times are not.",
        "",
    ]
    if "toy" in sec:
        out += toy_md(sec["toy"], s)
    if "accuracy" in sec:
        out += accuracy_md(sec["accuracy"], sec.get("step_time", {}), s)
    if "step_time" in sec and "timing" in sec["step_time"]:
        st = sec["step_time"]
        a = st["timing"]["absolute"]
        out += [f"Step time: one training step (forward, backward, AdamW) on a fixed batch of {st['batch'][0]} x"
                f" {st['batch'][1]} reviews, {s.rounds} interleaved rounds after {s.warmup} warm-up, one process;"
                " ms (min / median): " + "; ".join(f"{n} {fmt_s(v)}" for n, v in a.items()) + ".", ""]
    return "\n".join(out)


def toy_md(t: dict[str, Any], s: Settings) -> list[str]:
    """The planted-direction toy: what fits the budget, the final MSE per noise and seed, who wins."""
    k = t["rows"][0]["rank"]
    lora_numbers = 2 * 2 * (TOY_D + k)  # r=2 on the in -> k factor and on the k -> out factor
    out = ["## The planted-direction toy (spec test 3)", "",
           f"{TOY_D} x {TOY_D} layer, W = rank-{TOY_SIGNAL} signal + noise (std given); the task adds u* v*ᵀ"
           " along W's weakest singular directions. JACTUS at an 80% budget"
           f" ({int(s.budget * TOY_D * TOY_D)} numbers) gets rank {k}, task_rank 1, storing"
           f" {2 * TOY_D * k + k * k} numbers ((in + out) k + k²); truncated SVD then LoRA r=2 on each of its"
           f" two factors uses the same rank k: {2 * TOY_D * k} + {lora_numbers} ="
           f" {2 * TOY_D * k + lora_numbers} numbers, so both fit the budget. Adam, {t['steps']} full-batch"
           f" steps, best of lr {', '.join(map(str, t['lrs']))}; final MSE (start: the MSE of the"
           " uncompressed W on the task).", ""]
    rows = [[f"{r['noise']:g}", str(r["seed"]), f"{r['start']:.3f}", f"{r['truncated_core']:.4f}",
             f"{r['jactus']:.4f}", f"{r['jactus_floor']:.4f}", f"{r['factor_lora']:.4f}"] for r in t["rows"]]
    out += [table(["noise", "seed", "start", "truncated SVD, core tuned", "JACTUS core tuned",
                   "JACTUS floor (least squares)", "truncated SVD -> LoRA on factors"], rows), ""]
    noises = sorted({r["noise"] for r in t["rows"]})
    wins = [f"{sum(r['jactus'] < r['factor_lora'] for r in t['rows'] if r['noise'] == n)} of"
            f" {sum(r['noise'] == n for r in t['rows'])} seeds at noise {n:g}" for n in noises]
    return out + [f"JACTUS's tuned core ends below truncate-then-LoRA in {', '.join(wins)}; tuning the core of plain"
                  " truncation never learns the planted map (its basis has no trace of v*).", ""]


def accuracy_md(acc: dict[str, Any], st: dict[str, Any], s: Settings) -> list[str]:
    """The main table (kept share, trainable and deployed parameters, accuracy, step time), the
    variants and every run."""
    out = ["## Accuracy, parameters, step time", "",
           f"all-linear MiniLM (36 encoder Linear layers + pooler; the head is trained in full by all), retained"
           f" budget {s.budget:.0%} of the compressed layers' weight numbers; {s.steps} AdamW steps of"
           f" {s.batch} (max length {s.max_length}), 6% warm-up + cosine, clipping 1.0, no weight decay; lr"
           f" cores {s.lr_core:g}, LoRA {s.lr_lora:g}, head {s.head_lr:g}; calibration on the first"
           f" {s.calibration_examples} training examples; test accuracy of the last step on the first"
           f" {s.eval_examples} test rows, mean ± std over seeds {', '.join(map(str, s.seeds))}. Deployed"
           " parameters: every number the model needs at inference (LoRA on the uncompressed model merged;"
           " compress-then-LoRA's LoRA cannot be merged into the factors without raising their rank).", "",
           table(["variant", "compressed layers kept", "trainable: adapter/cores + head", "deployed params",
                  *[f"{DATASETS[d]} test acc." for d in s.datasets], "step time vs LoRA [IQR]"],
                 [variant_row(name, acc, st, s) for name in s.variants]), ""]
    out += ["Variants:", "", *[f"- **{v.name}**: {v.why}." for v in VARIANTS if v.name in s.variants], ""]
    detail = [[r["variant"], DATASETS[r["data"]], str(r["seed"]),
               f"failed: {r['error']}" if "error" in r else f"{r['test_accuracy']:.1%}",
               f"{r.get('first_loss', float('nan')):.3f} -> {r.get('last_loss', float('nan')):.3f}",
               f"{r.get('calibration_s', 0):.0f} / {r.get('compress_s', 0):.0f}", f"{r.get('train_s', 0):.0f}"]
              for r in acc["runs"]]
    return out + ["### Runs", "", table(["variant", "data", "seed", "test acc.", "train loss (first 5 -> last 10)",
                                         "calibrate / compress s", "training s"], detail), ""]


def variant_row(name: str, acc: dict[str, Any], st: dict[str, Any], s: Settings) -> list[str]:
    """One variant's main-table row; its facts from a successful run, else from the step-time build."""
    ratios = st.get("timing", {}).get("ratios", {})
    runs = [r for r in acc["runs"] if r["variant"] == name and "error" not in r]
    facts = runs[0] if runs else st.get("variants", {}).get(name, {})
    accs = [mean_std(acc["summary"][name][d]) for d in s.datasets]
    kept = (f"{facts['retained_fraction']:.1%} (ranks {facts['rank_min']}-{facts['rank_max']},"
            f" median {facts['rank_median']:.0f})") if "retained_fraction" in facts else "100%"
    trained = f"{count(facts['trainable_adapter'])} + {count(facts['trainable_head'])}" if facts else "-"
    deployed = count(facts["deployed_parameters"]) if facts else "-"
    time_cell = "1 (baseline)" if name == BASELINE else (
        fmt_ratio(ratios[f"{name}/{BASELINE}"]) if f"{name}/{BASELINE}" in ratios else "-")
    return [name, kept, trained, deployed, *accs, time_cell]
