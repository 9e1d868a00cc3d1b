"""The tabular side of BoostLLM (methods volume 1, §4): tables, seeded few-shot draws, and the two
text views of a row that the boosting rounds feed a language model.

- The feature view, TabLLM's serialisation (Hegselmann et al., AISTATS 2023): one sentence per
  column, in column order, "The <column> is <value>.", joined by single spaces.
- The path view: the split conditions a shallow decision tree (sklearn's `DecisionTreeClassifier`
  fitted on the training shots) tests on the row, root to leaf, and the class of its leaf:
  "The tree asks: worst radius <= 16.795000076293945; mean texture > 20.1. It predicts benign."

Both are deterministic and invert exactly (`parse_row`, `path_conditions`), types included, so the
text a model reads holds the very numbers the tree and the metrics see.

Values are written exactly. An int as `str(int)`; a float as `repr(float)`, the shortest text that
reads back to the same float (so 5.0 stays "5.0", apart from the int 5, and -0.0 keeps its sign).
A string as it is, unless reading it back would change it: when it reads as an int or a float
written that way ("5", "2.5"), starts with a double quote, or contains ". " (the end of a
sentence), it is written as a JSON string ("\\"5\\""). A row is read back by its known column
names, in order, so column names and strings may hold " is " and periods.

String columns enter the tree one-hot (`Table.features`): one 0/1 feature per category (the
column's categories in the whole table, sorted), named "<column> is <category>". The tree splits
such a feature at 0.5 (the midpoint of 0 and 1), and the path view reads "<column> is <category>"
(> 0.5) or "<column> is not <category>" (<= 0.5).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from splice.assets import SKLEARN_TABLES, AssetMissingError
from splice.core.errors import DataError, SpliceError

if TYPE_CHECKING:
    from sklearn.tree import DecisionTreeClassifier

Value = int | float | str

TABLES = SKLEARN_TABLES
_INT = re.compile(r"-?\d+")  # str(int)
_FLOAT = re.compile(r"-?(?:\d+\.\d+(?:e[+-]\d+)?|\d+e[+-]\d+)")  # repr(float) of a finite float
_CSV_INT = re.compile(r"[+-]?\d+")
_CSV_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ASKS, _ASKS_NOTHING, _PREDICTS = "The tree asks: ", "The tree asks nothing", ". It predicts "


@dataclass
class Table:
    """A classification table: `rows[r][j]` is the value of `columns[j]` in row r (an int, a float
    or a str; a column holds strings or numbers, never both), `labels[r]` indexes `classes`.

    Checked on construction: at least 2 classes, each with a row; finite numbers.
    """

    name: str
    columns: list[str]
    rows: list[list[Value]]
    labels: list[int]
    classes: list[str]

    def __post_init__(self) -> None:
        where = f"table {self.name!r}"
        if not self.columns or len(set(self.columns)) != len(self.columns):
            raise DataError(f"{where}: columns must be distinct names, got {self.columns}")
        if not self.rows or len(self.rows) != len(self.labels):
            raise DataError(f"{where}: {len(self.rows)} rows and {len(self.labels)} labels; expected as many, >= 1")
        for r, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise DataError(f"{where}: row {r} has {len(row)} values for the {len(self.columns)} columns")
        for j, column in enumerate(self.columns):
            _check_column(where, column, [row[j] for row in self.rows])
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise DataError(f"{where}: classes {self.classes}; a classifier needs at least 2 distinct ones")
        bad = [label for label in self.labels if type(label) is not int or not 0 <= label < len(self.classes)]
        if bad:
            raise DataError(f"{where}: label {bad[0]!r} is not a class index 0..{len(self.classes) - 1}")
        counts = np.bincount(self.labels, minlength=len(self.classes))
        if (counts == 0).any():
            raise DataError(f"{where}: class {self.classes[int(np.argmin(counts))]!r} has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def encoding(self) -> list[tuple[str, str | None]]:
        """What each column of `features()` is: (column, None) for a number column, (column,
        category) for one category of a string column (one-hot, categories sorted)."""
        out: list[tuple[str, str | None]] = []
        for j, column in enumerate(self.columns):
            if isinstance(self.rows[0][j], str):
                out += [(column, category) for category in sorted({row[j] for row in self.rows})]
            else:
                out.append((column, None))
        return out

    def feature_names(self) -> list[str]:
        """The name of each column of `features()`: the column, or "<column> is <category>"."""
        return [column if category is None else f"{column} is {category}" for column, category in self.encoding()]

    def features(self) -> np.ndarray:
        """The table as a float64 matrix (rows x `encoding()`) for sklearn models: numbers as they
        are, string columns one-hot."""
        index = {column: j for j, column in enumerate(self.columns)}
        encoding = self.encoding()
        out = np.empty((len(self.rows), len(encoding)))
        for f, (column, category) in enumerate(encoding):
            values = np.array([row[index[column]] for row in self.rows], dtype=object)
            out[:, f] = values if category is None else values == category
        return out


def _check_column(where: str, column: str, values: list[Value]) -> None:
    """Refuse values of other types than int/float/str, strings mixed with numbers, and NaN/inf."""
    for r, value in enumerate(values):
        if type(value) not in (int, float, str):
            raise DataError(f"{where}: row {r}, column {column!r} holds {value!r} ({type(value).__name__}); "
                            "a table holds int, float or str values")
        if isinstance(value, str) != isinstance(values[0], str):
            raise DataError(f"{where}: column {column!r} mixes strings and numbers "
                            f"(row 0 has {values[0]!r}, row {r} has {value!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: row {r}, column {column!r} is {value!r}; a table holds finite numbers")


# ------------------------------------------------------------------------------------- loading


def load_table(source: str, label_column: str | None = None) -> Table:
    """A bundled sklearn table by name (`TABLES`) or a CSV file.

    A CSV file has a header line; the label column (`label_column`, default the last) gives the
    classes (its distinct values, sorted: as numbers when all are integers), the other columns the
    features. A column whose cells are all integers holds ints, all numbers floats, else strings.
    Empty cells and rows of another length than the header are refused, naming the line.
    """
    if source in TABLES:
        if label_column is not None:
            raise SpliceError(f"label_column applies to CSV files; the bundled table {source!r} has its labels")
        return _bundled(source)
    if Path(source).is_file():
        return _read_csv(Path(source), label_column)
    raise SpliceError(f"unknown table {source!r}: bundled tables are {', '.join(TABLES)}, or give a CSV file's path")


def _bundled(name: str) -> Table:
    if importlib.util.find_spec("sklearn") is None:
        raise AssetMissingError(f"the {name} table needs `pip install scikit-learn`")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    return Table(name=name, columns=[str(f) for f in bunch.feature_names], rows=bunch.data.tolist(),
                 labels=bunch.target.tolist(), classes=[str(c) for c in bunch.target_names])


def _read_csv(path: Path, label_column: str | None) -> Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file, skipinitialspace=True)  # "1, 2.5": cells after ", " are numbers too
            header = next(reader, None)
            lines: list[tuple[int, list[str]]] = []
            for cells in reader:
                if cells:  # a blank line
                    lines.append((reader.line_num, [cell.strip() for cell in cells]))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 (a Latin-1 "
                        "export can be converted with `iconv -f latin1 -t utf-8`)") from None
    header = [name.strip() for name in header] if header else header
    if not header or not lines:
        raise DataError(f"{path}: a CSV table needs a header line and at least one row")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: the header repeats a column name: {header}")
    label = header[-1] if label_column is None else label_column
    if label not in header:
        raise DataError(f"{path}: no label column {label!r}; the columns are {', '.join(header)}")
    for line, cells in lines:
        if len(cells) != len(header):
            raise DataError(f"{path}, line {line}: {len(cells)} cells, the header has {len(header)} columns")
        for name, cell in zip(header, cells, strict=True):
            if not cell.strip():
                raise DataError(f"{path}, line {line}: column {name!r} is empty; fill or drop the row")
    columns = [name for name in header if name != label]
    by_column = {name: [cells[j] for _, cells in lines] for j, name in enumerate(header)}
    for name in columns:
        _refuse_missing_markers(path, name, by_column[name], [line for line, _ in lines])
    values = [_parse_cells(by_column[name]) for name in columns]
    names = sorted(set(by_column[label]), key=int if all(_CSV_INT.fullmatch(c) for c in by_column[label]) else str)
    if len(names) < 2:
        raise DataError(f"{path}: label column {label!r} holds one class ({names[0]!r}) on all {len(lines)} rows; "
                        "a classifier needs at least 2")
    index = {name: c for c, name in enumerate(names)}
    return Table(name=path.stem, columns=columns, rows=[list(row) for row in zip(*values, strict=True)],
                 labels=[index[cell] for cell in by_column[label]], classes=names)


MISSING_MARKERS = {"nan", "na", "n/a", "null", "none", "?", "-", "inf", "-inf", "+inf", "infinity"}


def _refuse_missing_markers(path: Path, column: str, cells: list[str], lines: list[int]) -> None:
    """A column of numbers with a missing-value marker ("nan", "NA", "?", ...) in some cells would
    silently become a column of string categories, each number one of them: refused, naming the
    first such cell."""
    markers = [k for k, cell in enumerate(cells) if cell.lower() in MISSING_MARKERS]
    numbers = sum(1 for cell in cells if _CSV_NUMBER.fullmatch(cell))
    if markers and numbers + len(markers) == len(cells) and numbers:
        k = markers[0]
        raise DataError(f"{path}, line {lines[k]}: column {column!r} holds numbers and the missing-value marker "
                        f"{cells[k]!r} ({len(markers)} cell(s)); fill or drop those rows")


def _parse_cells(cells: list[str]) -> list[Value]:
    if all(_CSV_INT.fullmatch(c) for c in cells):
        return [int(c) for c in cells]
    if all(_CSV_NUMBER.fullmatch(c) for c in cells):
        return [float(c) for c in cells]
    return list(cells)


# ----------------------------------------------------------------------------------- few shots


@dataclass(frozen=True)
class Split:
    """Row indices of a table (sorted, disjoint, covering it): the `shots` drawn rows are `train`
    and `validation` (held out for early stopping), the rest `test`. `note` says why there are no
    validation rows, when there are none."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    note: str = ""


