"""An audit's report: the checks that ran, their findings, a JSON file and a markdown page for
people and CI pipelines, and the exit code that fails a pipeline on a flag."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from splice.audit.findings import SEVERITIES, Finding
from splice.io.files import atomic_directory, write_text

FailOn = Literal["flag", "warning", "never"]
FAIL_ON: tuple[str, ...] = ("flag", "warning", "never")
EXIT_FLAGGED = 3  # distinct from 1 (an error) and 2 (bad usage)


class Section(Protocol):
    """What every check's result offers (`ProvenanceAudit`, `StaticAudit`, `TriggerScan`, ...)."""

    findings: list[Finding]

    def as_dict(self) -> dict[str, Any]: ...

    def table(self) -> str: ...


@dataclass
class AuditReport:
    """The checks run on one adapter, by name ("provenance", "static", "scan", "contamination")."""

    adapter: str
    sections: dict[str, Section] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        return [f for section in self.sections.values() for f in section.findings]

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def failed(self, fail_on: FailOn = "flag") -> bool:
        """Whether the audit fails: a flag (fail_on="flag"), a flag or a warning ("warning"), never."""
        check_fail_on(fail_on)
        failing = {"flag": ("flag",), "warning": ("flag", "warning"), "never": ()}[fail_on]
        return any(f.severity in failing for f in self.findings)

    def exit_code(self, fail_on: FailOn = "flag") -> int:
        return EXIT_FLAGGED if self.failed(fail_on) else 0

    def as_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "settings": self.settings,
                "counts": {s: self.count(s) for s in SEVERITIES},
                "findings": [f.as_dict() for f in self.findings],
                "sections": {name: section.as_dict() for name, section in self.sections.items()}}

    def markdown(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}(s)" for s in SEVERITIES)
        lines = [f"# Audit of {self.adapter}", "", f"Checks: {', '.join(self.sections) or 'none'}; {counts}.", ""]
        ranked = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        if ranked:
            lines += ["| severity | check | subject | finding |", "|---|---|---|---|"]
            lines += [f"| {f.severity} | {f.check} | {_cell(f.subject)} | {_cell(f.message)} |" for f in ranked]
        for name, section in self.sections.items():
            table = section.table()
            lines += ["", f"## {name}", "", table if table.startswith("|") else f"```\n{table}\n```"]
            if hasattr(section, "plot"):
                lines += ["", f"![{name}]({name}.png)"]
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """`out/audit.json`, `out/audit.md` and a PNG per check that draws one, whole or not at all."""
        with atomic_directory(out, overwrite) as folder:
            write_text(folder / "audit.json", json.dumps(self.as_dict(), indent=2, default=str) + "\n")
            write_text(folder / "audit.md", self.markdown())
            for name, section in self.sections.items():
                if hasattr(section, "plot"):
                    section.plot(folder / f"{name}.png")
        return Path(out)


def check_fail_on(fail_on: str) -> None:
    if fail_on not in FAIL_ON:
        from splice.core.errors import SpliceError

        raise SpliceError(f"fail_on={fail_on!r}: use one of {FAIL_ON}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
