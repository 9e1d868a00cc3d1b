"""bench_placement.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_placement import BASELINE, DOMLORA, VARIANT_BY_NAME, VARIANTS, png_path
from common_report import DATASETS, heading, mean_std, seed_table, table

if TYPE_CHECKING:
    from bench_placement import Settings


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def short_module(name: str) -> str:
    return name.removeprefix("bert.").removeprefix("encoder.").replace("attention.", "att.")


def modules_cell(a: dict[str, Any]) -> str:
    if "error" in a or not a["modules"]:
        return "-"
    return ", ".join(f"{short_module(m)} ({n}/{a['n']})" for m, n in a["modules"].items())


def params_cell(a: dict[str, Any]) -> str:
    if "error" in a:
        return "-"
    return f"{' or '.join(f'{p:,}' for p in a['adapter'])} / {a['head']:,}"


def main_table(acc: dict[str, Any], s: Settings) -> list[str]:
    summary = acc["summary"]
    rows = []
    for name in s.variants:
        cells = [name]
        for data in s.datasets:
            a = summary[name][data]
            cells += [params_cell(a), mean_std(a)]
        base = [summary.get(BASELINE, {}).get(d, {}) for d in s.datasets]
        own = [summary[name][d] for d in s.datasets]
        cpu = [f"{o['cpu_s']:.0f} ({o['cpu_s'] / b['cpu_s']:.2f}x)" for o, b in zip(own, base, strict=True)
               if "error" not in o and "cpu_s" in b]
        cells.append(" / ".join(cpu) or "-")
        rows.append(cells)
    header = ["placement"]
    for data in s.datasets:
        header += [f"{DATASETS[data]}: trainable adapter / head", f"{DATASETS[data]} test acc."]
    header.append("CPU s per run, vs q,v (" + " / ".join(DATASETS[d] for d in s.datasets) + ")")
    return [table(header, rows), ""]


def chosen_table(acc: dict[str, Any], s: Settings) -> list[str]:
    rows = []
    for r in acc["runs"]:
        if VARIANT_BY_NAME[r["variant"]].adapter["method"] != "domlora":
            continue
        modules = ", ".join(r.get("target_modules") or []) if "error" not in r else f"failed: {r['error']}"
        rows.append([r["variant"], DATASETS[r["data"]], str(r["seed"]), f"`{modules}`",
                     pct(r["test_accuracy"]) if "error" not in r else "-"])
    return [table(["placement", "data", "seed", "modules chosen (saved target_modules)", "test acc."], rows), ""]


def details_table(acc: dict[str, Any], s: Settings) -> list[str]:
    def cells(a: dict[str, Any]) -> list[str]:
        return [" / ".join(pct(x) for x in a["per_seed"]), pct(a["before_mean"]), f"{a['kept_step_0']}/{a['n']}",
                f"{a['train_s']:.0f}", f"{a['examples_per_s']:.1f}", f"{a['load_s']:.1f}"]

    return [seed_table(["placement", "data", "test acc. per seed", "before training (mean)", "runs that kept step 0",
                        "training wall s (mean)", "training examples/s (wall)", "setup wall s incl. probe (mean)"],
                       acc["summary"], s.variants, s.datasets, cells), ""]


def minilm_page_md(pm: dict[str, Any], acc: dict[str, Any] | None, s: Settings) -> list[str]:
    chosen = {}
    for r in (acc or {}).get("runs", []):
        if r["variant"] == DOMLORA and "error" not in r:
            chosen[(r["data"], r["seed"])] = r["target_modules"]
    rows, agree = [], []
    candidates = next((r["candidates"] for r in pm["runs"] if "error" not in r), "?")
    for r in pm["runs"]:
        if "error" in r:
            rows.append([DATASETS[r["data"]], str(r["seed"]), f"failed: {r['error']}", "", ""])
            continue
        top = ", ".join(f"{short_module(x['name'])} {pct(x['share'])}" for x in r["top"])
        kinds = ", ".join(f"{k} {pct(v)}" for k, v in list(r["by_kind"].items())[:3])
        trainer = chosen.get((r["data"], r["seed"]))
        same = "-" if trainer is None else ("yes" if trainer == [r["top"][0]["name"]] else f"no ({trainer})")
        if trainer is not None:
            agree.append(same == "yes")
        rows.append([DATASETS[r["data"]], str(r["seed"]), top, kinds, same])
    lines = [f"{s.probe_batches} probe batches of {s.batch} x <= {s.max_length} tokens (the first batches of the"
             " run's training order), the seed's freshly initialised head, expected score, r=8; candidates: every"
             f" Linear but the classifier ({candidates} modules). Shares are of the total over all candidates.", "",
             table(["data", "seed", f"top-{s.top_minilm} modules (share)", "largest module types (summed share)",
                    "top-1 = trainer's DomLoRA choice"], rows), ""]
    if agree:
        lines += [f"The PAGE run apart picked the trainer's module in {sum(agree)} of {len(agree)} runs.", ""]
    pngs = [Path(png_path(Path(), f"minilm_{r['data']}", s)).name for r in pm["runs"]
            if r["seed"] == s.seeds[0] and "error" not in r]
    if pngs:
        lines += [f"Heatmaps (first seed): {', '.join(f'`{n}`' for n in pngs)}. `Placement.heatmap` draws a module"
                  " outside the layer stack (the pooler) in the row of layer 0.", ""]
    return lines


def smollm2_md(ps: dict[str, Any], s: Settings) -> list[str]:
    lines = []
    titles = {"arithmetic": "arithmetic SFT (examples/smollm2_arithmetic.yaml)",
              "reviews": "Rotten Tomatoes review text as plain language modelling"}
    for text, r in ps.items():
        lines += [f"### {titles.get(text, text)}", ""]
        if "error" in r:
            lines += [f"failed: {r['error']}", ""]
            continue
        rows = [[str(i), f"`{x['name']}`", str(x["layer"]), x["kind"], pct(x["share"]), f"{x['expected']:.3g}",
                 f"{x['sampled']:.3g}"] for i, x in enumerate(r["top"], 1)]
        lines += [f"{r['batches']} batches of {r['batch_shape']}; {r['candidates']} candidate modules"
                  f" ({r['layers']} layers x 7); expected score, r=8. Heatmap: `{Path(r['heatmap']).name}`.", "",
                  table(["rank", "module", "layer", "type", "share", "expected", "sampled"], rows), "",
                  "Share by module type: " + ", ".join(f"{k} {pct(v)}" for k, v in r["by_kind"].items()) + ".",
                  "Share by depth: " + ", ".join(f"{k} {pct(v)}" for k, v in r["by_third"].items()) + ".", ""]
    return lines


def diff_words(a: dict[str, Any], b: dict[str, Any]) -> str:
    diff, spread = a["mean"] - b["mean"], a["std"] + b["std"]
    where = "beyond" if abs(diff) > spread else "within"
    return f"{100 * diff:+.1f} points ({where} the seeds' spread of {100 * spread:.1f})"


def findings(result: dict[str, Any], s: Settings) -> list[str]:
    """A few sentences read off the numbers (nothing here is written in advance)."""
    sec = result["sections"]
    out = accuracy_findings(sec["accuracy"]["summary"], s) if sec.get("accuracy") else []
    pages = [r for r in sec.get("page_minilm", {}).get("runs", []) if "error" not in r]
    out += page_minilm_findings(pages, s)
    return out + [smollm2_finding(text, r) for text, r in sec.get("page_smollm2", {}).items() if "error" not in r]


def accuracy_findings(summary: dict[str, Any], s: Settings) -> list[str]:
    """Per data set: DomLoRA top-1 against both LoRA placements, the other placements against q,v, and
    the runs that kept their step-0 checkpoint."""
    out = []
    for data in s.datasets:
        dom, parts = summary.get(DOMLORA, {}).get(data), []
        if not dom or "error" in dom:
            continue
        for other in (BASELINE, "LoRA all-linear"):
            o = summary.get(other, {}).get(data)
            if not o or "error" in o:
                continue
            ratio = max(dom["adapter"]) / max(o["adapter"])
            parts.append(f"vs {other}: {diff_words(dom, o)} with {ratio:.1%} of its adapter parameters"
                         f" and {dom['cpu_s'] / o['cpu_s']:.2f}x its CPU time per run")
        modules = ", ".join(f"`{m}` in {n} of {dom['n']} runs" for m, n in dom["modules"].items())
        out.append(f"- **{DATASETS[data]}**: DomLoRA top-1 chose {modules}; {pct(dom['mean'])} test accuracy, "
                   + "; ".join(parts) + ".")
        base = summary.get(BASELINE, {}).get(data, {})
        for name in s.variants:
            a = summary[name][data]
            if name in (BASELINE, DOMLORA) or "error" in a or "error" in base or not base:
                continue
            out.append(f"  - {name}: {pct(a['mean'])}, vs {BASELINE}: {diff_words(a, base)} with"
                       f" {max(a['adapter']) / max(base['adapter']):.2f}x its adapter parameters (the largest"
                       " count over seeds).")
        for name in s.variants:
            a = summary[name][data]
            if "error" not in a and a["kept_step_0"]:
                out.append(f"  - {name}: {a['kept_step_0']} of {a['n']} runs kept their step-0 checkpoint"
                           " (training did not beat the untrained head on validation).")
    return out


def page_minilm_findings(pages: list[dict[str, Any]], s: Settings) -> list[str]:
    """Per data set: the module PAGE ranks first most often on MiniLM, and how dominant it is."""
    out = []
    for data in s.datasets:
        tops = [r["top"] for r in pages if r["data"] == data]
        if not tops:
            continue
        firsts = Counter(t[0]["name"] for t in tops)
        name, count = firsts.most_common(1)[0]
        shares = [t[0]["share"] for t in tops if t[0]["name"] == name]
        seconds = [t[1]["share"] for t in tops if len(t) > 1]
        out.append(f"- **PAGE on MiniLM, {DATASETS[data]}**: `{name}` ranks first for {count} of {len(tops)} seeds"
                   f" with {pct(min(shares))}-{pct(max(shares))} of the energy"
                   + (f"; the second module holds {pct(max(seconds))} at most." if seconds else "."))
    return out


def smollm2_finding(text: str, r: dict[str, Any]) -> str:
    """SmolLM2's top module on one text: is it a shallow FFN down-projection, as the paper reports?"""
    best = r["top"][0]
    depth = thirds_name(best["layer"], r["layers"])
    verdict = "is" if r["top_is_down_proj"] else "is not"
    down = (f"the best down_proj ranks {r['first_down_proj_rank']}" if not r["top_is_down_proj"]
            and r["first_down_proj_rank"] else "")
    same = ("the sampled score agrees" if r["sampled_top"] == best["name"]
            else f"the sampled score ranks it {r['top_sampled_rank']} (its top: `{r['sampled_top']}`)")
    kind, kind_share = next(iter(r["by_kind"].items()))
    second = r["top"][1]["share"] if len(r["top"]) > 1 else float("nan")
    return (f"- **SmolLM2, {text}**: the top module `{best['name']}` ({pct(best['share'])} of the energy,"
            f" {best['share'] / second:.1f}x the second's)"
            f" {verdict} an FFN down-projection; layer {best['layer']} of {r['layers']} (0-based: after"
            f" {best['layer'] / r['layers']:.0%} of the stack, the {depth})"
            f"{'; ' + down if down else ''}; {same}. The module type with the largest summed share is"
            f" {kind} ({pct(kind_share)}); the first third of the layers holds"
            f" {pct(r['by_third']['first third'])}.")


