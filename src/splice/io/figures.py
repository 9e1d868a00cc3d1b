"""PNG figures (rank spectra, placement heatmaps, training and forgetting curves): matplotlib on
its file-only Agg backend, so that plotting works on a server without a display and never opens
a window, and a figure written as a new file like every other file splice writes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from splice.io.files import write_bytes


def pyplot() -> Any:
    """`matplotlib.pyplot`, on the Agg backend (imported on first use: matplotlib is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """`fig` as a PNG at `path` (an existing file, a link included, is replaced), then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    write_bytes(Path(path), buffer.getvalue())
    return Path(path)
