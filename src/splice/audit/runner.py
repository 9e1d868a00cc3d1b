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
from splice.audit.provenance import provenance_audit
from splice.audit.report import AuditReport
from splice.audit.scan import trigger_scan
from splice.audit.static import WeightProfile, static_audit
from splice.audit.word_scan import word_scan
from splice.core.errors import SpliceError

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


def audit(adapter: str | Path, model: nn.Module, tokenizer: Any = None, *,
          references: Sequence[str | Path | WeightProfile] = (), public_key: str | Path | None = None,
          scan: ScanSettings | None = None, suspect: Sequence[Item] | None = None,
          control: Sequence[Item] | None = None, contamination: dict[str, Any] | None = None) -> AuditReport:
    """Audit adapter folder `adapter` against `model`, its base (without that adapter):

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
    folder = Path(adapter)
    active = splice.active_adapters(model)
    splice.load(model, folder, AUDITED, provenance="off")  # the audit reports what load would refuse
    try:
        report = AuditReport(str(folder))
        report.sections["provenance"] = provenance_audit(folder, model, AUDITED, public_key)
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


def _scan(model: nn.Module, tokenizer: Any, settings: ScanSettings) -> Any:
    if settings.texts is not None:
        return word_scan(model, tokenizer, settings.texts, settings.candidates, batch_size=settings.batch_size)
    return trigger_scan(model, tokenizer, AUDITED, triggers=settings.triggers, prompts=settings.prompts,
                        template=settings.template, new_tokens=settings.new_tokens, batch_size=settings.batch_size)
