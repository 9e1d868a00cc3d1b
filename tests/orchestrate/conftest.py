"""Dropout-free tiny model folders for multiplexing: with no dropout in the backbone, a tenant
trained among others must end exactly (up to float summation order) where it ends alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_tiny_bert, save_tiny_llama


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("mux-bert"), dropout=0.0)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("mux-llama"))
