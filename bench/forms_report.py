"""bench_forms.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from common_report import DATASETS, fmt_ratio, fmt_s, heading, mean_std, seed_table, table, verdict
from forms_setup import BASELINE, FORM_BY_NAME, FORMS, lr_of

if TYPE_CHECKING:
    from forms_setup import Settings


def rel(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def main_table(result: dict[str, Any], s: Settings) -> list[str]:
    sec = result["sections"]
    acc, st, mem = sec.get("accuracy"), sec.get("step_time"), sec.get("memory")
    ratios = (st or {}).get("timing", {}).get("ratios", {})
    children = (mem or {}).get("children", {})
    base_mem = children.get(BASELINE, {})
    rows = []
    for name in s.forms:
        form = FORM_BY_NAME[name]
        params = (st or {}).get("forms", {}).get(name) or children.get(name) or {}
        if "adapter" in params:
            heads = [str(params["head"])]
            if acc:  # the measured head has 2 classes: (hidden + 1) numbers per class
                heads = [f"{acc['labels'][d] * (params['head'] // 2):,}" for d in s.datasets]
            count = f"{params['adapter']:,} / {' or '.join(heads)}"
        else:
            count = f"failed: {params.get('error', 'not measured')}"
        accs = [mean_std(acc["summary"][name][d]) if acc else "-" for d in s.datasets]
        if name == BASELINE:
            time_cell = "1 (baseline)" if ratios else "-"
        elif f"{name}/{BASELINE}" in ratios:
            time_cell = fmt_ratio(ratios[f"{name}/{BASELINE}"])
        else:
            time_cell = f"failed: {st['forms'][name]['error']}" if st and "error" in st["forms"].get(name, {}) else "-"
        child = children.get(name, {})
        if "error" in child:
            saved_cell = peak_cell = f"failed: {child['error']}"
        elif child and "saved_mb" in base_mem:
            saved_cell = f"{rel(child['saved_mb'], base_mem['saved_mb'])} ({child['saved_mb']:.1f} MB)"
            peak_cell = f"{rel(child['peak_mb'], base_mem['peak_mb'])} ({child['peak_mb']:.0f} MB)"
        else:
            saved_cell = peak_cell = "-"
        rows.append([name, f"{lr_of(form, s):g}", count, *accs, time_cell, saved_cell, peak_cell])
    header = ["form", "lr", "trainable params: adapter / head", *[f"{DATASETS[d]} test acc." for d in s.datasets],
              "step time vs LoRA [IQR]", "saved for backward vs LoRA", "peak RSS vs LoRA"]
    return [table(header, rows), ""]


def losses_paragraph(result: dict[str, Any], s: Settings) -> list[str]:
    """Where each form loses to LoRA (and where it does not), read off the numbers."""
    sec = result["sections"]
    acc, st, mem = sec.get("accuracy"), sec.get("step_time"), sec.get("memory")
    ratios = (st or {}).get("timing", {}).get("ratios", {})
    children = (mem or {}).get("children", {})
    lines = []
    for name in s.forms:
        if name == BASELINE:
            continue
        loses, holds, failed = [], [], []
        if acc:
            for d in s.datasets:
                a, b = acc["summary"][name][d], acc["summary"][BASELINE][d]
                if "error" in a or "error" in b:
                    failed.append(f"{DATASETS[d]} training ({a.get('error') or b.get('error')})")
                    continue
                diff = a["mean"] - b["mean"]
                spread = a["std"] + b["std"]
                where = f"{DATASETS[d]} accuracy {100 * diff:+.1f} points"
                if diff < 0 and -diff > spread:
                    loses.append(f"{where} (more than the seeds' spread, {100 * spread:.1f})")
                elif diff < 0:
                    holds.append(f"{where} (within the seeds' spread, {100 * spread:.1f}: not resolved)")
                else:
                    holds.append(where)
        r = ratios.get(f"{name}/{BASELINE}")
        if r is not None:
            what = f"step time {r['median']:.2f}x [{r['q1']:.2f}-{r['q3']:.2f}]"
            note = " (IQR above 1)" if r["q1"] > 1.0 else (" (IQR spans 1: not resolved)" if r["q3"] > 1.0 else "")
            (loses if r["q1"] > 1.0 else holds).append(what + note)
        elif st and "error" in st["forms"].get(name, {}):
            failed.append(f"step timing ({st['forms'][name]['error']})")
        c, b = children.get(name, {}), children.get(BASELINE, {})
        if "saved_mb" in c and "saved_mb" in b:
            factor = c["saved_mb"] / b["saved_mb"]
            what = f"activation memory {factor:.2f}x"
            (loses if factor > 1.02 else holds).append(what)
            pa = (st or {}).get("forms", {}).get(name, {}).get("adapter") or c.get("adapter")
            pb = (st or {}).get("forms", {}).get(BASELINE, {}).get("adapter") or b.get("adapter")
            if pa and pb:
                (loses if pa > pb else holds).append(f"adapter parameters {pa / pb:.2f}x")
        elif "error" in c:
            failed.append(f"memory ({c['error']})")
        parts = [f"**{name}**:"]
        parts.append(f"loses on {'; '.join(loses)}." if loses else "no clear loss on anything measured here.")
        if holds:
            parts.append(f"Otherwise: {'; '.join(holds)}.")
        if failed:
            parts.append(f"Failed: {'; '.join(failed)}.")
        lines += ["- " + " ".join(parts)]
    return lines


def accuracy_details(result: dict[str, Any], s: Settings) -> list[str]:
    def cells(a: dict[str, Any]) -> list[str]:
        return [" / ".join(f"{x:.1%}" for x in a["per_seed"]), f"{a['before_mean']:.1%}", f"{a['last_loss_mean']:.3f}",
                f"{a['kept_step_0']}/{a['n']}", f"{a['train_s_mean']:.0f}"]

    return [seed_table(["form", "data", "test acc. per seed", "before training", "train loss (last 5 steps)",
                        "runs that kept step 0", "training s (mean)"],
                       result["sections"]["accuracy"]["summary"], s.forms, s.datasets, cells), ""]


def dora_md(res: dict[str, Any], s: Settings) -> list[str]:
    lines = [
        f"One training step (forward + backward + AdamW, train mode, dropout 0, classifier trained) on a fixed"
        f" batch of {res['batch'][0]} x {res['batch'][1]} reviews; splice LoRA / PEFT LoRA / splice DoRA / PEFT"
        f" DoRA (r=8, alpha=16) each on its own copy of MiniLM, {s.dora_rounds} interleaved rounds (rotating order)"
        f" after {s.warmup} warm-up. Ratio = median of per-round ratios [Q1-Q3]; below 1: the first is faster.",
        "",
    ]
    rows = []
    for key, c in res["configs"].items():
        if "error" in c:
            rows.append([key, f"failed: {c['error']}"] + [""] * 7)
            continue
        r = c["ratios"]
        a = c["absolute"]
        rows.append([key, fmt_ratio(r["splice_dora/peft_dora"]), f"{r['splice_dora/peft_dora']['cpu_median']:.3f}",
                     fmt_ratio(r["splice_dora/splice_lora"]), fmt_ratio(r["peft_dora/peft_lora"]),
                     fmt_ratio(r["splice_dora/peft_lora"]), fmt_ratio(r["splice_lora/peft_lora"]),
                     " / ".join(fmt_s(a[n]) for n in ("splice_dora", "peft_dora")),
                     f"{c['dora_loss_diff']:.1e}"])
    lines += [table(["targets", "splice DoRA / PEFT DoRA", "(CPU time)", "splice DoRA / splice LoRA",
                     "PEFT DoRA / PEFT LoRA", "splice DoRA / PEFT LoRA", "splice LoRA / PEFT LoRA",
                     "DoRA ms splice / PEFT (min / med)", "DoRA loss diff at equal weights"], rows), ""]
    for key, c in res["configs"].items():
        if "error" in c:
            continue
        r = c["ratios"]["splice_dora/peft_dora"]
        s_over, p_over = c["ratios"]["splice_dora/splice_lora"], c["ratios"]["peft_dora/peft_lora"]
        lines.append(f"- {key}: splice's DoRA step cheaper than PEFT's (goal: ratio < 1 over the whole IQR)?"
                     f" {verdict(r['q1'], r['q3'], 1.0)} ({r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}])."
                     f" DoRA's cost over the same library's LoRA: splice {s_over['median']:.2f}x,"
                     f" PEFT {p_over['median']:.2f}x.")
    for key, c in res["configs"].items():
        if "error" in c:
            continue
        t, m = c["trainable"], c["saved_for_backward_mb"]
        lines.append(f"- {key}: trainable splice DoRA {t['splice_dora']:,}, PEFT DoRA {t['peft_dora']:,}, LoRA"
                     f" {t['splice_lora']:,} (head included); {c['lora_tensors']} LoRA tensors copied splice -> PEFT;"
                     f" LoRA loss diff {c['lora_loss_diff']:.1e}. Saved for backward (MB, weights excluded): splice"
                     f" DoRA {m['splice_dora']:.1f}, PEFT DoRA {m['peft_dora']:.1f}, splice LoRA"
                     f" {m['splice_lora']:.1f}, PEFT LoRA {m['peft_lora']:.1f}.")
    return lines + [""]


def markdown(result: dict[str, Any], s: Settings) -> str:
    sec = result["sections"]
    out = [
        *heading("Adapter forms on MiniLM: accuracy, parameters, step time and memory, same data and budget (CPU)",
                 result["environment"]),
        f"Runtime {result['runtime_s'] / 60:.1f} min."
        f" {'QUICK smoke run: too few steps and rounds to trust. ' if s.quick else ''}"
        "Other jobs may share this machine's two cores (see the load average): paired ratios are robust to that,"
        " absolute times are not.",
        "",
        budget_paragraph(s),
        "",
        "## Forms compared",
        "",
        *[f"- **{f.name}** `{json.dumps(f.adapter)}`, lr {lr_of(f, s):g}: {f.why}."
          for f in FORMS if f.name in s.forms],
        "", "## Main table", "", *how_measured(sec, s), "", *main_table(result, s)]
    if any(k in sec for k in ("accuracy", "step_time", "memory")):
        out += ["## Where a form loses to LoRA", "",
                "Read off the numbers above: accuracy differences are in points of the mean over seeds, a loss"
                " when larger than the sum of the two standard deviations (the seeds' spread); step time loses when"
                " the whole IQR is above 1; memory when the saved-for-backward bytes exceed LoRA's by more than 2%;"
                " parameters when the adapter has more than LoRA's.", "", *losses_paragraph(result, s), ""]
    if "accuracy" in sec:
        out += ["## Accuracy runs in detail", "", *accuracy_details(result, s)]
    if "step_time" in sec and "timing" in sec["step_time"]:
        a = sec["step_time"]["timing"]["absolute"]
        out += ["Absolute step times, ms (min / median): "
                + "; ".join(f"{n} {fmt_s(v)}" for n, v in a.items()) + ".", ""]
    if "memory" in sec:
        out += ["## Memory in detail", "", *memory_details(sec["memory"])]
    if "dora_peft" in sec:
        out += ["## DoRA: splice vs HF PEFT, one training step", "", *dora_md(sec["dora_peft"], s)]
    failures = failed_forms(result)
    if failures:
        out += ["## Failures", "", *[f"- {n}: {e}" for n, e in failures.items()], ""]
    return "\n".join(out)


def budget_paragraph(s: Settings) -> str:
    """What every form gets alike: model, trainer, steps, lengths, optimizer, seeds, evaluation, data."""
    used = {d: n for d, n in s.train_max_length.items() if d in s.datasets}
    lengths = (f"{next(iter(used.values()))} tokens" if len(set(used.values())) == 1
               else ", ".join(f"{n} tokens ({DATASETS[d]})" for d, n in used.items()))
    head_note = (" (the trainer's default 1e-2 left most Rotten Tomatoes runs of a 60-step trial at their step-0"
                 " checkpoint)") if s.head_lr != 1e-2 else ""
    return (f"**Budget, the same for every form**: bundled all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a fresh"
            f" classification head trained in full; `splice.train.run`, {s.steps} optimizer steps of batch {s.batch},"
            f" max length {lengths}, AdamW (weight decay 0.01), cosine schedule with 6% warm-up, gradient"
            f" clipping 1.0, head lr {s.head_lr:g}{head_note}, adapter lr {s.lr:g} unless the table says otherwise;"
            f" seeds {', '.join(map(str, s.seeds))} (seed = adapter and head init and data order). Accuracy: test"
            f" split, first {s.eval_examples} rows (the same rows for every form and seed), of the checkpoint the"
            " trainer keeps (the better on validation of step 0 and the last step); mean ± standard deviation over"
            " the seeds."
            " Data: Rotten Tomatoes (2 classes, 3,892 training reviews) and BBC News (5 topics, 1,780 training"
            " articles, cut at the max length).")


def how_measured(sec: dict[str, Any], s: Settings) -> list[str]:
    """The main table's method notes, one line for each section that ran."""
    lines = []
    if "step_time" in sec:
        st = sec["step_time"]
        lines += [f"Step time: one training step on a fixed batch of {st['batch'][0]} x {st['batch'][1]} reviews, all"
                  f" forms in one process, {s.rounds} interleaved rounds (rotating order) after {s.warmup} warm-up;"
                  " median of per-round ratios form / LoRA [Q1-Q3]."]
    if "memory" in sec:
        lines += ["Memory: one fresh process per form, the same batch. *Saved for backward*: bytes autograd keeps for"
                  " the backward of one training forward (weights excluded; deterministic): the activation memory."
                  " *Peak RSS*: the process's high-water mark (imports, model, optimizer, two steps), mostly the"
                  " model and libraries, so it moves little."]
    if "accuracy" in sec:
        lines += ["Head parameters: (384 + 1) x classes, one number per data set."]
    return lines


