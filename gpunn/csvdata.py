"""Tabular data from CSV files, for the command line.

The first row is the header (column names).  Every column other than the
target is a numeric feature.  Errors name the column and the line number in
the file (the header is line 1), so a bad cell can be found and fixed::

    data = read_training_csv("patients.csv", target="outcome")
    data.X, data.y, data.task, data.class_labels, data.lines

Records: every record after the header is one sample, in file order.  A
line holding nothing at all is not a record; a record whose cells are all
empty (``,,,``) is one, and is refused with its line number like any other
empty cell.  ``data.lines[i]`` is the file line on which sample ``i`` ends.

Targets: regression targets must be numbers; classification targets may be
numbers or strings, and are mapped to class indices 0..C-1 in sorted order
(numerically when every label is a number), remembered in ``class_labels``.
Missing targets (an empty cell, ``NA``, ``NaN``, ``null``...) are an error
naming their lines, and a column of numbers with a few text cells is not
silently taken as class labels.

Memory and time: cells are converted to float64 as they are read, so reading
takes about the size of the numeric array (plus 8 bytes per row for the
line numbers); time is linear in the file size; a line longer than
``MAX_LINE_CHARS`` is refused.
"""

from __future__ import annotations

import array
import csv
import dataclasses
import math
import os
from operator import itemgetter

import numpy as np

from gpunn.datasets import TASKS

#: a target with at most this many distinct integer values is taken as classes
MAX_INFERRED_CLASSES = 20
#: longest line accepted, in characters (a file with no line breaks is not read into memory whole)
MAX_LINE_CHARS = 16 * 1024 * 1024
#: target cells meaning "no value" (compared case-insensitively, after stripping spaces)
MISSING_VALUE_TOKENS = frozenset({"", "na", "n/a", "nan", "-nan", "null", "none", "#n/a", "?", "missing"})
#: rows converted per chunk by iter_feature_chunks (gpunn predict)
CHUNK_ROWS = 65536
#: values checked for NaN/infinity at a time (bounds the boolean temporary)
_FINITE_CHECK_ELEMENTS = 1 << 16


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
    #: the file line each sample ends on (int64, one per row of X)
    lines: np.ndarray = None
    #: remarks about the data worth showing the user (e.g. labels differing only in case)
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------- reading
def _bounded_lines(f, path):
    """The file's lines, refusing one longer than MAX_LINE_CHARS before it is read whole."""
    number = 0
    while True:
        line = f.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_CHARS and not (len(line) == MAX_LINE_CHARS + 1 and line[-1] in "\r\n"):
            raise CSVDataError(
                f"{path}: line {number} is longer than {MAX_LINE_CHARS:,} characters; "
                "is this a CSV file with line breaks between records?"
            )
        yield line


