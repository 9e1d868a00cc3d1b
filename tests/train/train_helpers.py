"""Helpers the training tests share (imported as `train_helpers`; fixtures are in conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from splice import assets


def minilm_tokenizer():
    try:
        return AutoTokenizer.from_pretrained(assets.minilm_path())
    except assets.AssetMissingError as err:
        pytest.skip(str(err))



def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
