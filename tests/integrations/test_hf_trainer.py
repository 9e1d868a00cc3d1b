"""splice adapters through a real `transformers.Trainer` (SpliceTrainer): adapter-only
checkpoints, exact resume, PEFT-loadable save_model, load_best_model_at_end."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import splice
from splice.integrations.hf_trainer import SpliceTrainer

VOCAB = 97


class RandomIds(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def make_base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def make_model(adapter_seed: int = 1) -> BertForSequenceClassification:
    model = make_base()
    torch.manual_seed(adapter_seed)
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["query", "value"], init="gaussian",
                                     train_also=["classifier"]))
    return model


def trainer(model, out: Path, **kwargs) -> SpliceTrainer:
    defaults = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                    learning_rate=1e-2, max_steps=6, save_steps=3, logging_steps=100, seed=0,
                    disable_tqdm=True, save_safetensors=True)
    defaults.update(kwargs)
    defaults = {k: v for k, v in defaults.items() if k in TrainingArguments.__dataclass_fields__}
    extra = {k: kwargs.pop(k) for k in ("eval_dataset", "compute_metrics") if k in kwargs}
    return SpliceTrainer(model=model, args=TrainingArguments(**defaults), train_dataset=RandomIds(), **extra)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in splice.trainable_parameters(model).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_checkpoints_hold_the_adapter_and_head_not_the_base(tmp_path):
    model = make_model()
    trainer(model, tmp_path).train()
    checkpoint = tmp_path / "checkpoint-6"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}
    tensors = load_file(checkpoint / "adapter_model.safetensors")
    assert len([k for k in tensors if ".lora_" in k]) == 2 * 2 * 2  # 2 layers x query, value x A, B
    assert {k for k in tensors if "classifier" in k} == {"base_model.model.classifier.weight",
                                                          "base_model.model.classifier.bias"}
    base_bytes = sum(t.numel() * t.element_size() for t in make_base().state_dict().values())
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 10
    # the whole checkpoint (optimizer state for the adapter only, RNG, trainer state) stays small too
    assert folder_bytes(checkpoint) < base_bytes


def test_resume_from_checkpoint_continues_to_the_same_adapter(tmp_path):
    straight = make_model()
    trainer(straight, tmp_path / "a").train()
    resumed = make_model(adapter_seed=7)  # different initial adapter: only the checkpoint can make them equal
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(adapter_tensors(straight), adapter_tensors(resumed))


def test_save_model_writes_a_peft_loadable_folder(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model()
    run = trainer(model, tmp_path / "run", max_steps=3)
    run.train()
    run.save_model(str(tmp_path / "final"))
    batch = {"input_ids": RandomIds(seed=5).ids[:4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    expected = logits(model.eval(), batch)
    loaded = peft.PeftModel.from_pretrained(make_base(), str(tmp_path / "final")).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-6)
    again = splice.load(make_base(), tmp_path / "final")
    torch.testing.assert_close(logits(again, batch), expected, rtol=0, atol=0)
    # save_model into the output dir keeps the checkpoints there
    run.save_model()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    scores = itertools.cycle([0.5, 0.9, 0.1])  # evaluations at steps 2, 4, 6: the best is step 4
    model = make_model()
    run = trainer(model, tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                  metric_for_best_model="score", greater_is_better=True, per_device_eval_batch_size=8,
                  eval_dataset=RandomIds(n=8, seed=3), compute_metrics=lambda _: {"score": next(scores)})
    run.train()
    assert run.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    best = splice.load(make_base(), tmp_path / "checkpoint-4")
    last = splice.load(make_base(), tmp_path / "checkpoint-6")
    batch = {"input_ids": RandomIds(seed=9).ids[:4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    assert not torch.equal(logits(best, batch), logits(last, batch))
    torch.testing.assert_close(logits(model.eval(), batch), logits(best, batch), rtol=0, atol=0)


def adapter_state_dicts(model) -> dict[str, torch.Tensor]:
    """Every adapter and head tensor the model holds (parameters and buffers), by state-dict key."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".splice." in k or k.startswith("splice_heads.")}


