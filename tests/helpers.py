"""Model factories and comparison helpers shared by the tests (imported as `helpers`)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import splice
from splice import assets
from splice.core.host import hosts

VOCAB = 97
HIDDEN = 32
INTERMEDIATE = 40


def make_bert(seed: int = 0, hidden: int = HIDDEN) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=INTERMEDIATE, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def make_llama(seed: int = 0, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def llama_for(backend: str, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama for a 4-bit backend: 64 wide for bitsandbytes, whose CPU kernels need every
    layer's inputs in whole 64-weight blocks (splice leaves narrower layers dense there)."""
    return make_llama(seed, hidden=64, intermediate=128) if backend == "bitsandbytes" else make_llama(seed)


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config).eval()


class ConvNet(nn.Module):
    """Every non-transformers host type in one model: Embedding, Conv1d, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 12, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.head = nn.Linear(12 + 6, 5)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        seq = self.conv1(self.embed(ids).transpose(1, 2)).relu().mean(-1)
        img = self.conv2(image).relu().mean((-2, -1))
        return self.head(torch.cat([seq, img], dim=-1))


def make_convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()



def logits(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The model's output tensor (HF `.logits` or a plain module's return value), no grad."""
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |actual - expected| <= rel * max |expected| (a tolerance relative to output scale)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * max(scale, 1e-12), f"max error {error:.3g} vs scale {scale:.3g}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> None:
    """The adapter under test really changes the output (so equality checks mean something)."""
    assert (a - b).abs().max().item() > rel * b.abs().max().item()


def randomize(model: nn.Module, name: str = "default", scale: float = 0.3, seed: int = 0) -> None:
    """Give every factor of splice adapter `name` random values (B starts at zero otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, host in hosts(model):
            if name in host:
                for param in host[name].parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)


def randomize_module(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def lm_training_losses(model: nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on the model's trainable parameters, language modelling on `ids`; the loss of each step."""
    optimizer = torch.optim.AdamW(splice.trainable_parameters(model).values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "bert": make_bert, "llama": make_llama, "gpt2": make_gpt2, "convnet": make_convnet,
}


def minilm_tokenizer():
    """The bundled MiniLM's WordPiece tokenizer (a real vocabulary for tiny model folders)."""
    try:
        return AutoTokenizer.from_pretrained(assets.minilm_path())
    except assets.AssetMissingError as err:
        pytest.skip(str(err))


def save_tiny_bert(path: Path, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide BERT encoder with MiniLM's tokenizer, as a folder `TrainConfig.model`
    accepts. `dropout=0` makes runs comparable bit for bit (DDP, multiplexing)."""
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llama(path: Path) -> Path:
    """A 2-layer, 32-wide Llama with MiniLM's tokenizer; `[SEP]` doubles as its eos token."""
    tokenizer = minilm_tokenizer()
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


POSITIVE = ["good", "great", "fine", "superb", "lovely", "wonderful"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "terrible"]


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Three-word "reviews" whose label is which word list they come from: learnable fast."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = POSITIVE if label else NEGATIVE
        rows.append({"text": " ".join(rng.choice(words) for _ in range(3)), "label": label})
    return rows


def text_batch(rows: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    """Token ids of the tiny models' vocabulary with labels; row 1 right-padded by 3 (mask 0, id 0)."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=generator)}
