"""Small data files for the boosting tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_rows(path: Path, rows: list[dict]) -> str:
    """`rows` as a JSON-lines file; its path as a string (what a config's data field takes)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