@pytest.mark.parametrize("config", [
    splice.LoRA(r=4, targets=["query", "value"], lora_bias=True, train_also=["classifier"]),
    splice.DoRA(r=4, targets=["query", "value"]),
    splice.LoRA(r=4, targets=["query", "value"], init="pissa"),
    splice.DiaBlo(blocks=4, targets=["query", "value"], train_also=["classifier"]),
], ids=["lora-bias-head", "dora", "pissa", "diablo"])
def test_save_and_restore_adapters_is_exact_in_place(tmp_path, config):
    from splice.integrations.hf_trainer import restore_adapters, save_adapters

    trained = make_base()
    splice.attach(trained, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in splice.trainable_parameters(trained).values():
            p.add_(torch.randn_like(p) * 0.1)
    save_adapters(trained, tmp_path)
    fmt = "peft_type" in (tmp_path / "adapter_config.json").read_text()
    assert fmt == (config.method in ("lora", "dora") and config.init != "pissa")
    fresh = make_base()
    splice.attach(fresh, config)
    params = dict(splice.trainable_parameters(fresh))
    restore_adapters(fresh, tmp_path)
    assert_same(adapter_state_dicts(fresh), adapter_state_dicts(trained))
    assert all(p is params[n] for n, p in splice.trainable_parameters(fresh).items())  # in place: optimizer intact


def test_several_adapters_use_peft_layout_and_restore_by_name(tmp_path):
    from splice.integrations.hf_trainer import restore_adapters, save_adapters

    model = make_base()
    splice.attach(model, splice.LoRA(r=4, targets=["query"], init="gaussian", train_also=["classifier"]))
    splice.attach(model, splice.LoRA(r=2, targets=["value"], init="gaussian"), name="other")
    assert save_adapters(model, tmp_path) == ["default", "other"]
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    fresh = make_base()
    torch.manual_seed(5)
    splice.attach(fresh, splice.LoRA(r=4, targets=["query"], init="gaussian", train_also=["classifier"]))
    splice.attach(fresh, splice.LoRA(r=2, targets=["value"], init="gaussian"), name="other")
    restore_adapters(fresh, tmp_path)
    assert_same(adapter_state_dicts(fresh), adapter_state_dicts(model))


def test_restore_refuses_an_adapter_that_does_not_fit_and_changes_nothing(tmp_path):
    from splice.core.errors import AdapterFileError
    from splice.integrations.hf_trainer import restore_adapters, save_adapters

    save_adapters(make_model(), tmp_path)
    other = make_base()
    splice.attach(other, splice.LoRA(r=4, targets=["query", "key"], init="gaussian", train_also=["classifier"]))
    before = adapter_state_dicts(other)
    with pytest.raises(AdapterFileError, match="does not"):
        restore_adapters(other, tmp_path)
    assert_same(adapter_state_dicts(other), before)


def test_resume_from_a_whole_model_checkpoint_still_works(tmp_path):
    from transformers import Trainer

    def lora_only():
        model = make_base()
        torch.manual_seed(1)
        return splice.attach(model, splice.LoRA(r=4, targets=["query", "value"], init="gaussian"))

    straight = lora_only()  # no head: a plain Trainer can write it whole
    plain = Trainer(model=straight, args=trainer(straight, tmp_path / "a").args, train_dataset=RandomIds())
    plain.train()
    assert (tmp_path / "a" / "checkpoint-3" / "model.safetensors").is_file()
    resumed = lora_only()
    with torch.no_grad():
        for p in splice.trainable_parameters(resumed).values():
            p.zero_()
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(adapter_tensors(straight), adapter_tensors(resumed))


def test_from_pretrained_of_a_checkpoint_keeps_the_adapter(tmp_path):
    """The issue's symptom: `from_pretrained(checkpoint)` used to drop the LoRA keys as unexpected.
    An adapter checkpoint names its base, and transformers' PEFT integration loads both."""
    pytest.importorskip("peft")
    make_base().save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    splice.attach(model, splice.LoRA(r=4, alpha=8, targets=["query", "value"], init="gaussian",
                                     train_also=["classifier"]))
    trainer(model, tmp_path / "run", max_steps=3).train()
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint-3").eval()
    batch = {"input_ids": RandomIds(seed=4).ids[:4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    torch.testing.assert_close(logits(reloaded, batch), logits(model.eval(), batch), rtol=1e-5, atol=1e-6)


def test_checkpoints_carry_a_model_card_with_the_metrics_and_keep_a_users_readme(tmp_path):
    scores = itertools.cycle([0.25, 0.75])
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "README.md").write_text("# My run\n\nNotes of mine.\n")
    run = trainer(make_model(), tmp_path, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8,
                  eval_dataset=RandomIds(n=8, seed=3), compute_metrics=lambda _: {"score": next(scores)})
    run.train()
    card = (tmp_path / "checkpoint-6" / "README.md").read_text()
    assert "| eval_score | 0.75 |" in card and "| method | lora |" in card and "runtime" not in card
    run.save_model(str(tmp_path))  # into the output folder, where the user's README is
    kept = (tmp_path / "README.md").read_text()
    assert kept.startswith("---\n") and "# My run\n\nNotes of mine.\n" in kept and "| eval_score | 0.75 |" in kept
