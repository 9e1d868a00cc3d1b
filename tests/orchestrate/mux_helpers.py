"""Data helpers the multiplexing tests share (imported as `mux_helpers`; fixtures are in conftest)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["good", "great", "fine", "superb", "bad", "awful", "poor", "dull", "plot", "actor", "scene", "music"]


def text_rows(path: Path, n: int, labels: int, max_words: int, seed: int) -> Path:
    """1..max_words words, all from the label's own quarter of WORDS: learnable in a few steps."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            label = rng.randrange(labels)
            group = WORDS[4 * label: 4 * label + 4]
            words = [rng.choice(group) for _ in range(rng.randint(1, max_words))]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path
