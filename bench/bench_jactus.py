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
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    HEAD,
    Candidate,
    Phases,
    bench_main,
    bench_parser,
    compare,
    environment,
    finish,
    interleaved,
    minilm_dir,
    pool_runs,
    review_batch,
    run_sections,
    seed_everything,
    seed_summary,
    settings_from,
    train_step,
    trainable,
)
from torch import nn

DATASETS = {"rotten_tomatoes": "Rotten Tomatoes", "bbc_news": "BBC News"}
BASELINE = "LoRA"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "jactus", "compress_lora" or "lora"
    options: dict[str, Any]
    why: str


VARIANTS = [
    Variant("JACTUS", "jactus", {"task_rank": 8, "weighting": "input"},
            "union of W's dominant subspace (output-error weighted, `weighting='input'`) and 8 input / 8"
            " gradient directions per layer; cores + head trained"),
    Variant("JACTUS t=0", "jactus", {"task_rank": 0, "weighting": "input"},
            "ablation: the same allocation and weighting without task directions (weighted truncated SVD),"
            " cores + head trained"),
    Variant("compress-then-LoRA", "compress_lora", {"r": 8, "alpha": 16},
            "truncated SVD (`task_rank=0, weighting='none'`), factors and core frozen, LoRA r=8 alpha=16"
            " beside each compressed layer + head"),
    Variant("LoRA", "lora", {"r": 8, "alpha": 16}, "uncompressed MiniLM, LoRA r=8 alpha=16 on the same layers + head"),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    jobs: int = 2
    sections: list[str] = field(default_factory=lambda: ["toy", "accuracy", "step_time"])
    variants: list[str] = field(default_factory=lambda: [v.name for v in VARIANTS])
    datasets: list[str] = field(default_factory=lambda: ["rotten_tomatoes"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget: float = 0.8
    steps: int = 150
    batch: int = 16
    max_length: int = 48
    lr_lora: float = 2e-3  # bench_forms' adapter lr
    # Pilot (Rotten Tomatoes, seed 0, 150 steps, validation accuracy of JACTUS): 3e-4 71.5%, 1e-3 74.5%,
    # 3e-3 and 1e-2 49% (the loss never fell: the cores hold the whole weights, not a delta).
    lr_core: float = 1e-3
    head_lr: float = 3e-2  # bench_forms' head lr
    calibration_examples: int = 128
    eval_examples: int = 200
    rounds: int = 10
    warmup: int = 2
    toy_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(seeds=[0], steps=4, calibration_examples=16, eval_examples=16, rounds=2, warmup=1,
                   toy_seeds=[0], quick=True, **overrides)


# ------------------------------------------------------------------------------------- toy


TOY_D, TOY_SIGNAL = 32, 4


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


class LoRABeside(nn.Module):
    """A frozen layer plus LoRA: y = layer(x) + (alpha / r) B A x, B = 0 at the start (PEFT's init)."""

    def __init__(self, layer: nn.Module, r: int, alpha: float) -> None:
        super().__init__()
        self.layer, self.scale = layer, alpha / r
        like = next(layer.parameters())
        self.lora_A = nn.Parameter(torch.empty(r, layer.in_features, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)


def data_rows(data: str) -> Any:
    from splice import assets

    return assets.dataset(data)


def encode(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    batch = dict(tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
    return batch | {"labels": torch.tensor([int(r["label"]) for r in rows])}


def build(variant: Variant, data: str, seed: int, s: Settings) -> tuple[nn.Module, list[dict[str, Any]], dict]:
    """A fresh MiniLM with a seeded head, prepared the variant's way; its parameter groups and facts."""
    import transformers

    import splice
    from splice.compression.factorized import factorized_modules, replace_module
    from splice.compression.jactus import calibrate, jactus

    splits = data_rows(data)
    seed_everything(seed)  # the head's init
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=len(splits.label_names))
    facts: dict[str, Any] = {"base_parameters": sum(p.numel() for p in model.parameters())}
    if variant.kind == "lora":
        o = variant.options
        splice.attach(model, splice.LoRA(r=o["r"], alpha=o["alpha"], targets="all-linear", train_also=[HEAD]))
        adapter = [p for n, p in trainable(model).items() if not n.startswith(f"{HEAD}.")]
        groups = [{"params": adapter, "lr": s.lr_lora}]
        facts["deployed_parameters"] = facts["base_parameters"]  # merged into W
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
        rows = splits.train[: s.calibration_examples]
        batches = [encode(tokenizer, rows[i : i + s.batch], s.max_length) for i in range(0, len(rows), s.batch)]
        tick = time.perf_counter()
        stats = calibrate(model, batches, "all-linear", train_also=[HEAD])
        facts["calibration_s"] = time.perf_counter() - tick
        options = variant.options if variant.kind == "jactus" else {"task_rank": 0, "weighting": "none"}
        tick = time.perf_counter()
        report = jactus(model, stats, budget=s.budget, train_also=[HEAD], **options)
        facts["compress_s"] = time.perf_counter() - tick
        ranks = list(report.ranks.values())
        facts.update({"retained_fraction": report.retained_fraction, "rank_min": min(ranks),
                      "rank_median": float(np.median(ranks)), "rank_max": max(ranks),
                      "compressed_before": report.params_before, "compressed_after": report.params_after})
        if variant.kind == "jactus":
            groups = [{"params": [p for n, p in model.named_parameters() if n.endswith(".core")], "lr": s.lr_core}]
        else:
            lora = []
            for name, layer in factorized_modules(model).items():
                layer.core.requires_grad_(False)
                wrapped = LoRABeside(layer, variant.options["r"], variant.options["alpha"])
                replace_module(model, name, wrapped)
                lora += [wrapped.lora_A, wrapped.lora_B]
            groups = [{"params": lora, "lr": s.lr_lora}]
        facts["deployed_parameters"] = sum(p.numel() for p in model.parameters())
    head = list(model.get_submodule(HEAD).parameters())
    groups.append({"params": head, "lr": s.head_lr})
    facts["trainable_adapter"] = sum(p.numel() for p in groups[0]["params"])
    facts["trainable_head"] = sum(p.numel() for p in head)
    return model, groups, facts


def train_and_test(model: nn.Module, groups: list[dict[str, Any]], data: str, seed: int, s: Settings) -> dict:
    """AdamW (no weight decay: it would pull the cores, i.e. the weights, to zero), 6% warm-up and
    cosine decay, clipping 1.0; the data order depends on the seed alone; test accuracy at the end."""
    import transformers
    from torch.utils.data import DataLoader

    splits = data_rows(data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    loader = DataLoader(splits.train, batch_size=s.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda rows: encode(tokenizer, rows, s.max_length))
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, int(0.06 * s.steps), s.steps)
    model.train()
    losses, step, tick = [], 0, time.perf_counter()
    while step < s.steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step == s.steps:
                break
    train_s = time.perf_counter() - tick
    model.eval()
    rows = splits.test[: s.eval_examples]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            batch = encode(tokenizer, rows[i : i + 32], s.max_length)
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return {"test_accuracy": correct / len(rows), "first_loss": float(np.mean(losses[:5])),
            "last_loss": float(np.mean(losses[-10:])), "train_s": train_s}


def train_one(name: str, data: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process; a failure is returned, not raised."""
    settings = Settings(**s)
    out: dict[str, Any] = {"variant": name, "data": data, "seed": seed}
    try:
        model, groups, facts = build(VARIANT_BY_NAME[name], data, seed, settings)
        out.update(facts)
        out.update(train_and_test(model, groups, data, seed, settings))
    except Exception as err:  # one broken variant must not stop the others
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
        out["traceback"] = traceback.format_exc()[-2000:]
    return out


def accuracy(s: Settings, phase: Phases) -> dict[str, Any]:
    jobs = [(v, d, seed) for d in s.datasets for seed in s.seeds for v in s.variants]
    phase(f"[accuracy] {len(jobs)} training runs, {s.jobs} at a time")

    def describe(row: dict[str, Any]) -> str:
        status = f"failed: {row['error']}" if "error" in row else (
            f"test acc {row['test_accuracy']:.3f}, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
            f" ({row['train_s']:.0f} s training)")
        return f"  {row['variant']:<20} {row['data']:<16} seed {row['seed']}: {status}"

    runs = pool_runs(train_one, [(*job, asdict(s)) for job in jobs], s.jobs, s.threads, describe)
    summary = seed_summary(runs, "variant", s.variants, s.datasets)
    return {"runs": runs, "summary": summary}


# ------------------------------------------------------------------------------- step time


def step_time(s: Settings, phase: Phases) -> dict[str, Any]:
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
    names = [c.name for c in candidates]
    if BASELINE in names and len(names) > 1:
        phase(f"[step time] {s.rounds} interleaved rounds of {len(names)} variants")
        samples = interleaved(candidates, s.rounds, s.warmup)
        out["timing"] = compare(samples, [(n, BASELINE) for n in names if n != BASELINE])
    return out


def markdown(result: dict[str, Any], s: Settings) -> str:
    """The report; jactus_report.py holds it and imports this module, so it is imported only here."""
    from jactus_report import markdown as render

    return render(result, s)


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
