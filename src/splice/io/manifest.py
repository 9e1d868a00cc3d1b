"""Provenance of an adapter folder: a SHA-256 manifest that `splice.save` writes next to the
adapter files and `splice.load` / `splice audit` verify.

Adapters are shared like packages, and a backdoor can live entirely in their weights; the
manifest lets a user check that the folder is the one its author wrote and that it was made for
the base model at hand. `splice_manifest.json` records

- the hash of every file of the folder (the model card `README.md` aside: users edit it) and of
  every tensor in `adapter_model.safetensors`, so a changed, added or removed file is found and
  a changed tensor is named;
- the base model's name and a hash of the base weights the adapter targets, in bf16 (so the same
  weights in fp32, bf16 or fp16 hash alike; a 4-bit base hashes as its dequantized weights, which
  differ from the full-precision original), in module order, names left out (a classifier and
  its bare encoder name the same layers differently);
- the method, rank, alpha, adapted modules and the splice version.

A manifest only binds the files to each other; who wrote them is what a signature says
(`io.signing`, `splice_manifest.sig` over the manifest's bytes).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from splice.core.host import hosts, initial_deltas_given_back
from splice.core.layers import dense_weight, is_plain_float_weight
from splice.io.adapter_files import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from splice.io.base_names import base_model_name
from splice.io.files import write_bytes

MANIFEST_NAME = "splice_manifest.json"
SIGNATURE_NAME = "splice_manifest.sig"
MANIFEST_VERSION = 1
HASHED_DTYPE = torch.bfloat16
# files of a folder the manifest does not cover: the model card (users edit it) and itself
UNHASHED = frozenset({CARD_NAME, MANIFEST_NAME, SIGNATURE_NAME})

BaseVerdict = Literal["match", "mismatch", "unknown"]

# model -> {adapter: (the hashed weights' identities and versions, hash, count)}: a trainer saves at
# every improvement, and hashing a large base's targeted weights each time would cost seconds
_BASE_HASHES: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, str, int]]] = weakref.WeakKeyDictionary()


def write_manifest(folder: Path, model: nn.Module | None = None, adapter: str | None = None) -> Path:
    """Write `folder`'s manifest from the files already in it; with the model and the adapter's
    name, the base model's identity and the hash of its targeted weights too."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": f"splice {_version()}",
        "adapter": _adapter_facts(config, model, adapter),
        "base_model": _base_facts(config, model, adapter),
        "files": {path.name: file_sha256(path) for path in _hashed_files(folder)},
        "tensors": tensor_hashes(folder / WEIGHTS_NAME) if (folder / WEIGHTS_NAME).is_file() else {},
    }
    path = folder / MANIFEST_NAME
    write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def base_weights_sha256(model: nn.Module, adapter: str) -> tuple[str | None, int, str]:
    """(hash, modules hashed, why there is no hash) of the base weights adapter `adapter` targets."""
    targeted = [(name, base, host) for name, base, host in hosts(model) if adapter in host]
    if not targeted:
        return None, 0, f"adapter {adapter!r} is attached to no module"
    merged = sorted({n for _, _, host in targeted for n in host.merged})
    if merged:
        return None, 0, f"adapters {merged} are merged into the base weights"
    targeted.sort(key=lambda item: item[0])
    key = tuple(_fingerprint(base.weight) for _, base, _ in targeted)
    cached = _BASE_HASHES.get(model, {}).get(adapter)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2], ""
    digest = hashlib.sha256()
    with initial_deltas_given_back(model, adapter):  # PiSSA-like inits took part of W out
        for _, base, host in targeted:
            weight = dense_weight(base, host.info).to(device="cpu", dtype=HASHED_DTYPE).contiguous()
            digest.update(f"{tuple(weight.shape)}\n".encode())
            digest.update(weight.view(torch.int16).numpy().tobytes())
    _BASE_HASHES.setdefault(model, {})[adapter] = (key, digest.hexdigest(), len(targeted))
    return digest.hexdigest(), len(targeted), ""


