"""Tabular data from CSV files, for the command line.

The first row is the header (column names).  Every column other than the
target is a numeric feature.  Errors name the column and the line number in
the file (the header is line 1), so a bad cell can be found and fixed::

    data = read_training_csv("patients.csv", target="outcome")
    data.X, data.y, data.task, data.class_labels

Targets: regression targets must be numbers; classification targets may be
numbers or strings, and are mapped to class indices 0..C-1 in sorted order
(numerically when every label is a number), remembered in ``class_labels``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np

from gpunn.datasets import TASKS

#: a target with at most this many distinct integer values is taken as classes
MAX_INFERRED_CLASSES = 20


class CSVDataError(ValueError):
    """A CSV file that cannot be used as given; the message names the file, column and line."""


class MissingColumnError(CSVDataError):
    """A column the caller asked for (the target, a model's feature) is not in the file."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
    X: np.ndarray
    y: np.ndarray
    task: str
    feature_names: list[str]
    target: str
    #: class labels (as strings) in class-index order; None for regression
    class_labels: list[str] | None


@dataclasses.dataclass(frozen=True)
class _Table:
    path: str
    header: list[str]
    rows: list[list[str]]
    lines: list[int]  # the file line each row ends on

    def column(self, name: str) -> int:
        try:
            return self.header.index(name)
        except ValueError:
            raise MissingColumnError(
                f"{self.path}: no column named {name!r}; the columns are: {', '.join(map(repr, self.header))}"
            ) from None


def _read(path) -> _Table:
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = None
            rows, lines = [], []
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank line
                cells = [cell.strip() for cell in row]
                if header is None:
                    header = cells
                    _check_header(path, header, reader.line_num)
                    continue
                if len(cells) != len(header):
                    raise CSVDataError(
                        f"{path}: line {reader.line_num} has {len(cells)} fields, the header has {len(header)}"
                    )
                rows.append(cells)
                lines.append(reader.line_num)
    except OSError as exc:
        raise CSVDataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CSVDataError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise CSVDataError(f"{path}: malformed CSV ({exc})") from None
    if header is None:
        raise CSVDataError(f"{path}: the file is empty (expected a header row of column names)")
    if not rows:
        raise CSVDataError(f"{path}: the file has a header but no data rows")
    return _Table(path, header, rows, lines)


def _check_header(path, header, line):
    for i, name in enumerate(header):
        if not name:
            raise CSVDataError(f"{path}: header (line {line}): column {i + 1} has no name")
    seen = set()
    for name in header:
        if name in seen:
            raise CSVDataError(f"{path}: header (line {line}): the column name {name!r} appears more than once")
        seen.add(name)


def _number(text: str):
    """The finite float in ``text``, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _empty_cell(table: _Table, name: str, line: int) -> CSVDataError:
    return CSVDataError(f"{table.path}: line {line}, column {name!r}: the cell is empty (missing values are not supported)")


def _numeric_columns(table: _Table, names: list[str]) -> np.ndarray:
    X = np.empty((len(table.rows), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        col = table.column(name)
        for i, (row, line) in enumerate(zip(table.rows, table.lines)):
            text = row[col]
            if not text:
                raise _empty_cell(table, name, line)
            value = _number(text)
            if value is None:
                raise CSVDataError(
                    f"{table.path}: line {line}, column {name!r}: expected a finite number, got {text!r}"
                )
            X[i, j] = value
    return X


def _label_key(label: str):
    value = _number(label)
    return (0, value, label) if value is not None else (1, 0.0, label)


def _canonical_label(text: str) -> str:
    """One spelling per number ("1", "1.0" and "1e0" are one class, written "1")."""
    value = _number(text)
    if value is None:
        return text
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def infer_task(values: list[str]) -> str:
    """binary for 2 distinct values; multiclass for text labels or a few integers; else regression."""
    distinct = {_canonical_label(v) for v in values}
    if len(distinct) <= 2:
        return "binary"
    numbers = [_number(v) for v in distinct]
    if any(n is None for n in numbers):
        return "multiclass"
    if all(n.is_integer() for n in numbers) and len(distinct) <= MAX_INFERRED_CLASSES:
        return "multiclass"
    return "regression"


def read_training_csv(path, target: str, task: str | None = None) -> TrainingData:
    """Features and targets for training; ``task`` None infers it from the target column."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    table = _read(path)
    t_col = table.column(target)
    feature_names = [name for name in table.header if name != target]
    if not feature_names:
        raise CSVDataError(f"{table.path}: the only column is the target {target!r}; there are no feature columns")
    raw = []
    for row, line in zip(table.rows, table.lines):
        if not row[t_col]:
            raise _empty_cell(table, target, line)
        raw.append(row[t_col])
    if task is None:
        task = infer_task(raw)
    if task == "regression":
        y = np.empty(len(raw), dtype=np.float64)
        for i, (text, line) in enumerate(zip(raw, table.lines)):
            value = _number(text)
            if value is None:
                raise CSVDataError(
                    f"{table.path}: line {line}, column {target!r}: a regression target must be a finite number, got {text!r}"
                )
            y[i] = value
        labels = None
    else:
        canonical = [_canonical_label(v) for v in raw]
        labels = sorted(set(canonical), key=_label_key)
        if len(labels) < 2:
            raise CSVDataError(f"{table.path}: column {target!r} holds only one class ({labels[0]!r}); nothing to learn")
        if task == "binary" and len(labels) != 2:
            raise CSVDataError(
                f"{table.path}: column {target!r} has {len(labels)} distinct values, a binary target needs exactly 2 "
                "(use --task multiclass)"
            )
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[v] for v in canonical], dtype=np.int64)
    X = _numeric_columns(table, feature_names)
    return TrainingData(X, y, task, feature_names, target, labels)


def read_features_csv(path, feature_names: list[str]) -> np.ndarray:
    """The named feature columns (in that order) as a float64 array; other columns are ignored."""
    table = _read(path)
    missing = [name for name in feature_names if name not in table.header]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MissingColumnError(
            f"{table.path}: the model needs feature column(s) {shown}, which the file lacks; "
            f"its columns are: {', '.join(map(repr, table.header))}"
        )
    return _numeric_columns(table, feature_names)


def write_csv(file, header: list[str], rows) -> None:
    """Write ``header`` and ``rows`` to an open text file."""
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