def memory_details(mem: dict[str, Any]) -> list[str]:
    rows = [[n, f"{c['saved_mb']:.1f}", f"{c['step_delta_mb']:.1f}", f"{c['peak_mb']:.0f}",
             f"{c['after_setup_mb']:.0f}"] if "error" not in c else [n, f"failed: {c['error']}", "", "", ""]
            for n, c in mem["children"].items()]
    return [f"({', '.join(f'{k}={v}' for k, v in mem['malloc_env'].items())}; step increase: VmHWM during"
            " one step minus the RSS before it, the high-water mark reset after a warm-up step.)", "",
            table(["form", "saved for backward MB", "step increase MB", "peak RSS MB", "after setup MB"], rows), ""]


def failed_forms(result: dict[str, Any]) -> dict[str, str]:
    sec, failed = result["sections"], {}
    for row in sec.get("accuracy", {}).get("runs", []):
        if "error" in row:
            failed.setdefault(row["form"], f"training: {row['error']}")
    for name, c in sec.get("step_time", {}).get("forms", {}).items():
        if "error" in c:
            failed.setdefault(name, f"step: {c['error']}")
    for name, c in sec.get("memory", {}).get("children", {}).items():
        if "error" in c:
            failed.setdefault(name, f"memory: {c['error']}")
    return failed