def _fingerprint(weight: torch.Tensor) -> tuple:
    """What tells a cached hash is stale: the tensor's identity, its in-place version (a merge, a
    load) and a strided sample of its values (writes through `.data` bypass the version)."""
    sample = None
    if is_plain_float_weight(weight):  # a packed 4-bit weight is only changed by requantizing (a new tensor)
        flat = weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes()
    return id(weight), weight._version, sample


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of each tensor of a safetensors file (dtype, shape and bytes), by key."""
    hashes = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous()
            digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            hashes[key] = digest.hexdigest()
    return hashes


@dataclass
class ManifestCheck:
    """What verifying a folder against its manifest found.

    `tampered`: files or tensors that differ from the manifest (changed, added, removed) or a
    manifest that cannot be read; `base`: whether the model's targeted weights hash as recorded
    ("unknown" without a model or a recorded hash, `base_message` says why); `notes`: context.
    """

    folder: Path
    manifest: dict[str, Any] | None
    tampered: list[str] = field(default_factory=list)
    base: BaseVerdict = "unknown"
    base_message: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_manifest(self) -> bool:
        return self.manifest is not None

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "manifest": self.has_manifest, "tampered": self.tampered,
                "base": self.base, "base_message": self.base_message, "notes": self.notes}


def verify_manifest(folder: str | Path, model: nn.Module | None = None, adapter: str | None = None) -> ManifestCheck:
    """Check the files of `folder` against its manifest and, given the model with the adapter
    attached as `adapter`, the base weights it targets against the recorded hash."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return ManifestCheck(folder, None, notes=[f"{folder} has no {MANIFEST_NAME} (splice.save writes one; "
                                                  "HF PEFT and older splice folders have none): nothing to verify"])
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest_version {manifest.get('manifest_version')!r} is not {MANIFEST_VERSION}"
                             if isinstance(manifest, dict) else "not a JSON object")
        files, tensors = dict(manifest["files"]), dict(manifest["tensors"])
    except (ValueError, KeyError, TypeError) as err:
        return ManifestCheck(folder, None, tampered=[f"{path}: unreadable manifest ({err})"])
    check = ManifestCheck(folder, manifest)
    check.tampered = _file_differences(folder, files) + _tensor_differences(folder, tensors, files)
    if model is not None and adapter is not None:
        check.base, check.base_message = _base_verdict(manifest, model, adapter)
    else:
        check.base_message = "no model given: the base weights were not compared"
    return check


def _file_differences(folder: Path, recorded: dict[str, str]) -> list[str]:
    present = {path.name: path for path in _hashed_files(folder)}
    found = [f"{folder / name}: listed in the manifest but missing" for name in sorted(set(recorded) - set(present))]
    found += [f"{folder / name}: not in the manifest (added after it was written)"
              for name in sorted(set(present) - set(recorded))]
    found += [f"{folder / name}: its SHA-256 differs from the manifest's (changed after it was written)"
              for name in sorted(set(present) & set(recorded)) if file_sha256(present[name]) != recorded[name]]
    return found


def _tensor_differences(folder: Path, recorded: dict[str, str], files: dict[str, str]) -> list[str]:
    weights = folder / WEIGHTS_NAME
    if WEIGHTS_NAME not in files or not weights.is_file() or file_sha256(weights) == files[WEIGHTS_NAME]:
        return []
    try:
        actual = tensor_hashes(weights)
    except (SafetensorError, OSError) as err:
        return [f"{weights}: cannot be read to compare its tensors ({err})"]
    changed = sorted(k for k in set(actual) & set(recorded) if actual[k] != recorded[k])
    added, removed = sorted(set(actual) - set(recorded)), sorted(set(recorded) - set(actual))
    return [f"{weights}: tensor {key} {what}" for keys, what in
            ((changed, "differs from the manifest's"), (added, "is not in the manifest"), (removed, "is missing"))
            for key in keys]


def _base_verdict(manifest: dict[str, Any], model: nn.Module, adapter: str) -> tuple[BaseVerdict, str]:
    recorded = manifest.get("base_model") or {}
    expected = recorded.get("weights_sha256")
    if not expected:
        return "unknown", f"the manifest records no base-weight hash ({recorded.get('why', 'not given')})"
    actual, count, why = base_weights_sha256(model, adapter)
    if actual is None:
        return "unknown", f"the model's base weights could not be hashed: {why}"
    if actual == expected and count == recorded.get("modules_hashed"):
        return "match", f"the {count} targeted base weights hash as recorded"
    base = f"base {recorded['name']!r}" if recorded.get("name") else "a base"
    return "mismatch", (f"the adapter was made for {base} whose {recorded.get('modules_hashed')} "
                        f"targeted weights hash to {expected[:12]}..; this model's {count} hash to {actual[:12]}.. "
                        "(another base model or revision, or changed weights)")


def _hashed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in UNHASHED)


def _adapter_facts(config: dict[str, Any], model: nn.Module | None, adapter: str | None) -> dict[str, Any]:
    modules = sorted(name for name, _, host in hosts(model) if adapter in host) if model is not None else None
    return {
        "name": adapter,
        "method": config.get("peft_type") or config.get("method"),
        "rank": config.get("r", config.get("rank")),
        "alpha": config.get("lora_alpha", config.get("alpha")),
        "target_modules": config.get("target_modules", config.get("targets")),
        "modules": modules,
    }


def _base_facts(config: dict[str, Any], model: nn.Module | None, adapter: str | None) -> dict[str, Any]:
    name = config.get("base_model_name_or_path") or (base_model_name(model) if model is not None else None)
    if model is None or adapter is None:
        return {"name": name, "weights_sha256": None, "why": "written without the model"}
    digest, count, why = base_weights_sha256(model, adapter)
    facts: dict[str, Any] = {"name": name, "weights_sha256": digest, "modules_hashed": count,
                             "hashed_as": str(HASHED_DTYPE).removeprefix("torch.")}
    if digest is None:
        facts["why"] = why
    return facts


def _version() -> str:
    from splice import __version__  # the package's, read when a manifest is written (splice imports io)

    return __version__
