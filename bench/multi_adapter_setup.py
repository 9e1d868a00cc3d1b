"""bench_multi_adapter.py's setup: its settings, the target sets, and the models and batches every
section builds on (twin splice / PEFT models holding identical adapters, SmolLM2, packed text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from common import Batch, LoraSpec, Peft, Phases, Splice, review_chunks, twins
from torch import nn

TARGETS: dict[str, dict[str, str | list[str]]] = {
    "minilm": {"qv": ["query", "value"], "all-linear": "all-linear"},
    "smollm2": {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
}
B_STD = 0.02  # std of the seeded lora_B values: large enough to change outputs and tokens
CAUSAL = LoraSpec(head=None, task_type="CAUSAL_LM")


@dataclass
class Settings:
    """How much to measure; `--quick` shrinks every count (and the decode length) to a smoke run."""

    threads: int = 1
    warmup: int = 2  # untimed rounds before the MiniLM rounds (SmolLM2 sections: 1)
    sections: list[str] = field(default_factory=lambda: ["mixed_batch", "decode", "training", "memory"])
    targets: list[str] = field(default_factory=lambda: ["qv", "all-linear"])
    mixed_batch: int = 32
    mixed_seq: int = 48
    mixed_adapters: list[int] = field(default_factory=lambda: [4, 16])
    mixed_rounds: int = 20
    decode_batch: int = 8
    prompt_len: int = 32
    new_tokens: int = 32
    decode_adapters: int = 8
    decode_rounds: int = 4
    minilm_batch: int = 8
    minilm_seq: int = 64
    minilm_pairs: int = 20
    smollm_batch: int = 4
    smollm_seq: int = 64
    smollm_pairs: int = 8
    smollm_train_targets: list[str] = field(default_factory=lambda: ["qv"])
    mem_steps: int = 1
    mem_dropouts: list[float] = field(default_factory=lambda: [0.0, 0.1])
    mem_models: list[str] = field(default_factory=lambda: ["minilm", "smollm2"])
    mem_targets: list[str] = field(default_factory=lambda: ["qv", "all-linear"])  # MiniLM; SmolLM2: qv
    default_malloc: bool = False
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        return cls(warmup=1, mixed_adapters=[16], mixed_rounds=2, new_tokens=4, decode_rounds=1, minilm_pairs=2,
                   smollm_pairs=1, smollm_seq=32, mem_models=["minilm"], mem_dropouts=[0.1], mem_targets=["qv"],
                   quick=True, **overrides)


@dataclass
class Context:
    """What every section gets: the settings and the model folders (resolved once)."""

    settings: Settings
    minilm: Path
    smollm2: Path
    phase: Phases


def lora_only(spec: LoraSpec) -> LoraSpec:
    """The same LoRA without a trained head (encoder or decoder models)."""
    return LoraSpec(r=spec.r, alpha=spec.alpha, dropout=spec.dropout, head=None, task_type=None)


def twin_models(base: nn.Module, spec: LoraSpec, targets: str | list[str], names: list[str], seed: int
                ) -> tuple[nn.Module, nn.Module, int]:
    """A splice and a PEFT copy of `base` holding the same adapters `names` (`common.twins`, lora_B
    of std `B_STD`). Returns both models and the number of LoRA tensors."""
    return twins(base, Splice(spec), Peft(spec), targets, names, seed, B_STD)


def causal_batch(path: Path, size: int, length: int, seed: int) -> Batch:
    """Packed real text for causal-LM training: no padding, labels = inputs (the model shifts)."""
    ids = review_chunks(path, size, length, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def load_smollm2(path: Path) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
