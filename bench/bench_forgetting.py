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
head (initialised as transformers initialises BERT's classifier), trained in full with its task
and then kept aside; only the LoRA is carried over. Task A is evaluated with its own head after
training B, so F measures what the shared encoder (the LoRA) forgot, not a head being retrained.

Training mirrors `splice.train.run` (the settings come from a `TrainConfig`; its data loading and
collation are used): AdamW, lr 2e-3 for the LoRA and 1e-2 for the head, weight decay 0.01, cosine
schedule with 6% warm-up, clipping at 1.0, batch 16, 64 tokens, backbone dropout on, one epoch of
steps * 16 rows. `run` itself is not used: it always builds a fresh model and adapter, and a
sequential run needs the adapter carried from one task to the next. A fresh optimizer per task.
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
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline / quiet environment before transformers)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

import splice  # noqa: E402
from splice.analysis.forgetting import (  # noqa: E402
    accuracy_matrix,
    fit_forgetting_law,
    forgetting,
    gradient_subspace,
    subspace_angle,
)
from splice.train import TrainConfig, tasks  # noqa: E402
from splice.train.data import collator, load_splits, train_loader  # noqa: E402

TASKS = ("rotten_tomatoes", "bbc_news")
SHORT = {"rotten_tomatoes": "RT", "bbc_news": "BBC"}
BATCH, MAX_LEN, EVAL_BATCH = 16, 64, 64


@dataclass
class Task:
    """One task of a sequential run: its rows, its own head, its loaders."""

    name: str
    config: TrainConfig
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    head: nn.Linear


def make_config(data: str, rank: int, seed: int, steps: int, eval_rows: int) -> TrainConfig:
    return TrainConfig(
        model="minilm", data=data, adapter={"method": "lora", "r": rank, "alpha": 2 * rank,
                                            "targets": ["query", "value"]},
        max_length=MAX_LEN, batch_size=BATCH, lr=2e-3, head_lr=1e-2, weight_decay=0.01, warmup_ratio=0.06,
        max_steps=steps, max_train_examples=steps * BATCH, max_eval_examples=eval_rows, max_grad_norm=1.0,
        seed=seed, output_dir="runs/unused",
    )


def fresh_head(hidden: int, labels: int, std: float, seed: int) -> nn.Linear:
    """A classifier as transformers initialises BERT's: weight ~ N(0, std), bias 0."""
    head = nn.Linear(hidden, labels)
    with torch.no_grad():
        head.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        head.bias.zero_()
    return head


def logits_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the current head's logits (the model's own loss assumes its first label count)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits, batch["labels"])


def sequential_run(order: tuple[str, str], rank: int, seed: int, args: argparse.Namespace,
                   init_angles: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Train one LoRA on order[0] then order[1]; the matrix, F and both θ_min measurements.

    θ_min at init is the same for every rank and both orders of one seed (same pretrained
    weights, ΔW = 0, same heads, same gradient batches), so it is measured once per seed and
    kept in `init_angles`.
    """
    tick = time.perf_counter()
    configs = [make_config(data, rank, seed, args.steps[data], args.eval_rows) for data in order]
    splits = [load_splits(c) for c in configs]
    common.seed_everything(seed)
    model, tokenizer = tasks.load_model(configs[0], splits[0].label_names)
    splice.attach(model, configs[0].adapter_config())  # the LoRA only: the heads are handled below
    lora = list(splice.trainable_parameters(model).values())
    std = model.config.initializer_range
    run_tasks = [Task(c.data, c, s.train, s.validation, fresh_head(model.config.hidden_size, len(s.label_names),
                                                                    std, seed * 10 + TASKS.index(c.data)))
                 for c, s in zip(configs, splits, strict=True)]
    collate = collator("classification", tokenizer, MAX_LEN)

    def use_head(task: Task) -> None:
        model.classifier = task.head

    def gradient_batches(task: Task) -> list[dict[str, torch.Tensor]]:
        loader = DataLoader(task.train_rows, batch_size=BATCH, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(seed + 1000))
        return [batch for batch, _ in zip(loader, range(args.k), strict=False)]

    timings = {"load_s": time.perf_counter() - tick, "angles_s": 0.0, "train_s": 0.0, "eval_s": 0.0}

    def angle_now() -> dict[str, Any]:
        """θ_min between the two tasks' gradient subspaces at the model as it is, each with its head."""
        start = time.perf_counter()
        model.eval()
        spaces = []
        for task in run_tasks:
            use_head(task)
            spaces.append(gradient_subspace(model, gradient_batches(task), logits_loss, k=args.k))
        angle = subspace_angle(*spaces)
        timings["angles_s"] += time.perf_counter() - start
        return {"mean": angle.mean, "min": angle.min, "per_module": angle.per_module}

    if seed not in init_angles:
        init_angles[seed] = angle_now()
    angles = {"init": init_angles[seed]}

    def train(task: Task) -> None:
        if task is run_tasks[1]:
            angles["switch"] = angle_now()  # after A, before B
        start = time.perf_counter()
        use_head(task)
        model.train()
        optimizer = torch.optim.AdamW([{"params": lora, "lr": task.config.lr},
                                       {"params": list(task.head.parameters()), "lr": task.config.head_lr}],
                                      weight_decay=task.config.weight_decay)
        steps = task.config.max_steps
        schedule = get_cosine_schedule_with_warmup(
            optimizer, int(task.config.warmup_ratio * steps), steps)
        loader = train_loader(task.train_rows, task.config, collate)
        for _, batch in zip(range(steps), loader, strict=False):
            loss = logits_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*lora, *task.head.parameters()], task.config.max_grad_norm)
            optimizer.step()
            schedule.step()
        timings["train_s"] += time.perf_counter() - start

    @torch.no_grad()
    def evaluate(task: Task) -> float:
        start = time.perf_counter()
        use_head(task)
        model.eval()
        correct = 0
        for batch in DataLoader(task.eval_rows, batch_size=EVAL_BATCH, collate_fn=collate):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        timings["eval_s"] += time.perf_counter() - start
        return correct / len(task.eval_rows)

    matrix = accuracy_matrix(run_tasks, train, evaluate)
    result = {"order": [SHORT[t] for t in order], "rank": rank, "seed": seed, "matrix": matrix,
              "forgetting": forgetting(matrix)[0], "theta": angles,
              "seconds": {**timings, "total_s": time.perf_counter() - tick}}
    print(f"  {'->'.join(result['order'])} r={rank} seed={seed}: a={[[round(v, 3) for v in row] for row in matrix]}"
          f" F={result['forgetting']:+.3f} θ_init={math.degrees(angles['init']['mean']):.2f}°"
          f" θ_switch={math.degrees(angles['switch']['mean']):.2f}°"
          f" ({', '.join(f'{k} {v:.0f}' for k, v in result['seconds'].items())})", flush=True)
    return result


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
