"""Review of issue 21's provenance work (manifests, signatures, load policies, `splice audit`,
`splice keygen` / `sign`): each test here fails on the reviewed code for a real reason and
passes once it is fixed."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import make_bert, make_llama, randomize, save_tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import splice
from splice.audit import audit
from splice.audit.report import EXIT_FLAGGED
from splice.audit.settings import read_audit_settings
from splice.cli.main import app
from splice.core.errors import AdapterFileError, ConfigError, SpliceError
from splice.io.manifest import MANIFEST_NAME, SIGNATURE_NAME, base_weights_sha256, verify_manifest
from splice.io.provenance import ProvenanceWarning
from splice.io.signing import generate_key, sign_folder

runner = CliRunner()
TARGETS = ["query", "value"]


def bert_adapter(tmp_path: Path, name: str = "adapter", **save_options) -> Path:
    model = make_bert(0)
    splice.attach(model, splice.LoRA(r=2, targets=TARGETS))
    randomize(model)
    return splice.save(model, tmp_path / name, **save_options)


def two_adapters(tmp_path: Path, **save_options) -> Path:
    """A folder in PEFT's layout: "default" at the root, "b" in subfolder b."""
    model = make_bert(0)
    splice.attach(model, splice.LoRA(r=2, targets=TARGETS))
    randomize(model)
    splice.attach(model, splice.LoRA(r=2, targets=["query"]), name="b")
    randomize(model, "b", seed=1)
    return splice.save(model, tmp_path / "several", adapters=["default", "b"], **save_options)


def scale_first_tensor(folder: Path, factor: float = 5.0) -> str:
    """Tamper with the adapter: one tensor of its weights file scaled; its key."""
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * factor
    save_file(tensors, folder / "adapter_model.safetensors")
    return key


def provenance_warnings(model: torch.nn.Module, folder: Path, **options) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splice.load(model, folder, **options)
    return [str(w.message) for w in caught if issubclass(w.category, ProvenanceWarning)]


# -- load: what it lets through, and what it leaves behind ------------------------------------------


def test_a_signed_folder_whose_tensors_were_changed_is_refused_when_a_public_key_is_given(tmp_path):
    """`public_key=` means "only what this author signed": files that differ from the signed
    manifest are not what the author signed, so a warning (provenance='warn') is not enough."""
    private, public = generate_key(tmp_path / "me.pem", tmp_path / "me.pub")
    folder = bert_adapter(tmp_path, sign_with=private)
    key = scale_first_tensor(folder)
    model = make_bert(0)
    with pytest.raises(AdapterFileError, match=f"tensor {key} differs from the manifest's"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProvenanceWarning)
            splice.load(model, folder, public_key=public)
    assert splice.adapters(model) == {}


def test_a_public_key_is_not_silently_ignored_under_provenance_off(tmp_path):
    """An unsigned folder loaded with a key to check it against: the key is either checked or the
    combination refused, never dropped without a word."""
    _, public = generate_key(tmp_path / "me.pem", tmp_path / "me.pub")
    folder = bert_adapter(tmp_path)
    model = make_bert(0)
    with pytest.raises(SpliceError, match=rf"{SIGNATURE_NAME}|provenance='off'"):
        splice.load(model, folder, provenance="off", public_key=public)
    assert splice.adapters(model) == {}


def test_a_strict_refusal_leaves_the_models_own_adapter_active_and_trainable(tmp_path):
    folder = bert_adapter(tmp_path)
    other = make_bert(3)  # another base: refused after attaching, by the base-weight hash
    splice.attach(other, splice.LoRA(r=2, targets=["query"]), name="mine")
    trainable = sorted(splice.trainable_parameters(other))
    with pytest.raises(AdapterFileError, match="provenance='strict'"):
        splice.load(other, folder, provenance="strict")
    assert list(splice.adapters(other)) == ["mine"]
    assert splice.active_adapters(other) == ["mine"]
    assert sorted(splice.trainable_parameters(other)) == trainable


def test_a_provenance_warning_turned_into_an_error_leaves_nothing_attached(tmp_path):
    """Under `-W error` (pytest's filterwarnings, CI) the load raises: the adapter must not stay."""
    folder = bert_adapter(tmp_path)
    other = make_bert(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)
        with pytest.raises(ProvenanceWarning):
            splice.load(other, folder)
    assert splice.adapters(other) == {}


