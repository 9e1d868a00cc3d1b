"""Provenance of an adapter folder: a SHA-256 manifest that `splice.save` writes next to the
adapter files and `splice.load` / `splice audit` verify.

Adapters are shared like packages, and a backdoor can live entirely in their weights; the
manifest lets a user check that the folder is the one its author wrote and that it was made for
the base model at hand. `splice_manifest.json` records

- the hash of every file of the folder (the model card `README.md` aside: users edit it) and of
  every tensor in `adapter_model.safetensors`, so a changed, added or removed file is found and
  a changed tensor is named (a file added that `load` never reads, a run's metrics or a
  trainer's state, is reported apart: worth a look, not a change of what loads);
- the base model's name, a SHA-256 of the base weights the adapter targets (as stored: exact), in
  module order, names left out (a classifier and its bare encoder name the same layers
  differently), their storage (float32, bfloat16, 4bit, ...), and 32 values sampled from each:
  a copy of the base in another dtype or quantized cannot hash alike (rounding fp32 to fp16 then
  bf16 differs from rounding it to bf16), so there the samples are compared within the rounding
  error of the coarser storage, and the verdict says "equal up to rounding";
- the method, rank, alpha, adapted modules and the splice version;
- in a folder of several adapters (PEFT's layout), the root's manifest also records each
  subfolder's manifest hash, so a subfolder whose manifest was removed or rewritten is found.

The base weights are hashed at every save, never cached: a cache could not see a write through
`.data`, and a stale hash is a silent failure; on a large base saved often it costs seconds.
A manifest only binds the files to each other; who wrote them is what a signature says
(`io.signing`, `splice_manifest.sig` over the manifest's bytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from splice.core.host import hosts, initial_deltas_given_back
from splice.core.layers import dense_weight, is_plain_float_weight
from splice.core.nf4_layers import is_4bit_layer
from splice.core.targets import HOST_ATTRIBUTE
from splice.io.adapter_files import ADAPTER_FILES, CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from splice.io.base_names import base_model_name
from splice.io.files import write_bytes

MANIFEST_NAME = "splice_manifest.json"
SIGNATURE_NAME = "splice_manifest.sig"
MANIFEST_VERSION = 1
SAMPLES_PER_MODULE = 32
# the rounding error of a storage, relative to the weights' RMS: how far a copy in it may stray.
# Round-to-nearest moves each value by at most the unit roundoff u times its size (float16
# u = 2^-11, bfloat16 2^-8), so the RMS error is below u x RMS; a little above u, no more: a
# fine-tune's 0.5% change must not pass as rounding. The quantized storages are blockwise.
ROUNDING = {"float64": 1e-9, "float32": 1e-6, "float16": 6e-4, "bfloat16": 4e-3, "8bit": 5e-2, "4bit": 0.2}
# files of a folder the manifest does not cover: the model card (users edit it) and itself
UNHASHED = frozenset({CARD_NAME, MANIFEST_NAME, SIGNATURE_NAME})

BaseVerdict = Literal["match", "mismatch", "unknown"]


def write_manifest(folder: Path, model: nn.Module | None = None, adapter: str | None = None,
                   subfolders: list[str] | tuple[str, ...] = ()) -> Path:
    """Write `folder`'s manifest from the files already in it; with the model and the adapter's
    name, the base model's identity and its targeted weights too; with `subfolders`, the hashes
    of their manifests (written first). A folder holding only subfolders gets a manifest of them."""
    config = json.loads((folder / CONFIG_NAME).read_text()) if (folder / CONFIG_NAME).is_file() else None
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": f"splice {_version()}",
        "adapter": _adapter_facts(config, model, adapter) if config is not None else None,
        "base_model": _base_facts(config, model, adapter) if config is not None else None,
        "files": {path.name: file_sha256(path) for path in _hashed_files(folder)},
        "tensors": tensor_hashes(folder / WEIGHTS_NAME) if (folder / WEIGHTS_NAME).is_file() else {},
        "subfolders": {sub: file_sha256(folder / sub / MANIFEST_NAME) for sub in sorted(subfolders)},
    }
    path = folder / MANIFEST_NAME
    write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def base_weights_sha256(model: nn.Module, adapter: str) -> tuple[str | None, int, str]:
    """(hash, modules hashed, why there is no hash) of the base weights adapter `adapter` targets."""
    record = base_weights_record(model, adapter)
    return record["weights_sha256"], record.get("modules_hashed", 0), record.get("why", "")


def base_weights_record(model: nn.Module, adapter: str) -> dict[str, Any]:
    """What a manifest records of the base weights adapter `adapter` targets: their hash, count,
    storages and samples (module doc); `why` instead when they cannot be read."""
    targeted = sorted(((name, base, host) for name, base, host in hosts(model) if adapter in host),
                      key=lambda item: item[0])
    if not targeted:
        return {"weights_sha256": None, "why": f"adapter {adapter!r} is attached to no module"}
    merged = sorted({n for _, _, host in targeted for n in host.merged})
    if merged:
        return {"weights_sha256": None, "why": f"adapters {merged} are merged into the base weights"}
    digest, storages, samples = hashlib.sha256(), set(), []
    with initial_deltas_given_back(model, adapter):  # PiSSA-like inits took part of W out
        for _, base, host in targeted:
            for storage, tensor in _base_tensors(base, host):
                digest.update(f"{storage}{tuple(tensor.shape)}\n".encode())
                digest.update(_bytes(tensor))
                storages.add(storage)
                samples.append(_sample(tensor))
    return {"weights_sha256": digest.hexdigest(), "modules_hashed": len(targeted), "storage": sorted(storages),
            "samples": samples}


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
            tensor = handle.get_tensor(key)
            digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}\n".encode())
            digest.update(_bytes(tensor))
            hashes[key] = digest.hexdigest()
    return hashes


@dataclass
class ManifestCheck:
    """What verifying a folder against its manifest found.

    `tampered`: files, tensors or subfolder manifests that differ from the manifest (changed,
    added, removed) or a manifest that cannot be read; `extra`: files added beside the adapter
    that `load` never reads (a run's metrics, a trainer's state: worth a look, not tampering with
    what loads); `base`: whether the model's targeted
    weights are the recorded ones ("unknown" without a model or a recorded hash, `base_message`
    says why); `notes`: context.
    """

    folder: Path
    manifest: dict[str, Any] | None
    tampered: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    base: BaseVerdict = "unknown"
    base_message: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_manifest(self) -> bool:
        return self.manifest is not None

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "manifest": self.has_manifest, "tampered": self.tampered,
                "extra": self.extra, "base": self.base, "base_message": self.base_message, "notes": self.notes}


def verify_manifest(folder: str | Path, model: nn.Module | None = None, adapter: str | None = None) -> ManifestCheck:
    """Check the files of `folder` against its manifest (and against the record its parent's
    manifest keeps of it, in a folder of several adapters) and, given the model with the adapter
    attached as `adapter`, the base weights it targets against the recorded ones."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    bound = _parent_record(folder)
    if not path.is_file():
        if bound is not None:
            return ManifestCheck(folder, None, tampered=[f"{path}: missing, though {folder.parent / MANIFEST_NAME} "
                                                         "lists it (removed after it was written)"])
        return ManifestCheck(folder, None, notes=[f"{folder} has no {MANIFEST_NAME} (splice.save writes one; "
                                                  "HF PEFT and older splice folders have none): nothing to verify"])
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest_version {manifest.get('manifest_version')!r} is not {MANIFEST_VERSION}"
                             if isinstance(manifest, dict) else "not a JSON object")
        files, tensors = dict(manifest["files"]), dict(manifest["tensors"])
        subfolders = dict(manifest.get("subfolders") or {})
    except (ValueError, KeyError, TypeError) as err:
        return ManifestCheck(folder, None, tampered=[f"{path}: unreadable manifest ({err})"])
    check = ManifestCheck(folder, manifest)
    changed, check.extra = _file_differences(folder, files)
    check.extra += _added_folders(folder, subfolders)
    check.tampered = changed + _tensor_differences(folder, tensors, files) + _subfolder_differences(folder, subfolders)
    if bound is not None and bound != file_sha256(path):
        check.tampered.append(f"{path}: differs from the hash {folder.parent / MANIFEST_NAME} records of it "
                              "(rewritten after it was written)")
    if model is not None and adapter is not None:
        check.base, check.base_message = _base_verdict(manifest, model, adapter)
    else:
        check.base_message = "no model given: the base weights were not compared"
    return check