def draw_shots(table: Table, shots: int, seed: int, validation: float | int = 0.25) -> Split:
    """A seeded stratified draw of `shots` rows; the same seed gives the same split.

    Each class gets one shot, the rest go in proportion to the class sizes (largest remainder).
    Validation holds out `validation` of the shots (a fraction, rounded up, or a count), at least
    one of each class, drawn the same way; it is empty (see `Split.note`) when that would leave a
    class without a training row.
    """
    k = len(table.classes)
    if seed < 0:
        raise SpliceError(f"seed must be >= 0, got {seed}")
    if shots < k:
        raise SpliceError(f"{shots} shots cannot hold a row of each of the {k} classes of {table.name} "
                          f"({', '.join(table.classes)}); ask for at least {k}")
    if shots >= len(table):
        raise SpliceError(f"{shots} shots leave no test rows: {table.name} has {len(table)} rows")
    if validation < 0 or isinstance(validation, float) and validation >= 1:
        raise SpliceError(f"validation must be a fraction in [0, 1) or a count >= 0, got {validation!r}")
    labels = np.asarray(table.labels)
    counts = np.bincount(labels, minlength=k)
    generator = np.random.default_rng(seed)
    by_class = [generator.permutation(np.flatnonzero(labels == c)) for c in range(k)]
    drawn = [rows[:q] for rows, q in zip(by_class, _quotas(counts, shots, counts), strict=True)]
    per_class = np.array([len(rows) for rows in drawn])
    wanted = math.ceil(validation * shots) if isinstance(validation, float) else validation
    held = max(wanted, k) if wanted else 0
    note = "" if wanted else "no validation rows asked for"
    if held and ((per_class < 2).any() or held > shots - k):
        note = (f"no validation rows: holding out {held} of the {shots} shots, one of each class at least, must "
                f"leave a row of each class to train on (shots per class: {per_class.tolist()})")
    quota = _quotas(per_class, held, per_class - 1) if not note else np.zeros(k, dtype=int)
    validation_rows = [rows[:q] for rows, q in zip(drawn, quota, strict=True)]
    train_rows = [rows[q:] for rows, q in zip(drawn, quota, strict=True)]
    test = np.setdiff1d(np.arange(len(table)), np.concatenate(drawn))
    return Split(train=np.sort(np.concatenate(train_rows)), validation=np.sort(np.concatenate(validation_rows)),
                 test=test, note=note)


