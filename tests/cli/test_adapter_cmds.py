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
    result = runner.invoke(app, ["merge", str(path), "--into-base", "--model", str(tiny_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("splice" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    again = runner.invoke(app, ["merge", str(path), "--into-base", "--model", str(tiny_folder), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


@pytest.mark.parametrize("command", ["train", "eval", "inspect", "info", "merge"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def _second_adapter(tiny_folder, tmp_path, seed: int):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_folder).eval()
    splice.attach(model, splice.LoRA(r=3, alpha=4, rslora=True, targets=["query", "key"], train_also=["classifier"]))
    torch.manual_seed(seed)
    randomize(model)
    return splice.save(model, tmp_path / f"adapter-{seed}")


def _weights_with(tiny_folder, adapter):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_folder).eval()
    if adapter is not None:
        splice.load(model, adapter)
        splice.unload(model)
    return {k: v.double() for k, v in model.state_dict().items()}


def test_merge_several_adapters_is_the_weighted_sum_and_folds_into_the_base(trained_adapter, tiny_folder, tmp_path):
    first, _, _ = trained_adapter
    second = _second_adapter(tiny_folder, tmp_path, 5)
    out = tmp_path / "merged-adapter"
    result = runner.invoke(app, ["merge", str(first), str(second), "--method", "linear", "--weights", "0.25,0.75",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    base = _weights_with(tiny_folder, None)
    changes = [{k: v - base[k] for k, v in _weights_with(tiny_folder, a).items()} for a in (first, second)]
    merged = _weights_with(tiny_folder, out)
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged[weight] - base[weight], 0.25 * changes[0][weight] + 0.75 * changes[1][weight])
    head = "classifier.weight"
    torch.testing.assert_close(merged[head], base[head] + 0.25 * changes[0][head] + 0.75 * changes[1][head])
    folded = tmp_path / "folded"
    result = runner.invoke(app, ["merge", str(first), str(second), "--weights", "0.25,0.75", "--into-base",
                                 "--model", str(tiny_folder), "--out", str(folded)])
    assert result.exit_code == 0, result.output
    plain = {k: v.double() for k, v in AutoModelForSequenceClassification.from_pretrained(folded).state_dict().items()}
    torch.testing.assert_close(plain[weight], merged[weight])


def test_merge_ties_and_emr_write_loadable_adapters(trained_adapter, tiny_folder, tmp_path):
    first, _, _ = trained_adapter
    second = _second_adapter(tiny_folder, tmp_path, 6)
    ties = tmp_path / "ties"
    result = runner.invoke(app, ["merge", str(first), str(second), "--method", "ties", "--density", "0.3",
                                 "--rank", "2", "--out", str(ties)])
    assert result.exit_code == 0, result.output
    assert {m.rank for m in splice.io.info.inspect_adapter(ties).modules} == {2}
    emr = tmp_path / "emr"
    result = runner.invoke(app, ["merge", str(first), str(second), "--method", "emr", "--out", str(emr)])
    assert result.exit_code == 0, result.output
    rebuilt = sorted(p.name for p in emr.glob("task-*"))
    assert len(rebuilt) == 2 and (emr / "unified" / "unified.json").is_file()
    splice.load(AutoModelForSequenceClassification.from_pretrained(tiny_folder), emr / rebuilt[0])


def test_merge_of_one_adapter_asks_what_is_meant(trained_adapter, tmp_path):
    path, _, _ = trained_adapter
    result = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--into-base" in result.output


def test_merge_quiet_prints_the_folder_and_no_table(trained_adapter, tiny_folder, tmp_path):
    first, _, _ = trained_adapter
    second = _second_adapter(tiny_folder, tmp_path, 7)
    args = ["merge", str(first), str(second), "--method", "ties"]
    shown = runner.invoke(app, [*args, "--out", str(tmp_path / "shown")])
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "quiet"), "--quiet"])
    assert shown.exit_code == quiet.exit_code == 0, quiet.output
    assert "┏" in shown.output and quiet.output.strip() == f"-> {tmp_path / 'quiet'}"


@pytest.mark.parametrize("method,option,value", [("linear", "--density", "0.3"), ("ties", "--seed", "3"),
                                                 ("dare_linear", "--majority", "frequency")])
def test_merge_refuses_an_option_its_method_ignores(trained_adapter, tiny_folder, tmp_path, method, option, value):
    first, _, _ = trained_adapter
    second = _second_adapter(tiny_folder, tmp_path, 6)
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(first), str(second), "--method", method, option, value,
                                 "--out", str(out)])
    assert result.exit_code != 0 and f"does not use {option}" in result.output, result.output
    assert not out.exists()
