"""What every audit check reports: findings (a flag, a warning or a note about one subject) that
the audit report gathers, prints, writes as JSON and turns into an exit code for CI pipelines."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Check = Literal["provenance", "static", "scan", "contamination"]
Severity = Literal["flag", "warning", "note"]
SEVERITIES: tuple[Severity, ...] = ("flag", "warning", "note")


@dataclass(frozen=True)
class Finding:
    """One thing a check found: `subject` is what it is about (a file, a module, a trigger, an
    evaluation set), `severity` "flag" (evidence of tampering, a backdoor or contamination: the
    audit fails), "warning" (something the user should look at) or "note" (context)."""

    check: Check
    severity: Severity
    subject: str
    message: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def flags(findings: list[Finding]) -> list[Finding]:
    """The findings that fail an audit."""
    return [f for f in findings if f.severity == "flag"]
