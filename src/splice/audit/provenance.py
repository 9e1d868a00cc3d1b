"""The provenance check of an audit: the folder's manifest (`io.manifest`) and signature
(`io.signing`) as findings. `splice.load` applies the same checks as a policy; an audit reports
everything it finds instead of stopping at the first problem."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from splice.audit.findings import Finding
from splice.io.manifest import ManifestCheck, verify_manifest
from splice.io.signing import SignatureVerdict, verify_signature


@dataclass
class ProvenanceAudit:
    """The manifest check, the signature verdict and what they mean as findings: files or
    tensors that differ from the manifest and a bad or missing (when a key was given) signature
    are flags; a missing manifest, files added that `load` never reads and another base than
    recorded are warnings."""

    check: ManifestCheck
    signature: SignatureVerdict
    signature_message: str
    findings: list[Finding] = field(default_factory=list)
    others: list[ProvenanceAudit] = field(default_factory=list)  # the other adapters of a folder of several

    def as_dict(self) -> dict[str, Any]:
        return {**self.check.as_dict(), "signature": self.signature, "signature_message": self.signature_message,
                "findings": [f.as_dict() for f in self.findings], "others": [o.as_dict() for o in self.others]}

    def table(self) -> str:
        manifest = "present" if self.check.has_manifest else "missing"
        rows = [("manifest", manifest), ("files and tensors", "as recorded" if not self.check.tampered else
                                         f"{len(self.check.tampered)} difference(s)"),
                ("base weights", f"{self.check.base}: {self.check.base_message}"),
                ("signature", f"{self.signature}: {self.signature_message}")]
        rows += [(f"other folder {o.check.folder}", "as recorded" if not o.check.tampered else
                  f"{len(o.check.tampered)} difference(s)") for o in self.others]
        return "\n".join(["| check | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def provenance_audit(folder: str | Path, model: nn.Module | None = None, adapter: str | None = None,
                     public_key: str | Path | None = None, *, others: Sequence[str | Path] = ()) -> ProvenanceAudit:
    """Verify `folder` against its manifest, the base weights of `model` (with the adapter
    attached as `adapter`) against the recorded hash, and its signature with `public_key`;
    `others`, the other folders of a folder of several adapters, are verified too (files and
    signatures), their findings added."""
    audit = _folder_audit(Path(folder), model, adapter, public_key)
    for other in dict.fromkeys(Path(o) for o in others):
        audit.others.append(_folder_audit(Path(other), None, None, public_key, audited=False))
        audit.findings += audit.others[-1].findings
    return audit


def _folder_audit(folder: Path, model: nn.Module | None, adapter: str | None,
                  public_key: str | Path | None, *, audited: bool = True) -> ProvenanceAudit:
    """One folder's findings; `audited` False: another adapter of the folder, whose base weights
    are not compared (the model carries the audited one)."""
    check = verify_manifest(folder, model, adapter)
    verdict, message = verify_signature(folder, public_key) if check.has_manifest else ("unsigned", "no manifest")
    audit = ProvenanceAudit(check, verdict, message)
    subject = str(folder)
    audit.findings += [Finding("provenance", "flag", subject, item) for item in check.tampered]
    audit.findings += [Finding("provenance", "warning", subject, item) for item in check.extra]
    if not check.has_manifest and not check.tampered:
        audit.findings.append(Finding("provenance", "warning", subject, check.notes[0]))
    if check.base == "mismatch":
        audit.findings.append(Finding("provenance", "warning", subject, check.base_message))
    elif check.has_manifest:
        said = (check.base_message if audited else
                "not compared here (only the audited adapter's are; audit this one with --name to compare its own)")
        audit.findings.append(Finding("provenance", "note", subject, f"base weights: {said}"))
    if verdict == "invalid" or (verdict == "unsigned" and public_key is not None):
        audit.findings.append(Finding("provenance", "flag", subject, message))
    elif check.has_manifest:
        audit.findings.append(Finding("provenance", "note", subject, message))
    return audit
