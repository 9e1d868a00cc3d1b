"""`splice analyze` and `splice compare` on adapters saved for a tiny model folder."""

from __future__ import annotations

import json

import pytest
from helpers import randomize, save_tiny_bert
from transformers import AutoModel
from typer.testing import CliRunner

import splice
from splice.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def saved_lora(folder, path, seed: int = 0, **config):
    """A random LoRA for the model in `folder`, saved to `path` (PEFT format, base model recorded)."""
    model = AutoModel.from_pretrained(folder)
    splice.attach(model, splice.LoRA(r=2, **config))
    randomize(model, seed=seed)
    return splice.save(model, path)


@pytest.fixture(scope="module")
def adapter(tiny_folder, tmp_path_factory):
    return saved_lora(tiny_folder, tmp_path_factory.mktemp("saved") / "adapter")


def test_analyze_prints_ranks_and_writes_json_and_plots(adapter, tiny_folder, tmp_path):
    out = tmp_path / "spectra"
    result = runner.invoke(app, ["analyze", str(adapter), "--model", str(tiny_folder), "--out", str(out),
                                 "--top-k", "1"])
    assert result.exit_code == 0, result.output
    assert "4 modules: entropy rank mean" in result.output
    report = json.loads((out / "spectra.json").read_text())
    assert [m["numerical_rank"] for m in report["modules"]] == [2, 2, 2, 2]
    assert all(len(m["singular_values"]) == 1 for m in report["modules"])
    for name in ("spectra.png", "effective_rank.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    again = runner.invoke(app, ["analyze", str(adapter), "--model", str(tiny_folder), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


def test_analyze_finds_the_recorded_base_model_and_writes_next_to_the_adapter(adapter):
    out = adapter.parent / "adapter-spectra"
    result = runner.invoke(app, ["analyze", str(adapter), "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "spectra.json").is_file() and (out / "spectra.png").is_file()


def test_a_directory_that_is_not_an_adapter_is_refused(tmp_path, tiny_folder):
    (tmp_path / "notes.txt").write_text("hello")
    for command in (["analyze", str(tmp_path)], ["compare", str(tmp_path), str(tmp_path)]):
        result = runner.invoke(app, [*command, "--model", str(tiny_folder)])
        assert result.exit_code == 1 and "no adapter_config.json" in result.output
    assert not (tmp_path.parent / f"{tmp_path.name}-spectra").exists()


def test_compare_lists_shared_and_one_sided_modules(adapter, tiny_folder, tmp_path):
    other = saved_lora(tiny_folder, tmp_path / "other", seed=1, targets=["query", "key"])
    out = tmp_path / "comparison"
    result = runner.invoke(app, ["compare", str(adapter), str(other), "--out", str(out), "--k", "1"])
    assert result.exit_code == 0, result.output
    assert "2 shared modules" in result.output and "only in" in result.output
    found = json.loads((out / "comparison.json").read_text())
    assert len(found["only_a"]) == 2 and len(found["only_b"]) == 2  # value / key of both layers
    assert all(m["k_a"] == m["k_b"] == 1 for m in found["modules"])
    itself = runner.invoke(app, ["compare", str(adapter), str(adapter), "--out", str(out)])
    assert itself.exit_code == 1 and "--force" in itself.output
    itself = runner.invoke(app, ["compare", str(adapter), str(adapter), "--out", str(out), "--force"])
    assert itself.exit_code == 0, itself.output
    summary = json.loads((out / "comparison.json").read_text())["summary"]
    assert summary["mean_overlap"] == pytest.approx(1.0) and summary["mean_cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("command", ["analyze", "compare"])
def test_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output
