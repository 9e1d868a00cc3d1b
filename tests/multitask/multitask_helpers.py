"""Word-list tasks for tiny multi-task runs, written as the files a config points at (shared by
the fixtures in conftest.py and the tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Each task: its classes, each with the words its texts are made of (three words a text).
LISTS = {
    "colour": {"warm": ["red", "orange", "yellow", "gold"], "cool": ["blue", "green", "purple", "grey"]},
    "animal": {"pet": ["cat", "dog", "hamster"], "farm": ["cow", "pig", "sheep"], "wild": ["lion", "wolf", "bear"]},
}


def labelled(lists: dict[str, list[str]], n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    labels = [rng.choice(sorted(lists)) for _ in range(n)]
    return [{"text": " ".join(rng.choices(lists[label], k=3)), "label": label} for label in labels]


def counting(n: int, seed: int) -> list[dict[str, Any]]:
    """Prompt/completion rows for a generator: how many words a list has."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 4) for _ in range(n)]
    return [{"prompt": "Words: " + " ".join(rng.choices(["sun", "moon", "star"], k=k)) + "\nCount:",
             "completion": f" {k}"} for k in sizes]


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def task(files: dict[str, str], name: str, data: str | None = None, **extra: Any) -> dict[str, Any]:
    """A task mapping over a word-list file and its evaluation file."""
    data = data or name
    return {"name": name, "data": files[data], "validation": files[f"{data}-val"], **extra}
