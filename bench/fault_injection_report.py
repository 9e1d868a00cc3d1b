"""bench_fault_injection.py's rendering: the markdown report from the result JSON alone (`--render` needs no
model and measures nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench_fault_injection import OUTCOMES

if TYPE_CHECKING:
    from bench_fault_injection import Settings


def markdown(result: dict[str, Any], s: Settings) -> str:
    from common import heading, table

    w = result["writers"]
    swap = "renameat2 RENAME_EXCHANGE" if result["environment"].get("rename_exchange") else "two renames"
    out = [*heading("Fault injection: SIGKILL during an adapter overwrite, then load", result["environment"]), ""]
    if s.quick:
        out += ["**Quick run: smoke test only, too few kills to read as rates.**", ""]
    out += [f"{s.kills} SIGKILLs per writer, each at a random moment 0 to {s.delay:g} save durations after the"
            " child's first save began, the child overwriting the folder with versions A and B alternately;"
            f" every {s.fresh_every}th kill during a fresh save (no folder before). After each kill the folder is"
            " loaded with `splice.load` onto a fresh base and its outputs compared bit for bit. `before` is the"
            " code at HEAD~3 (config rewritten in place, then the weights); `after` is `splice.save` now"
            f" (temporary sibling, fsync, {swap}).",
            "", table(["writer", "kills", "old", "new", "refused", "mixed", "other", "save ms: warm / a child's first",
                        "kills leaving leftovers (most at once)", "leftovers after one more clean save"],
                       [[name, str(r["kills"]), *(str(r[o]) for o in OUTCOMES),
                         f"{r['save_ms']:.1f} / {r['first_save_ms'] or 0:.1f}",
                         f"{r['rounds_with_leftovers']} ({r['leftovers_after_kill_max']})",
                         str(len(r["leftovers_after_final_save"]))]
                        for name, r in w.items()]), ""]
    out += ["old / new: exactly the folder before the save in flight / exactly what it was writing; refused: a"
            " SpliceError; mixed: loaded without error, outputs of neither version; other: any other exception."
            " Leftovers: temporaries next to the folder (`after`: the killed child's, removed by the next save) or"
            " files in it besides the adapter's two (`before`: safetensors' `.tmp*`, never removed by a save).", ""]
    for name, r in w.items():
        fresh = ", ".join(f"{k} {v}" for k, v in sorted(r["fresh"].items()))
        saves = {int(k): v for k, v in r["saves_before_kill"].items()}  # JSON made the keys strings
        out += [f"- **{name}**: {r['fresh_rounds']} rounds began with no folder; in {r['fresh_save_kills']} the kill"
                f" landed in that fresh save: {fresh}. Saves the child finished before its kill (count of kills):"
                f" {saves}. Left after the final clean save:"
                f" {r['leftovers_after_final_save'] or 'nothing'}."]
        for outcome, details in r["details"].items():
            out += [f"  - {outcome}: " + "; ".join(f"`{d[:160]}`" for d in details)]
    out += ["", f"Total run time {result['total_s']:.0f} s."]
    return "\n".join(out)
