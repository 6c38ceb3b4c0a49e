"""The ``gpunn`` command line, end to end on the NumPy backend (CPU, a few seconds)."""

import csv
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

import gpunn
from gpunn.cli import PREPROCESS_SUFFIX, load_preprocessing, main


@pytest.fixture(autouse=True)
def numpy_backend():
    """Train on the CPU backend whatever earlier tests selected (the CLI changes it with --backend)."""
    gpunn.set_backend("numpy")
    yield
    gpunn.set_backend("numpy")


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def held_out_accuracy(output):
    match = re.search(r"Held-out accuracy: ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


def assert_usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# ------------------------------------------------------------------ train
def test_train_default_is_the_breast_cancer_classifier():
    result = invoke("train", "--backend", "numpy")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "breast_cancer" in out
    assert "Dense(64, relu) -> Dense(1, sigmoid)" in out
    assert "Epoch 30/30" in out  # fit's own progress display
    assert held_out_accuracy(out) >= 0.93


def test_train_digits_multiclass():
    result = invoke("train", "--dataset", "digits", "--epochs", "15", "--verbose", "0", "--backend", "numpy")
    assert result.exit_code == 0, result.output
    assert "Epoch" not in result.output  # --verbose 0: only the result
    assert held_out_accuracy(result.output) >= 0.93


def test_train_diabetes_regression():
    result = invoke("train", "--dataset", "diabetes", "--hidden", "32", "--epochs", "20", "--verbose", "2")
    assert result.exit_code == 0, result.output
    match = re.search(r"Held-out MAE: ([0-9.]+)\s+RMSE: ([0-9.]+)\s+R2: (-?[0-9.]+)", result.output)
    assert match, result.output
    mae, rmse, r2 = map(float, match.groups())
    assert 0 < mae <= rmse < 100  # in the data's units (the target spans 25..346)
    assert r2 > 0.1


def test_train_options_shape_the_model():
    result = invoke(
        "train", "--dataset", "iris", "--hidden", "16,8", "--activation", "tanh", "--optimizer", "sgd", "--lr", "0.05",
        "--epochs", "5", "--batch-size", "16", "--test-size", "0.3", "--seed", "3", "--verbose", "1",
    )
    assert result.exit_code == 0, result.output
    assert "Dense(16, tanh) -> Dense(8, tanh) -> Dense(3, softmax)" in result.output
    assert "sgd lr=0.05" in result.output
    assert "105 training / 45 held-out" in result.output


def test_train_is_reproducible_with_a_seed():
    a = invoke("train", "--epochs", "3", "--verbose", "0", "--seed", "7")
    b = invoke("train", "--epochs", "3", "--verbose", "0", "--seed", "7")
    assert a.output == b.output


# ------------------------------------------------------- CSV: train + predict
def _blobs(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 3)) + np.where(y[:, None] == 1, 2.5, -2.5) * np.array([1.0, 0.5, 0.0])
    return x, y


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_csv_train_save_predict(tmp_path):
    x, y = _blobs(200)
    labels = np.array(["healthy", "sick"])
    train_csv = tmp_path / "train.csv"
    _write(train_csv, ["f1", "f2", "outcome", "f3"], [[a, b, lab, c] for (a, b, c), lab in zip(x, labels[y])])
    model = tmp_path / f"clf{gpunn.MODEL_SUFFIX}"
    result = invoke("train", "--data", train_csv, "--target", "outcome", "--epochs", "10", "--save", model)
    assert result.exit_code == 0, result.output
    assert "binary" in result.output
    assert held_out_accuracy(result.output) >= 0.9
    assert not (tmp_path / (model.name + PREPROCESS_SUFFIX)).exists()  # one file: the preprocessing is inside
    sidecar = load_preprocessing(model)
    assert sidecar["task"] == "binary"
    assert sidecar["feature_names"] == ["f1", "f2", "f3"]
    assert sidecar["class_labels"] == ["healthy", "sick"]
    assert len(sidecar["scaler"]["mean"]) == len(sidecar["scaler"]["scale"]) == 3

    # new data: columns in another order, an extra column, no target
    xn, yn = _blobs(50, seed=1)
    new_csv = tmp_path / "new.csv"
    _write(new_csv, ["id", "f3", "f1", "f2"], [[i, c, a, b] for i, (a, b, c) in enumerate(xn)])
    preds = tmp_path / "preds.csv"
    result = invoke("predict", model, new_csv, "--out", preds)
    assert result.exit_code == 0, result.output
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["prediction", "prob_healthy", "prob_sick"]
    assert len(rows) == 50
    for row in rows:
        p = float(row["prob_healthy"]) + float(row["prob_sick"])
        assert p == pytest.approx(1.0, abs=1e-5)
    predicted = np.array([row["prediction"] for row in rows])
    assert (predicted == labels[yn]).mean() >= 0.9

    # to stdout, and the target column (if present) is ignored
    _write(new_csv, ["f1", "f2", "f3", "outcome"], [[a, b, c, ""] for a, b, c in xn])
    result = invoke("predict", model, new_csv)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "prediction,prob_healthy,prob_sick"
    assert len(result.output.splitlines()) == 51


