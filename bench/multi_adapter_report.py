"""bench_multi_adapter.py's rendering: each section's markdown and its rows of the Goals table,
from the section's JSON alone (so `--render` needs no model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from common_report import environment_line, fmt_pct, fmt_ratio, fmt_s, heading, table, verdict
from multi_adapter_setup import B_STD

if TYPE_CHECKING:
    from multi_adapter_setup import Settings


Row = tuple[list[str], dict[str, str]]  # a table row and its goal


def goal(section: str, what: str, config: str, value: str, met: str) -> dict[str, str]:
    return {"section": section, "goal": what, "config": config, "value": value, "met": met}


def per_config(intro: str, configs: dict[str, Any], header: list[str], row: Callable[[str, dict[str, Any]], Row]
               ) -> tuple[list[str], list[dict[str, str]]]:
    """A section with one table row and one goal per configuration: the intro, the table, the goals."""
    rows = [row(label, c) for label, c in configs.items()]
    return [intro, "", table(header, [cells for cells, _ in rows]), ""], [g for _, g in rows]


def mixed_batch_md(res: dict[str, Any], s: Settings) -> tuple[list[str], list[dict[str, str]]]:
    def row(label: str, c: dict[str, Any]) -> Row:
        o, r, t = c["overhead"], c["overhead_ratio"], c["timing"]
        ratio = r["splice/peft"]
        ci = f"{ratio['value']:.2f} [{ratio['ci95_low']:.2f} to {ratio['ci95_high']:.2f}]"
        met = "n/a (PEFT overhead <= 0)" if np.isnan(ratio["value"]) else verdict(
            ratio["ci95_low"], ratio["ci95_high"], 1 / 3)
        return ([label, fmt_s(t["absolute"]["base"]), fmt_pct(o["splice"]), fmt_pct(o["peft"]),
                 fmt_pct(o["splice_ref"]), ci,
                 fmt_ratio(t["ratios"]["splice/peft"]), fmt_ratio(t["ratios"]["splice_ref/peft"]),
                 f"{c['parity']['splice_vs_peft']:.1e}", f"{c['parity']['grouped_vs_reference']:.1e}"],
                goal("mixed_batch", "splice overhead <= 1/3 of PEFT's", label, f"{ratio['value']:.2f}", met))

    lines, goals = per_config(
        f"Batch {s.mixed_batch} x {s.mixed_seq} tokens of reviews ({res['real_token_fraction']:.0%} real tokens),"
        f" row i -> adapter i mod N, `torch.inference_mode`, eval; {s.mixed_rounds} interleaved rounds after"
        f" {s.warmup} warm-up. Overhead = (t - t_base) / t_base per round, median [Q1 to Q3]. Overhead ratio ="
        " median splice overhead / median PEFT overhead, 95% bootstrap interval over rounds in brackets."
        " `route` / `adapter_names` are set inside the timed call (per-batch cost included).",
        res["configs"], ["config", "base ms (min / med)", "splice overhead", "PEFT overhead", "splice ref. overhead",
                         "overhead ratio splice/PEFT", "time splice/PEFT", "time splice ref./PEFT",
                         "max diff splice-PEFT", "max diff grouped-ref."], row)
    scale = next(iter(res["configs"].values()))["parity"] if res["configs"] else None
    if scale:
        lines += [f"Outputs compared on last_hidden_state (max |value| {scale['output_scale']:.1f}); the adapters"
                  f" move it by up to {scale['adapters_vs_base']:.2f} from the base model's.", ""]
    return lines, goals


def decode_md(res: dict[str, Any], s: Settings) -> tuple[list[str], list[dict[str, str]]]:
    def row(key: str, c: dict[str, Any]) -> Row:
        tps, p, o = c["tokens_per_s"], c["parity"], c["overhead"]
        speed = c["timing"]["ratios"]["peft/splice"]
        return ([key, f"{tps['base']:.1f}", f"{tps['splice']:.1f}", f"{tps['peft']:.1f}", fmt_ratio(speed),
                 fmt_pct(o["splice"]), fmt_pct(o["peft"]), f"{p['same_tokens_fraction']:.1%}",
                 f"{p['prompt_logits_max_diff']:.1e}", f"{p['tokens_changed_vs_base']:.0%}"],
                goal("decode", "splice >= 1.5x PEFT tokens/s", key, f"{speed['median']:.2f}x",
                     verdict(speed["q1"], speed["q3"], 1.5, lower_is_better=False)))

    return per_config(
        f"{s.decode_batch} prompts of {s.prompt_len} tokens (packed review text), {s.decode_adapters} adapters,"
        f" row i -> adapter i mod {s.decode_adapters}; greedy `generate`, {s.new_tokens} new tokens (min = max,"
        f" so every row has the same length), KV cache on; {s.decode_rounds} interleaved rounds after one"
        " untimed call of each (the one whose tokens are compared)."
        " Tokens/s = generated tokens / median wall time of the whole `generate` call (prefill included)."
        " Speed-up = median of per-round t_PEFT / t_splice.",
        res["configs"], ["targets", "base tok/s", "splice tok/s", "PEFT tok/s", "speed-up splice/PEFT",
                         "splice time over base", "PEFT time over base", "same tokens splice-PEFT",
                         "prompt logits max diff", "tokens changed by adapters"], row)


def training_md(res: dict[str, Any], s: Settings) -> tuple[list[str], list[dict[str, str]]]:
    def row(label: str, c: dict[str, Any]) -> Row:
        r = c["ratios"]["splice/peft"]
        return ([label, f"{c['trainable']:,}", fmt_ratio(r), f"{r['cpu_median']:.3f}",
                 fmt_s(c["absolute"]["splice"]), fmt_s(c["absolute"]["peft"]), f"{c['loss_diff']:.1e}"],
                goal("training", "splice step time <= PEFT's", label, f"{r['median']:.3f}",
                     verdict(r["q1"], r["q3"], 1.0)))

    return per_config(
        f"Forward + backward + AdamW, train mode, LoRA dropout 0. MiniLM: batch {s.minilm_batch} x {s.minilm_seq}"
        f" reviews, classifier trained (splice `train_also`, PEFT SEQ_CLS), {s.minilm_pairs} pairs after"
        f" {s.warmup} warm-up. SmolLM2: batch {s.smollm_batch} x {s.smollm_seq} packed review text, causal-LM"
        f" loss, {s.smollm_pairs} pairs after 1 warm-up. Ratio = median of per-pair splice/PEFT [Q1-Q3].",
        res["configs"], ["config", "trainable", "splice/PEFT wall", "CPU-time ratio", "splice ms (min / med)",
                         "PEFT ms (min / med)", "loss diff at equal weights"], row)


def memory_md(res: dict[str, Any], s: Settings) -> tuple[list[str], list[dict[str, str]]]:
    children = res["children"]
    env = ", ".join(f"{k}={v}" for k, v in res["malloc_env"].items()) or "default malloc settings"
    lines = [
        f"One fresh process per row ({env}); MiniLM batch {s.minilm_batch} x {s.minilm_seq} (head trained),"
        f" SmolLM2 batch {s.smollm_batch} x {s.smollm_seq} causal LM. *Saved for backward*: bytes of the"
        " tensors autograd keeps for the backward of one training forward (once per storage, weights"
        " excluded): deterministic. *Step increase*: VmHWM during"
        f" {s.mem_steps} training step(s) minus the RSS just before them, the high-water mark being reset"
        " (/proc/self/clear_refs) after one warm-up step. *Peak*: the process's VmHWM over everything"
        " (imports, model, warm-up), ru_maxrss in brackets. *floor*: the frozen model without adapters,"
        " gradients flowing down to its embeddings: what any LoRA on these layers must keep at least.",
        "",
    ]
    rows = []
    for kind, c in children.items():
        rows.append([kind, f"{c['trainable']:,}", f"{c['saved_mb']:.1f}", f"{c['step_delta_mb']:.1f}",
                     f"{c['peak_mb']:.0f} ({c['peak_ru_maxrss_mb']:.0f})", f"{c['after_import_mb']:.0f}",
                     f"{c['after_setup_mb']:.0f}"])
    lines += [table(["configuration", "trainable", "saved for backward MB", "step increase MB", "peak MB",
                     "after imports MB", "after setup MB"], rows), ""]
    rows, goals = [], []
    for kind, c in children.items():
        if ":splice:" not in kind:
            continue
        p = children.get(kind.replace(":splice:", ":peft:"))
        floor = children.get(kind.split(":")[0] + ":floor")
        if p is None:
            continue

        def less(a: float, b: float) -> str:
            return f"{1 - a / b:+.1%}" if b > 0 else "n/a"

        config = kind.replace(":splice", "")
        saved_less = 1 - c["saved_mb"] / p["saved_mb"]
        rows.append([config, f"{c['saved_mb']:.1f} / {p['saved_mb']:.1f}", less(c["saved_mb"], p["saved_mb"]),
                     f"{c['step_delta_mb']:.1f} / {p['step_delta_mb']:.1f}",
                     less(c["step_delta_mb"], p["step_delta_mb"]),
                     f"{c['peak_mb']:.0f} / {p['peak_mb']:.0f}", less(c["peak_mb"], p["peak_mb"]),
                     f"{floor['saved_mb']:.1f}" if floor else "-",
                     f"{c['saved_mb'] - floor['saved_mb']:.1f} / {p['saved_mb'] - floor['saved_mb']:.1f}" if floor
                     else "-"])
        goals.append(goal("memory", ">= 20% less saved-for-backward memory", config, f"{saved_less:.1%}",
                          "yes" if saved_less >= 0.2 else "no"))
    lines += ["splice vs PEFT (splice / PEFT, and how much less splice needs):", "",
              table(["config", "saved MB", "saved: less", "step increase MB", "step: less", "peak MB", "peak: less",
                     "floor saved MB", "above floor MB"], rows), ""]
    shares = [children[k.split(":")[0] + ":floor"]["saved_mb"] / c["saved_mb"] for k, c in children.items()
              if ":splice:" in k and k.split(":")[0] + ":floor" in children and c["saved_mb"] > 0]
    if shares:
        lines += [f"What dominates: the floor (the frozen model's own activations, needed by any LoRA whose"
                  f" gradient must reach the lower layers) is {min(shares):.0%}-{max(shares):.0%} of what splice"
                  " saves for backward. Above it, splice adds only the adapted layers' inputs that the frozen model"
                  " does not keep anyway; PEFT also keeps the rank-r hidden and, with dropout, a dropped copy of the"
                  " input and its mask per adapted layer. So the difference is large with dropout and nil without.",
                  ""]
    return lines, goals


def markdown(result: dict[str, Any], s: Settings) -> str:
    from bench_multi_adapter import PLANNED, SECTIONS  # imports this module: only here

    out = [
        *heading("Many adapters on one base, and one LoRA training step: splice vs HF PEFT (CPU)",
                 result["environment"]),
        f"LoRA r=8, alpha=16; lora_B seeded non-zero (std {B_STD}) and copied from splice into PEFT, so both"
        f" libraries hold identical adapters. {'QUICK smoke run: too few rounds to trust. ' if s.quick else ''}"
        f"Runtime {result['runtime_s']:.0f} s.",
        "",
        "Other jobs may share this machine's CPU while the benchmark runs. Paired, interleaved ratios and"
        " per-round overheads are robust to that; absolute times (ms, tokens/s) are not: compare them"
        " within a row only, never across runs or machines.",
        "",
    ]
    if result["environment"].get("malloc_keeps_freed_memory"):
        out += ["Timed sections ran with glibc malloc keeping freed memory for reuse (`common.keep_freed_memory`):"
                " without it every forward faults its activation pages in anew, which on this VM tripled the system"
                " time and doubled the spread of per-round overheads. Both libraries run in the same process under"
                " the same allocator; `--default-malloc` switches it off.", ""]
    for rerun in result.get("reruns", []):  # a section replaced by a later run of `--sections`
        out += [f"Section `{rerun['section']}` was rerun after a code change ({rerun['why']}):", "",
                environment_line(rerun["environment"]), ""]
    sections, goals = [], []
    number = 0
    for section in SECTIONS:
        if section.key not in result["sections"]:
            continue
        number += 1
        lines, section_goals = section.report(result["sections"][section.key], s)
        sections += [f"## {number}. {section.title}", "", *lines]
        goals += section_goals
    for key, what in PLANNED.items():
        number += 1
        sections += [f"## {number}. ({key}) {what}", "", "Not measured by this script.", ""]
    if goals:
        out += ["## Goals", "",
                "Goals from the issue. *met*: yes if the whole spread (IQR of per-round ratios; for the overhead"
                " ratio its 95% bootstrap interval) is on the good side, no if all of it is on the bad side.", "",
                table(["section", "goal", "config", "value", "met"],
                      [[g["section"], g["goal"], g["config"], g["value"], g["met"]] for g in goals]), ""]
    return "\n".join(out + sections)
