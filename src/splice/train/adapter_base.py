"""Which base model, task and label count a saved adapter belongs to.

Commands that take an adapter folder and need its model (`merge --into-base`, `analyze`,
`compare`, `compress --sweep`, DoRA merges) resolve it here: the model recorded in the adapter
(or the one the user names), the task from PEFT's `task_type` (or, for splice's own format, from
the heads it trains), and as many labels as its classification head has outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from splice.core.errors import SpliceError
from splice.core.targets import SEQ_CLS_HEAD_NAMES
from splice.io.adapter_files import read_config
from splice.io.files import read_adapter
from splice.io.info import AdapterInfo, inspect_adapter
from splice.train.tasks import load_pretrained, model_path

# HF PEFT's task_type -> splice's task ("base": the bare model, no head)
PEFT_TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}


@dataclass(frozen=True)
class AdapterBase:
    """The model an adapter goes with: `load()` gives it, fresh, with a head of the right size."""

    model: str
    task: str
    labels: tuple[str, ...]

    def load(self) -> nn.Module:
        return load_pretrained(self.model, self.task, self.labels)


def task_of_peft(task_type: str | None) -> str:
    return PEFT_TASKS.get(task_type or "", "base")


def adapter_base(adapters: Sequence[str | Path], model: str | None = None, task: str = "auto") -> AdapterBase:
    """The base model of these adapters (they must agree on it unless `model` is given), checked
    to exist before anything is loaded."""
    found = [inspect_adapter(path) for path in adapters]
    if model is None:
        recorded = [f.base_model for f in found]
        if None in recorded:
            raise SpliceError(f"{adapters[recorded.index(None)]} names no base model; pass --model")
        if len(set(recorded)) > 1:
            raise SpliceError(f"the adapters name different base models {sorted(set(recorded))}; pass --model")
        model = recorded[0]
    model_path(model)  # neither bundled nor a folder: refused here, before any output
    if task == "auto":
        task = _task_of(found[0], model)
    labels = tuple(str(i) for i in range(head_outputs(adapters[0], list(found[0].heads))))
    return AdapterBase(model, task, labels)


def head_outputs(path: str | Path, heads: list[str]) -> int:
    """A classification head's output size: rows of its last saved weight (2 if none)."""
    _, tensors = read_adapter(path)
    weights = [v for k, v in sorted(tensors.items())
               if k.endswith("weight") and any(f".{h}." in f".{k}" for h in heads)]
    return weights[-1].shape[0] if weights else 2


def _task_of(found: AdapterInfo, model: str) -> str:
    """PEFT's task_type; for splice's own format, the class of the model it was saved from (files
    since 0.1.0's `model_class`). Where neither says (PEFT's task_type null, as LoraConfig leaves
    it by default): a trained classification head, else the base model's own architecture, so
    that a causal LM's adapter is not folded into a bare model without its LM head."""
    if found.format == "peft":
        if found.config.get("task_type"):
            return task_of_peft(found.config["task_type"])
        model_class = ""
    else:
        model_class = str(read_config(found.path).get("model_class") or "")
    if model_class.endswith("ForCausalLM"):
        return "causal_lm"
    heads = {h.rsplit(".", 1)[-1] for h in found.heads}
    if model_class.endswith("ForSequenceClassification") or heads & set(SEQ_CLS_HEAD_NAMES):
        return "classification"
    if not model_class and any(a.endswith("ForCausalLM") for a in _architectures(model)):
        return "causal_lm"
    return "base"


def _architectures(model: str) -> list[str]:
    """The model classes a transformers folder's config.json lists (`architectures`)."""
    config = model_path(model) / "config.json"
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError) as err:
        raise SpliceError(f"{config} cannot be read as a transformers config: {err}") from None
