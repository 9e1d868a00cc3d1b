"""Dropout-free tiny model folders for multiplexing: with no dropout in the backbone, a tenant
trained among others must end exactly (up to float summation order) where it ends alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from splice import assets


def _tokenizer():
    try:
        return AutoTokenizer.from_pretrained(assets.minilm_path())
    except assets.AssetMissingError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mux-bert")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mux-llama")
    tokenizer = _tokenizer()
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
