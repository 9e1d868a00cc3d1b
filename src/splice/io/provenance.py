"""What `splice.load` does with an adapter folder's manifest and signature (`io.manifest`,
`io.signing`), by policy:

- "warn" (default): files that differ from the manifest, or a base model whose targeted weights
  hash otherwise than recorded, give a `ProvenanceWarning` and the adapter loads; a folder
  without a manifest (HF PEFT's, say) loads silently;
- "strict": each of those refuses the load (nothing stays attached), a missing manifest too;
- "off": nothing is checked.

A public key given to `load` means the signature must verify and the files must be the signed
ones, under either policy: asking for a signature check and loading an unsigned, wrongly signed
or changed folder would defeat its purpose (and "off" with a key is refused as a contradiction).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from torch import nn

from splice.core.errors import AdapterFileError, SpliceError
from splice.io.manifest import verify_manifest
from splice.io.signing import verify_signature

Policy = Literal["warn", "strict", "off"]
POLICIES: tuple[str, ...] = ("warn", "strict", "off")


class ProvenanceWarning(UserWarning):
    """An adapter folder differs from its manifest, or was made for other base weights."""


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise SpliceError(f"provenance={policy!r}: use one of {POLICIES}")


def check_files(folder: Path, policy: Policy, public_key: str | Path | None) -> None:
    """Before attaching: the folder's files against its manifest, and its signature."""
    if policy == "off":  # `load` refuses it with a public key
        return
    check = verify_manifest(folder)
    if public_key is not None:
        verdict, message = verify_signature(folder, public_key)
        if verdict != "verified":
            raise AdapterFileError(f"refusing to load {folder}: {message}")
        if check.tampered:
            raise AdapterFileError(f"refusing to load {folder}: its files are not the ones signed: "
                                   + "; ".join(check.tampered))
    if not check.has_manifest and not check.tampered:
        if policy == "strict":
            raise AdapterFileError(f"refusing to load {folder} (provenance='strict'): {check.notes[0]}")
        return
    if check.tampered:
        _report(folder, policy, "its files differ from its manifest: " + "; ".join(check.tampered))


def base_mismatch(folder: Path, model: nn.Module, name: str, policy: Policy) -> str | None:
    """After attaching: why the base weights adapter `name` targets are not the ones its manifest
    records (None when they are, or cannot be compared). Under "warn" it is also warned."""
    if policy == "off":
        return None
    check = verify_manifest(folder, model, name)
    if check.base != "mismatch":
        return None
    if policy == "warn":
        _report(folder, policy, check.base_message)
    return f"refusing to load {folder} (provenance='strict'): {check.base_message}"


def _report(folder: Path, policy: Policy, message: str) -> None:
    if policy == "strict":
        raise AdapterFileError(f"refusing to load {folder} (provenance='strict'): {message}")
    warnings.warn(f"{folder}: {message} (splice audit checks it in full; provenance='strict' refuses)",
                  ProvenanceWarning, stacklevel=4)
