"""The files of one adapter folder: their names, reading them from one folder version, and
pairing a file's tensors with the adapter they are copied into.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's legacy
`adapter_model.bin` is read too), the same two files whether the format is HF PEFT's or
splice's own, and a `README.md` model card (`io.model_card`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from splice.core.errors import AdapterFileError, ShapeMismatchError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)

_OPEN_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of adapter folder `path`, both of one version even while another
    process swaps a new version in: on Linux both files are read through one open descriptor of
    the folder (`/proc/self/fd/N`), so from one folder whatever its name; elsewhere the folder's
    identity is compared before and after. Read again if the folder went away meanwhile."""
    path = Path(path)
    for _ in range(5):
        try:
            fd: int | None = os.open(path, _OPEN_FOLDER)
        except OSError:
            fd = None  # read_config says what is wrong
        try:
            pinned = Path(f"/proc/self/fd/{fd}") if fd is not None and os.path.isdir(f"/proc/self/fd/{fd}") else None
            here = pinned or path
            try:
                config, tensors = read_config(here), read_weights(here)
            except AdapterFileError as err:
                if fd is not None and _moved(path, fd):
                    continue  # swapped out and being removed while read: read the new one
                if pinned is not None:
                    raise AdapterFileError(str(err).replace(str(pinned), str(path))) from None
                raise
            if pinned is not None or fd is None or not _moved(path, fd):
                return config, tensors
        finally:
            if fd is not None:
                os.close(fd)
    raise AdapterFileError(f"{path} was replaced again and again while being read; try again once its writer is done")


def _moved(path: Path, fd: int) -> bool:
    """Whether `path` no longer names the folder open as `fd`."""
    try:
        there, held = os.stat(path), os.fstat(fd)
    except OSError:
        return True
    return (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino)


def check_folder(path: Path, what: str) -> None:
    """Refuse a path that is not a folder, saying whether it is missing or a file."""
    if path.is_file():
        raise AdapterFileError(f"{what} {path} is a file, not a folder")
    if not path.is_dir():
        raise AdapterFileError(f"{what} {path} does not exist")


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`/adapter_config.json; a missing folder or file, invalid JSON or a
    non-object are refused naming the file (and the sub-folders that do hold adapters)."""
    path = Path(path)
    check_folder(path, "adapter directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        nested = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
        hint = f"; adapters in sub-folders: {nested} (load them with adapters=...)" if nested else ""
        present = sorted(p.name for p in path.iterdir())
        raise AdapterFileError(f"no {CONFIG_NAME} in {path} (found {present}){hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `path`/adapter_model.safetensors (or PEFT's legacy .bin, unpickled with
    `weights_only`); a missing or corrupt file is refused naming it."""
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


def paired_tensors(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                   where: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, value) pairs for copying a file's tensors into an adapter: refuses, before anything
    is copied, tensors missing on either side and shapes that differ, naming `where`."""
    missing, unexpected = sorted(set(targets) - set(values)), sorted(set(values) - set(targets))
    if missing or unexpected:
        raise AdapterFileError(f"{where} does not match the adapter: missing tensors {missing[:5]}, "
                               f"unexpected tensors {unexpected[:5]}")
    for key, target in targets.items():
        if target.shape != values[key].shape:
            raise ShapeMismatchError(f"{where}: {key} has shape {tuple(values[key].shape)}, the model needs "
                                     f"{tuple(target.shape)}")
    return [(target, values[key]) for key, target in targets.items()]
