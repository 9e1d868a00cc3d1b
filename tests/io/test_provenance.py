"""Provenance manifests and signatures (issue 21, item 1): `splice.save` writes the hashes,
`splice.load` verifies them by policy, a signature binds the folder to its author's key."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_close, logits, make_bert, randomize
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import splice
from splice.audit import provenance_audit
from splice.core.errors import AdapterFileError, OutputExistsError, SpliceError
from splice.io.hub import adapter_patterns
from splice.io.manifest import MANIFEST_NAME, SIGNATURE_NAME, base_weights_sha256, verify_manifest
from splice.io.provenance import ProvenanceWarning
from splice.io.signing import generate_key, sign_folder, verify_signature

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def saved(tmp_path: Path, seed: int = 0, init: str = "default", **save_options) -> Path:
    model = make_bert(seed)
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"], init=init))
    randomize(model)
    return splice.save(model, tmp_path / f"adapter{seed}{init}", **save_options)


def quiet_load(model: torch.nn.Module, folder: Path, **options) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)
        return splice.load(model, folder, **options)


def test_the_manifest_hashes_every_file_and_tensor_and_the_targeted_base_weights(tmp_path):
    folder = saved(tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["files"] == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                                 for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert sorted(manifest["tensors"]) == sorted(load_file(folder / "adapter_model.safetensors"))
    assert manifest["adapter"]["rank"] == 2 and manifest["adapter"]["alpha"] == 16
    assert manifest["adapter"]["modules"] == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                              for i in (0, 1) for m in ("query", "value")]
    model = splice.attach(make_bert(0), splice.LoRA(r=2, targets=["query", "value"]))
    assert manifest["base_model"]["weights_sha256"] == base_weights_sha256(model, "default")[0]
    assert manifest["base_model"]["modules_hashed"] == 4
    assert not (saved(tmp_path, seed=1, manifest=False) / MANIFEST_NAME).exists()


def test_the_same_base_loads_silently_and_the_base_hash_ignores_the_float_dtype(tmp_path):
    folder = saved(tmp_path)
    quiet_load(make_bert(0), folder, provenance="strict")
    model = quiet_load(make_bert(0).to(torch.bfloat16), folder, provenance="strict")
    assert verify_manifest(folder, model, "default").base == "match"


def test_a_pissa_adapter_hashes_the_base_before_its_init_took_the_top_singular_part(tmp_path):
    folder = saved(tmp_path, init="pissa")
    assert verify_manifest(folder, quiet_load(make_bert(0), folder), "default").base == "match"


def test_another_base_warns_under_warn_and_is_refused_with_nothing_attached_under_strict(tmp_path):
    folder = saved(tmp_path)
    with pytest.warns(ProvenanceWarning, match="the adapter was made for a base whose 4 targeted weights hash to"):
        splice.load(make_bert(3), folder)
    other = make_bert(3)
    reference = logits(other, input_ids=IDS)
    with pytest.raises(AdapterFileError, match=r"provenance='strict'.*made for a base whose 4 targeted"):
        splice.load(other, folder, provenance="strict")
    assert splice.adapters(other) == {}
    assert_close(logits(other, input_ids=IDS), reference, rel=0)
    quiet_load(make_bert(3), folder, provenance="off")


def test_a_changed_tensor_is_named_and_an_added_file_is_found(tmp_path):
    folder = saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[1]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.warns(ProvenanceWarning, match=f"tensor {key} differs from the manifest's"):
        splice.load(make_bert(0), folder)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: its SHA-256 differs"):
        splice.load(make_bert(0), folder, provenance="strict")
    clean = saved(tmp_path, seed=2)
    (clean / "adapter_model.bin").write_bytes(b"pickled surprise")
    with pytest.raises(AdapterFileError, match=r"adapter_model.bin: not in the manifest \(added after"):
        splice.load(make_bert(2), clean, provenance="strict")


def test_an_adapter_subfolder_added_to_a_signed_single_adapter_folder_is_found_as_added(tmp_path):
    folder = saved(tmp_path)
    private, public = generate_key(tmp_path / "me.pem", tmp_path / "me.pub")
    sign_folder(folder, private)
    shutil.copytree(saved(tmp_path, seed=1), folder / "extra")  # `load(..., adapters="all")` would read it
    added = f"{folder / 'extra'}: an adapter not in {folder / MANIFEST_NAME} (added after it was written)"
    assert verify_manifest(folder).tampered == [added]
    audit = provenance_audit(folder, public_key=public)
    assert [(f.severity, f.message) for f in audit.findings if f.severity == "flag"] == [("flag", added)]
    with pytest.raises(AdapterFileError, match=r"extra: an adapter not in .*\(added after it was written\)"):
        splice.load(make_bert(0), folder, provenance="strict")


def test_a_folder_without_a_manifest_loads_unless_strict_and_a_broken_manifest_is_tampering(tmp_path):
    peft_model = get_peft_model(make_bert(0), LoraConfig(r=2, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path / "peft")
    quiet_load(make_bert(0), tmp_path / "peft")
    with pytest.raises(AdapterFileError, match=f"has no {MANIFEST_NAME}"):
        splice.load(make_bert(0), tmp_path / "peft", provenance="strict")
    folder = saved(tmp_path)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(AdapterFileError, match="unreadable manifest"):
        splice.load(make_bert(0), folder, provenance="strict")
    with pytest.raises(SpliceError, match="provenance='loose': use one of"):
        splice.load(make_bert(0), folder, provenance="loose")


def test_a_signed_folder_verifies_with_its_key_and_is_refused_with_another_or_after_a_change(tmp_path):
    private, public = generate_key(tmp_path / "me.pem", tmp_path / "me.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    _, stranger = generate_key(tmp_path / "them.pem", tmp_path / "them.pub")
    folder = saved(tmp_path, sign_with=private)
    assert verify_signature(folder, public)[0] == "verified"
    assert verify_signature(folder, None)[0] == "not checked"
    quiet_load(make_bert(0), folder, public_key=public)
    with pytest.raises(AdapterFileError, match="is not a signature of .* by the key in"):
        splice.load(make_bert(0), folder, public_key=stranger)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["adapter"]["rank"] = 3
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify_signature(folder, public)[0] == "invalid"
    unsigned = saved(tmp_path, seed=1)
    with pytest.raises(AdapterFileError, match=f"has no {SIGNATURE_NAME}"):
        splice.load(make_bert(1), unsigned, public_key=public)


def test_signing_refuses_to_overwrite_keys_and_signatures_and_a_key_of_the_wrong_kind(tmp_path):
    private, _ = generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    with pytest.raises(OutputExistsError, match="k.pem exists"):
        generate_key(private, tmp_path / "other.pub")
    folder = saved(tmp_path, sign_with=private)
    first = (folder / SIGNATURE_NAME).read_bytes()
    with pytest.raises(OutputExistsError, match="signed already"):
        sign_folder(folder, private)
    sign_folder(folder, private, overwrite=True)
    assert (folder / SIGNATURE_NAME).read_bytes() == first  # Ed25519 signatures are deterministic
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "ec.pem").write_bytes(ec_key)
    with pytest.raises(SpliceError, match="ECPrivateKey; splice signs with Ed25519"):
        sign_folder(folder, tmp_path / "ec.pem", overwrite=True)
    with pytest.raises(SpliceError, match=r"private key file .*nokey.pem does not exist"):
        sign_folder(folder, tmp_path / "nokey.pem", overwrite=True)
    with pytest.raises(SpliceError, match=r"public key file .*nokey.pub does not exist"):
        verify_signature(folder, tmp_path / "nokey.pub")
    with pytest.raises(SpliceError, match="needs manifest=True"):
        saved(tmp_path, seed=1, manifest=False, sign_with=private)


def test_hub_downloads_fetch_the_manifest_and_signature_with_the_adapter():
    from huggingface_hub.utils import filter_repo_objects

    files = ["README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME, SIGNATURE_NAME, "x.bin"]
    assert list(filter_repo_objects(files, allow_patterns=adapter_patterns(None, False))) == files[1:5]


def test_the_base_hash_sees_a_weight_changed_in_place_or_through_data():
    model = splice.attach(make_bert(0), splice.LoRA(r=2, targets=["query", "value"]))
    first = base_weights_sha256(model, "default")[0]
    assert base_weights_sha256(model, "default")[0] == first
    query = model.bert.encoder.layer[0].attention.self.query.weight
    with torch.no_grad():
        query.mul_(2.0)
    second = base_weights_sha256(model, "default")[0]
    query.data.mul_(0.5)  # bypasses the version counter
    assert len({first, second}) == 2 and base_weights_sha256(model, "default")[0] == first


def test_a_file_load_never_reads_is_reported_apart_not_as_tampering(tmp_path):
    folder = saved(tmp_path)
    (folder / "metrics.json").write_text("{}")  # a run's or a trainer's file beside the adapter
    quiet_load(make_bert(0), folder, provenance="strict")
    check = verify_manifest(folder)
    assert check.tampered == [] and len(check.extra) == 1 and "splice.load does not read it" in check.extra[0]
    from splice.audit.provenance import provenance_audit

    warned = [f for f in provenance_audit(folder).findings if f.severity == "warning"]
    assert [f.message for f in warned] == check.extra
    (folder / "sub").mkdir()  # a folder of anything but an adapter: reported the same way
    (folder / "sub" / "evil.py").write_text("print('hi')\n")
    check = verify_manifest(folder)
    assert check.tampered == [] and check.extra[-1] == (f"{folder / 'sub'}: a folder not in the manifest (added "
                                                        "after it was written; splice.load does not read it)")
