"""JACTUS (joint compression and adaptation) against compress-then-LoRA and uncompressed LoRA, on
the bundled MiniLM (CPU).

What it measures, at one retained budget (80% of the compressed layers' weight numbers):

toy          the planted-direction toy of the method's spec (volume 1, §8, test 3): a 32 x 32 linear
             layer W = rank-4 signal + noise; the task adds u* v*ᵀ with u*, v* W's weakest singular
             directions, and its inputs vary most along v*. Final training MSE of: JACTUS's core
             (task_rank 1), the core of truncated SVD at the same rank (task_rank 0), and truncated
             SVD then LoRA r=2 on the two truncated factors (in -> k and k -> out), each at its
             best of two learning rates; plus the least-squares floor of JACTUS's core.
accuracy     per data set and seed, three ways to fine-tune all-linear MiniLM with a fresh head:
             (a) JACTUS: calibrate on the first training examples, compress every Linear layer
                 except the head, train the cores and the head;
             (b) compress-then-LoRA: truncated SVD of the same layers to the same budget (JACTUS
                 with task_rank=0, cores frozen), then LoRA r=8 beside each compressed layer and
                 the head; the LoRA is written here in the bench, because splice cannot attach an
                 adapter to a FactorizedLinear (it is not a Linear: `splice.core.layers.describe`);
             (c) uncompressed LoRA r=8 on the same layers + head (`splice.attach`), the reference.
             Same steps, batch, lr schedule, seeds, data order and test rows for all; test accuracy
             of the last step, trainable and deployed parameter counts. Runs go to `--jobs` worker
             processes, one torch thread each.
step_time    one training step of each variant on a fixed batch of reviews, all in one process,
             paired and interleaved; median of per-round ratios variant / LoRA [IQR].

Run `python bench/bench_jactus.py` (about 25 minutes on two idle cores); `--quick` is a smoke run
of a few minutes. Results: bench/results/jactus.{json,md} (`jactus_quick` for --quick).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    DATASETS,
    Candidate,
    Phases,
    bench_main,
    bench_parser,
    encode_rows,
    environment,
    finish,
    guarded,
    minilm_dir,
    review_batch,
    run_sections,
    seed_runs,
    seed_summary,
    settings_from,
    train_loop,
    train_step,
    versus_baseline,
)
from jactus_report import markdown
from jactus_setup import BASELINE, TOY_D, TOY_SIGNAL, VARIANT_BY_NAME, VARIANTS, Settings, Variant, build, data_rows
from torch import nn

# ------------------------------------------------------------------------------------- toy


def planted(seed: int, noise: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The planted-direction task (as in tests/compress/test_jactus.py)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(TOY_D, TOY_SIGNAL, generator=g) @ torch.randn(TOY_SIGNAL, TOY_D, generator=g) / 2
    W += noise * torch.randn(TOY_D, TOY_D, generator=g)
    P, _, Qh = torch.linalg.svd(W)
    X = torch.randn(512, TOY_D, generator=g) + 3 * torch.randn(512, 1, generator=g) * Qh[-1]
    Y = X @ W.T + 2 * (X @ Qh[-1])[:, None] * P[:, -1]
    model = nn.Sequential(nn.Linear(TOY_D, TOY_D, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    return model, X, Y


class FactorLoRA(nn.Module):
    """Truncated SVD as two linear maps (x -> A x -> B A x, A = S^½ Vᵀ, B = U S^½) with LoRA r on each."""

    def __init__(self, W: torch.Tensor, k: int, r: int, seed: int) -> None:
        super().__init__()
        U, S, Vh = torch.linalg.svd(W)
        self.A, self.B = S[:k].sqrt()[:, None] * Vh[:k], U[:, :k] * S[:k].sqrt()
        g = torch.Generator().manual_seed(seed)
        n, m = W.shape[1], W.shape[0]
        self.a1 = nn.Parameter(torch.randn(r, n, generator=g) / math.sqrt(n))
        self.b1 = nn.Parameter(torch.zeros(k, r))
        self.a2 = nn.Parameter(torch.randn(r, k, generator=g) / math.sqrt(k))
        self.b2 = nn.Parameter(torch.zeros(m, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.A.T + (x @ self.a1.T) @ self.b1.T
        return h @ self.B.T + (h @ self.a2.T) @ self.b2.T


def fit(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, steps: int, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(X), Y).backward()
        optimizer.step()
    with torch.no_grad():
        return F.mse_loss(model(X), Y).item()


def toy(s: Settings, phase: Phases) -> dict[str, Any]:
    from splice.compression.jactus import jactus

    phase("[toy] planted direction")
    steps, lrs = (300, (1e-2, 3e-2)) if not s.quick else (30, (3e-2,))
    rows = []
    for noise in (0.01, 0.05):
        for seed in s.toy_seeds:
            model, X, Y = planted(seed, noise)
            batches = [{"x": X[i : i + 128], "y": Y[i : i + 128]} for i in range(0, 512, 128)]

            def mse(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
                return F.mse_loss(m(b["x"]), b["y"])

            with torch.no_grad():
                start = F.mse_loss(model(X), Y).item()
            row: dict[str, Any] = {"noise": noise, "seed": seed, "start": start}
            for key, task_rank in (("jactus", 1), ("truncated_core", 0)):
                results = []
                for lr in lrs:
                    m = copy.deepcopy(model)
                    report = jactus(m, batches, budget=s.budget, task_rank=task_rank, loss_fn=mse)
                    results.append(fit(m, X, Y, steps, lr))
                row[key] = min(results)
                row["rank"] = report.layers[0].rank
                if key == "jactus":
                    Z = (X @ m[0].V).double()
                    core_t = torch.linalg.lstsq(Z, (Y @ m[0].U).double()).solution
                    row["jactus_floor"] = F.mse_loss((Z @ core_t @ m[0].U.double().T).float(), Y).item()
            row["factor_lora"] = min(fit(FactorLoRA(model[0].weight.detach(), row["rank"], 2, seed), X, Y, steps, lr)
                                     for lr in lrs)
            rows.append(row)
    return {"rows": rows, "steps": steps, "lrs": list(lrs)}


# -------------------------------------------------------------------------------- variants


def train_and_test(model: nn.Module, groups: list[dict[str, Any]], data: str, seed: int, s: Settings) -> dict:
    """AdamW (no weight decay: it would pull the cores, i.e. the weights, to zero), 6% warm-up and
    cosine decay, clipping 1.0; the data order depends on the seed alone; test accuracy at the end."""
    import transformers
    from torch.utils.data import DataLoader

    splits = data_rows(data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    loader = DataLoader(splits.train, batch_size=s.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda rows: encode_rows(tokenizer, rows, s.max_length))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, int(0.06 * s.steps), s.steps)
    tick = time.perf_counter()
    losses = train_loop(model, loader, optimizer, scheduler, [p for g in groups for p in g["params"]], s.steps)
    train_s = time.perf_counter() - tick
    model.eval()
    rows = splits.test[: s.eval_examples]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            batch = encode_rows(tokenizer, rows[i : i + 32], s.max_length)
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return {"test_accuracy": correct / len(rows), "first_loss": float(np.mean(losses[:5])),
            "last_loss": float(np.mean(losses[-10:])), "train_s": train_s}


def train_one(name: str, data: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process; a failure is returned, not raised."""
    out: dict[str, Any] = {"variant": name, "data": data, "seed": seed}
    return guarded(out, built_and_trained, out, VARIANT_BY_NAME[name], data, seed, Settings(**s))


