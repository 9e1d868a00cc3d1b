"""`splice.audit.audit`: every check the caller asks for, on one adapter folder and its base
model, gathered in one report. The model is left as it was given: the adapter is attached for
the audit under its own name and detached at the end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import splice
from splice.audit.contamination import Item, contamination_test
from splice.audit.findings import Finding
from splice.audit.provenance import provenance_audit
from splice.audit.report import AuditReport
from splice.audit.scan import trigger_scan
from splice.audit.static import WeightProfile, static_audit
from splice.audit.trigger_words import word_scan
from splice.core.errors import AdapterFileError, SpliceError
from splice.io.layout import saved_adapters
from splice.io.manifest import MANIFEST_NAME

AUDITED = "audited"  # the name the adapter is attached under


@dataclass(frozen=True)
class ScanSettings:
    """The behaviour scan: a causal LM's trigger sweep (`triggers`, `prompts`, `template`) or,
    with `texts`, a classifier's trigger-word scan over those texts (`candidates` added)."""

    triggers: Sequence[str] | None = None
    prompts: Sequence[str] | None = None
    template: str = "{trigger}\n{prompt}"
    texts: Sequence[str] | None = None
    candidates: Sequence[str] | None = None
    new_tokens: int = 8
    batch_size: int = 8


def audit(adapter: str | Path, model: nn.Module, tokenizer: Any = None, *, name: str | None = None,
          references: Sequence[str | Path | WeightProfile] = (), public_key: str | Path | None = None,
          scan: ScanSettings | None = None, suspect: Sequence[Item] | None = None,
          control: Sequence[Item] | None = None, contamination: dict[str, Any] | None = None,
          settings: dict[str, Any] | None = None) -> AuditReport:
    """Audit adapter folder `adapter` against `model`, its base (without that adapter). In a
    folder of several adapters (PEFT's layout) every one's provenance is checked, the other
    checks run on adapter `name` (default: the root's "default", or the only one):

    - provenance, always: the manifest's hashes, the base weights it was made for, the signature
      (with `public_key`);
    - the static weight audit, always: per-module ΔW features, scored against `references`
      (benign adapters of the same base) when there are at least 3;
    - the behaviour scan with `scan` (needs `tokenizer`): `trigger_scan` for a causal LM,
      `word_scan` for a classifier when `scan.texts` is given;
    - the contamination test with `suspect` and `control` items (needs `tokenizer`;
      `contamination` holds `contamination_test`'s other options).
    """
    if (suspect is None) != (control is None):
        raise SpliceError("the contamination test needs both suspect (the evaluation set) and control items")
    if (scan is not None or suspect is not None) and tokenizer is None:
        raise SpliceError("the behaviour scan and the contamination test need the model's tokenizer")
    if AUDITED in splice.adapters(model):
        raise SpliceError(f"the model already carries an adapter named {AUDITED!r}; pass the bare base model")
    folder, others = _folders(Path(adapter), name)
    active = splice.active_adapters(model)
    try:
        splice.load(model, folder, AUDITED, provenance="off")  # the audit reports what load would refuse
    except AdapterFileError as err:
        return unloadable_audit(adapter, err, name=name, public_key=public_key, settings=settings)
    try:
        report = AuditReport(str(folder), settings=dict(settings or {}))
        report.sections["provenance"] = provenance_audit(folder, model, AUDITED, public_key, others=others)
        report.sections["static"] = static_audit(folder, model, list(references))
        if scan is not None:
            report.sections["scan"] = _scan(model, tokenizer, scan)
        if suspect is not None:
            report.sections["contamination"] = contamination_test(model, tokenizer, suspect, control, adapter=AUDITED,
                                                                  **(contamination or {}))
        return report
    finally:
        splice.detach(model, AUDITED)
        if active:
            splice.activate(model, active)


def _folders(adapter: Path, name: str | None) -> tuple[Path, list[Path]]:
    """The audited adapter's folder and the others whose provenance is checked with it."""
    folders = saved_adapters(adapter)
    folder = _audited_folder(adapter, folders, name)
    others = [f for f in folders.values() if f != folder]
    if adapter != folder and (adapter / MANIFEST_NAME).is_file() and adapter not in others:
        others.insert(0, adapter)  # the root's manifest records the subfolders'
    return folder, others


def unloadable_audit(adapter: str | Path, err: AdapterFileError, *, name: str | None = None,
                     public_key: str | Path | None = None, settings: dict[str, Any] | None = None) -> AuditReport:
    """The audit of a folder that cannot be read (`err`: a corrupt or truncated file): when its
    manifest shows it was changed after it was written, that is the finding (a flag, and a
    report), not a tool error; otherwise `err` is raised."""
    folder, others = _folders(Path(adapter), name)
    provenance = provenance_audit(folder, None, None, public_key, others=others)
    if not any(f.severity == "flag" for f in provenance.findings):
        raise err
    report = AuditReport(str(folder), settings=dict(settings or {}))
    provenance.findings.append(Finding("provenance", "flag", str(folder), f"the adapter cannot be loaded ({err}); "
                                       "its files were changed after the manifest was written, so no other check "
                                       "ran"))
    report.sections["provenance"] = provenance
    return report


def _audited_folder(path: Path, folders: dict[str, Path], name: str | None) -> Path:
    """The folder of the adapter whose weights and behaviour are audited."""
    if name is not None:
        if name not in folders:
            raise SpliceError(f"{path} holds no adapter {name!r}; it holds {sorted(folders) or 'none'}")
        return folders[name]
    if "default" in folders or len(folders) <= 1:
        return folders.get("default", next(iter(folders.values()), path))  # none: load says what is wrong
    raise SpliceError(f"{path} holds several adapters {sorted(folders)} and none at its root; name one (--name)")


def _scan(model: nn.Module, tokenizer: Any, settings: ScanSettings) -> Any:
    if settings.texts is not None:
        return word_scan(model, tokenizer, settings.texts, settings.candidates, batch_size=settings.batch_size)
    return trigger_scan(model, tokenizer, AUDITED, triggers=settings.triggers, prompts=settings.prompts,
                        template=settings.template, new_tokens=settings.new_tokens, batch_size=settings.batch_size)