def _parent_record(folder: Path) -> str | None:
    """The hash the parent folder's manifest records of `folder`'s manifest, if it lists it."""
    parent = folder.parent / MANIFEST_NAME
    if folder.parent == folder or not parent.is_file():
        return None
    try:
        listed = json.loads(parent.read_text()).get("subfolders") or {}
    except (ValueError, AttributeError):
        return None  # the parent's own check reports an unreadable manifest
    return listed.get(folder.name) if isinstance(listed, dict) else None


def _file_differences(folder: Path, recorded: dict[str, str]) -> tuple[list[str], list[str]]:
    """(differences that change what `load` reads, files added beside it that it never reads)."""
    present = {path.name: path for path in _hashed_files(folder)}
    added = sorted(set(present) - set(recorded))
    found = [f"{folder / name}: listed in the manifest but missing" for name in sorted(set(recorded) - set(present))]
    found += [f"{folder / name}: not in the manifest (added after it was written)" for name in added
              if name in ADAPTER_FILES]
    extra = [f"{folder / name}: not in the manifest (added after it was written; splice.load does not read it)"
             for name in added if name not in ADAPTER_FILES]
    found += [f"{folder / name}: its SHA-256 differs from the manifest's (changed after it was written)"
              for name in sorted(set(present) & set(recorded)) if file_sha256(present[name]) != recorded[name]]
    return found, extra


