"""Saving and loading adapters: HF PEFT's format where it can hold the method, splice's otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from splice.core.api import model_state
from splice.core.errors import AdapterFileError, SpliceError
from splice.io import native, peft_format
from splice.io.files import atomic_directory, read_adapter
from splice.io.state import adapter_state, pick_adapter, save_state

__all__ = ["adapter_state", "load", "save", "save_state"]

Format = Literal["auto", "peft", "splice"]


def save(
    model: nn.Module,
    path: str | Path,
    name: str | None = None,
    *,
    format: Format = "auto",
    portable: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write adapter `name` (default: the only one, or the only active one) to directory `path`.

    LoRA adapters are written in HF PEFT's format, so `PeftModel.from_pretrained(base, path)`
    gives the same outputs (PiSSA adapters are converted to a rank-2r LoRA for the unmodified
    base, as PEFT does). Other methods use splice's own format. `portable=True` also checks the
    subset vLLM serves (no trained heads, one rank and alpha) and explains what prevents it.
    An existing non-empty directory is refused unless `overwrite=True`, which replaces it as a
    whole: the folder is written next to it and swapped in at once, so a crash, a full disk or a
    kill leaves the old complete folder or the new one, never a mixture (`io.files`).
    """
    name = pick_adapter(model, name)
    if format == "auto":
        format = "peft" if peft_format.can_write(model, name) else "splice"
    if format == "peft" and not peft_format.can_write(model, name):
        raise SpliceError(f"adapter {name!r} ({model_state(model).adapters[name].config.method}) "
                          "cannot be written in PEFT's format; use format='splice'")
    if portable and format != "peft":
        raise SpliceError("portable=True needs a LoRA adapter written in PEFT's format")
    with atomic_directory(path, overwrite) as folder:
        if format == "peft":
            peft_format.write(model, folder, name, portable=portable)
        else:
            native.write(model, folder, name)
    return Path(path)


def load(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False) -> nn.Module:
    """Attach the adapter stored in `path` (splice's or HF PEFT's format) as `name`.

    The directory is validated against the model first: a module it names that the model lacks,
    a shape that does not fit, a corrupt file or an unknown method is refused with the reason,
    and nothing is attached. Loaded adapters are frozen unless `trainable=True`.
    """
    config, tensors = read_adapter(path)
    if config.get("format") == native.FORMAT:
        native.read(model, config, tensors, name, trainable, source=path)
    elif "peft_type" in config:
        peft_format.read(model, config, tensors, name, trainable, source=path)
    else:
        raise AdapterFileError(
            f"{path} is neither a splice nor an HF PEFT adapter (config keys: {sorted(config)[:8]})"
        )
    return model
