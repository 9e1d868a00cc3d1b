"""bench_lora_vs_peft.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common_report import fmt_ratio, fmt_s, heading, table

if TYPE_CHECKING:
    from bench_lora_vs_peft import Settings


def markdown(result: dict[str, Any], settings: Settings | None = None) -> str:
    """The human-readable report: one table per measurement, ratios as median [Q1-Q3]."""
    s, cfgs = result["settings"], result["configs"]
    out = [
        *heading("splice vs HF PEFT: LoRA r=8, alpha=16 on all-MiniLM-L6-v2 (CPU)", result["environment"]),
        f"Workload: batch {s['batch_size']} x {s['seq_len']} tokens of Rotten Tomatoes reviews (real text,"
        f" padded; {result['real_token_fraction']:.0%} of positions are real tokens), classifier head trained"
        f" in both libraries. {'QUICK smoke run: too few rounds to trust. ' if s['quick'] else ''}"
        f"Runtime {result['runtime_s']:.0f} s.",
        "",
        "Ratios are splice/PEFT (below 1 = splice faster): median of per-round ratios of a paired,"
        " interleaved run, [Q1-Q3] in brackets; times are min / median milliseconds.",
        "",
    ]
    out += training_md(cfgs, s) + inference_md(cfgs, s)
    if result.get("rss"):
        out += rss_md(result["rss"], s)
    return "\n".join(out + overheads_md(cfgs, s) + parity_md(cfgs))


def training_md(cfgs: dict[str, Any], s: dict[str, Any]) -> list[str]:
    rows = []
    for key, c in cfgs.items():
        t = c["training"]
        r = t["ratios"]["splice/peft"]
        rows.append([key, fmt_ratio(r), f"{r['cpu_median']:.3f}", fmt_s(t["absolute"]["splice"]),
                     fmt_s(t["absolute"]["peft"])])
    return [f"## 1. Training step (forward + backward + AdamW), {s['pairs']} pairs after {s['warmup']} warm-up steps",
            "", table(["targets", "splice/PEFT wall", "CPU-time ratio", "splice ms", "PEFT ms"], rows), ""]


def inference_md(cfgs: dict[str, Any], s: dict[str, Any]) -> list[str]:
    rows = []
    for key, c in cfgs.items():
        for group, g in c["inference"].items():
            for pair, r in g["ratios"].items():
                num, den = pair.split("/")
                rows.append([key, group, pair, fmt_ratio(r), fmt_s(g["absolute"][num]), fmt_s(g["absolute"][den])])
    return [f"## 2. Inference forward (no grad, eval), {s['infer_rounds']} rounds", "",
            table(["targets", "group", "ratio", "median [Q1-Q3]", "numerator ms", "denominator ms"], rows), ""]


def rss_md(rss: dict[str, Any], s: dict[str, Any]) -> list[str]:
    rows = [[k, f"{v['trainable']:,}", f"{v['peak_mb']:.0f} ({v['peak_vmhwm_mb']:.0f})",
             f"{v['after_import_mb']:.0f}", f"{v['after_setup_mb']:.0f}", f"{v['train_delta_mb']:.0f}"]
            for k, v in rss.items()]
    return [f"## 3. Peak RSS of {s['rss_steps']} training step(s), one fresh process per row", "",
            "peak = ru_maxrss (VmHWM in brackets, should agree); after imports / after setup (model,"
            " adapter, optimizer) and the training delta are VmHWM readings.", "",
            table(["configuration", "trainable", "peak MB", "after imports MB", "after setup MB",
                   "training delta MB"], rows), ""]


def overheads_md(cfgs: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """attach / save / load / merge times, then trainable counts and the adapter files."""
    rows = []
    for key, c in cfgs.items():
        for op, o in c["overheads"].items():
            rows.append([key, op, fmt_s(o["absolute"]["splice"]), fmt_s(o["absolute"]["peft"]),
                         fmt_ratio(o["ratios"]["splice/peft"])])
    out = [f"## 4. Overheads ({s['reps']} interleaved repetitions; min / median ms) and files", "",
           table(["targets", "operation", "splice ms", "PEFT ms", "splice/PEFT"], rows), ""]
    rows = []
    for key, c in cfgs.items():
        f, p = c["files"], c["params"]["splice"]
        rows.append([key, f"{p['with_head']:,}", f"{p['without_head']:,}",
                     f"{f['splice']['weights_bytes']:,} + {f['splice']['config_bytes']:,}",
                     f"{f['peft']['weights_bytes']:,} + {f['peft']['config_bytes']:,}",
                     "yes" if f["tensors"]["same_keys"] else "NO", f"{f['tensors']['max_abs_diff']:.1e}"])
    return out + [table(["targets", "trainable (with head)", "trainable (no head)", "splice file B (weights + config)",
                         "PEFT file B (weights + config)", "same tensor names", "max tensor diff"], rows),
                  "", "Trainable counts are asserted equal between the libraries; files hold the same adapter"
                  " (written by splice, loaded by PEFT, written again by PEFT).", ""]


def parity_md(cfgs: dict[str, Any]) -> list[str]:
    labels = {"splice_to_peft": "splice save -> PEFT load", "peft_to_splice": "PEFT save -> splice load",
              "after_3_adamw_steps": "after 3 identical AdamW steps (lr 1e-3)",
              "merged_splice_vs_merged_peft": "splice.merge vs PEFT merge_and_unload",
              "splice_merged_vs_unmerged": "splice merged vs unmerged",
              "adapter_effect": "(adapter vs base model, to show the adapter matters)",
              "logit_scale": "(max |logit|, for scale)"}
    rows = [[label] + [f"{c['parity'][k]:.2e}" for c in cfgs.values()] for k, label in labels.items()]
    return ["## 5. Numerical parity, max |logits difference| (fp32, eval mode)", "", table(["check", *cfgs], rows), ""]
