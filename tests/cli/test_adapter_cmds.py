"""`splice inspect`, `splice info`, `splice merge` through the real `splice` app."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

import splice
from splice.cli.main import app

runner = CliRunner()


@pytest.fixture
def tiny_folder(tmp_path):
    """A saved tiny BERT classifier folder, as a user's local checkpoint would be."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    folder = tmp_path / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture
def trained_adapter(tiny_folder, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_folder).eval()
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"], train_also=["classifier"]))
    randomize(model)
    torch.nn.init.normal_(model.classifier.weight)
    ids = torch.randint(0, 64, (2, 6))
    expected = model(ids).logits.detach()
    return splice.save(model, tmp_path / "adapter"), ids, expected


def test_inspect_counts_the_selected_modules(tiny_folder):
    result = runner.invoke(app, ["inspect", str(tiny_folder), "--targets", "query,value", "--layers", "1"])
    assert result.exit_code == 0, result.output
    assert "2 modules selected" in result.output


def test_inspect_reports_a_pattern_that_matches_nothing(tiny_folder):
    result = runner.invoke(app, ["inspect", str(tiny_folder), "--targets", "quer"])
    assert result.exit_code == 1
    assert "query" in result.output  # the near match is suggested


def test_info_describes_the_adapter_without_a_model(trained_adapter):
    path, _, _ = trained_adapter
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["format"] == "peft" and found["method"] == "lora"
    assert found["adapter_parameters"] == 2 * 2 * 2 * (16 + 16)  # layers x (q, v) x r x (in + out)
    assert found["heads"] == {"classifier": 16 * 3 + 3}
    assert found["portable_to_vllm"] is False


def test_info_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"hello": 1}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "corrupt" in result.output


def test_merge_writes_a_plain_model_with_the_adapter_folded_in(trained_adapter, tiny_folder, tmp_path):
    path, ids, expected = trained_adapter
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(path), "--model", str(tiny_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("splice" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    again = runner.invoke(app, ["merge", str(path), "--model", str(tiny_folder), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


@pytest.mark.parametrize("command", ["train", "eval", "inspect", "info", "merge"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output
