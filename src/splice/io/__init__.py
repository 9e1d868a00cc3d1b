"""Saving and loading adapters: HF PEFT's format where it can hold the method, splice's otherwise;
one adapter per folder or several in PEFT's layout (`io.layout`); local folders or Hub repos
(`io.hub`); a model card in every folder written (`io.model_card`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch import nn

from splice.core.api import activate, active_adapters, detach, model_state
from splice.core.errors import AdapterFileError, SpliceError
from splice.io import hub, layout, native, peft_format
from splice.io.adapter_files import read_adapter
from splice.io.adapter_states import adapter_state, pick_adapter, save_state
from splice.io.files import atomic_directory
from splice.io.hub import push_folder
from splice.io.layout import Selection
from splice.io.manifest import write_manifest
from splice.io.model_card import card_entry, write_cards
from splice.io.provenance import Policy, base_mismatch, check_files, check_policy
from splice.io.signing import sign_folder

__all__ = ["adapter_state", "load", "push_folder", "save", "save_state"]

Format = Literal["auto", "peft", "splice"]


def save(
    model: nn.Module,
    path: str | Path,
    name: str | None = None,
    *,
    adapters: Selection | None = None,
    format: Format = "auto",
    portable: bool = False,
    overwrite: bool = False,
    metrics: Mapping[str, Any] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    hub_api: Any = None,
    manifest: bool = True,
    sign_with: str | Path | None = None,
) -> Path:
    """Write adapter `name` (default: the only one, or the only active one) to directory `path`,
    or several (`adapters=[...]` or "all") in PEFT's layout: "default" at the root, every other
    in a subfolder named after it (`PeftModel.save_pretrained(selected_adapters=...)`).

    LoRA adapters are written in HF PEFT's format, so `PeftModel.from_pretrained(base, path)`
    gives the same outputs (PiSSA adapters are converted to a rank-2r LoRA for the unmodified
    base, as PEFT does). Other methods use splice's own format. `portable=True` also checks the
    subset vLLM serves (no trained heads, one rank and alpha) and explains what prevents it.
    Every folder gets a README.md model card (with `metrics`, when given); one a user wrote in
    the folder being replaced keeps its text (`io.model_card`).
    An existing non-empty directory is refused unless `overwrite=True`, which replaces it as a
    whole: the folder is written next to it and swapped in at once, so a crash, a full disk or a
    kill leaves the old complete folder or the new one, never a mixture (`io.files`).
    `push_to_hub="owner/name"` then uploads the folder to that Hub repo (created if missing,
    `private` on creation; `hub_api`: an `huggingface_hub.HfApi` to use instead of the default);
    a failed upload leaves the folder written.

    Every adapter folder gets a provenance manifest, `splice_manifest.json` (`io.manifest`: hashes
    of its files and tensors, of the base weights it targets, its method, rank and alpha), which
    `load` and `splice audit` verify; `manifest=False` leaves it out. `sign_with=` a PEM Ed25519
    private key also signs it (`io.signing`; `splice keygen` makes a key pair).
    """
    if sign_with is not None and not manifest:
        raise SpliceError("sign_with= signs the manifest; it needs manifest=True")
    if adapters is not None and name is not None:
        raise SpliceError("pass name= (one adapter) or adapters= (several), not both")
    if push_to_hub is not None:
        hub.check_repo_id(push_to_hub)
    places = {pick_adapter(model, name): ""} if adapters is None else _places(model, adapters)
    formats = {adapter: _format(model, adapter, format, portable) for adapter in places}
    with atomic_directory(path, overwrite) as folder:
        entries = []
        for adapter, sub in places.items():
            where = folder / sub
            where.mkdir(exist_ok=True)
            if formats[adapter] == "peft":
                config, tensors = peft_format.write(model, where, adapter, portable=portable)
            else:
                config, tensors = native.write(model, where, adapter)
            entries.append(card_entry(adapter, sub, where, config, tensors))
        if manifest:
            _write_manifests(model, folder, places, sign_with)
        write_cards(folder, entries, metrics=metrics, replacing=Path(path))
    if push_to_hub is not None:
        push_folder(path, push_to_hub, private=private, api=hub_api)
    return Path(path)


def _write_manifests(model: nn.Module, folder: Path, places: dict[str, str], sign_with: str | Path | None) -> None:
    """Each adapter folder's manifest, the subfolders' first: the root's records their hashes
    (`io.manifest`); then each signed, when asked."""
    subs = {sub: adapter for adapter, sub in places.items() if sub}
    for sub, adapter in subs.items():
        write_manifest(folder / sub, model, adapter)
    root = next((adapter for adapter, sub in places.items() if not sub), None)
    write_manifest(folder, model, root, subfolders=sorted(subs))
    if sign_with is not None:
        for sub in ["", *subs]:
            sign_folder(folder / sub, sign_with)


def _places(model: nn.Module, adapters: Selection) -> dict[str, str]:
    """The subfolder of each adapter to save (PEFT's layout); unknown names refused."""
    attached = list(model_state(model).adapters)
    names = attached if adapters == "all" else list(adapters)
    unknown = [n for n in names if n not in attached]
    if unknown or not names:
        raise SpliceError(f"no adapter named {unknown} to save; attached: {attached}" if unknown else
                          "adapters= names no adapter to save")
    return {n: layout.subfolder(n) for n in names}


def _format(model: nn.Module, name: str, format: Format, portable: bool) -> str:
    """The format adapter `name` is written in: PEFT's where it can hold it (`auto`)."""
    if format == "auto":
        format = "peft" if peft_format.can_write(model, name) else "splice"
    if format == "peft" and not peft_format.can_write(model, name):
        raise SpliceError(f"adapter {name!r} ({model_state(model).adapters[name].config.method}) "
                          "cannot be written in PEFT's format; use format='splice'")
    if portable and format != "peft":
        raise SpliceError("portable=True needs a LoRA adapter written in PEFT's format")
    return format


def load(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False,
         heads: bool = True, adapters: Selection | None = None, revision: str | None = None,
         subfolder: str | None = None, provenance: Policy = "warn",
         public_key: str | Path | None = None) -> nn.Module:
    """Attach the adapter stored in `path` (splice's or HF PEFT's format) as `name`.

    `path` is a local folder, or a Hub repo id ("owner/name", `revision=` a branch, tag or
    commit) whose adapter files are downloaded into the Hugging Face cache (`HF_HUB_OFFLINE=1`:
    the cache only). `subfolder=` reads the adapter from a subfolder of it; `adapters=[...]` or
    "all" loads several from PEFT's layout, each under its own name ("default" from the root).
    `heads=False` leaves out the modules the adapter trained in full (a classifier), to give the
    adapter new ones.

    The directory is validated against the model first: a module it names that the model lacks,
    a shape that does not fit, a corrupt file or an unknown method is refused with the reason,
    and nothing is attached (with several, none of them). Loaded adapters are frozen unless
    `trainable=True`.

    The folder's provenance manifest, when it has one, is verified (`io.provenance`): files that
    differ from it, or base weights other than the ones it was made for, give a
    `ProvenanceWarning` (`provenance="warn"`) or refuse the load ("strict", which also refuses a
    folder without a manifest); `public_key=` a PEM Ed25519 public key requires a valid signature.
    """
    check_policy(provenance)
    if provenance == "off" and public_key is not None:
        raise SpliceError("public_key= asks for a signature check, provenance='off' for none; drop one")
    folder = hub.resolve(path, revision=revision, subfolder=subfolder, several=adapters is not None)
    previous = active_adapters(model)
    if adapters is None:
        _load_one(model, folder, name, trainable, heads, provenance, public_key, previous)
        return model
    if name != "default":
        raise SpliceError("name= names the one adapter loaded; with adapters= each keeps its own name")
    loaded: list[str] = []
    try:
        for adapter, where in layout.adapter_folders(folder, adapters).items():
            _load_one(model, where, adapter, trainable, heads, provenance, public_key, previous)
            loaded.append(adapter)
    except BaseException:
        for adapter in loaded:
            detach(model, adapter)
        _reactivate(model, previous)
        raise
    return model


def _load_one(model: nn.Module, folder: Path, name: str, trainable: bool, heads: bool, provenance: Policy,
              public_key: str | Path | None, previous: list[str]) -> None:
    check_files(folder, provenance, public_key)
    config, tensors = read_adapter(folder)
    if config.get("format") == native.FORMAT:
        native.read(model, config, tensors, name, trainable, source=folder, heads=heads)
    elif "peft_type" in config:
        peft_format.read(model, config, tensors, name, trainable, source=folder, heads=heads)
    else:
        raise AdapterFileError(
            f"{folder} is neither a splice nor an HF PEFT adapter (config keys: {sorted(config)[:8]})"
        )
    try:  # after attaching: the base weights it targets (a warning raised as an error undoes it too)
        refusal = base_mismatch(folder, model, name, provenance)
        if refusal is not None and provenance == "strict":
            raise AdapterFileError(refusal)
    except BaseException:
        detach(model, name)
        _reactivate(model, previous)
        raise


def _reactivate(model: nn.Module, previous: list[str]) -> None:
    """The adapters active before a refused load, active (and trainable as recorded) again."""
    if previous:
        activate(model, previous)
