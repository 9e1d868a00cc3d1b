"""The name an adapter records for its base model (`base_model_name_or_path`), made portable.

transformers sets a model's `name_or_path` to what `from_pretrained` was given: for a local
folder, a path that is valid on one machine only (for the bundled models, a folder inside a
virtual environment or a cache). An adapter should name its base so that another machine, and
PEFT, can find it:

1. a bundled model's folder: its public Hub id (`splice.assets.HUB_IDS`), which
   `splice.train.tasks.model_path` resolves back to the bundled copy, offline;
2. a local folder whose `config.json` records a Hub id as `_name_or_path`: that id;
3. anything else as it is (a Hub id already, or a folder with nothing better to say).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from splice import assets


def base_model_name(model: nn.Module) -> str | None:
    """The portable name of the model's base (see the module doc), None if it records none."""
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return portable_name(str(name)) if name else None


def portable_name(name: str) -> str:
    """`name` (a Hub id or a local folder) as an adapter should record it."""
    if not os.path.isdir(name):
        return name
    bundled = assets.hub_id_of(name)
    if bundled is not None:
        return bundled
    recorded = _recorded_name(Path(name) / "config.json")
    return recorded if recorded is not None and is_repo_id(recorded) else name


def is_repo_id(text: str, *, namespaced: bool = False) -> bool:
    """Whether `text` has the form of a Hugging Face Hub repo id: "name" or "owner/name" (only
    the latter when `namespaced`); paths such as "./x", "/x" or "a/b/c" do not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if namespaced and text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _recorded_name(config_file: Path) -> str | None:
    """`_name_or_path` of a transformers config.json, if it has a readable string there."""
    try:
        recorded = json.loads(config_file.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and recorded else None
