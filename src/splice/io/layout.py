"""Several adapters in one folder, in HF PEFT's layout.

`PeftModel.save_pretrained(path, selected_adapters=[...])` writes the adapter named "default" at
the folder's root and every other adapter in a subfolder named after it; `from_pretrained(base,
path, subfolder="b")` and `load_adapter(path / "b", "b")` read them back. `splice.save(model,
path, adapters=[...])` and `splice.load(model, path, adapters=[...] | "all")` use the same
layout, and so do `SpliceTrainer` checkpoints holding several adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from splice.core.errors import AdapterFileError, SpliceError
from splice.io.adapter_files import CONFIG_NAME

ROOT_ADAPTER = "default"

Selection = Sequence[str] | Literal["all"]


def subfolder(name: str) -> str:
    """Where adapter `name` lives inside a folder of several: "" (the root) for "default", else a
    subfolder named after it. Refuses names that are not a single folder name."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise SpliceError(f"adapter name {name!r} cannot name a subfolder; use letters, digits, '-' or '_'")
    return "" if name == ROOT_ADAPTER else name


def saved_adapters(path: Path) -> dict[str, Path]:
    """The adapters folder `path` holds in this layout, by name: "default" at its root if there
    is an adapter_config.json there, and every subfolder that holds one."""
    found = {ROOT_ADAPTER: path} if (path / CONFIG_NAME).is_file() else {}
    if path.is_dir():
        found |= {sub.name: sub for sub in sorted(path.iterdir())
                  if sub.is_dir() and not sub.name.startswith(".") and (sub / CONFIG_NAME).is_file()}
    return found


def adapter_folders(path: Path, adapters: Selection) -> dict[str, Path]:
    """The folders of the chosen adapters (by name; "all": every one `path` holds), each checked
    to hold an adapter_config.json; what is missing is refused naming the folder and what it has."""
    found = saved_adapters(path)
    if adapters == "all":
        if not found:
            raise AdapterFileError(f"{path} holds no adapter: no {CONFIG_NAME} at its root or in a subfolder")
        return found
    if isinstance(adapters, str):
        raise SpliceError(f"adapters must be a list of names or 'all', not {adapters!r}")
    chosen = {name: path / subfolder(name) for name in adapters}
    missing = [f"{name!r} ({folder})" for name, folder in chosen.items() if not (folder / CONFIG_NAME).is_file()]
    if missing:
        raise AdapterFileError(f"{path} holds no adapter {', '.join(missing)}; it holds {sorted(found) or 'none'}")
    return chosen
