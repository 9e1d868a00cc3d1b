"""What a BoostLoRA run leaves in `<output_dir>/report/` (written whole, `atomic_directory`):
boost.json (settings, every round, the scores), boost.md (the rounds as a table) and boost.png
(validation score, training error and the rank of W - W0 against the round)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.io.figures import pyplot, save_png
from splice.io.files import atomic_directory, write_json, write_text

if TYPE_CHECKING:
    from splice.boost.boostlora import BoostResult


def write_report(result: BoostResult, folder: Path) -> Path:
    """Write the report folder; its path."""
    data = result.to_dict()
    with atomic_directory(folder, overwrite=True) as tmp:
        write_json(tmp / "boost.json", data)
        write_text(tmp / "boost.md", markdown(data))
        if data["rounds"]:
            plot_rounds(data, tmp / "boost.png")
    return folder


def _shown(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(data: dict[str, Any]) -> str:
    """The rounds and the outcome as markdown."""
    s, metric = data["settings"], data["metric"]
    lines = [
        "# BoostLoRA",
        "",
        f"TinyLoRA r={s['r']}, u={s['u']}, {'rotating' if s['rotate'] else 'fixed'} singular slices; "
        f"{'round 0 on every row, then ' if s['first_round_all'] else ''}mining {s['mine']} (mix_correct "
        f"{s['mix_correct']}); {s['steps_per_round']} steps a round, at most "
        f"{s['rounds']} rounds. Stopped: {data['stop_reason']}; {data['kept']} round(s) kept.",
        "",
        f"| round | slice | rows wrong | trained on | steps | validation {metric} before | after | kept | "
        "rank of W - W0 (mean) | trained parameters |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in data["rounds"]:
        lines.append(f"| {r['round']} | {r['offset']} | {r['failing']} ({r['train_error_before']:.1%}) | "
                     f"{r['trained_rows']} | {r['steps']} | {_shown(r['validation_before'])} | "
                     f"{_shown(r['validation_after'])} | {'yes' if r['kept'] else 'no'} | {r['rank']['mean']:.1f} | "
                     f"{r['trainable']} ({r['adapter_parameters']} TinyLoRA) |")
    lines.append("")
    scores = [f"{split} {name} {value:.4f}" for split in ("validation", "test")
              for name, value in data[split].items()]
    if data["train_error"] is not None:
        scores.insert(0, f"training error {data['train_error']:.4f}")
    lines += ["Boosted model: " + (", ".join(scores) or "no scores") + ".", ""]
    if data["adapter"]:
        lines += [f"The whole change as a LoRA for the original base: `{data['adapter']}`.", ""]
    return "\n".join(lines)


def plot_rounds(data: dict[str, Any], path: Path) -> Path:
    """Validation score (before each round, then after the last kept one), training error and
    the mean rank of W - W0, against the round."""
    plt = pyplot()
    rounds = data["rounds"]
    fig, (score_ax, rank_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["round"] for r in rounds]
    validation = [r["validation_after"] if r["kept"] else r["validation_before"] for r in rounds]
    if any(v is not None for v in validation):
        score_ax.plot(xs, validation, marker="o", label=f"validation {data['metric']} after the round")
    score_ax.plot(xs, [r["train_error_before"] for r in rounds], marker="s", label="training error before the round")
    for r in rounds:
        if not r["kept"]:
            score_ax.axvline(r["round"], color="grey", linestyle=":", linewidth=1)
    score_ax.set_xlabel("round")
    score_ax.legend(fontsize=8)
    score_ax.set_title("scores (dotted: round undone)")
    rank_ax.plot(xs, [r["rank"]["mean"] for r in rounds], marker="o", label="mean")
    rank_ax.fill_between(xs, [r["rank"]["min"] for r in rounds], [r["rank"]["max"] for r in rounds], alpha=0.2,
                         label="min-max over modules")
    rank_ax.set_xlabel("round")
    rank_ax.set_ylabel("rank of W - W0")
    rank_ax.legend(fontsize=8)
    rank_ax.set_title("rank of the merged change")
    fig.tight_layout()
    return save_png(fig, path)
