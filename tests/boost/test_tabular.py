"""BoostLLM's tabular views: loading, few-shot draws, the feature serialisation and the tree path,
each checked to invert exactly and to agree with sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
import sklearn.datasets  # noqa: E402

from splice.boost.tabular import (  # noqa: E402
    TABLES,
    PathTree,
    Table,
    draw_shots,
    fit_path_tree,
    load_table,
    parse_row,
    path_conditions,
    path_text,
    path_texts,
    serialize_row,
    serialize_rows,
)
from splice.core.errors import DataError, SpliceError  # noqa: E402

AWKWARD = ["it is a test.", "a. b", "5", "2.5", '"quoted"', "x is y", "nan", "Inc.", ""]


def write(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def same_values(parsed: dict, table: Table, i: int) -> None:
    """Equal values of equal types, the sign of a zero included."""
    expected = dict(zip(table.columns, table.rows[i], strict=True))
    assert list(parsed) == table.columns
    for column, value in expected.items():
        assert type(parsed[column]) is type(value) and parsed[column] == value, column
        if isinstance(value, float):
            assert math.copysign(1, parsed[column]) == math.copysign(1, value), column


@pytest.fixture
def mixed_csv(tmp_path) -> str:
    """Ints, exact floats, strings that look like numbers or sentences, and a string label."""
    rows = ["count,size,note,label", '3,5.0,red,yes', '-7,1e-07,"it is a test.",no', '12,-0.0,"a. b",yes',
            '0,3.141592653589793,5,no', '4,2.0,"""quoted""",yes', '1,0.5,x is y,no', '2,1.5,Inc.,yes']
    return write(tmp_path / "mixed.csv", rows)


def test_bundled_tables_load_as_sklearn_has_them_and_round_trip():
    for name in TABLES:
        table, bunch = load_table(name), getattr(sklearn.datasets, f"load_{name}")()
        assert table.columns == [str(f) for f in bunch.feature_names]
        assert table.classes == [str(c) for c in bunch.target_names]
        assert table.labels == bunch.target.tolist() and np.array_equal(table.features(), bunch.data)
        for i, text in enumerate(serialize_rows(table, range(5))):
            assert text == serialize_row(table, i)
            same_values(parse_row(text, table.columns), table, i)


def test_breast_cancer_reads_as_tabllm_sentences():
    table = load_table("breast_cancer")
    assert table.classes[:2] == ["malignant", "benign"]
    assert serialize_row(table, 0).startswith("The mean radius is 17.99. The mean texture is 10.38. ")
    assert serialize_row(table, 0).endswith("The worst fractal dimension is 0.1189.")


def test_csv_values_keep_their_types_and_round_trip(mixed_csv):
    table = load_table(mixed_csv)
    assert table.name == "mixed" and table.columns == ["count", "size", "note"] and table.classes == ["no", "yes"]
    assert [type(v) for v in table.rows[0]] == [int, float, str] and table.labels == [1, 0, 1, 0, 1, 0, 1]
    assert table.rows[3][2] == "5" and table.rows[4][2] == '"quoted"'
    assert serialize_row(table, 0) == "The count is 3. The size is 5.0. The note is red."
    assert serialize_row(table, 1) == "The count is -7. The size is 1e-07. The note is it is a test.."
    assert serialize_row(table, 3) == 'The count is 0. The size is 3.141592653589793. The note is "5".'
    for i in range(len(table)):
        same_values(parse_row(serialize_row(table, i), table.columns), table, i)


def test_column_names_and_strings_with_is_and_periods_round_trip():
    columns = ["the colour is", "a. b", "x"]
    rows = [[value, value, 1.0] for value in AWKWARD] + [[value, "The x is 1.0", -0.0] for value in AWKWARD]
    table = Table("awkward", columns, rows, [r % 2 for r in range(len(rows))], ["even", "odd"])
    for i in range(len(table)):
        text = serialize_row(table, i)
        assert serialize_row(table, i) == text
        same_values(parse_row(text, columns), table, i)


def test_parse_row_refuses_text_of_other_columns():
    table = load_table("iris")
    with pytest.raises(SpliceError, match="The petal length"):
        parse_row(serialize_row(table, 0), ["sepal length (cm)", "petal length (cm)"])


def test_features_one_hot_the_string_columns_in_sorted_order(mixed_csv):
    table = load_table(mixed_csv)
    names = table.feature_names()
    categories = ['"quoted"', "5", "Inc.", "a. b", "it is a test.", "red", "x is y"]
    assert names == ["count", "size", *(f"note is {c}" for c in categories)]
    features = table.features()
    assert features[:, 0].tolist() == [3, -7, 12, 0, 4, 1, 2]
    assert features[0, names.index("note is red")] == 1 and features[0, 2:].sum() == 1
    assert (features[:, 2:].sum(axis=1) == 1).all()


@pytest.mark.parametrize(("name", "shots"), [("breast_cancer", 16), ("wine", 16), ("iris", 5), ("digits", 64)])
def test_shots_are_stratified_disjoint_and_cover_the_table(name, shots):
    table = load_table(name)
    split = draw_shots(table, shots, seed=3)
    labels = np.asarray(table.labels)
    drawn = np.concatenate([split.train, split.validation])
    assert len(drawn) == shots and len(split.test) == len(table) - shots
    assert np.array_equal(np.sort(np.concatenate([drawn, split.test])), np.arange(len(table)))
    assert set(labels[split.train]) == set(range(len(table.classes)))
    counts, taken = np.bincount(labels), np.bincount(labels[drawn], minlength=len(table.classes))
    assert np.abs(taken - shots * counts / counts.sum()).max() < 1 + 1e-9  # in proportion, one each at least
    if len(split.validation):
        assert split.note == "" and set(labels[split.validation]) == set(labels[drawn])
        assert len(split.validation) == max(math.ceil(shots / 4), len(table.classes))


def test_validation_is_a_quarter_of_the_shots_or_none_with_a_note():
    split = draw_shots(load_table("breast_cancer"), 16, seed=0)
    assert len(split.validation) == 4 and len(split.train) == 12 and split.note == ""
    few = draw_shots(load_table("digits"), 16, seed=0)  # 10 classes: some have a single shot
    assert len(few.validation) == 0 and len(few.train) == 16 and "no validation rows" in few.note
    assert "no validation rows asked" in draw_shots(load_table("iris"), 9, seed=0, validation=0).note
    assert len(draw_shots(load_table("iris"), 30, seed=0, validation=6).validation) == 6
    iris = load_table("iris")
    small = draw_shots(iris, 8, seed=0)  # a quarter is 2 rows, raised to one of each of the 3 classes
    assert sorted(np.asarray(iris.labels)[small.validation].tolist()) == [0, 1, 2] and len(small.train) == 5


def test_the_same_seed_gives_the_same_split_and_another_seed_another():
    table = load_table("wine")
    first, again, other = draw_shots(table, 16, seed=1), draw_shots(table, 16, seed=1), draw_shots(table, 16, seed=2)
    for field in ("train", "validation", "test"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.train, other.train)


def walk(tree: PathTree, x: np.ndarray, names: list[str]) -> list[tuple[str, str, float]]:
    """The conditions from the root to a leaf, read off `tree_` directly (sklearn compares float32
    features with the thresholds)."""
    nodes, node, out = tree.model.tree_, 0, []
    while nodes.children_left[node] != -1:
        feature, threshold = nodes.feature[node], float(nodes.threshold[node])
        goes_left = np.float32(x[feature]) <= threshold
        out.append((names[feature], "<=" if goes_left else ">", threshold))
        node = nodes.children_left[node] if goes_left else nodes.children_right[node]
    return out


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "iris"])
def test_the_path_view_is_the_trees_decision_path(name):
    table = load_table(name)
    split = draw_shots(table, 64, seed=0)
    tree = fit_path_tree(table, split.train, depth=3, seed=0)
    names, x = table.feature_names(), table.features()
    texts = path_texts(tree, table, split.test)
    assert texts == path_texts(tree, table, split.test)
    predicted = tree.model.predict(x[split.test])
    paths = tree.model.decision_path(x[split.test])
    for r, (i, text) in enumerate(zip(split.test, texts, strict=True)):
        conditions = path_conditions(text, tree)
        assert conditions == walk(tree, x[i], names) and len(conditions) == paths[r].nnz - 1
        for feature, op, threshold in conditions:
            value = np.float32(x[i, names.index(feature)])
            assert (value <= threshold) if op == "<=" else (value > threshold)
        assert text.startswith("The tree asks: ") and text.endswith(f". It predicts {table.classes[predicted[r]]}.")
    assert path_text(tree, table, int(split.test[7])) == texts[7]


def test_string_columns_read_as_is_and_is_not(tmp_path):
    lines = ["the colour; shade,size,label"] + [f"{c},{s},{'hot' if c == 'red; dark' else 'cold'}"
                                                for c in ("red; dark", "blue", "green") for s in (1, 2, 3)]
    table = load_table(write(tmp_path / "colours.csv", lines))
    tree = fit_path_tree(table, range(len(table)), depth=2, seed=0)
    texts = path_texts(tree, table, range(len(table)))
    assert texts[0] == "The tree asks: the colour; shade is red; dark. It predicts hot."
    assert texts[3] == "The tree asks: the colour; shade is not red; dark. It predicts cold."
    names, x = table.feature_names(), table.features()
    for i, text in enumerate(texts):
        assert path_conditions(text, tree) == walk(tree, x[i], names)


def test_a_tree_of_one_leaf_asks_nothing(tmp_path):
    lines = ["size,label", "1,a", "1,b", "1,a", "1,a"]
    table = load_table(write(tmp_path / "flat.csv", lines))
    tree = fit_path_tree(table, range(4), depth=2, seed=0)
    assert path_text(tree, table, 1) == "The tree asks nothing. It predicts a."
    assert path_conditions(path_text(tree, table, 1), tree) == []


def test_a_path_view_of_another_table_is_refused():
    iris, wine = load_table("iris"), load_table("wine")
    tree = fit_path_tree(iris, range(0, 150, 5), depth=2, seed=0)
    with pytest.raises(SpliceError, match="other features"):
        path_texts(tree, wine, [0])
    with pytest.raises(SpliceError, match="not a path view"):
        path_conditions("The tree asks: alcohol <= 1.5. It predicts setosa.", tree)


def test_unknown_table_lists_the_bundled_ones():
    with pytest.raises(SpliceError, match="unknown table 'titanic'") as error:
        load_table("titanic")
    assert all(name in str(error.value) for name in ("breast_cancer", "wine", "iris", "digits", "CSV"))


def test_csv_problems_name_the_file_line_and_column(tmp_path):
    good = ["a,b,label", "1,x,yes", "2,y,no"]
    with pytest.raises(DataError, match=r"no label column 'kind'; the columns are a, b, label"):
        load_table(write(tmp_path / "t.csv", good), label_column="kind")
    with pytest.raises(DataError, match=r"'label' holds one class \('yes'\)"):
        load_table(write(tmp_path / "one.csv", ["a,label", "1,yes", "2,yes"]))
    with pytest.raises(DataError, match=r"ragged.csv, line 3: 2 cells, the header has 3 columns"):
        load_table(write(tmp_path / "ragged.csv", [*good[:2], "2,no", good[2]]))
    with pytest.raises(DataError, match=r"empty.csv, line 2: column 'b' is empty"):
        load_table(write(tmp_path / "empty.csv", ["a,b,label", "1,,yes", "2,y,no"]))


def test_csv_label_column_may_be_any_and_numeric_classes_sort_as_numbers(tmp_path):
    table = load_table(write(tmp_path / "t.csv", ["grade,a", "10,1.5", "2,2.5", "10,3.5"]), label_column="grade")
    assert table.columns == ["a"] and table.classes == ["2", "10"] and table.labels == [1, 0, 1]


def test_too_few_shots_and_bad_tables_are_refused():
    with pytest.raises(SpliceError, match="2 shots cannot hold a row of each of the 3 classes of iris"):
        draw_shots(load_table("iris"), 2, seed=0)
    with pytest.raises(SpliceError, match="leave no test rows"):
        draw_shots(load_table("iris"), 150, seed=0)
    with pytest.raises(DataError, match="mixes strings and numbers"):
        Table("t", ["a"], [[1], ["x"]], [0, 1], ["p", "q"])
    with pytest.raises(DataError, match="at least 2"):
        Table("t", ["a"], [[1], [2]], [0, 0], ["p"])
