"""bench_speed.py's rendering: the goals table (the issue's four rows, per thread column) and one
table per section and column, from the result JSON alone (`--render` needs no model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common_report import fmt_pct, fmt_ratio, fmt_s, heading, table, verdict

if TYPE_CHECKING:
    from bench_speed import Settings

Section = dict[str, Any]  # one section's result in one thread column


def markdown(result: dict[str, Any], settings: Settings | None = None) -> str:
    """The report: goals first (headline = torch's default thread count), then every section."""
    s, sections = result["settings"], result["sections"]
    quick = "QUICK smoke run: too few rounds to trust. " if s["quick"] else ""
    out = [*heading("Speed on the hot paths: splice vs HF PEFT and the base model (CPU)", result["environment"]),
           "", f"{quick}Runtime {result['runtime_s']:.0f} s. Columns: " + ", ".join(
               f"{column_label(result, c)}" for c in result["threads"]) + " (the first is the headline).", "",
           "Ratios are medians of per-round ratios of a paired, interleaved run, [Q1-Q3] in brackets; overheads"
           " are (t - t_base) / t_base per round, median [Q1 to Q3]; times are min / median ms.", ""]
    out += goals_md(result) + gaps_md(result)
    for key, render in SECTIONS.items():
        if key in sections:
            out += render(result, sections[key])
    return "\n".join(out)


def column_label(result: dict[str, Any], column: str) -> str:
    n = result["threads"][column]
    return f"torch default ({n} threads)" if column == "default" else f"{n} thread{'s' if n > 1 else ''}"


def per_column(result: dict[str, Any], section: dict[str, Section], title: str, intro: str,
               body: Callable[[Section], list[str]]) -> list[str]:
    """A section: its title and intro, then `body` once per thread column."""
    out = [f"## {title}", "", intro, ""]
    for column, res in section.items():
        out += [f"**{column_label(result, column)}**", "", *body(res), ""]
    return out


# ---------------------------------------------------------------------------------- the goals


def goals_md(result: dict[str, Any]) -> list[str]:
    """The issue's table: one row per measure and configuration, a value per thread column, and
    whether the headline column meets the goal (`verdict`: the whole spread on the good side)."""
    sections, columns = result["sections"], list(result["threads"])
    rows = []
    for key, make in GOALS.items():
        if key not in sections:
            continue
        for goal in make(sections[key][columns[0]]):
            cells = [goal.value(sections[key][c][goal.config]) if goal.config in sections[key][c] else ""
                     for c in columns]
            headline = sections[key][columns[0]][goal.config]
            rows.append([f"{key}: {goal.label}", *cells, goal.goal, goal.limit(headline), goal.met(headline)])
    header = ["measure", *[column_label(result, c) for c in columns], "goal", "limit", "met (headline)"]
    return ["## Goals", "", table(header, rows), ""]


@dataclass(frozen=True)
class Goal:
    """One row of the goals table: which configuration of a section, and how to read it."""

    label: str
    config: str
    value: Callable[[Section], str]
    goal: str
    limit: Callable[[Section], str]
    met: Callable[[Section], str]


def training_goals(res: Section) -> list[Goal]:
    def met(c: Section) -> str:
        return verdict(c["ratios"]["splice/peft"]["q1"], c["ratios"]["splice/peft"]["q3"], 1.0)

    return [Goal(config, config, lambda c: fmt_ratio(c["ratios"]["splice/peft"]) + " x PEFT", "<= 1.0 x PEFT",
                 lambda c: "", met) for config in res if config.startswith("LoRA dropout 0.1")]


def inference_goals(res: Section) -> list[Goal]:
    def value(m: Section) -> str:
        return f"splice {fmt_pct(m['overhead']['splice'])}, PEFT {fmt_pct(m['overhead']['peft'])}"

    def met(m: Section) -> str:
        return verdict(m["overhead"]["splice"]["q1"], m["overhead"]["splice"]["q3"], 2 * m["flop_overhead"])

    return [Goal("unmerged, all-linear r=8, one adapter, over the base", "model", value,
                 "<= 2x the FLOP overhead", lambda m: f"{m['flop_overhead']:+.1%} (the added FLOPs)", met)]


def mixed_goals(res: Section) -> list[Goal]:
    def value(c: Section) -> str:
        r = c["overhead_ratio"]
        return f"{r['value']:.2f} [{r['ci95_low']:.2f} to {r['ci95_high']:.2f}] of PEFT's overhead"

    def limit(c: Section) -> str:
        one, peft = c["overhead"]["splice_one_adapter"]["median"], c["overhead"]["peft"]["median"]
        return f"one adapter on every row: {one:+.1%} ({one / peft:.2f} of PEFT's)"

    def met(c: Section) -> str:
        if not c["overhead"]["peft"]["median"] > 0:
            return "n/a (PEFT's overhead not resolved)"
        return verdict(c["overhead_ratio"]["ci95_low"], c["overhead_ratio"]["ci95_high"], 1 / 3)

    return [Goal(f"{c['adapters']} adapters, {key}", key, value, "<= 1/3 of PEFT's overhead", limit, met)
            for key, c in res.items()]


def decode_goals(res: Section) -> list[Goal]:
    def value(c: Section) -> str:
        r = c["timing"]["ratios"]
        return f"{fmt_ratio(r['base/splice'])} x base, {fmt_ratio(r['peft/splice'])} x PEFT tok/s"

    def met(c: Section) -> str:
        r = c["timing"]["ratios"]["base/splice"]
        return verdict(r["q1"], r["q3"], 0.95, lower_is_better=False)

    return [Goal(f"8 prompts x 8 adapters, {key}", key, value, ">= 0.95 x base tok/s",
                 lambda c: f"{memory_floor(c):.3f} x base (memory traffic)", met) for key in res]


def memory_floor(c: Section) -> float:
    """Best splice/base speed if decoding is bound by memory traffic: every base weight and every
    row's adapter factors are read once a step."""
    return 1 / (1 + c["bytes"]["adapter_factors"] / c["bytes"]["base_weights"])


GOALS: dict[str, Callable[[Section], list[Goal]]] = {
    "training": training_goals, "inference": inference_goals, "mixed": mixed_goals, "decode": decode_goals}


# ---------------------------------------------------------------------------------- the gaps


def gaps_md(result: dict[str, Any]) -> list[str]:
    """Where the time over the base goes, for the two goals that the hardware bounds: per layer,
    the two low-rank GEMMs alone (and whether they use the threads the base GEMM uses) against
    the hook and dispatch; for decoding, the share of the memory-traffic floor reached."""
    sections, out = result["sections"], []
    if "inference" in sections:
        rows = []
        for column, res in sections["inference"].items():
            for shape, layer in res["layers"].items():
                gemm_share = layer["absolute"]["gemms"]["median_s"] / layer["absolute"]["base"]["median_s"]
                threads = {k: layer["absolute"][k]["cpu_median_s"] / layer["absolute"][k]["median_s"]
                           for k in ("base", "gemms")}
                splice = layer["overhead"]["splice"]["median"]
                rows.append([column_label(result, column), shape, f"{layer['flop_overhead']:+.1%}", f"{gemm_share:.1%}",
                             f"{threads['base']:.2f} / {threads['gemms']:.2f}", f"{splice:+.1%}",
                             f"{splice - gemm_share:+.1%}"])
        out += ["## Where the unmerged overhead goes", "",
                "Per adapted layer shape: the added FLOPs, the two low-rank GEMMs alone (share of the base layer's "
                "time), the cores each keeps busy (CPU time / wall time, base / GEMMs), splice's whole overhead, and "
                "what is left for the hook, dispatch and the output's read-modify-write (splice minus GEMMs).", "",
                table(["column", "layer", "added FLOPs", "two GEMMs alone", "cores busy (base / GEMMs)",
                       "splice overhead", "hook and dispatch"], rows), ""]
    if "decode" in sections:
        rows = []
        for column, res in sections["decode"].items():
            for key, c in res.items():
                speed, floor = c["timing"]["ratios"]["base/splice"]["median"], memory_floor(c)
                rows.append([column_label(result, column), key, f"{speed:.3f}", f"{floor:.3f}", f"{speed / floor:.1%}",
                             "yes" if floor < 0.95 else "no"])
        out += ["## Decode against the memory-traffic floor", "",
                "A decoding step reads every base weight and every row's adapter factors; the floor is the speed "
                "relative to the base if nothing else cost time. Where the floor is below 0.95, the goal cannot be "
                "met by any kernel on this hardware without reading fewer bytes.", "",
                table(["column", "targets", "splice / base speed", "floor", "share of the floor",
                       "goal above the floor"], rows), ""]
    return out


# ------------------------------------------------------------------------------- the sections


def training_md(result: dict[str, Any], section: dict[str, Section]) -> list[str]:
    s = result["settings"]

    def body(res: Section) -> list[str]:
        rows = [[config, fmt_ratio(c["ratios"]["splice/peft"]), f"{c['ratios']['splice/peft']['cpu_median']:.3f}",
                 fmt_s(c["absolute"]["splice"]), fmt_s(c["absolute"]["peft"]), f"{c['loss_diff']:.1e}"]
                for config, c in res.items()]
        return [table(["form, targets", "splice/PEFT time", "CPU-time ratio", "splice ms", "PEFT ms",
                       "loss diff at equal weights"], rows)]

    return per_column(result, section, "Training step (MiniLM, 8 x 64, head trained)",
                      f"Forward + backward + AdamW, train mode; {s['train_pairs']} interleaved pairs after"
                      f" {s['warmup']} warm-up. Identical adapters (lora_B seeded, copied into PEFT); with dropout"
                      " the masks differ between the libraries (each draws its own).", body)


def inference_md(result: dict[str, Any], section: dict[str, Section]) -> list[str]:
    s = result["settings"]
    calls = s["layer_calls"]

    def body(res: Section) -> list[str]:
        m = res["model"]
        rows = [[name, fmt_pct(m["overhead"][name]) if name != "base" else "", fmt_s(m["absolute"][name])]
                for name in ("base", "splice", "peft")]
        layers = [[shape, c["example"], str(c["rows"]), f"{c['absolute']['base']['median_s'] / calls * 1e6:.0f}",
                   fmt_pct(c["overhead"]["splice"]), fmt_pct(c["overhead"]["peft"]), share(c["overhead"]["gemms"]),
                   f"{c['flop_overhead']:+.1%}"] for shape, c in res["layers"].items()]
        return [table(["model", "overhead over base", f"ms per {s['infer_calls']} forwards"], rows), "",
                f"Added FLOPs {m['flop_overhead']:+.2%}; max |last hidden state| difference splice-PEFT"
                f" {m['splice_vs_peft_max_diff']:.1e} (the adapter moves them by {m['adapter_vs_base_max_diff']:.2f}).",
                "", table(["layer (in -> out)", "example", "rows", "base us/call", "splice", "PEFT",
                           "two GEMMs alone (of base time)", "added FLOPs"], layers)]

    return per_column(result, section, "Unmerged inference (MiniLM encoder, 8 x 64, all-linear r=8, one adapter)",
                      f"`torch.inference_mode`, eval; {s['infer_rounds']} interleaved rounds of {s['infer_calls']}"
                      f" forwards after {s['warmup']} warm-up. Per layer: one real layer of each adapted shape alone on"
                      f" the input it sees in that forward, {s['layer_calls']} calls a round, {s['layer_rounds']}"
                      " rounds; *two GEMMs alone* is splice's fused kernel pair (`add_low_rank_`) without the"
                      " hook, so splice minus it is the hook and dispatch cost.", body)


def share(overhead: dict[str, float]) -> str:
    """A candidate's time as a share of the base's, from its overhead quartiles (t / t_base = 1 + overhead)."""
    return f"{1 + overhead['median']:.1%} [{1 + overhead['q1']:.1%} to {1 + overhead['q3']:.1%}]"


def mixed_md(result: dict[str, Any], section: dict[str, Section]) -> list[str]:
    s = result["settings"]

    def body(res: Section) -> list[str]:
        rows = []
        for key, c in res.items():
            o, r = c["overhead"], c["overhead_ratio"]
            rows.append([key, fmt_s(c["absolute"]["base"]), fmt_pct(o["splice"]), fmt_pct(o["peft"]),
                         fmt_pct(o["splice_one_adapter"]),
                         f"{r['value']:.2f} [{r['ci95_low']:.2f} to {r['ci95_high']:.2f}]",
                         f"{c['splice_vs_peft_max_diff']:.1e}"])
        return [table(["targets", "base ms", "splice route", "PEFT adapter_names", "splice, one adapter",
                       "overhead ratio splice/PEFT [95% CI]", "max diff splice-PEFT"], rows)]

    return per_column(result, section, f"Mixed batch (MiniLM, 32 x 48, {s['mixed_adapters']} adapters)",
                      f"Row i -> adapter i mod {s['mixed_adapters']}, `torch.inference_mode`; {s['mixed_rounds']}"
                      " interleaved rounds; overheads over the base model; `route` entered inside the timed call.",
                      body)


def decode_md(result: dict[str, Any], section: dict[str, Section]) -> list[str]:
    s = result["settings"]

    def body(res: Section) -> list[str]:
        rows = []
        for key, c in res.items():
            tps, r, b = c["tokens_per_s"], c["timing"]["ratios"], c["bytes"]
            rows.append([key, f"{tps['base']:.1f}", f"{tps['base_frozen']:.1f}", f"{tps['splice']:.1f}",
                         f"{tps['peft']:.1f}", fmt_ratio(r["base/splice"]), fmt_ratio(r["base_frozen/splice"]),
                         fmt_ratio(r["peft/splice"]),
                         f"{b['adapter_factors'] / 2**20:.1f} / {b['base_weights'] / 2**20:.0f} MB",
                         f"{memory_floor(c):.3f}", f"{c['same_tokens_splice_peft']:.1%}",
                         f"{c['tokens_changed_vs_base']:.0%}"])
        return [table(["targets", "base tok/s", "frozen base tok/s", "splice tok/s", "PEFT tok/s",
                       "splice/base speed", "splice/frozen base speed", "splice/PEFT speed", "factors / base weights",
                       "memory floor", "same tokens splice-PEFT", "tokens changed by adapters"], rows)]

    return per_column(result, section, "Decode (SmolLM2-135M, 8 prompts x 8 adapters)",
                      f"Greedy `generate`, {s['new_tokens']} new tokens (min = max), KV cache; {s['decode_rounds']}"
                      " interleaved rounds after one untimed call of each (whose tokens are compared). Speed ="
                      " median per-round t_other / t_splice. The base runs as loaded and as a frozen copy (the"
                      " adapted models' base is frozen; with a frozen lm_head torch runs the prefill's last-token"
                      " logits as a bmm over an expanded weight instead of one mm). Memory floor = 1 / (1 + factor"
                      " bytes / weight bytes): the best splice/base speed when a step is bound by reading weights.",
                      body)


SECTIONS: dict[str, Callable[[dict[str, Any], dict[str, Section]], list[str]]] = {
    "training": training_md, "inference": inference_md, "mixed": mixed_md, "decode": decode_md}
