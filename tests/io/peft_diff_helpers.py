"""Tiny models and helpers for the differential suite against HF PEFT (`test_peft_differential.py`).

Models in the style of PEFT's own custom-model tests (`tests/test_custom_models.py`): small
`nn.Module`s with Linear/Conv2d/Embedding layers, and tiny transformers models built from configs
with seeded random weights. Every factory returns a model in eval mode; `base(name)` builds each
once per session and hands out deep copies, so cases stay independent.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import splice

VOCAB = 50
BATCH = 4  # rows of every input batch (route tests mix adapters across them)
ATOL = 1e-5
RTOL = 0.0
PREFIX = "base_model.model."


# -- custom models (PEFT's test_custom_models.py style) ---------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin0 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(x).relu()


class MLP(nn.Module):
    """`lin0`, nested `block.lin0` and `block2.lin0` (same leaf name), `lin1` (the head);
    optionally a `classifier` after it (what "all-linear" must adapt on a plain module)."""

    def __init__(self, classifier: bool = False) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16)
        self.block = Block(16)
        self.block2 = Block(16)
        self.lin1 = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 3) if classifier else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin1(self.block2(self.block(self.lin0(x).relu())))
        return self.classifier(out.relu()) if self.classifier is not None else out


class ConvModel(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(4, 6, 3, groups=groups)  # 6x6 -> 4x4
        self.lin0 = nn.Linear(6 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.conv2d(x).relu().flatten(1))


class EmbModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lin0 = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.emb(ids)).mean(1)


class MHAModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin0 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


# -- transformers models -----------------------------------------------------------------------


def _bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=3, initializer_range=0.2))


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def _llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))


def _t5() -> nn.Module:
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "mlp_cls": lambda: MLP(classifier=True),
    "conv": ConvModel,
    "conv_grouped": lambda: ConvModel(groups=2),
    "emb": EmbModel,
    "mha": MHAModel,
    "bert": _bert,
    "gpt2": _gpt2,
    "llama": _llama,
    "t5": _t5,
}


@cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FACTORIES[name]().eval()


def base(name: str) -> nn.Module:
    """A fresh copy of the seeded base model `name` (never the cached original)."""
    return copy.deepcopy(_built(name))


def inputs(name: str) -> Any:
    """A seeded batch of BATCH rows for model `name`: a tensor, or a dict of keyword inputs."""
    g = torch.Generator().manual_seed(1)
    if name in ("mlp", "mlp_cls"):
        return torch.randn(BATCH, 10, generator=g)
    if name in ("conv", "conv_grouped"):
        return torch.randn(BATCH, 4, 6, 6, generator=g)
    if name == "emb":
        return torch.randint(0, VOCAB, (BATCH, 6), generator=g)
    if name == "mha":
        return torch.randn(BATCH, 5, 8, generator=g)
    ids = torch.randint(1, VOCAB, (BATCH, 7), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (BATCH, 5), generator=g)}
    return {"input_ids": ids}


def run(model: nn.Module, batch: Any, **extra: Any) -> torch.Tensor:
    """The model's output tensor (`.logits` for transformers models), without gradients."""
    with torch.no_grad():
        out = model(**batch, **extra) if isinstance(batch, dict) else model(batch, **extra)
    return (out.logits if hasattr(out, "logits") else out).detach().clone()


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: splice differs from PEFT\n{m}")


def assert_changes(adapted: torch.Tensor, plain: torch.Tensor, what: str) -> None:
    """The adapter really changes the output, so that equality checks mean something."""
    assert (adapted - plain).abs().max().item() > 1e-3, f"{what}: the adapter does not change the output"


# -- adapters with random, non-zero factors ----------------------------------------------------


def _fill(params: list[tuple[str, nn.Parameter]], seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            noise = torch.randn(p.shape, generator=g)
            if "magnitude" in name:  # DoRA's magnitude: keep it near ||W|| (positive)
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(noise * scale)


def randomize_peft(peft_model: nn.Module, adapter: str, seed: int, scale: float = 0.3) -> None:
    """Random values for every tensor of PEFT adapter `adapter`: LoRA factors, lora_B bias, DoRA
    magnitude, and its copies of modules_to_save (never `original_module`)."""
    params = [
        (n, p) for n, p in peft_model.named_parameters()
        if (f".{adapter}." in n or n.endswith(f".{adapter}")) and ("lora_" in n or ".modules_to_save." in n)
    ]
    assert params, f"PEFT adapter {adapter!r} has no parameters"
    _fill(params, seed, scale)


def randomize_splice(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random values for what trains right after `splice.attach`: the new (active) adapter's
    factors and the heads it trains (`train_also`), found through the public API only."""
    params = sorted(splice.trainable_parameters(model).items())
    assert params, "nothing trainable after attach"
    _fill(params, seed, scale)


# -- configs -----------------------------------------------------------------------------------


def splice_config(peft_kwargs: dict[str, Any]) -> splice.LoRA:
    """The splice config meaning what `LoraConfig(**peft_kwargs)` means."""
    kw = dict(peft_kwargs)
    dora = kw.pop("use_dora", False)
    out: dict[str, Any] = {
        "r": kw.pop("r", 8), "alpha": kw.pop("lora_alpha", 8), "targets": kw.pop("target_modules"),
        "rslora": kw.pop("use_rslora", False),
    }
    train_also = list(kw.pop("modules_to_save", None) or [])
    if kw.pop("task_type", None) == "SEQ_CLS":  # PEFT's SEQ_CLS wrapper trains the classifier in full
        train_also.append("classifier")
    if train_also:
        out["train_also"] = train_also
    for peft_key, splice_key in (("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"),
                                 ("lora_bias", "lora_bias"), ("layers_to_transform", "layers"),
                                 ("layers_pattern", "layers_pattern"), ("exclude_modules", "exclude")):
        if peft_key in kw:
            out[splice_key] = kw.pop(peft_key)
    if kw.pop("init_lora_weights", True) == "pissa":
        out["init"] = "pissa"
    kw.pop("fan_in_fan_out", None)  # splice knows Conv1D by its type
    assert not kw, f"no splice equivalent for {sorted(kw)}"
    return (splice.DoRA if dora else splice.LoRA)(**out)


# -- files -------------------------------------------------------------------------------------


def file_modules(path: Path) -> dict[str, int]:
    """{module path: rank} of the LoRA factors in an adapter directory (PEFT's tensor names)."""
    found = {}
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix) and ".base_layer." not in key:
                    found[key[len(PREFIX):-len(suffix)]] = f.get_slice(key).get_shape()[0]
    return found


def peft_modules(peft_model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """{module path: (rank, scaling)} of PEFT adapter `adapter`'s LoRA layers."""
    found = {}
    for name, module in peft_model.named_modules():
        ranks, scalings = getattr(module, "r", None), getattr(module, "scaling", None)
        if isinstance(ranks, dict) and isinstance(scalings, dict) and adapter in ranks and hasattr(module, "lora_A"):
            found[name.removeprefix(PREFIX)] = (ranks[adapter], scalings[adapter])
    return found


def with_peft_config(splice_dir: Path, config_dir: Path, out: Path) -> Path:
    """A directory holding PEFT's own adapter_config.json and splice's tensors."""
    out.mkdir(parents=True)
    shutil.copy(config_dir / "adapter_config.json", out / "adapter_config.json")
    shutil.copy(splice_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    return out


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "adapter_config.json").read_text())