def _added_folders(folder: Path, recorded: dict[str, str]) -> list[str]:
    """Folders beside the adapter that are neither listed subfolders nor adapters (those are
    checked as such): added after the manifest was written, never read by `load`."""
    return [f"{path}: a folder not in the manifest (added after it was written; splice.load does not read it)"
            for path in sorted(folder.iterdir()) if path.is_dir() and path.name not in recorded
            and not (path / CONFIG_NAME).is_file() and path.name != "__pycache__"]


def _subfolder_differences(folder: Path, recorded: dict[str, str]) -> list[str]:
    found = []
    for sub, expected in sorted(recorded.items()):
        manifest = folder / sub / MANIFEST_NAME
        if not manifest.is_file():
            found.append(f"{manifest}: listed in {folder / MANIFEST_NAME} but missing")
        elif file_sha256(manifest) != expected:
            found.append(f"{manifest}: differs from the hash {folder / MANIFEST_NAME} records of it")
    adapters = [p.name for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()]
    found += [f"{folder / sub}: an adapter not in {folder / MANIFEST_NAME} (added after it was written)"
              for sub in sorted(set(adapters) - set(recorded))]
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
    actual = base_weights_record(model, adapter)
    if actual["weights_sha256"] is None:
        return "unknown", f"the model's base weights could not be hashed: {actual['why']}"
    count = actual["modules_hashed"]
    if actual["weights_sha256"] == expected and count == recorded.get("modules_hashed"):
        return "match", f"the {count} targeted base weights hash as recorded"
    was, now = list(recorded.get("storage") or []), actual["storage"]
    if count == recorded.get("modules_hashed") and was != now and _close(recorded.get("samples"), actual["samples"],
                                                                          was + now):
        return "match", (f"the {count} targeted base weights equal the recorded ones up to rounding (stored as "
                         f"{'/'.join(now)} here, {'/'.join(was)} when saved; the exact hash differs)")
    base = f"base {recorded['name']!r}" if recorded.get("name") else "a base"
    return "mismatch", (f"the adapter was made for {base} whose {recorded.get('modules_hashed')} "
                        f"targeted weights hash to {expected[:12]}..; this model's {count} hash to "
                        f"{actual['weights_sha256'][:12]}.. (another base model or revision, or changed weights)")


def _close(recorded: Any, actual: list[list[float]], storages: list[str]) -> bool:
    """Whether each module's samples agree within the storages' rounding errors (summed: a copy
    may have been rounded into each of them in turn)."""
    if not isinstance(recorded, list) or len(recorded) != len(actual):
        return False
    tolerance = sum(ROUNDING.get(s, 0.0) for s in set(storages))
    for was, now in zip(recorded, actual, strict=True):
        was, now = torch.tensor(was, dtype=torch.float64), torch.tensor(now, dtype=torch.float64)
        if was.shape != now.shape:
            return False
        scale = max(float(was.pow(2).mean().sqrt()), 1e-12)
        if float((was - now).pow(2).mean().sqrt()) > tolerance * scale:
            return False
    return True


def _base_tensors(base: nn.Module, host: Any) -> list[tuple[str, torch.Tensor]]:
    """(storage, tensor) of a hosted layer's own weights: its weight as stored (a packed one
    dequantized); for a whole block (LoReFT), every parameter outside splice's hosts."""
    if host.info.kind == "block":
        return [(str(p.dtype).removeprefix("torch."), p.detach()) for name, p in base.named_parameters()
                if HOST_ATTRIBUTE not in name.split(".")]
    weight = base.weight
    if is_plain_float_weight(weight):
        return [(str(weight.dtype).removeprefix("torch."), weight.detach())]
    return [("4bit" if is_4bit_layer(base) else "8bit", dense_weight(base, host.info))]


def _bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's bytes as hashlib reads them, without a copy when it is on the CPU already."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def _sample(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PER_MODULE, flat.numel())).long().to(flat.device)
    return [float(v) for v in flat[index].float().cpu()]


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
    return {"name": name, **base_weights_record(model, adapter)}


def _version() -> str:
    from splice import __version__  # the package's, read when a manifest is written (splice imports io)

    return __version__
