"""The Geometric Forgetting Law on a real two-task run: MiniLM + LoRA, Rotten Tomatoes then BBC News
and the reverse (volume 2, §3; `splice.analysis.forgetting`).

What: for each order, LoRA rank and seed, train one LoRA (query, value; alpha = 2r) on task A,
then carry it over and train it on task B; record the accuracy matrix a[t][j] on both tasks'
validation rows, task A's forgetting F = a[0][A] - a[1][A], and θ_min between the two tasks'
gradient subspaces (k gradient samples dL/dW per adapted layer, mean over the 12 layers); then fit
F = a (1 - cos² θ_min) + b and report a, b, R² honestly, whatever they are.

Two places to measure θ_min, both reported:
- "init": both tasks' gradients at the untrained model (pretrained weights, B = 0, fresh heads).
  This is the tasks' geometry at the pretrained model; it does not depend on the rank (dL/dW at
  ΔW = 0 is the same for every LoRA) nor on the order, so the two orders share it.
- "switch": both tasks' gradients at the model after training A, when B starts (A with its
  trained head, B with its fresh one): the overlap at the moment the interference happens.

Heads: the two tasks have different label sets (2 vs 5 classes), so each task has its own linear
head (the adapter's own copy of the classifier, initialised by transformers), trained in full with
its task; only the LoRA is carried over (`TrainConfig.init_adapter`: the adapter without its
heads). Task A is evaluated with its own head after training B (B's LoRA copied under A's head),
so F measures what the shared encoder (the LoRA) forgot, not a head being retrained.

Training is `splice.train.Trainer` (one per task, a fresh optimizer each): AdamW, lr 2e-3 for the
LoRA and 1e-2 for the head, weight decay 0.01, cosine schedule with 6% warm-up, clipping at 1.0,
batch 16, 64 tokens, backbone dropout on, one epoch of steps * 16 rows, one evaluation at the end
(the trainer keeps the better of the start and the end; the end in every run so far).
Defaults: r in {4, 16}, seeds {0, 1}, 80 steps on RT and 40 on BBC (which learns faster). A first
run with r in {2, 8} and 60 steps each left RT at chance with r = 2 (nothing learned, so F = 0 for
a reason that has nothing to do with geometry), hence the longer RT phase and larger ranks.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_forgetting.py            # ~12 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_forgetting.py --quick    # ~2 min smoke run

Writes bench/results/forgetting.{json,md,png} (`forgetting_quick.*` for --quick).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline / quiet environment before transformers)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import splice  # noqa: E402
from splice.analysis.forgetting import (  # noqa: E402
    fit_forgetting_law,
    forgetting,
    gradient_subspace,
    subspace_angle,
)
from splice.train import TrainConfig, Trainer, tasks  # noqa: E402
from splice.train.data import collator, load_splits  # noqa: E402

TASKS = ("rotten_tomatoes", "bbc_news")
SHORT = {"rotten_tomatoes": "RT", "bbc_news": "BBC"}
BATCH, MAX_LEN, EVAL_BATCH = 16, 64, 64


QUIET = Console(quiet=True)


def make_config(data: str, rank: int, seed: int, steps: int, eval_rows: int, out: Path,
                init_adapter: Path | None = None) -> TrainConfig:
    return TrainConfig(
        model="minilm", data=data, adapter={"method": "lora", "r": rank, "alpha": 2 * rank,
                                            "targets": ["query", "value"]},
        max_length=MAX_LEN, batch_size=BATCH, lr=2e-3, head_lr=1e-2, weight_decay=0.01, warmup_ratio=0.06,
        max_steps=steps, max_train_examples=steps * BATCH, max_eval_examples=eval_rows, max_grad_norm=1.0,
        eval_every=steps, checkpoint_every=None, seed=seed, output_dir=str(out),
        init_adapter=None if init_adapter is None else str(init_adapter),
    )


def logits_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the model's logits (the gradient samples of `gradient_subspace`)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits, batch["labels"])


def fresh_model(config: TrainConfig) -> nn.Module:
    """The untrained model of a task as `Trainer.from_config` builds it (B = 0, a fresh head)."""
    splits = load_splits(config)
    model, _ = tasks.load_model(config, splits.label_names)
    return splice.attach(model, tasks.adapter_config(config, model))


def carry_adapter(source: nn.Module, target: nn.Module) -> None:
    """Copy the LoRA tensors of `source` into `target` (same backbone and targets); heads stay."""
    theirs = splice.trainable_parameters(source)
    with torch.no_grad():
        for name, p in splice.trainable_parameters(target).items():
            if not name.startswith("classifier.") and name in theirs:
                p.copy_(theirs[name])


def sequential_run(order: tuple[str, str], rank: int, seed: int, args: argparse.Namespace,
                   init_angles: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Train one LoRA on order[0] then order[1] with `splice.train.Trainer`; the matrix, F and θ_min.

    Task A is a `Trainer` from its config; task B a `Trainer` whose config continues A's saved
    adapter (`init_adapter`) with B's own fresh head. θ_min at init is the same for every rank
    and both orders of one seed (same pretrained weights, ΔW = 0, same heads, same gradient
    batches), so it is measured once per seed and kept in `init_angles`.
    """
    tick = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="forgetting-"))
    common.seed_everything(seed)
    config_a = make_config(order[0], rank, seed, args.steps[order[0]], args.eval_rows, work / "a")
    first = Trainer.from_config(config_a, console=QUIET)
    timings = {"load_s": time.perf_counter() - tick, "angles_s": 0.0}

    def subspace(model: nn.Module, rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        loader = DataLoader(rows, batch_size=BATCH, shuffle=True, collate_fn=collator("classification", tokenizer,
                                                                                     MAX_LEN),
                            generator=torch.Generator().manual_seed(seed + 1000))
        model.eval()
        return gradient_subspace(model, [b for b, _ in zip(loader, range(args.k), strict=False)], logits_loss,
                                 k=args.k)

    def angle(a: tuple, b: tuple) -> dict[str, Any]:
        start = time.perf_counter()
        found = subspace_angle(subspace(*a), subspace(*b))
        timings["angles_s"] += time.perf_counter() - start
        return {"mean": found.mean, "min": found.min, "per_module": found.per_module}

    if seed not in init_angles:
        config_b = make_config(order[1], rank, seed, args.steps[order[1]], args.eval_rows, work / "unused")
        fresh_b = fresh_model(config_b)
        init_angles[seed] = angle((first.plain_model, first.train_rows, first.tokenizer),
                                  (fresh_b, load_splits(config_b).train, first.tokenizer))
    angles = {"init": init_angles[seed]}
    result_a = first.fit()
    config_b = make_config(order[1], rank, seed, args.steps[order[1]], args.eval_rows, work / "b",
                           init_adapter=work / "a" / "adapter")
    second = Trainer.from_config(config_b, console=QUIET)  # A's LoRA, B's own fresh head
    angles["switch"] = angle((first.plain_model, first.train_rows, first.tokenizer),
                             (second.plain_model, second.train_rows, second.tokenizer))
    result_b = second.fit()
    carry_adapter(second.plain_model, first.plain_model)  # A's head on the LoRA after B
    start = time.perf_counter()
    a_after_b = first.evaluate(["validation"], generate=False)["validation"]["accuracy"]

    matrix = [[accuracy(result_a, "after"), accuracy(result_b, "before")],
              [a_after_b, accuracy(result_b, "after")]]
    timings.update(train_s=result_a.timings["train_s"] + result_b.timings["train_s"],
                   eval_s=sum(r.timings.get(k, 0.0) for r in (result_a, result_b)
                              for k in ("eval_before_s", "eval_after_s")) + time.perf_counter() - start)
    shutil.rmtree(work, ignore_errors=True)
    result = {"order": [SHORT[t] for t in order], "rank": rank, "seed": seed, "matrix": matrix,
              "forgetting": forgetting(matrix)[0], "theta": angles,
              "seconds": {**timings, "total_s": time.perf_counter() - tick}}
    print_point(result)
    return result


def accuracy(result: Any, when: str) -> float:
    """Validation accuracy of a run's result, before or after its training."""
    return result.metrics[when]["validation"]["accuracy"]


def print_point(r: dict[str, Any]) -> None:
    matrix = [[round(v, 3) for v in row] for row in r["matrix"]]
    print(f"  {'->'.join(r['order'])} r={r['rank']} seed={r['seed']}: a={matrix}"
          f" F={r['forgetting']:+.3f} θ_init={math.degrees(r['theta']['init']['mean']):.2f}°"
          f" θ_switch={math.degrees(r['theta']['switch']['mean']):.2f}°"
          f" ({', '.join(f'{k} {v:.0f}' for k, v in r['seconds'].items())})", flush=True)


def fits(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The law fitted on every point and per order, with θ from each place and each aggregate."""
    out = {}
    orders = {"->".join(r["order"]) for r in runs}
    groups = {"all": runs, **{o: [r for r in runs if "->".join(r["order"]) == o] for o in orders}}
    for where in ("init", "switch"):
        for aggregate in ("mean", "min"):
            for group, points in sorted(groups.items()):
                key = f"{where}/{aggregate}/{group}"
                try:
                    law = fit_forgetting_law([p["theta"][where][aggregate] for p in points],
                                             [p["forgetting"] for p in points])
                    out[key] = {"a": law.a, "b": law.b, "r2": law.r2, "r": law.r, "n": law.n}
                except splice.SpliceError as err:  # every angle equal: nothing to fit
                    out[key] = {"error": str(err), "n": len(points)}
    return out


def rank_cv(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Coefficient of variation of F over ranks, per order and seed (the paper: 10-19% on real tasks)."""
    out = {}
    for key in sorted({("->".join(r["order"]), r["seed"]) for r in runs}):
        values = [r["forgetting"] for r in runs if ("->".join(r["order"]), r["seed"]) == key]
        if len(values) > 1:
            mean = statistics.mean(values)
            cv = statistics.pstdev(values) / abs(mean) if mean else None
            out[f"{key[0]} seed {key[1]}"] = {"F": values, "cv": cv}
    return out


def plot(runs: list[dict[str, Any]], laws: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(sorted({r["rank"] for r in runs}), "os^Dv<>", strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, where in zip(axes, ("init", "switch"), strict=True):
        for order, color in (("RT->BBC", "tab:red"), ("BBC->RT", "tab:blue")):
            points = [r for r in runs if "->".join(r["order"]) == order]
            for r in points:
                x = 1 - math.cos(r["theta"][where]["mean"]) ** 2
                ax.scatter(x, r["forgetting"], color=color, marker=markers[r["rank"]], s=30,
                           label=f"{order} r={r['rank']}")
        law = laws.get(f"{where}/mean/all", {})
        xs = [1 - math.cos(r["theta"][where]["mean"]) ** 2 for r in runs]
        if "a" in law and max(xs) > min(xs):
            grid = [min(xs), max(xs)]
            ax.plot(grid, [law["a"] * x + law["b"] for x in grid], "k--",
                    label=f"fit a={law['a']:.2f} b={law['b']:.3f} R²={law['r2']:.2f}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set_xlabel(f"1 - cos² θ_min ({where}, mean over layers)")
        ax.set_ylabel("F = acc_A(after A) - acc_A(after A then B)")
        ax.set_title(f"θ_min measured at {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict[str, Any]) -> str:
    s, runs, laws = result["settings"], result["runs"], result["fits"]
    lines = [
        "# Geometric Forgetting Law: MiniLM + LoRA, Rotten Tomatoes <-> BBC News",
        "",
        common.environment_line(result["environment"]),
        "",
        f"LoRA r in {s['ranks']} (alpha 2r) on query, value; seeds {s['seeds']}; {s['steps']['rotten_tomatoes']}"
        f" steps on RT and {s['steps']['bbc_news']} on BBC, batch {BATCH}; validation accuracy on the first"
        f" {s['eval_rows']} rows; k = {s['k']} gradient samples"
        " dL/dW per layer; θ_min = mean over the 12 adapted layers. Each task keeps its own head; task A is"
        " evaluated with its own head after B. Total "
        f"{result['total_s'] / 60:.1f} min.",
        "",
        "## Points",
        "",
    ]
    def degrees(theta: dict[str, Any]) -> str:
        return f"{math.degrees(theta['mean']):.2f}° / {math.degrees(theta['min']):.2f}°"

    rows = []
    for r in runs:
        (aa, _), (ba, bb) = r["matrix"]
        rows.append(["->".join(r["order"]), str(r["rank"]), str(r["seed"]), f"{aa:.3f}", f"{ba:.3f}",
                     f"{r['forgetting']:+.3f}", f"{bb:.3f}", degrees(r["theta"]["init"]),
                     degrees(r["theta"]["switch"])])
    lines.append(common.table(["order A->B", "r", "seed", "acc_A after A", "acc_A after B", "F", "acc_B after B",
                               "θ_min init (mean / min)", "θ_min switch (mean / min)"], rows))
    lines += ["", "## Fits of F = a (1 - cos² θ_min) + b", ""]
    fit_rows = []
    for key, law in laws.items():
        where, aggregate, group = key.split("/")
        if "a" in law:
            fit_rows.append([where, aggregate, group, str(law["n"]), f"{law['a']:+.3f}", f"{law['b']:+.4f}",
                             f"{law['r2']:.3f}", f"{law['r']:+.3f}"])
        else:
            fit_rows.append([where, aggregate, group, str(law["n"]), "-", "-", "-", "(all angles equal)"])
    lines.append(common.table(["θ measured at", "over layers", "points", "n", "a", "b", "R²", "r"], fit_rows))
    if result["rank_cv"]:
        lines += ["", "## F across ranks (CV = std / |mean|)", ""]
        lines.append(common.table(["order, seed", "F per rank", "CV"], [
            [key, " ".join(f"{v:+.3f}" for v in entry["F"]), f"{entry['cv']:.1%}" if entry["cv"] is not None else "-"]
            for key, entry in result["rank_cv"].items()]))
    lines += ["", f"Plot: `{result['plot']}`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: r=4, one seed, 20 / 10 steps (~2 min)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rt-steps", type=int, default=80, help="optimizer steps on Rotten Tomatoes")
    parser.add_argument("--bbc-steps", type=int, default=40, help="optimizer steps on BBC News (learns faster)")
    parser.add_argument("--eval-rows", type=int, default=160)
    parser.add_argument("--k", type=int, default=6, help="gradient samples (mini-batches) per subspace")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=common.HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.seeds, args.rt_steps, args.bbc_steps, args.eval_rows, args.k = [4], [0], 20, 10, 48, 4
    args.steps = {"rotten_tomatoes": args.rt_steps, "bbc_news": args.bbc_steps}
    torch.set_num_threads(args.threads)
    env = common.environment(args.threads)
    started = time.perf_counter()
    runs, init_angles = [], {}
    for order in (TASKS, TASKS[::-1]):
        for seed in args.seeds:
            for rank in args.ranks:
                runs.append(sequential_run(order, rank, seed, args, init_angles))
    stem = "forgetting_quick" if args.quick else "forgetting"
    laws = fits(runs)
    env["loadavg_end"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.out_dir / f"{stem}.png"
    plot(runs, laws, plot_path)
    result = {"settings": {"ranks": args.ranks, "seeds": args.seeds, "steps": args.steps, "eval_rows": args.eval_rows,
                           "k": args.k, "batch": BATCH, "max_length": MAX_LEN, "quick": args.quick},
              "environment": env, "runs": runs, "fits": laws, "rank_cv": rank_cv(runs),
              "total_s": time.perf_counter() - started, "plot": plot_path.name}
    common.write_results(args.out_dir, stem, result, report(result))


if __name__ == "__main__":
    main()