def thirds_name(layer: int | None, layers: int) -> str:
    if layer is None:
        return "outside the layer stack"
    return ["first third", "middle third", "last third"][min(2, 3 * layer // layers)]


def markdown(result: dict[str, Any], s: Settings) -> str:
    sec = result["sections"]
    out = [
        *heading("Adapter placement: DomLoRA vs LoRA on q,v vs LoRA on all linear layers (CPU)", result["environment"]),
        f"Runtime {result['runtime_s'] / 60:.1f} min, {s.jobs} worker processes of {s.threads} torch thread(s)."
        f" {'QUICK smoke run: too few steps, seeds and rows to trust. ' if s.quick else ''}",
        "",
        f"**Budget, the same for every placement**: bundled all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a"
        f" fresh classification head trained in full; `splice.train.run`, {s.steps} optimizer steps of batch"
        f" {s.batch}, max length {s.max_length} tokens, AdamW (weight decay 0.01), cosine schedule with 6% warm-up,"
        f" gradient clipping 1.0, adapter lr {s.lr:g}, head lr {s.head_lr:g}; seeds {', '.join(map(str, s.seeds))}"
        " (seed = head and adapter init, data order and DomLoRA's probe batches). Accuracy: the first"
        f" {s.eval_examples} rows of the test split, of the checkpoint the trainer keeps (the better on the first"
        f" {s.eval_examples} validation rows of step 0 and the last step); mean ± standard deviation over the seeds."
        " Data: Rotten Tomatoes (2 classes) and BBC News (5 topics, articles cut at the max length).",
        "",
        "## Placements compared",
        "",
        *[f"- **{v.name}** `{json.dumps(v.adapter)}`: {v.why}." for v in VARIANTS if v.name in s.variants],
        "",
    ]
    if sec.get("accuracy"):
        out += ["## Main table", "",
                "Trainable parameters: the adapter / the classification head ((384 + 1) x classes). CPU s: the"
                " worker's CPU time for the whole run (load, DomLoRA's probe, the four evaluations, training), mean"
                " over seeds; unlike wall time it does not grow when other jobs share the cores.", "",
                *main_table(sec["accuracy"], s),
                "## Modules DomLoRA chose", "", *chosen_table(sec["accuracy"], s),
                "## Accuracy runs in detail", "", *details_table(sec["accuracy"], s)]
    if sec.get("page_minilm"):
        out += ["## PAGE ranking on MiniLM", "", *minilm_page_md(sec["page_minilm"], sec.get("accuracy"), s)]
    if sec.get("page_smollm2"):
        out += ["## PAGE ranking on SmolLM2-135M-Instruct", "",
                "SmolLM2 as bundled: a Q4_1 GGUF dequantised to fp32 (Llama, 30 layers, hidden 576, FFN 1536)."
                " The paper's claim is about 8B Llama/Qwen models; this checks whether a 135M model shows the same.",
                "", *smollm2_md(sec["page_smollm2"], s)]
    found = findings(result, s)
    if found:
        out += ["## What the numbers say", "",
                "Accuracy differences are in points of the mean over seeds, beyond the spread when larger than the"
                " sum of the two standard deviations.", "", *found, ""]
    if result.get("failed"):
        out += ["## Failures", "", *[f"- {f}" for f in result["failed"]], ""]
    return "\n".join(out)
