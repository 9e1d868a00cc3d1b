"""Reading and writing the two files of an adapter directory, with errors that say why."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splice.core.errors import AdapterFileError, OutputExistsError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def prepare_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Create `path`, refusing to write into a folder that already holds files unless asked."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and is not empty; pass overwrite=True (CLI: --force) to replace it"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole folder at once: yields an empty temporary sibling folder to fill; when the
    block succeeds it replaces `path` as a whole (a reader sees the old complete folder or the
    new one, never a mixture); when it fails the temporary folder is removed and `path` is as it
    was. A non-empty `path` is refused unless `overwrite`. (First version; hardened in issue 13.)"""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"{path} already exists and is not empty; pass overwrite=True (CLI: --force) "
                                "to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield temporary
        old = path.parent / f".{path.name}.old-{temporary.name.rsplit('-', 1)[-1]}"
        if path.exists():
            path.rename(old)
        temporary.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_config(path: Path, config: dict[str, Any]) -> None:
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors with PEFT's metadata; tensors detached, contiguous and unaliased."""
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        nested = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
        hint = f"; adapters in sub-folders: {nested}" if nested else ""
        present = sorted(p.name for p in path.iterdir())
        raise AdapterFileError(f"no {CONFIG_NAME} in {path} (found {present}){hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    safetensors_file, legacy_file = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    try:
        if safetensors_file.is_file():
            return load_file(str(safetensors_file))
        if legacy_file.is_file():
            return torch.load(legacy_file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling garbage raises almost any error type
        name = safetensors_file if safetensors_file.is_file() else legacy_file
        raise AdapterFileError(f"{name} is corrupt or unreadable: {err}") from None
    raise AdapterFileError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path}")


def base_model_name(model: torch.nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None