def test_a_subfolder_adapter_whose_manifest_was_removed_does_not_load_silently(tmp_path):
    """In a folder of several adapters written by splice.save, deleting one subfolder's manifest
    and changing its weights must not make the change invisible under the default policy."""
    folder = two_adapters(tmp_path)
    os.remove(folder / "b" / MANIFEST_NAME)
    scale_first_tensor(folder / "b")
    messages = provenance_warnings(make_bert(0), folder, adapters="all")
    assert any(str(folder / "b") in m for m in messages), messages


# -- false alarms on legitimate use -----------------------------------------------------------


def test_a_base_loaded_in_fp16_is_the_base_the_adapter_was_made_for(tmp_path):
    """The manifest says fp32, bf16 and fp16 copies of the same weights hash alike; fp32 -> fp16
    -> bf16 rounds differently from fp32 -> bf16, so an fp16 base (torch_dtype=float16, the
    usual way to run a model) is refused under strict as "another base"."""
    folder = bert_adapter(tmp_path)
    model = make_bert(0).half()
    assert provenance_warnings(model, folder, provenance="strict") == []
    assert verify_manifest(folder, model, "default").base == "match"


def test_a_4bit_copy_of_the_base_is_not_reported_as_another_base_model(tmp_path):
    """An adapter trained on the full-precision base, served on a 4-bit copy of it (QLoRA-style
    serving): the warning must not tell the user it is another base model or revision."""
    pytest.importorskip("torchao")
    model = make_llama(0)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj", "v_proj"]))
    randomize(model)
    folder = splice.save(model, tmp_path / "dense")
    quantized = splice.quantize(make_llama(0), "nf4", backend="torchao")
    messages = provenance_warnings(quantized, folder)
    assert not any("another base model or revision" in m for m in messages), messages


def test_saving_a_loreft_adapter_still_works_with_its_manifest(tmp_path):
    """LoReFT's hosts are whole decoder layers (no `.weight`): hashing the base weights raises
    AttributeError, so `splice.save` of any LoReFT adapter fails."""
    model = make_llama(0)
    splice.attach(model, splice.LoReFT(r=2))
    randomize(model)
    folder = splice.save(model, tmp_path / "reft")
    assert (folder / MANIFEST_NAME).is_file()
    assert provenance_warnings(make_llama(0), folder, provenance="strict") == []


def test_a_merged_adapter_written_by_splice_carries_a_manifest(tmp_path):
    """`merge_adapters(...).save` (and `save_state`) writes an adapter folder without a manifest,
    so splice's own output is refused under provenance='strict'."""
    from splice.merging import merge_adapters

    first, second = bert_adapter(tmp_path, "a"), bert_adapter(tmp_path, "b")
    merged = merge_adapters([first, second], "linear").save(tmp_path / "merged")
    assert (merged / MANIFEST_NAME).is_file()
    splice.load(make_bert(0), merged, provenance="strict")


def test_the_hf_trainer_callback_writes_a_manifest_at_the_root_and_leaves_no_stale_one(tmp_path):
    """`save_adapters` moves config, weights and card of a root adapter into the output folder,
    not the manifest: the root has none, and one from an earlier splice.save stays, stale, so the
    new checkpoint is reported as tampered."""
    from splice.integrations.hf_trainer import save_adapters

    model = make_bert(0)
    splice.attach(model, splice.LoRA(r=2, targets=TARGETS))
    randomize(model)
    save_adapters(model, tmp_path / "fresh")
    assert (tmp_path / "fresh" / MANIFEST_NAME).is_file()
    splice.save(model, tmp_path / "reused")
    randomize(model, seed=3)  # trained further
    save_adapters(model, tmp_path / "reused")
    assert provenance_warnings(make_bert(0), tmp_path / "reused") == []


# -- the cached base hash --------------------------------------------------------------------------


def test_the_cached_base_hash_sees_a_write_through_data_between_the_sampled_values():
    """The cache trusts a strided sample (1024 values) for writes through `.data`: on a 64 x 64
    weight (stride 4) a change at index 1 returns the old hash."""
    model = make_llama(0, hidden=64, intermediate=128)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    before = base_weights_sha256(model, "default")[0]
    model.model.layers[0].self_attn.q_proj.weight.data[0, 1] += 1.0
    assert base_weights_sha256(model, "default")[0] != before


# -- audit ------------------------------------------------------------------------------------------


