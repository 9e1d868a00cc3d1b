"""The library side of `splice merge --into-base`, `analyze` and `compare`: an adapter folder's base
model, task and label count, and folding an adapter into that model."""

from __future__ import annotations

import pytest
import torch
from helpers import make_llama, randomize, randomize_module, save_tiny_bert, save_tiny_llama

import splice
from splice.core.errors import SpliceError
from splice.merging import fold_into_base
from splice.train.adapter_base import adapter_base


@pytest.fixture
def trained(tmp_path):
    """A LoRA with a 3-label head on a tiny BERT saved as a folder, the adapter saved beside it."""
    base = save_tiny_bert(tmp_path / "base", dropout=0.0)
    model = adapter_base_model(base)
    splice.attach(model, splice.LoRA(r=2, targets=["query", "value"], train_also=["classifier"]))
    randomize(model)
    randomize_module(model.classifier, seed=3)
    splice.save(model, tmp_path / "adapter")
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    return tmp_path / "adapter", base, model.eval()(input_ids=ids).logits, ids


def adapter_base_model(folder):
    from splice.train.tasks import load_pretrained

    return load_pretrained(str(folder), "classification", ("a", "b", "c")).eval()


def test_adapter_base_reads_model_task_and_labels(trained):
    adapter, base, _, _ = trained
    found = adapter_base([adapter])
    assert (found.model, found.task, len(found.labels)) == (str(base), "classification", 3)
    assert adapter_base([adapter], task="base").task == "base"


def test_fold_into_base_gives_a_plain_model_with_the_adapters_outputs(trained):
    adapter, _, expected, ids = trained
    plain = fold_into_base(adapter_base([adapter]).load().eval(), adapter)
    assert not any(n.endswith((".splice", "splice_heads")) for n, _ in plain.named_modules())
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_an_adapter_without_a_recorded_model_needs_one(trained, tmp_path):
    import json

    adapter = trained[0]
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SpliceError, match="names no base model; pass --model"):
        adapter_base([adapter])
    assert adapter_base([adapter], model=str(trained[1])).model == str(trained[1])


def test_a_splice_format_adapter_of_a_causal_lm_names_its_task(tmp_path):
    """The file records the model class it was saved from, so its base loads with the LM head's
    module names (`model.layers...`) although no head was trained."""
    model = make_llama()
    splice.attach(model, splice.MoELoRA(experts=2, r=2, targets=["q_proj"]))
    splice.save(model, tmp_path / "moe")
    assert adapter_base([tmp_path / "moe"], model="smollm2").task == "causal_lm"


def test_a_peft_adapter_without_task_type_folds_into_its_causal_lm(tmp_path):
    """LoraConfig leaves task_type None by default: the fold must keep the base model's LM head
    (its architecture says ForCausalLM), not give a bare decoder."""
    from peft import LoraConfig, get_peft_model

    from splice.train.tasks import load_pretrained

    folder = save_tiny_llama(tmp_path / "base")
    peft_model = get_peft_model(load_pretrained(str(folder), "causal_lm"), LoraConfig(r=2, target_modules=["q_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    found = adapter_base([tmp_path / "adapter"], model=str(folder))
    assert found.task == "causal_lm"
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    plain = fold_into_base(found.load().eval(), tmp_path / "adapter")
    torch.testing.assert_close(plain(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
