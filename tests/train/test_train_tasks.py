"""Task plumbing: the head joins train_also, and per-example metrics agree with the model's loss."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForSequenceClassification

import splice
from splice.train import TrainConfig, tasks
from splice.train.data import CausalLMCollator, ClassificationCollator


def test_head_is_found_and_added_to_train_also(tiny_bert_dir):
    config = TrainConfig(model=str(tiny_bert_dir), adapter={"method": "lora", "targets": ["query"]})
    model, _ = tasks.load_model(config, ("neg", "pos"))
    assert tasks.head_name(model) == "classifier"
    adapter = tasks.adapter_config(config, model)
    assert adapter.train_also == ["classifier"]
    splice.attach(model, adapter)
    trainable = splice.trainable_parameters(model)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_llama_classification_head_is_score():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3)
    assert tasks.head_name(LlamaForSequenceClassification(config)) == "score"


def test_model_without_a_known_head_is_refused():
    with pytest.raises(splice.SpliceError, match="train_also"):
        tasks.head_name(torch.nn.Linear(2, 2))


def test_unknown_model_name_is_refused():
    with pytest.raises(splice.SpliceError, match="never downloads"):
        tasks.model_path("bert-base-uncased")


def test_classification_stats_match_the_models_loss(tiny_bert_dir):
    config = TrainConfig(model=str(tiny_bert_dir))
    model, tokenizer = tasks.load_model(config, ("a", "b"))
    batch = ClassificationCollator(tokenizer, 16)([{"text": "good film", "label": 1}, {"text": "bad", "label": 0}])
    stats = tasks.example_stats("classification", model.eval(), batch)
    metrics = tasks.reduce_stats("classification", stats)
    assert metrics["loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    expected = (model(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert metrics["accuracy"] == expected


def test_causal_stats_count_only_completion_tokens(tiny_llama_dir):
    config = TrainConfig(model=str(tiny_llama_dir), task="causal_lm")
    model, tokenizer = tasks.load_model(config)
    rows = [{"prompt": "Question: one plus one?", "completion": " 2"},
            {"prompt": "Q: 3?", "completion": " three and more words"}]
    batch = CausalLMCollator(tokenizer, 32)(rows)
    stats = tasks.example_stats("causal_lm", model.eval(), batch)
    assert stats["tokens"].tolist() == [2.0, 5.0]  # answer tokens + [SEP] as eos
    metrics = tasks.reduce_stats("causal_lm", stats)
    assert metrics["loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_exact_match_compares_the_first_line_of_the_greedy_answer(tiny_llama_dir):
    config = TrainConfig(model=str(tiny_llama_dir), task="causal_lm")
    model, tokenizer = tasks.load_model(config)
    prompt = "Question: what comes next?"
    inputs = tokenizer([prompt], return_tensors="pt", return_token_type_ids=False)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(greedy[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    rows = [{"prompt": prompt, "completion": f" {answer.strip()}"}, {"prompt": prompt, "completion": " nope"}]
    assert tasks.exact_match(model, tokenizer, rows, batch_size=2, max_new_tokens=3) == 0.5
    assert tokenizer.padding_side == "right"


def test_the_newly_initialized_head_report_is_silenced_but_other_missing_weights_are_not(tiny_bert_dir, tmp_path,
                                                                                         caplog):
    caplog.set_level("WARNING", logger="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head alone is no reason for a warning
        model = tasks.load_pretrained(str(tiny_bert_dir), "classification", ("neg", "pos"))
    assert model.classifier.out_features == 2
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage() or "newly initialized" in r.getMessage()]
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bert_dir, damaged)
    weights = next(damaged.glob("*.safetensors"))
    tensors = load_file(weights)
    dropped = next(k for k in tensors if "query.weight" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"missing from the checkpoint besides the head.*query\.weight"):
        tasks.load_pretrained(str(damaged), "classification", ("neg", "pos"))