def built_and_trained(out: dict[str, Any], variant: Variant, data: str, seed: int, s: Settings) -> dict[str, Any]:
    """Build the variant, its facts into `out` at once (a run that fails in training still reports
    them), then train and test it."""
    model, groups, facts = build(variant, data, seed, s)
    out.update(facts)
    return train_and_test(model, groups, data, seed, s)


def accuracy(s: Settings, phase: Phases) -> dict[str, Any]:
    """Every (variant, data set, seed) trained and tested, `s.jobs` runs at a time."""

    def describe(row: dict[str, Any]) -> str:
        status = f"failed: {row['error']}" if "error" in row else (
            f"test acc {row['test_accuracy']:.3f}, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
            f" ({row['train_s']:.0f} s training)")
        return f"  {row['variant']:<20} {row['data']:<16} seed {row['seed']}: {status}"

    runs = seed_runs(train_one, s.variants, s, phase, describe)
    summary = seed_summary(runs, "variant", s.variants, s.datasets)
    return {"runs": runs, "summary": summary}


# ------------------------------------------------------------------------------- step time


def step_time(s: Settings, phase: Phases) -> dict[str, Any]:
    """One training step of every variant on a fixed batch of reviews, paired and interleaved."""
    batch, real = review_batch(s.batch, s.max_length)
    out: dict[str, Any] = {"batch": list(batch["input_ids"].shape), "real_token_fraction": real, "variants": {}}
    candidates = []
    for name in s.variants:
        phase(f"[step time] build {name}")
        try:
            model, groups, facts = build(VARIANT_BY_NAME[name], "rotten_tomatoes", 0, s)
            model.train()
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            train_step(model, optimizer, batch)  # also checks the step runs
            out["variants"][name] = facts
            candidates.append(Candidate(name, lambda _, m=model, o=optimizer: train_step(m, o, batch)))
        except Exception as err:
            out["variants"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out | versus_baseline(candidates, BASELINE, s.rounds, s.warmup, phase, "variants")


# -------------------------------------------------------------------------------------- main


SECTIONS = {"toy": toy, "accuracy": accuracy, "step_time": step_time}


def run(s: Settings) -> dict[str, Any]:
    phase = Phases()
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(s.threads), "settings": asdict(s), "sections": {},
                              "variants": {v.name: asdict(v) for v in VARIANTS}}
    run_sections(result, s, phase, SECTIONS, untimed=("toy", "accuracy"), timed=("step_time",))
    return finish(result, phase)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = bench_parser(__doc__, "smoke run of a few minutes (numbers not trustworthy)")
    p.add_argument("--jobs", type=int, help="training runs at a time, each its own process (default 2)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="subset of sections")
    p.add_argument("--variants", nargs="+", choices=list(VARIANT_BY_NAME), help="subset of variants (keep LoRA)")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="data sets (default rotten_tomatoes)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, help="optimizer steps per training run")
    p.add_argument("--lr-core", type=float, help="learning rate of JACTUS's cores")
    p.add_argument("--eval-examples", type=int, help="test rows evaluated")
    p.add_argument("--rounds", type=int, help="timed rounds of the step-time section")
    args = p.parse_args(argv)
    return args, settings_from(args, Settings)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, Settings, lambda s, args: run(s), markdown, "jactus")


if __name__ == "__main__":
    main()
