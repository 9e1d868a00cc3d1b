"""Data a run cannot use is refused, naming the file and line (issue 13).

Before, an empty or blank file, a JSONL line that is not an object, a null text, a label of -1,
a null label (it became a class "None"), a label of 0.5 or a mix of integer and string labels
(classes renumbered silently), and single-class data (accuracy 1.0 by construction) each loaded,
or crashed later with a raw KeyError/TypeError from the tokenizer or the collator.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splice import assets
from splice.core.errors import DataError
from splice.train import TrainConfig
from splice.train.data import canonical_splits, load_eval_rows, load_splits, read_rows

pytestmark = pytest.mark.guards("crash")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def jsonl(path: Path, rows: list[object]) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


def good_rows(n: int = 10) -> list[dict]:
    return [{"text": f"review {i}", "label": i % 2} for i in range(n)]


def refused(config: TrainConfig, *expected: str) -> str:
    with pytest.raises(DataError) as caught:
        load_splits(config)
    message = str(caught.value)
    for part in expected:
        assert part in message, (part, message)
    return message


# -- files that hold no rows, and lines that are not rows ----------------------------------------


@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", ""), ("blank.jsonl", "\n  \n\t\n"), ("empty.csv", ""), ("header-only.csv", "text,label\n"),
], ids=["empty-jsonl", "blank-jsonl", "empty-csv", "header-only-csv"])
def test_a_file_without_rows_is_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    message = refused(TrainConfig(data=str(path)), str(path))
    assert "empty" in message or "no rows" in message


@pytest.mark.parametrize(("line", "kind"), [
    ("[1, 2]", "list"), ('"just a string"', "string"), ("42", "number"), ("null", "null"),
], ids=["list", "string", "number", "null"])
def test_a_jsonl_line_that_is_not_an_object(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in good_rows(3)] + [line] +
                       [json.dumps(r) for r in good_rows(3)])
    refused(TrainConfig(data=str(path)), f"{path}:4", "not a JSON object", kind)


# -- texts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), (17, "17"), (["a", "b"], "['a', 'b']")],
                         ids=["null", "number", "list"])
def test_a_text_that_is_not_a_string(tmp_path, value, shown):
    rows = good_rows(6)
    rows[4]["text"] = value
    path = jsonl(tmp_path / "d.jsonl", rows)
    refused(TrainConfig(data=str(path)), f"{path}:5", "'text'", shown, "expected a string")


def test_a_null_completion_in_causal_lm_data(tmp_path):
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(6)]
    rows[2]["completion"] = None
    path = jsonl(tmp_path / "d.jsonl", rows)
    refused(TrainConfig(model="smollm2", task="causal_lm", data=str(path)), f"{path}:3", "'completion'", "null")


def test_a_later_row_without_the_label_column(tmp_path):
    rows = good_rows(6)
    del rows[3]["label"]
    path = jsonl(tmp_path / "d.jsonl", rows)
    refused(TrainConfig(data=str(path)), f"{path}:4", "no column 'label'", "--label-column")


# -- labels ----------------------------------------------------------------------------------


@pytest.mark.guards("silent")
@pytest.mark.parametrize(("value", "expected"), [
    (-1, "-1"), (None, "null"), (0.5, "0.5"), (True, "True"), ("", "blank"), ([1], "[1]"),
], ids=["minus-one", "null", "fraction", "bool", "blank", "list"])
def test_a_label_that_is_not_a_class_in_jsonl(tmp_path, value, expected):
    rows = good_rows(8)
    rows[6]["label"] = value
    path = jsonl(tmp_path / "d.jsonl", rows)
    refused(TrainConfig(data=str(path)), f"{path}:7", "label", expected)


@pytest.mark.guards("silent")
@pytest.mark.parametrize(("value", "expected"), [("-1", "-1"), ("0.5", "0.5"), ("", "blank")],
                         ids=["minus-one", "fraction", "blank"])
def test_a_label_that_is_not_a_class_in_csv(tmp_path, value, expected):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(5)) + f"bad row,{value}\n")
    refused(TrainConfig(data=str(path)), f"{path}:7", "label", expected)


def test_a_csv_row_missing_its_label_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nrow a,0\nrow b\nrow c,1\n")
    refused(TrainConfig(data=str(path)), f"{path}:3", "label", "null")


@pytest.mark.guards("silent")
def test_integer_and_string_labels_are_not_mixed(tmp_path):
    rows = good_rows(6)
    rows[4]["label"] = "positive"
    path = jsonl(tmp_path / "d.jsonl", rows)
    refused(TrainConfig(data=str(path)), f"{path}:1", f"{path}:5", "mix class indices", "class names")


@pytest.mark.guards("silent")
def test_a_validation_file_with_names_when_training_has_indices(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", good_rows(6))
    validation = jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "neg"}, {"text": "y", "label": "pos"}])
    refused(TrainConfig(data=str(train), validation=str(validation)), f"{train}:1", f"{validation}:1", "mix")


def test_rows_from_code_are_named_by_split_and_position():
    with pytest.raises(DataError, match=r"validation row 2: label column 'label' is -1"):
        canonical_splits(good_rows(4), [{"text": "a", "label": 0}, {"text": "b", "label": -1}], [], TrainConfig())


def test_whole_number_spellings_are_one_class(tmp_path):
    """Documented behaviour (passes before for "1" and 1; 1.0 was a class of its own before)."""
    path = tmp_path / "d.jsonl"
    jsonl(path, [{"text": "a", "label": 1}, {"text": "b", "label": "1"}, {"text": "c", "label": 1.0},
                 {"text": "d", "label": 0}] * 3)
    splits = load_splits(TrainConfig(data=str(path)))
    assert splits.label_names == ("0", "1")
    assert {r["label"] for r in splits.train + splits.validation} == {0, 1}


# -- one class -------------------------------------------------------------------------------


@pytest.mark.guards("silent")
def test_single_class_data_is_refused(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(20)])
    refused(TrainConfig(data=str(path)), str(path), "only class 'pos'", "at least two classes")


@pytest.mark.guards("silent")
def test_single_class_training_rows_after_the_hold_out_are_refused(tmp_path):
    n = 20
    order = assets.shuffled(list(range(n)))  # where assets.split sends each row
    held_out = order[int(n * 0.8):]
    rows = [{"text": f"t{i}", "label": 1 if i in held_out else 0} for i in range(n)]
    path = jsonl(tmp_path / "d.jsonl", rows)
    refused(TrainConfig(data=str(path)), str(path), "training rows", "only class '0'")


@pytest.mark.guards("silent")
def test_single_class_evaluation_file_with_names_is_refused_with_indices_allowed(tmp_path):
    names = jsonl(tmp_path / "names.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(4)])
    with pytest.raises(DataError, match="only class 'pos'"):
        load_eval_rows(TrainConfig(data=str(names)))
    indices = jsonl(tmp_path / "indices.jsonl", [{"text": f"t{i}", "label": 1} for i in range(4)])
    rows = load_eval_rows(TrainConfig(data=str(indices)))  # documented: accuracy on one class is meaningful
    assert [r["label"] for r in rows.test] == [1, 1, 1, 1]


def test_read_rows_still_reads_good_files(tmp_path):
    """Regression guard (passes before and after)."""
    path = jsonl(tmp_path / "d.jsonl", good_rows(3))
    assert read_rows(path) == good_rows(3)
