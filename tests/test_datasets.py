"""Embedded data sets and CSV reading (gpunn.datasets, gpunn.csvdata)."""

import numpy as np
import pytest

from gpunn import csvdata, datasets


@pytest.mark.parametrize(
    "name, task, shape, classes",
    [
        ("breast_cancer", "binary", (569, 30), 2),
        ("digits", "multiclass", (1797, 64), 10),
        ("iris", "multiclass", (150, 4), 3),
        ("wine", "multiclass", (178, 13), 3),
        ("diabetes", "regression", (442, 10), None),
    ],
)
def test_load(name, task, shape, classes):
    data = datasets.load(name)
    assert data.name == name and data.task == task
    assert data.X.shape == shape and data.X.dtype == np.float64
    assert data.y.shape == (shape[0],)
    assert len(data.feature_names) == shape[1]
    assert data.n_classes == classes
    if classes:
        assert data.y.dtype == np.int64 and set(np.unique(data.y)) == set(range(classes))


def test_default_and_unknown():
    assert datasets.names()[0] == datasets.DEFAULT == "breast_cancer"
    assert datasets.load().class_names == ["malignant", "benign"]
    with pytest.raises(ValueError, match="did you mean 'iris'"):
        datasets.load("irs")


def test_describe():
    rows = {r["name"]: r for r in datasets.describe()}
    assert rows["digits"]["samples"] == 1797 and rows["digits"]["classes"] == 10


@pytest.mark.parametrize(
    "values, task",
    [
        (["0", "1", "1"], "binary"),
        (["yes", "no"], "binary"),
        (["1", "1.0", "2"], "binary"),  # "1" and "1.0" are one class
        (["a", "b", "c"], "multiclass"),
        (["0", "1", "2", "3"], "multiclass"),
        (["0.5", "1.5", "2.25"], "regression"),
        ([str(i) for i in range(100)], "regression"),  # too many integers for classes
    ],
)
def test_infer_task(values, task):
    assert csvdata.infer_task(values) == task


def _write(path, text):
    path.write_text(text)
    return path


def test_read_training_csv(tmp_path):
    path = _write(tmp_path / "d.csv", "a, b ,label\n1,2,10\n\n3,4.5,2\n5,6e1,10\n")
    data = csvdata.read_training_csv(path, "label")
    assert data.feature_names == ["a", "b"]
    assert data.task == "binary"
    assert data.class_labels == ["2", "10"]  # numeric labels sort as numbers
    np.testing.assert_array_equal(data.y, [1, 0, 1])
    np.testing.assert_allclose(data.X, [[1, 2], [3, 4.5], [5, 60]])
    reg = csvdata.read_training_csv(path, "label", task="regression")
    assert reg.class_labels is None and reg.y.tolist() == [10.0, 2.0, 10.0]


@pytest.mark.parametrize(
    "text, target, task, error, match",
    [
        ("a,b,label\n1,2,x\n3,nan,y\n", "label", None, csvdata.CSVDataError, r"line 3, column 'b'.*'nan'"),
        ("a,b,label\n1,2,x\n", "target", None, csvdata.MissingColumnError, r"'target'.*'a', 'b', 'label'"),
        ("a,b,label\n1,2,x\n", "label", "regression", csvdata.CSVDataError, r"line 2, column 'label'.*finite number"),
        ("a,b,label\n1,2\n", "label", None, csvdata.CSVDataError, "line 2 has 2 fields"),
        ("a,a,label\n1,2,3\n", "label", None, csvdata.CSVDataError, "more than once"),
        ("", "label", None, csvdata.CSVDataError, "empty"),
        ("a,label\n", "label", None, csvdata.CSVDataError, "no data rows"),
        ("a,label\n1,3\n2,3\n", "label", None, csvdata.CSVDataError, "only one class"),
        ("a,label\n1,x\n2,y\n3,z\n", "label", "binary", csvdata.CSVDataError, "exactly 2"),
    ],
)
def test_csv_errors(tmp_path, text, target, task, error, match):
    path = _write(tmp_path / "d.csv", text)
    with pytest.raises(error, match=match):
        csvdata.read_training_csv(path, target, task=task)


def test_read_features_csv(tmp_path):
    path = _write(tmp_path / "d.csv", "id,b,a\nr1,2,1\nr2,4,3\n")
    np.testing.assert_allclose(csvdata.read_features_csv(path, ["a", "b"]), [[1, 2], [3, 4]])
    with pytest.raises(csvdata.MissingColumnError, match="'c'"):
        csvdata.read_features_csv(path, ["a", "c"])
