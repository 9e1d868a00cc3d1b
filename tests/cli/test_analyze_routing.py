"""`splice analyze` on a saved MoELoRA: routing on data instead of spectra, and the options that
choose the data, refused for other adapters."""

from __future__ import annotations

import json

import pytest
from helpers import randomize, save_tiny_bert
from PIL import Image
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

import splice
from splice.analysis import adapter_dir_spectra
from splice.analysis.routing import RoutingReport
from splice.cli.main import app
from splice.methods.moelora import MoELoRA

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def saved(folder, path, config):
    """A random adapter `config` for the model in `folder`, saved to `path` (base model recorded)."""
    model = AutoModel.from_pretrained(folder)
    splice.attach(model, config)
    randomize(model)
    return splice.save(model, path)


@pytest.fixture(scope="module")
def moe(tiny_folder, tmp_path_factory):
    return saved(tiny_folder, tmp_path_factory.mktemp("moe") / "adapter",
                 MoELoRA(experts=4, top_k=2, r=4, targets=["query", "value"]))


@pytest.fixture(scope="module")
def lora(tiny_folder, tmp_path_factory):
    return saved(tiny_folder, tmp_path_factory.mktemp("lora") / "adapter", splice.LoRA(r=2))


def test_a_moelora_is_analysed_by_its_routing_on_data(moe, tiny_folder, tmp_path):
    out = tmp_path / "routing"
    command = ["analyze", str(moe), "--data", "rotten_tomatoes", "--rows", "6", "--out", str(out)]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    report = RoutingReport.from_dict(json.loads((out / "routing.json").read_text()))
    assert report.adapter == str(moe) and report.texts == 6 and report.top_k == 2
    texts = [r["text"] for r in splice.assets.dataset("rotten_tomatoes").test[:6]]
    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(tiny_folder)(texts)["input_ids"])
    assert [m.layer for m in report.modules] == [0, 0, 1, 1] and all(m.tokens == tokens for m in report.modules)
    assert all(sum(m.utilisation) == pytest.approx(1.0) and 0 < m.normalised_entropy <= 1 + 1e-6
               for m in report.modules)
    assert f"4 modules routed {tokens} tokens of 6 texts (rotten_tomatoes)" in " ".join(result.output.split())
    assert "H/log E" in result.output and "skipped" not in result.output
    with Image.open(out / "routing.png") as image:
        assert image.format == "PNG"
    assert sorted(p.name for p in out.iterdir()) == ["routing.json", "routing.png"]  # no spectra
    again = runner.invoke(app, command)
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(app, [*command, "--force"]).exit_code == 0


def test_defaults_route_rows_of_the_task_data_next_to_the_adapter(moe, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Question: 2 + 2?\\nAnswer:", "completion": " 4"}\n{"text": "short"}\n')
    result = runner.invoke(app, ["analyze", str(moe), "--data", str(rows), "--force", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((moe.parent / "adapter-routing" / "routing.json").read_text())["texts"] == 2
    result = runner.invoke(app, ["analyze", str(moe), "--rows", "3", "--force", "--quiet"])
    assert result.exit_code == 0, result.output
    # the base is an encoder's bare model: classification data
    assert "of 3 texts (rotten_tomatoes)" in " ".join(result.output.split())


def test_data_options_are_refused_for_an_adapter_with_weight_changes(lora, tmp_path):
    for option in (["--data", "arithmetic"], ["--rows", "5"]):
        result = runner.invoke(app, ["analyze", str(lora), "--out", str(tmp_path / "out"), *option])
        assert result.exit_code == 1 and "not a MoELoRA" in result.output
    assert not (tmp_path / "out").exists()


def test_a_lora_still_gets_its_spectra_and_no_routing(lora, tiny_folder, tmp_path):
    out = tmp_path / "spectra"
    result = runner.invoke(app, ["analyze", str(lora), "--out", str(out), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["effective_rank.png", "spectra.json", "spectra.png"]
    expected = adapter_dir_spectra(AutoModel.from_pretrained(tiny_folder), lora).to_dict(2)
    assert json.loads((out / "spectra.json").read_text()) == json.loads(json.dumps(expected))


def test_help_explains_the_routing_options():
    result = runner.invoke(app, ["analyze", "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "--data" in text and "--rows" in text and "routing.png" in text
