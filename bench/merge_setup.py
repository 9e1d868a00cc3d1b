"""bench_merge.py's setup: its settings, the correctness cases and combination rules, the two random
adapters of a case (built in PEFT), their true weight changes, and the target change each rule
should produce."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TARGETS = ["query", "value"]
Delta = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One correctness case: the two PEFT LoraConfigs (beyond targets and dropout) and what they are."""

    name: str
    configs: tuple[dict[str, Any], dict[str, Any]]
    what: str


CASES = [
    Case("LoRA", (dict(r=8, lora_alpha=16), dict(r=8, lora_alpha=16)), "r=8, alpha=16, both"),
    Case("rsLoRA", (dict(r=8, lora_alpha=16, use_rslora=True),) * 2, "r=8, alpha=16, use_rslora (scale 5.66)"),
    Case("ranks", (dict(r=8, lora_alpha=16), dict(r=4, lora_alpha=8)), "r=8 alpha=16 and r=4 alpha=8"),
    Case("rank_pattern", (dict(r=8, lora_alpha=16, rank_pattern={"value": 4}),
                          dict(r=8, lora_alpha=16, rank_pattern={"query": 2})),
         "r=8 alpha=16 with value at r=4, and with query at r=2"),
    Case("lora_bias", (dict(r=8, lora_alpha=16, lora_bias=True),) * 2, "r=8, alpha=16, lora_bias=True"),
    Case("DoRA", (dict(r=8, lora_alpha=16, use_dora=True),) * 2, "r=8, alpha=16, use_dora=True"),
]


@dataclass(frozen=True)
class Rule:
    """One combination rule: PEFT's combination_type and kwargs, splice's method and kwargs."""

    name: str
    peft: str
    splice: str
    target: str  # "sum", "svd8", "ties"
    peft_kwargs: dict[str, Any] = field(default_factory=dict)
    splice_kwargs: dict[str, Any] = field(default_factory=dict)


FULL = 16  # Σ r_i of every case (PEFT counts max(r, rank_pattern) = 8 per adapter)
DENSE = 384  # MiniLM's hidden size: query and value are 384 x 384, so this rank keeps any dense change
RULES = [
    Rule("cat", "cat", "cat", "sum"),
    Rule("linear", "linear", "linear", "sum"),
    Rule("svd rank 16", "svd", "svd", "sum", {"svd_rank": FULL}, {"rank": FULL}),
    Rule("svd rank 8", "svd", "svd", "svd8", {"svd_rank": 8}, {"rank": 8}),
    Rule("ties d=0.5 full rank", "ties_svd", "ties", "ties", {"density": 0.5, "svd_rank": DENSE},
         {"density": 0.5, "rank": DENSE}),
    Rule("ties d=0.5 (PEFT factor-wise)", "ties", "ties", "ties", {"density": 0.5}, {"density": 0.5, "rank": DENSE}),
]


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count to a smoke run."""

    threads: int = 1
    jobs: int = 2
    sections: list[str] = field(default_factory=lambda: ["correctness", "timing", "accuracy"])
    cases: list[str] = field(default_factory=lambda: [c.name for c in CASES])
    weights: list[float] = field(default_factory=lambda: [0.7, 0.5])
    reviews: int = 32
    seq_len: int = 64
    rounds: int = 10
    warmup: int = 2
    steps: int = 80
    batch: int = 8
    train_max_length: int = 32
    lr: float = 2e-3
    head_lr: float = 3e-2
    eval_examples: int = 128
    test_examples: int | None = None
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(cases=["LoRA", "DoRA"], reviews=8, rounds=2, warmup=1, steps=3, eval_examples=16,
                   test_examples=64, quick=True, **overrides)


# --------------------------------------------------------------------------- building adapters


def randomize(model: nn.Module, adapter: str, seed: int, std: float = 0.05) -> None:
    """Seeded non-zero factors (and lora_B bias) for `adapter`; DoRA magnitudes scaled by 1 ± 10%."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if f".{adapter}." not in name and not name.endswith(f".{adapter}"):
                continue
            noise = torch.randn(p.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * noise)
            elif "lora_A" in name or "lora_B" in name:
                p.copy_(noise * std)


def peft_pair(base: nn.Module, case: Case) -> nn.Module:
    import peft

    configs = [peft.LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **c) for c in case.configs]
    model = peft.get_peft_model(copy.deepcopy(base), configs[0], adapter_name="a")
    model.add_adapter("b", configs[1])
    for i, name in enumerate("ab"):
        randomize(model, name, seed=10 + i)
    model.eval()
    return model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.state_dict().items()}


def delta(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> Delta:
    assert weights.keys() == base.keys(), sorted(set(weights) ^ set(base))[:5]
    return {k: weights[k] - base[k] for k in base}


def peft_merged_delta(model: nn.Module, adapter: str, base: dict[str, torch.Tensor]) -> Delta:
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=[adapter])
    return delta(weights_of(merged), base)


# ------------------------------------------------------------------------------------ targets


def weighted_sum(deltas: list[Delta], weights: list[float]) -> Delta:
    return {k: sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]}


def truncated(change: Delta, rank: int) -> Delta:
    out = {}
    for k, v in change.items():
        if v.dim() == 2 and v.abs().max() > 0:
            u, s, vh = torch.linalg.svd(v, full_matrices=False)
            v = (u[:, :rank] * s[:rank]) @ vh[:rank]
        out[k] = v
    return out


def ties_target(deltas: list[Delta], weights: list[float], density: float) -> Delta:
    """PEFT's `merge_utils.ties` on each module's dense change [ΔW | Δb]: trim each τ_i, elect the
    sign of Σ τ_i, average the w_i τ_i that agree."""
    from peft.utils.merge_utils import ties

    out = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    w = torch.tensor(weights, dtype=torch.float64)
    for key in deltas[0]:
        if not key.endswith(".weight") or all(d[key].abs().max() == 0 for d in deltas):
            continue
        bias_key = key[: -len("weight")] + "bias"
        has_bias = bias_key in deltas[0] and any(d[bias_key].abs().max() > 0 for d in deltas)
        taus = [torch.cat([d[key], d[bias_key][:, None]], dim=1) if has_bias else d[key] for d in deltas]
        merged = ties(taus, w, density, "total")
        out[key] = merged[:, :-1] if has_bias else merged
        if has_bias:
            out[bias_key] = merged[:, -1]
    return out


def target_of(rule: Rule, deltas: list[Delta], weights: list[float]) -> Delta:
    if rule.target == "sum":
        return weighted_sum(deltas, weights)
    if rule.target == "svd8":
        return truncated(weighted_sum(deltas, weights), 8)
    return ties_target(deltas, weights, rule.splice_kwargs["density"])
