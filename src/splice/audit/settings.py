"""What `splice audit` runs, from a YAML file and flags (flags win), and the files it reads:
trigger, prompt and text lists (one per line, or JSON lines with a "text") and evaluation items
(JSON lines with "prompt" and "completion", or "text")."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splice.audit.contamination import Item
from splice.core.errors import ConfigError, DataError
from splice.core.validation import Problem, did_you_mean, field_problems, raise_problems
from splice.train.config import read_yaml_mapping


@dataclass
class AuditSettings:
    """The checks of one audit and their options (see `splice audit --help` for each)."""

    model: str | None = None
    name: str | None = None
    references: list[str] = field(default_factory=list)
    public_key: str | None = None
    scan: Literal["auto", "on", "off"] = "auto"
    triggers: str | None = None
    prompts: str | None = None
    template: str = "{trigger}\n{prompt}"
    texts: str | None = None
    suspect: str | None = None
    control: str | None = None
    new_tokens: int = 8
    batch_size: int = 8
    cdd_samples: int = 20
    k: float = 0.2
    fail_on: Literal["flag", "warning", "never"] = "flag"
    out: str | None = None


def read_audit_settings(path: Path | None, flags: dict[str, Any]) -> AuditSettings:
    """The file's settings (if any) with the flags given (not None) on top, every key and value
    checked: an unknown key or a wrong value is refused naming the file, the key and the value."""
    data = read_yaml_mapping(path, "audit config", "audit settings") if path is not None else {}
    known = [f.name for f in dataclasses.fields(AuditSettings)]
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], known)}")
    if isinstance(data.get("scan"), bool):  # YAML 1.1 reads a bare on/off as a boolean
        data["scan"] = "on" if data["scan"] else "off"
    merged = data | {key: value for key, value in flags.items() if value is not None}
    problems = field_problems(AuditSettings, merged)
    problems += [Problem(key, merged[key], "a positive number") for key in ("new_tokens", "batch_size", "cdd_samples")
                 if isinstance(merged.get(key), int) and merged[key] <= 0]
    if isinstance(merged.get("k"), (int, float)) and not 0 < merged["k"] <= 1:
        problems.append(Problem("k", merged["k"], "a share in (0, 1]"))
    problems += [Problem(key, value, "an existing file (paths are read from the current folder, as flags are)")
                 for key, value in _paths(merged) if not Path(value).exists()]
    raise_problems(problems, ConfigError, where=path)
    return AuditSettings(**merged)


def _paths(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, path) of every input file the settings name, checked before the model loads."""
    keys = ("public_key", "triggers", "prompts", "texts", "suspect", "control")
    found = [(key, settings[key]) for key in keys if isinstance(settings.get(key), str)]
    references = settings.get("references")
    return found + ([("references", r) for r in references if isinstance(r, str)] if isinstance(references, list)
                    else [])


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or the "text" of each line of a .jsonl file."""
    rows = _rows(Path(path))
    return [_field(row, "text", path, n) if isinstance(row, dict) else row for n, row in enumerate(rows, 1)]


def read_items(path: str | Path) -> list[Item]:
    """Evaluation items: JSON lines with "prompt" and "completion" (a pair) or "text" (whole)."""
    items: list[Item] = []
    for n, row in enumerate(_rows(Path(path)), 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object with prompt and completion, or text")
        items.append((_field(row, "prompt", path, n), _field(row, "completion", path, n)) if "prompt" in row
                     else _field(row, "text", path, n))
    return items


def _rows(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty")
    if path.suffix != ".jsonl":
        return lines
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}: not JSON ({err})") from None
    return rows


def _field(row: dict[str, Any], key: str, path: str | Path, n: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{path}, line {n}: key {key!r} has value {value!r}, expected a string")
    return value
