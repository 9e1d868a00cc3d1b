"""The README.md model card in every adapter folder: PEFT's front matter keys, what the adapter
is, metrics, and a user's own README never overwritten silently."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import make_bert, randomize
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

import splice
from splice.io import save_state
from splice.io.model_card import END, START

BASE = "org/tiny-bert"


def named_bert() -> torch.nn.Module:
    model = make_bert()
    model.name_or_path = BASE  # as from_pretrained("org/tiny-bert") sets it
    return model


def lora_model(**lora) -> torch.nn.Module:
    model = named_bert()
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"], **lora))
    randomize(model)
    return model


def front(path) -> dict:
    text = (path / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def test_front_matter_has_peft_keys_and_the_body_says_what_the_adapter_is(tmp_path):
    splice.save(lora_model(train_also=["classifier"]), tmp_path / "ours")
    peft_model = get_peft_model(named_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours, theirs = ModelCard.load(tmp_path / "ours" / "README.md"), ModelCard.load(tmp_path / "peft" / "README.md")
    assert set(theirs.data.to_dict()) <= set(ours.data.to_dict())
    assert ours.data.library_name == "peft" and ours.data.base_model == BASE
    assert set(theirs.data.tags) - {"transformers"} <= set(ours.data.tags)
    body = ours.text
    assert "| method | lora |" in body and "| rank | 2 |" in body
    assert "| targets | query, value (4 modules) |" in body
    # 2 layers x (query, value) x r=2 x (32 in + 32 out); the classifier is Linear(32, 2)
    assert "| trainable parameters | 512 in the adapter + 66 in modules trained in full (classifier) |" in body


def test_splice_format_and_metrics(tmp_path):
    model = named_bert()
    splice.attach(model, splice.DiaBlo(blocks=4, targets=["query"]))
    splice.save(model, tmp_path, overwrite=True, metrics={"validation": {"accuracy": 0.875}, "step": 40})
    data = front(tmp_path)
    assert data["library_name"] == "splice" and "diablo" in data["tags"]
    text = (tmp_path / "README.md").read_text()
    assert "| validation accuracy | 0.875 |" in text and "| step | 40 |" in text
    assert "splice.load(model, path)" in text


def test_a_local_base_is_not_written_as_base_model(tmp_path):
    model = lora_model()
    model.name_or_path = str(tmp_path / "some" / "folder")
    splice.save(model, tmp_path / "adapter")
    data = front(tmp_path / "adapter")
    assert "base_model" not in data and not any(t.startswith("base_model:") for t in data["tags"])


def test_a_users_readme_keeps_its_text_and_keys(tmp_path):
    folder = tmp_path / "adapter"
    splice.save(lora_model(), folder)
    user = "---\nlicense: mit\ntags:\n- sentiment\n---\n\n# My adapter\n\nTrained on my data; ask me first.\n"
    (folder / "README.md").write_text(user)
    splice.save(lora_model(), folder, overwrite=True)
    text = (folder / "README.md").read_text()
    assert text.count(START) == 1 and "# My adapter\n\nTrained on my data; ask me first.\n" in text
    data = front(folder)
    assert data["license"] == "mit" and {"sentiment", "lora"} <= set(data["tags"]) and data["base_model"] == BASE
    edited = text.replace(END, END + "\n\nMore words of mine.\n")
    (folder / "README.md").write_text(edited)
    splice.save(lora_model(), folder, overwrite=True, metrics={"accuracy": 0.5})
    again = (folder / "README.md").read_text()
    assert again.count(START) == 1 and again.count("| method | lora |") == 1  # replaced, not appended again
    assert "ask me first" in again and "More words of mine." in again and "| accuracy | 0.5 |" in again


def test_a_readme_with_broken_front_matter_is_left_as_it_was(tmp_path):
    folder = tmp_path / "adapter"
    splice.save(lora_model(), folder)
    broken = "---\ntags: [unclosed\n---\nmine\n"
    (folder / "README.md").write_text(broken)
    with pytest.warns(UserWarning, match="not valid YAML"):
        splice.save(lora_model(), folder, overwrite=True)
    assert (folder / "README.md").read_text() == broken


def test_merged_and_compressed_outputs_get_a_card_too(tmp_path):
    from splice.io import adapter_state

    save_state(adapter_state(lora_model()), tmp_path / "state")
    assert front(tmp_path / "state")["library_name"] == "peft"


def test_several_adapters_one_card_at_the_root_one_per_subfolder(tmp_path):
    model = lora_model()
    splice.attach(model, splice.DiaBlo(blocks=4, targets=["key"]), name="b")
    splice.save(model, tmp_path, adapters="all", overwrite=True)
    root = (tmp_path / "README.md").read_text()
    assert "## default (the root)" in root and "## b (`b/`)" in root
    assert front(tmp_path)["library_name"] == "splice"  # not every adapter here is PEFT's
    assert front(tmp_path / "b")["tags"] == sorted(["diablo", "splice", f"base_model:adapter:{BASE}"])