def test_csv_regression_and_multiclass_are_inferred(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    reg = tmp_path / "reg.csv"
    _write(reg, ["a", "b", "price"], [[a, b, 3 * a - b + 10.5] for a, b in x])
    model = tmp_path / "reg.gpunn"
    result = invoke("train", "--data", reg, "--target", "price", "--epochs", "30", "--verbose", "0", "--save", model)
    assert result.exit_code == 0, result.output
    assert "Held-out MAE" in result.output
    result = invoke("predict", model, reg)
    assert result.exit_code == 0, result.output
    values = [float(v) for v in result.output.splitlines()[1:]]
    truth = 3 * x[:, 0] - x[:, 1] + 10.5
    assert np.abs(np.array(values) - truth).mean() < 0.5

    cls = tmp_path / "cls.csv"
    _write(cls, ["a", "b", "k"], [[a, b, int(a > 0) + int(b > 0) * 2] for a, b in x])
    result = invoke("train", "--data", cls, "--target", "k", "--epochs", "2", "--verbose", "1")
    assert result.exit_code == 0, result.output
    assert "multiclass" in result.output and "Dense(4, softmax)" in result.output


# ------------------------------------------------------------------ errors
def test_csv_missing_target_names_the_column_and_lists_the_columns(tmp_path):
    path = tmp_path / "d.csv"
    _write(path, ["x1", "x2", "label"], [[1, 2, 0], [3, 4, 1]])
    result = invoke("train", "--data", path, "--target", "lable")
    assert_usage_error(result, "--target", "'lable'", "'x1', 'x2', 'label'")


def test_csv_non_numeric_cell_names_column_and_line(tmp_path):
    path = tmp_path / "d.csv"
    _write(path, ["x1", "x2", "label"], [[1, 2, 0], [3, 4, 1], [5, "abc", 0]])
    result = invoke("train", "--data", path, "--target", "label")
    assert_usage_error(result, "--data", "line 4", "'x2'", "'abc'")


def test_csv_empty_cell_names_column_and_line(tmp_path):
    path = tmp_path / "d.csv"
    _write(path, ["x1", "x2", "label"], [[1, 2, 0], ["", 4, 1], [5, 6, 0]])
    result = invoke("train", "--data", path, "--target", "label")
    assert_usage_error(result, "line 3", "'x1'", "empty")


def test_predict_reports_missing_feature_columns(tmp_path):
    x, y = _blobs(60)
    path = tmp_path / "t.csv"
    _write(path, ["f1", "f2", "f3", "y"], [[a, b, c, t] for (a, b, c), t in zip(x, y)])
    model = tmp_path / "m.gpunn"
    assert invoke("train", "--data", path, "--target", "y", "--epochs", "1", "--verbose", "0", "--save", model).exit_code == 0
    _write(path, ["f1", "f3"], [[1, 2]])
    assert_usage_error(invoke("predict", model, path), "'f2'", "FILE.csv")
    gpunn.load_model(model).save(model)  # a model file without preprocessing (and no sidecar)
    assert_usage_error(invoke("predict", model, path), "preprocess", "--save")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--hidden", "64,x"], ["--hidden"]),
        (["--dataset", "digts"], ["--dataset", "did you mean 'digits'"]),
        (["--data", __file__], ["--target"]),
        (["--target", "y"], ["--target", "--data"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--test-size", "1.5"], ["--test-size"]),
        (["--backend", "tpu"], ["--backend"]),
    ],
)
def test_bad_options_are_usage_errors(args, fragments):
    assert_usage_error(invoke("train", *args), *fragments)


def test_save_into_missing_directory_fails_before_training(tmp_path):
    result = invoke("train", "--save", tmp_path / "nope" / "m.gpunn")
    assert_usage_error(result, "--save", "does not exist")
    assert "Epoch" not in result.output


# ------------------------------------------------------ info, datasets, bench
def test_info():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for key in ("gpunn", "numpy", "numba", "numba-cuda", "cupy", "backend", "GPU", "CUDA"):
        assert re.search(rf"^{re.escape(key)}\s", result.output, re.M), result.output
    assert gpunn.__version__ in result.output


def test_datasets():
    result = invoke("datasets")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:5] == ["name", "task", "samples", "features", "classes"]
    table = {line.split()[0]: line.split()[1:5] for line in lines[1:]}
    assert table["breast_cancer"] == ["binary", "569", "30", "2"]
    assert table["digits"] == ["multiclass", "1797", "64", "10"]
    assert table["diabetes"] == ["regression", "442", "10", "-"]


def test_bench_calls_gpunn_bench_main(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("gpunn.bench")
    fake.main = lambda quick, out: calls.append((quick, out))
    fake.missing_requirements = lambda: []
    monkeypatch.setitem(sys.modules, "gpunn.bench", fake)
    result = invoke("bench", "--quick", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert calls == [(True, str(tmp_path))]


def test_bench_without_the_module_is_a_clean_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpunn.bench", None)  # import of gpunn.bench fails
    result = CliRunner().invoke(main, ["bench"])
    assert result.exit_code == 2
    assert "gpunn.bench" in result.output and "Traceback" not in result.output
    assert "pip install 'gpunn[bench]'" in result.output


def test_python_dash_m_gpunn():
    proc = subprocess.run([sys.executable, "-m", "gpunn", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "predict", "info", "datasets", "bench"):
        assert command in proc.stdout
