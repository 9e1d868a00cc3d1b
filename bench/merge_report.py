"""bench_merge.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common_report import environment_line, fmt_ratio, fmt_s, heading, table

if TYPE_CHECKING:
    from merge_setup import Settings


def cell(res: dict[str, Any]) -> tuple[str, str]:
    if "error" in res:
        return "raises", "-"
    return (f"{res['rel_error']:.1e} (worst {res['worst_tensor_rel_error']:.1e})",
            f"{res['logits_max_abs_diff']:.1e}")


def correctness_md(sec: dict[str, Any], s: Settings) -> list[str]:
    rows, raised = [], []
    for case, row in sec["cases"].items():
        for rule, res in row["rules"].items():
            p, q = res["peft"], res["splice"]
            rows.append([case, rule, *cell(p), *cell(q), f"{res['target_logit_change_max']:.2f}"])
            for lib in ("peft", "splice"):
                if "error" in res[lib]:
                    raised.append(f"- {case}, {rule}, {lib}: `{res[lib]['error']}`")
    out = [table(["case", "rule", "PEFT ‖Δ−target‖/‖target‖", "PEFT max abs Δlogit",
                  "splice ‖Δ−target‖/‖target‖", "splice max abs Δlogit", "target's max abs logit change"], rows), ""]
    svd8 = [[case, f"{row['rules'][name]['target_vs_sum']:.3f}",
             *(f"{row['rules'][name][lib]['rel_error_vs_sum']:.3f}" if "rel_error_vs_sum" in row["rules"][name][lib]
               else "raises" for lib in ("peft", "splice"))]
            for case, row in sec["cases"].items() for name in ["svd rank 8"] if name in row["rules"]]
    if svd8:
        out += ["Truncation to rank 8, measured against the untruncated Σ w_i ΔW_i instead (‖Δ − Σ‖/‖Σ‖; the"
                " best rank-8 matrix per module is the floor for a plain LoRA result; a DoRA result is not a rank-8"
                " change, as its magnitude rescales W too, so there the floor does not apply):", "",
                table(["case", "best rank-8 (floor)", "PEFT svd rank 8", "splice svd rank 8"], svd8), ""]
    if raised:
        out += ["Errors raised:", "", *raised, ""]
    return out


def timing_md(sec: dict[str, Any]) -> list[str]:
    a, r = sec["absolute"], sec["ratios"]
    rows = [[rule, fmt_s(a[f"splice {rule}"]), fmt_s(a[f"peft {rule}"]), fmt_ratio(r[f"splice {rule}/peft {rule}"])]
            for rule in ("linear", "svd")]
    return [table(["rule", "splice min / median ms", "PEFT min / median ms", "splice / PEFT, median [IQR]"], rows), ""]


def accuracy_md(sec: dict[str, Any], s: Settings) -> list[str]:
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in sec["test"].items()]
    runs = "; ".join(f"half {r['half']}: best step {r['best_step']}, validation accuracy"
                     f" {r['validation_accuracy']:.3f}, {r['train_s']:.0f} s" for r in sec["runs"])
    return [f"Two LoRA r=8 (alpha 16, query,value, head trained), seed 0 each, {s.steps} steps of batch {s.batch},"
            f" max length {s.train_max_length}, lr {s.lr} (head {s.head_lr}), on the two halves"
            f" ({sec['train_rows'][0]} and {sec['train_rows'][1]} rows) of the Rotten Tomatoes training split;"
            f" test accuracy on {sec['test_rows']} test reviews. Runs: {runs}. Merges by splice, heads averaged.", "",
            table(["adapter", "test accuracy"], rows), ""]


def markdown(result: dict[str, Any], s: Settings) -> str:
    sec = result["sections"]
    out = [*heading("Merging adapters: splice `merge_adapters` vs HF PEFT `add_weighted_adapter` (MiniLM, CPU)",
                    result["environment"]), ""]
    if s.quick:
        out += ["**Quick run: smoke test only, too few cases and rounds to trust.**", ""]
    if "correctness_rerun" in result:
        rerun = result["correctness_rerun"]
        out += [f"Correctness section re-run: {environment_line(rerun['environment'])} ({rerun['why']}).", ""]
    if "correctness" in sec:
        out += ["## Correctness against the true weight change", "",
                f"Two random adapters on query,value of MiniLM (12 modules), weights {s.weights}; the target of"
                " cat, linear and svd at rank 16 is Σ w_i ΔW_i with ΔW_i each adapter's true change (merged alone"
                " by PEFT and diffed); of svd rank 8 its best rank-8 truncation per matrix; of ties the rule (PEFT's"
                " `merge_utils.ties`, density 0.5) on the dense changes [ΔW_i | Δb_i]. Errors are relative Frobenius"
                " norms over all parameters (worst single tensor in brackets); logits on"
                f" {s.reviews} Rotten Tomatoes reviews. For ties both libraries keep rank 384 (all of it):"
                " PEFT through `ties_svd` (the dense rule, then an SVD), splice with `rank=384`; the factor-wise"
                " row is PEFT's `ties`, which applies the rule to A and to B separately. PEFT's `linear` also"
                " combines A and B separately (its docs call it an approximation), so it is not Σ w_i ΔW_i even"
                " for plain LoRA; PEFT's `cat` and `svd` are its exact rules.", "",
                *correctness_md(sec["correctness"], s)]
    if "timing" in sec:
        out += ["## Merge time (plain LoRA case, adapters in memory)", "",
                f"{s.rounds} interleaved rounds after {s.warmup} warm-up; {sec['timing']['modules']} modules."
                " PEFT `linear` is a weighted sum of the factors (no SVD); splice `linear` builds Σ w_i ΔW_i and"
                " re-factors it to its numerical rank with an SVD in float64; `svd` at rank 16 is an SVD in both.",
                "", *timing_md(sec["timing"])]
    if "accuracy" in sec:
        out += ["## Accuracy of merged adapters (Rotten Tomatoes)", "", *accuracy_md(sec["accuracy"], s)]
    out += [f"Total run time {result['total_s']:.0f} s."]
    return "\n".join(out)
