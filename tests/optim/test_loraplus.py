"""LoRA+: the parameter groups are HF PEFT's `create_loraplus_optimizer` groups, parameter for
parameter, on the same model (LoRA on attention and on the word embeddings, a trained head)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import make_bert
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

import splice
from splice.optim import loraplus_groups

TARGETS = ["query", "value", "word_embeddings"]


def _canonical(name: str) -> str:
    """One name for a tensor in both libraries: module path and factor (or the head's tensor)."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.lora_(?:embedding_)?([AB])\.default(?:\.weight)?$", r".\1", name)
    name = re.sub(r"\.splice\.default\.lora_([AB])$", r".\1", name)
    return name.replace(".modules_to_save.default.", ".")


def _groups(optimizer_groups, names: dict[int, str]) -> list[tuple[float, float, frozenset[str]]]:
    return sorted((group["lr"], group["weight_decay"], frozenset(_canonical(names[id(p)]) for p in group["params"]))
                  for group in optimizer_groups if group["params"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_groups_equal_peft_loraplus_groups(weight_decay):
    base = make_bert()
    ours = splice.attach(copy.deepcopy(base), splice.LoRA(r=4, alpha=8, targets=TARGETS, train_also=["classifier"]))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            task_type="SEQ_CLS"))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_lr_embedding=1e-5, loraplus_weight_decay=weight_decay)
    groups = loraplus_groups(ours, lr=1e-3, lr_ratio=16, lr_embedding=1e-5, weight_decay=weight_decay)
    ours_names = {id(p): n for n, p in ours.named_parameters()}
    theirs_names = {id(p): n for n, p in theirs.named_parameters()}
    expected = _groups(reference.param_groups, theirs_names)
    assert _groups(groups, ours_names) == expected
    assert len(expected) == 4  # A, embedding, B, and the head's bias in B without decay


def test_only_the_given_parameters_are_grouped():
    model = splice.attach(make_bert(), splice.LoRA(r=4, targets=["query"], train_also=["classifier"]))
    adapter = {n: p for n, p in splice.trainable_parameters(model).items() if not n.startswith("classifier")}
    groups = loraplus_groups(model, adapter, lr=1e-3, lr_ratio=4)
    grouped = {id(p) for group in groups for p in group["params"]}
    assert grouped == {id(p) for p in adapter.values()}
    lrs = {group["loraplus"]: group["lr"] for group in groups}
    assert lrs == {"A": 1e-3, "B": 4e-3}