class _Reader:
    """Streams a CSV file's records after checking its header; use as a context manager."""

    def __init__(self, path, delimiter=","):
        self.path = os.fspath(path)
        if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\"":
            raise ValueError(f"delimiter: expected one character (such as ',' or ';'), got {delimiter!r}")
        self.delimiter = delimiter

    def __enter__(self):
        try:
            self._file = open(self.path, newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise CSVDataError(f"{self.path}: cannot read the file ({exc.strerror or exc})") from None
        self._reader = csv.reader(_bounded_lines(self._file, self.path), delimiter=self.delimiter)
        self.header = None
        for line, row in self._rows():
            self.header = [cell.strip() for cell in row]
            self._check_header(line)
            break
        if self.header is None:
            raise CSVDataError(f"{self.path}: the file is empty (expected a header row of column names)")
        self.index = {name: i for i, name in enumerate(self.header)}
        return self

    def __exit__(self, *exc):
        self._file.close()

    def _rows(self):
        """(line, cells) of every non-blank row, translating read errors into CSVDataError."""
        reader = self._reader
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line is not a record
                yield reader.line_num, row
        except OSError as exc:
            raise CSVDataError(f"{self.path}: cannot read the file ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise CSVDataError(f"{self.path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise CSVDataError(f"{self.path}: malformed CSV near line {reader.line_num} ({exc})") from None

    def records(self):
        """(line, cells) of every record, in file order; a record with the wrong field count is an error."""
        width = len(self.header)
        for line, row in self._rows():
            if len(row) != width:
                raise CSVDataError(
                    f"{self.path}: line {line} has {len(row)} fields, the header has {width}{self.delimiter_hint()}"
                )
            yield line, row

    def delimiter_hint(self) -> str:
        for other in ";\t|":
            if other != self.delimiter and any(other in name for name in self.header):
                shown = "\\t" if other == "\t" else other
                return (
                    f" (the header contains {shown!r}: is the file {shown!r}-separated? "
                    f"gpunn reads {self.delimiter!r}-separated files unless given --delimiter '{shown}')"
                )
        return ""

    def _check_header(self, line):
        header, path = self.header, self.path
        for i, name in enumerate(header):
            if not name:
                raise CSVDataError(f"{path}: header (line {line}): column {i + 1} has no name{self.delimiter_hint()}")
        seen = set()
        for name in header:
            if name in seen:
                raise CSVDataError(f"{path}: header (line {line}): the column name {name!r} appears more than once")
            seen.add(name)

    def column(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise MissingColumnError(
                f"{self.path}: no column named {name!r}; the columns are: {_listing(self.header)}{self.delimiter_hint()}"
            ) from None

    def columns(self, names) -> list[int]:
        missing = [name for name in names if name not in self.index]
        if missing:
            shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MissingColumnError(
                f"{self.path}: the model needs feature column(s) {shown}, which the file lacks; "
                f"its columns are: {_listing(self.header)}{self.delimiter_hint()}"
            )
        return [self.index[name] for name in names]


def _listing(names, limit=50) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _getter(indices):
    """A function returning the cells at ``indices`` of a row as a sequence."""
    if len(indices) == 1:
        (only,) = indices
        return lambda row: (row[only],)
    return itemgetter(*indices)


def _cell_error(reader: _Reader, line, row, indices, names) -> CSVDataError:
    """The error for the first cell of ``row`` (at ``indices``) that is not a number."""
    for j, name in zip(indices, names):
        text = row[j].strip()
        if not text:
            return CSVDataError(
                f"{reader.path}: line {line}, column {name!r}: the cell is empty (missing values are not supported)"
            )
        try:
            float(text)
        except ValueError:
            return CSVDataError(
                f"{reader.path}: line {line}, column {name!r}: expected a finite number, got {text[:80]!r}"
                f"{reader.delimiter_hint() if ',' in text else ''}"
            )
    return CSVDataError(f"{reader.path}: line {line}: unreadable numbers")  # pragma: no cover - float() failed above


def _check_finite(reader, X, lines, names):
    """CSVDataError naming the line and column of the first NaN or infinite value in ``X``."""
    rows = max(1, _FINITE_CHECK_ELEMENTS // max(1, X.shape[1]))
    for start in range(0, X.shape[0], rows):  # chunked: no full-size boolean temporary
        block = X[start : start + rows]
        if not np.isfinite(block).all():
            i, j = np.argwhere(~np.isfinite(block))[0]
            raise CSVDataError(
                f"{reader.path}: line {int(lines[start + i])}, column {names[j]!r}: expected a finite number, "
                f"got {str(block[i, j])!r}"
            )


def _parse_rows(reader, records, indices, names, on_row=None, limit=None):
    """Numeric cells at ``indices`` of the records, as (X float64 (n, len(indices)), lines int64 (n,)).

    Stops after ``limit`` records when given.  ``on_row(line, row)`` sees
    every record (to collect other columns).  Values are appended to
    ``array.array`` buffers and the result views them: no second copy.
    """
    values, line_numbers = array.array("d"), array.array("q")
    cells = _getter(indices)
    count = 0
    for line, row in records:
        try:
            values.extend(map(float, cells(row)))
        except ValueError:
            raise _cell_error(reader, line, row, indices, names) from None
        line_numbers.append(line)
        if on_row is not None:
            on_row(line, row)
        count += 1
        if limit is not None and count >= limit:
            break
    X = np.frombuffer(values, dtype=np.float64).reshape(count, len(indices)) if count else np.empty((0, len(indices)))
    lines = np.frombuffer(line_numbers, dtype=np.int64) if count else np.empty(0, dtype=np.int64)
    _check_finite(reader, X, lines, names)
    return X, lines


# --------------------------------------------------------------------- targets
def _number(text: str):
    """The finite float in ``text``, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _label_key(label: str):
    value = _number(label)
    return (0, value, label) if value is not None else (1, 0.0, label)


def _canonical_label(text: str) -> str:
    """One spelling per number ("1", "1.0" and "1e0" are one class, written "1")."""
    value = _number(text)
    if value is None:
        return text
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def is_missing(text: str) -> bool:
    """Whether a target cell means "no value" (empty, NA, NaN, null, ...)."""
    return text.strip().lower() in MISSING_VALUE_TOKENS


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


class _TargetColumn:
    """The target cells, stored compactly: 16 bytes per row.

    A finite number is kept as a float in ``values`` (code -1); any other
    text is kept once in ``texts`` and each row holds its index in ``codes``.
    """

    def __init__(self, column: int):
        self.column = column
        self.values = array.array("d")
        self.codes = array.array("q")
        self.texts: list[str] = []
        self._code_of: dict[str, int] = {}
        self.first_line: list[int] = []  # of each distinct text
        self.missing_lines: list[int] = []

    def add(self, line, row):
        text = row[self.column].strip()
        value = _number(text)
        if value is not None:
            self.values.append(value)
            self.codes.append(-1)
            return
        if is_missing(text):
            self.missing_lines.append(line)
        code = self._code_of.get(text)
        if code is None:
            code = self._code_of[text] = len(self.texts)
            self.texts.append(text)
            self.first_line.append(line)
        self.values.append(math.nan)
        self.codes.append(code)

    def labelled(self):
        """(distinct labels, label index of every row): numbers as canonical labels ("1.0" is "1")."""
        codes = np.frombuffer(self.codes, dtype=np.int64) if len(self.codes) else np.empty(0, np.int64)
        numeric = codes < 0
        if not numeric.any():
            return list(self.texts), codes
        values = np.frombuffer(self.values, dtype=np.float64)
        if numeric.all():  # the usual case: one int64 per row, no other full-size temporaries
            distinct = np.unique(values)
            codes = np.searchsorted(distinct, values)
        else:  # numbers and text, kept apart by an explicit --task
            distinct = np.unique(values[numeric])
            codes = np.where(numeric, len(self.texts) + np.searchsorted(distinct, np.where(numeric, values, 0.0)), codes)
        labels = list(self.texts) + [_canonical_label(repr(float(v))) for v in distinct]
        return labels, codes


def _lines_text(lines, limit=10) -> str:
    shown = ", ".join(map(str, lines[:limit]))
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def _check_missing(path, target, column: _TargetColumn):
    if column.missing_lines:
        n = len(column.missing_lines)
        raise CSVDataError(
            f"{path}: column {target!r} has no value on {n} line{'s' if n > 1 else ''} "
            f"({_lines_text(column.missing_lines)}): a target must be given for every row; "
            "fill those cells in or remove those rows"
        )


def _check_mixed(path, target, column: _TargetColumn):
    """A column of numbers with some text cells is a data error, not a class-label column."""
    codes = np.frombuffer(column.codes, dtype=np.int64)
    n_text = int((codes >= 0).sum())
    if n_text == 0 or n_text == len(codes):
        return
    examples = ", ".join(f"line {line}: {text[:40]!r}" for line, text in sorted(zip(column.first_line, column.texts))[:5])
    raise CSVDataError(
        f"{path}: column {target!r} holds numbers on {len(codes) - n_text} rows but text on {n_text} "
        f"({examples}{', ...' if len(column.texts) > 5 else ''}); fix those cells, or pass --task multiclass "
        "(or binary) to treat every value as a class label"
    )


def _case_groups(labels):
    """Groups of labels that differ only in letter case or surrounding spaces."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.strip().casefold(), []).append(label)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _label_texts(column: _TargetColumn, ignore_label_case):
    """(distinct labels, label index per row, notes): case variants merged on request, else noted."""
    texts, codes = column.labelled()
    groups = _case_groups(sorted(set(texts)))
    if not groups:
        return texts, codes, ()
    if not ignore_label_case:
        shown = "; ".join(" and ".join(map(repr, g)) for g in groups[:5])
        return texts, codes, (f"labels differing only in case are separate classes: {shown} (--ignore-label-case merges them)",)
    counts = np.bincount(codes, minlength=len(texts))
    frequency = dict(zip(texts, counts.tolist()))
    merged = {}
    for group in groups:  # each group takes its most frequent spelling
        keep = max(group, key=lambda s: (frequency[s], s))
        merged.update({s: keep for s in group})
    note = "labels differing only in case were merged: " + "; ".join("/".join(g) for g in groups)
    return [merged.get(t, t) for t in texts], codes, (note,)


def _classification_targets(path, target, texts, codes, task):
    """(y int64, class labels) for a binary or multiclass target; row i has label ``texts[codes[i]]``."""
    labels = sorted(set(texts), key=_label_key)
    if len(labels) < 2:
        raise CSVDataError(f"{path}: column {target!r} holds only one class ({labels[0]!r}); nothing to learn")
    if task == "binary" and len(labels) != 2:
        raise CSVDataError(
            f"{path}: column {target!r} has {len(labels)} distinct values, a binary target needs exactly 2 "
            "(use --task multiclass)"
        )
    index = {label: i for i, label in enumerate(labels)}
    code_to_class = np.array([index[t] for t in texts], dtype=np.int64)
    return code_to_class[codes], labels


def _infer_column_task(column: _TargetColumn, ignore_label_case) -> str:
    """infer_task's rule, applied without making a label per distinct number (a regression column has many)."""
    if column.texts:  # all text (a mix was refused before): few distinct labels as a rule
        return infer_task(_label_texts(column, ignore_label_case)[0])
    distinct = np.unique(np.frombuffer(column.values, dtype=np.float64))
    if len(distinct) <= 2:
        return "binary"
    if len(distinct) <= MAX_INFERRED_CLASSES and bool((distinct == np.round(distinct)).all()):
        return "multiclass"
    return "regression"


def _regression_targets(path, target, column: _TargetColumn):
    if column.texts:
        line, text = min(zip(column.first_line, column.texts))
        raise CSVDataError(
            f"{path}: line {line}, column {target!r}: a regression target must be a finite number, got {text[:80]!r}"
        )
    return np.frombuffer(column.values, dtype=np.float64)


def read_training_csv(
    path, target: str, task: str | None = None, delimiter: str = ",", ignore_label_case: bool = False
) -> TrainingData:
    """Features and targets for training; ``task`` None infers it from the target column."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    with _Reader(path, delimiter) as reader:
        t_col = reader.column(target)
        feature_names = [name for name in reader.header if name != target]
        if not feature_names:
            raise CSVDataError(
                f"{reader.path}: the only column is the target {target!r}; there are no feature columns"
                f"{reader.delimiter_hint()}"
            )
        indices = [i for i in range(len(reader.header)) if i != t_col]
        column = _TargetColumn(t_col)
        X, lines = _parse_rows(reader, reader.records(), indices, feature_names, on_row=column.add)
    if X.shape[0] == 0:
        raise CSVDataError(f"{reader.path}: the file has a header but no data rows")
    _check_missing(reader.path, target, column)
    if task is None:
        _check_mixed(reader.path, target, column)
        task = _infer_column_task(column, ignore_label_case)
    if task == "regression":
        y, labels, notes = _regression_targets(reader.path, target, column), None, ()
    else:
        texts, codes, notes = _label_texts(column, ignore_label_case)
        y, labels = _classification_targets(reader.path, target, texts, codes, task)
    return TrainingData(X, y, task, feature_names, target, labels, lines, notes)


def iter_feature_chunks(
    path, feature_names: list[str], id_column: str | None = None, delimiter: str = ",", chunk_rows: int | None = None
):
    """Yield (X float64 (n, K), lines int64 (n,), ids list[str] or None) for consecutive records.

    Every record of the file appears in exactly one chunk, in file order, so
    the i-th output row of a prediction is the i-th record of the file.
    Other columns are ignored.  A file with no data rows is an error.
    """
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    with _Reader(path, delimiter) as reader:
        indices = reader.columns(feature_names)
        id_index = None if id_column is None else reader.column(id_column)
        records = reader.records()
        total = 0
        while True:
            ids = None if id_index is None else []
            on_row = None if ids is None else (lambda line, row: ids.append(row[id_index].strip()))
            X, lines = _parse_rows(reader, records, indices, feature_names, on_row=on_row, limit=chunk_rows)
            if X.shape[0] == 0:
                break
            total += X.shape[0]
            yield X, lines, ids
            if X.shape[0] < chunk_rows:
                break
    if total == 0:
        raise CSVDataError(f"{reader.path}: the file has a header but no data rows")


def read_features_csv(path, feature_names: list[str], delimiter: str = ",") -> np.ndarray:
    """The named feature columns (in that order) as a float64 array; other columns are ignored."""
    chunks = [X for X, _, _ in iter_feature_chunks(path, feature_names, delimiter=delimiter)]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def write_csv(file, header: list[str], rows) -> None:
    """Write ``header`` and ``rows`` to an open text file."""
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