def _quotas(sizes: np.ndarray, total: int, room: np.ndarray) -> np.ndarray:
    """How many of `total` rows each class gives: one each, the rest in proportion to `sizes`
    (the largest shortfall first, ties to the lower class), never more than `room`. The caller
    makes sure that `len(sizes) <= total <= room.sum()` and that every room is >= 1."""
    ideal = 1 + (total - len(sizes)) * sizes / sizes.sum()
    quota = np.minimum(np.floor(ideal).astype(int), room)
    while quota.sum() < total:
        quota[np.argmax(np.where(quota < room, ideal - quota, -np.inf))] += 1
    return quota


# ------------------------------------------------------------------------------ feature view


def format_value(value: Value) -> str:
    """A value as the feature view writes it (see the module's docstring)."""
    if isinstance(value, str):
        plain = not (_INT.fullmatch(value) or _FLOAT.fullmatch(value) or value.startswith('"') or ". " in value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    return repr(value)


def serialize_row(table: Table, i: int) -> str:
    """Row i as "The <column> is <value>." sentences, in column order, joined by single spaces."""
    pairs = zip(table.columns, table.rows[i], strict=True)
    return " ".join(f"The {column} is {format_value(value)}." for column, value in pairs)


def serialize_rows(table: Table, indices: Sequence[int]) -> list[str]:
    """`serialize_row` of each of `indices`."""
    return [serialize_row(table, int(i)) for i in indices]


def parse_row(text: str, columns: Sequence[str]) -> dict[str, Value]:
    """The values `serialize_row` wrote, by the known `columns` in order: each sentence opens with
    "The <column> is "; a plain value runs to the next ". " (the last one to the final "."), a
    quoted one is a JSON string."""
    values: dict[str, Value] = {}
    pos = 0
    for k, column in enumerate(columns):
        opening = f"{' ' if k else ''}The {column} is "
        if not text.startswith(opening, pos):
            raise SpliceError(f"expected {opening!r} at character {pos} of the row text {text[:200]!r}")
        pos += len(opening)
        if text.startswith('"', pos):
            try:
                values[column], pos = json.JSONDecoder().raw_decode(text, pos)
            except json.JSONDecodeError as error:
                raise SpliceError(f"column {column!r}: bad quoted value {text[pos:pos + 80]!r} ({error})") from None
            end = pos
        else:
            end = text.find(". ", pos) if k < len(columns) - 1 else len(text) - 1
            if end < pos:
                raise SpliceError(f"column {column!r}: no '.' ends its value in {text[pos:pos + 80]!r}")
            values[column] = _read_plain(text[pos:end])
        if not text.startswith(".", end):
            raise SpliceError(f"column {column!r}: expected '.' at character {end} of {text[:200]!r}")
        pos = end + 1
    if pos != len(text):
        raise SpliceError(f"text after the last column {columns[-1]!r}: {text[pos:pos + 80]!r}")
    return values


def _read_plain(text: str) -> Value:
    if _INT.fullmatch(text):
        return int(text)
    return float(text) if _FLOAT.fullmatch(text) else text


# --------------------------------------------------------------------------------- path view


@dataclass(frozen=True)
class PathTree:
    """A fitted shallow tree and what its path view speaks of: the features it was fitted on
    (`Table.encoding()`) and the class names."""

    model: DecisionTreeClassifier
    encoding: tuple[tuple[str, str | None], ...]
    classes: tuple[str, ...]


def fit_path_tree(table: Table, train_indices: Sequence[int], depth: int, seed: int) -> PathTree:
    """`DecisionTreeClassifier(max_depth=depth, random_state=seed)` fitted on the training rows'
    `features()`. (sklearn fits and predicts on float32 copies of the features, so a condition
    holds for the float32 value of a row's number.)"""
    if depth < 1:
        raise SpliceError(f"depth must be >= 1, got {depth}")
    rows = np.asarray(train_indices, dtype=int)
    if rows.size == 0:
        raise SpliceError("no training rows to fit the path tree on")
    if importlib.util.find_spec("sklearn") is None:
        raise AssetMissingError("the decision-tree path view needs `pip install scikit-learn`")
    from sklearn.tree import DecisionTreeClassifier

    model = DecisionTreeClassifier(max_depth=depth, random_state=seed)
    model.fit(table.features()[rows], np.asarray(table.labels)[rows])
    return PathTree(model=model, encoding=tuple(table.encoding()), classes=tuple(table.classes))


def path_text(tree: PathTree, table: Table, i: int) -> str:
    """Row i's path view: "The tree asks: <condition>; <condition>. It predicts <class>.", the
    conditions root to leaf ("The tree asks nothing. ..." for a tree that is one leaf)."""
    return path_texts(tree, table, [i])[0]


def path_texts(tree: PathTree, table: Table, indices: Sequence[int]) -> list[str]:
    """`path_text` of each of `indices`, from one `decision_path` and one `predict` call."""
    if tuple(table.encoding()) != tree.encoding:
        raise SpliceError(f"the tree was fitted on other features than table {table.name!r} has: "
                          f"{[name for name, _ in tree.encoding][:10]} vs {table.columns[:10]}")
    x = table.features()[np.asarray(indices, dtype=int)]
    paths, predicted = tree.model.decision_path(x), tree.model.predict(x)
    nodes = tree.model.tree_
    texts = []
    for r in range(len(x)):
        path = np.sort(paths.indices[paths.indptr[r]:paths.indptr[r + 1]])  # a parent's id is below its children's
        conditions = [_condition(tree.encoding[nodes.feature[n]], "<=" if child == nodes.children_left[n] else ">",
                                 float(nodes.threshold[n])) for n, child in zip(path[:-1], path[1:], strict=True)]
        asks = _ASKS + "; ".join(conditions) if conditions else _ASKS_NOTHING
        texts.append(f"{asks}{_PREDICTS}{tree.classes[int(predicted[r])]}.")
    return texts


def _condition(feature: tuple[str, str | None], op: str, threshold: float) -> str:
    column, category = feature
    if category is None:
        return f"{column} {op} {threshold!r}"
    return f"{column} is {category}" if op == ">" else f"{column} is not {category}"


def path_conditions(text: str, tree: PathTree) -> list[tuple[str, str, float]]:
    """The conditions of a path view, root to leaf, as (feature name, "<=" or ">", threshold), the
    feature names those of `Table.feature_names()` (a one-hot condition has threshold 0.5).

    Read by the tree's known features and class names, so names may hold "; " and " is ".
    """
    for name in sorted(tree.classes, key=len, reverse=True):
        ending = f"{_PREDICTS}{name}."
        if text == _ASKS_NOTHING + ending:
            return []
        if text.startswith(_ASKS) and text.endswith(ending):
            conditions = _read_conditions(text[len(_ASKS):-len(ending)], 0, _condition_openings(tree))
            if conditions is not None:
                return conditions
    raise SpliceError(f"not a path view of this tree (features {[n for n, _ in tree.encoding][:10]}, "
                      f"classes {list(tree.classes)}): {text[:200]!r}")


def _condition_openings(tree: PathTree) -> list[tuple[str, str, str, float | None]]:
    """(text a condition opens with, feature name, op, threshold or None when a number follows)."""
    out: list[tuple[str, str, str, float | None]] = []
    for column, category in tree.encoding:
        if category is None:
            out += [(f"{column} <= ", column, "<=", None), (f"{column} > ", column, ">", None)]
        else:
            name = f"{column} is {category}"
            out += [(name, name, ">", 0.5), (f"{column} is not {category}", name, "<=", 0.5)]
    return sorted(out, key=lambda opening: len(opening[0]), reverse=True)


def _read_conditions(body: str, pos: int, openings: list[tuple[str, str, str, float | None]]
                     ) -> list[tuple[str, str, float]] | None:
    """The conditions of `body[pos:]` ("; "-separated), or None when they do not read: each known
    opening is tried, longest first, and the rest read after it."""
    for opening, name, op, fixed in openings:
        if not body.startswith(opening, pos):
            continue
        end = pos + len(opening)
        number = _FLOAT.match(body, end) if fixed is None else None
        if fixed is None and number is None:
            continue
        condition = (name, op, fixed if number is None else float(number.group()))
        end = end if number is None else number.end()
        if end == len(body):
            return [condition]
        rest = _read_conditions(body, end + 2, openings) if body.startswith("; ", end) else None
        if rest is not None:
            return [condition, *rest]
    return None
