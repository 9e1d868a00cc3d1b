"""Reading rows and collating batches; above all, the causal-LM loss mask."""

from __future__ import annotations

import sys

import pytest
from train_helpers import write_jsonl

from splice import SpliceError
from splice.train import TrainConfig
from splice.train.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    ClassificationCollator,
    canonical_splits,
    load_splits,
    read_rows,
)


def test_causal_lm_labels_mask_exactly_prompt_and_padding(tokenizer):
    rows = [{"prompt": "Question: what is two plus two?\nAnswer:", "completion": " 4"},
            {"prompt": "Question: 7 - 3?", "completion": " four, said the calculator"}]
    batch = CausalLMCollator(tokenizer, max_length=64)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, row in enumerate(rows):
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = len(prompt) + len(completion)
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert ids[:n].tolist() == prompt + completion
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()
        assert labels[len(prompt) : n].tolist() == completion
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == tokenizer.pad_token_id).all()
        assert mask[:n].all() and not mask[n:].any()
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)


def test_causal_lm_truncates_to_max_length(tokenizer):
    batch = CausalLMCollator(tokenizer, max_length=6)([{"prompt": "a b c", "completion": " d e f g h"}])
    assert batch["input_ids"].shape == (1, 6)
    assert batch["labels"][0, :5].tolist() == [IGNORE_INDEX] * 5  # [CLS] a b c [SEP] are the prompt
    assert batch["labels"][0, 5] == batch["input_ids"][0, 5]


def test_classification_collator_pads_to_longest_and_truncates(tokenizer):
    rows = [{"text": "good", "label": 1}, {"text": "a much longer and rather dull review", "label": 0}]
    batch = ClassificationCollator(tokenizer, max_length=5)(rows)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]


def test_read_rows_from_jsonl_csv_and_iterables(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("text,label\nx,1\ny,0\n")
    assert read_rows(jsonl) == [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    assert read_rows(csv_file) == [{"text": "x", "label": "1"}, {"text": "y", "label": "0"}]
    assert read_rows(iter([{"a": 1}])) == [{"a": 1}]


def test_read_rows_errors_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(SpliceError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SpliceError, match="broken.jsonl:2 is not valid JSON"):
        read_rows(broken)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(SpliceError, match="pip install datasets"):
        read_rows(tmp_path)


def test_string_labels_are_numbered_in_sorted_order_and_csv_integers_stay():
    config = TrainConfig(data="x.jsonl", text_column="review", label_column="sentiment")
    splits = canonical_splits([{"review": "a", "sentiment": "pos"}], [{"review": "b", "sentiment": "neg"}], [], config)
    assert splits.label_names == ("neg", "pos")
    assert splits.train == [{"text": "a", "label": 1}] and splits.validation == [{"text": "b", "label": 0}]
    numbered = canonical_splits([{"text": "a", "label": "2"}, {"text": "b", "label": 0}], [], [], TrainConfig())
    assert [r["label"] for r in numbered.train] == [2, 0] and numbered.label_names == ("0", "1", "2")


def test_missing_column_names_the_flags_of_the_task():
    with pytest.raises(SpliceError, match="--text-column / --label-column"):
        canonical_splits([{"sentence": "a", "label": 0}], [], [], TrainConfig())
    with pytest.raises(SpliceError, match="--prompt-column / --completion-column"):
        canonical_splits([{"question": "1+1", "completion": "2"}], [], [],
                         TrainConfig(model="smollm2", task="causal_lm"))


def test_file_without_validation_holds_out_a_tenth(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(50)]
    config = TrainConfig(data=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_train_examples=30)
    splits = load_splits(config)
    assert len(splits.train) == 30 and len(splits.validation) == 10 and splits.test == []
    assert not {r["text"] for r in splits.train} & {r["text"] for r in splits.validation}


def test_max_eval_examples_keeps_the_first_rows_of_each_evaluation_split(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    validation = write_jsonl(tmp_path / "v.jsonl", [{"text": f"v{i}", "label": i % 2} for i in range(10)])
    splits = load_splits(TrainConfig(data=str(train), validation=str(validation), max_eval_examples=3))
    assert [r["text"] for r in splits.validation] == ["v0", "v1", "v2"] and len(splits.train) == 20
    whole = load_splits(TrainConfig())
    capped = load_splits(TrainConfig(max_eval_examples=4))
    assert capped.validation == whole.validation[:4] and capped.test == whole.test[:4]
    assert capped.train == whole.train


def test_bundled_data_set_for_the_wrong_task_is_refused():
    with pytest.raises(SpliceError, match="'arithmetic' is for causal_lm"):
        load_splits(TrainConfig(data="arithmetic"))