def test_the_audit_of_a_folder_of_several_adapters_finds_a_changed_subfolder(tmp_path):
    """`splice audit folder` on PEFT's layout audits the root adapter only and passes (status 0)
    a folder whose adapter "b" was tampered with."""
    folder = two_adapters(tmp_path)
    scale_first_tensor(folder / "b")
    report = audit(folder, make_bert(0))
    assert report.exit_code() == EXIT_FLAGGED
    assert any(str(folder / "b") in f.message for f in report.findings if f.severity == "flag")


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("review-provenance")
    base = save_tiny_llama(where / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    splice.attach(model, splice.LoRA(r=2, targets=["q_proj"]))
    randomize(model, scale=0.05)
    return base, splice.save(model, where / "adapter")


def test_the_audit_json_records_the_settings_it_ran_with(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    result = runner.invoke(app, ["audit", str(adapter), "--model", str(base), "--scan", "off", "--fail-on", "warning",
                                 "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "report" / "audit.json").read_text())["settings"]
    assert settings.get("fail_on") == "warning" and settings.get("model") == str(base), settings


def test_audit_quiet_prints_no_table_only_the_closing_line(llama_adapter):
    """--quiet: "no progress bars and no tables: only errors, warnings and the closing line"."""
    base, adapter = llama_adapter
    result = runner.invoke(app, ["audit", str(adapter), "--model", str(base), "--scan", "off", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "note(s)" in result.output
    assert "audit of" not in result.output and "severity" not in result.output, result.output


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["off", "on"])
def test_scan_on_or_off_in_a_yaml_config_is_read_as_written(tmp_path, value):
    """YAML 1.1 reads a bare on/off as a boolean: `scan: off`, as `--help` spells it, is refused."""
    config = tmp_path / "audit.yaml"
    config.write_text(f"scan: {value}\n")
    assert read_audit_settings(config, {}).scan == value


@pytest.mark.parametrize("k", [0, 5])
def test_a_min_k_share_outside_0_1_is_refused_naming_the_file_key_and_value(tmp_path, k):
    """Caught only after the base model is loaded and scored, without the file's name, today."""
    config = tmp_path / "audit.yaml"
    config.write_text(f"k: {k}\n")
    with pytest.raises(ConfigError, match=rf"audit.yaml.*'k' has value {k}"):
        read_audit_settings(config, {})


# -- keys and signatures ----------------------------------------------------------------------------


def test_keygen_refuses_one_path_for_both_keys_before_the_private_key_is_lost(tmp_path):
    """`splice keygen me.pub` writes the private key to me.pub, then the public key over it."""
    same = tmp_path / "me.pub"
    with pytest.raises(SpliceError, match="me.pub"):
        generate_key(same, same)
    result = runner.invoke(app, ["keygen", str(tmp_path / "you.pub")])
    assert result.exit_code == 1 and "you.pub" in result.output, result.output


def test_keygen_of_its_own_example_creates_the_key_folder(tmp_path):
    """`splice keygen ~/.splice/me.pem` (the command's example) dies on FileNotFoundError, with
    status 1 and no message, where ~/.splice does not exist yet."""
    result = runner.invoke(app, ["keygen", str(tmp_path / ".splice" / "me.pem")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / ".splice" / "me.pem").is_file() and (tmp_path / ".splice" / "me.pub").is_file()


def test_signing_a_folder_that_differs_from_its_manifest_is_refused(tmp_path):
    """A signature vouches for the folder; signing a manifest the files no longer match signs
    changes the author never made."""
    private, _ = generate_key(tmp_path / "me.pem", tmp_path / "me.pub")
    folder = bert_adapter(tmp_path)
    scale_first_tensor(folder)
    with pytest.raises(SpliceError, match="adapter_model.safetensors"):
        sign_folder(folder, private)
    assert not (folder / SIGNATURE_NAME).exists()


def test_splice_sign_signs_every_adapter_of_a_folder_of_several(tmp_path):
    """`splice sign` signs the root manifest only; the folder then fails `load(adapters="all",
    public_key=...)` on its unsigned subfolder."""
    private, public = generate_key(tmp_path / "me.pem", tmp_path / "me.pub")
    folder = two_adapters(tmp_path)
    result = runner.invoke(app, ["sign", str(folder), "--key", str(private)])
    assert result.exit_code == 0, result.output
    model = splice.load(make_bert(0), folder, adapters="all", public_key=public)
    assert sorted(splice.adapters(model)) == ["b", "default"]
