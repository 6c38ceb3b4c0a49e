"""Issue 9 on the command line: every CSV record kept, model + preprocessing as one file, data errors that
name the file, line and column, rare classes, and CSV reading that scales (NumPy backend, tiny models)."""

from __future__ import annotations

import csv
import io
import json
import re
import time
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

import gpunn
from gpunn import csvdata
from gpunn.cli import PREPROCESS_SUFFIX, main


@pytest.fixture(autouse=True)
def numpy_backend():
    gpunn.set_backend("numpy")
    yield
    gpunn.set_backend("numpy")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def blobs(n, seed=0, positive_share=0.5):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_share).astype(int)
    x = rng.normal(size=(n, 3)) + np.where(y[:, None] == 1, 2.0, -2.0) * np.array([1.0, 0.5, 0.0])
    return x, y


def train_model(tmp_path, name="m.gpunn", labels=("no", "yes"), seed=0, n=120, extra=()):
    x, y = blobs(n, seed)
    data = write_csv(tmp_path / f"train_{seed}.csv", ["f1", "f2", "f3", "y"],
                     [[a, b, c, labels[t]] for (a, b, c), t in zip(x, y)])
    model = tmp_path / name
    result = invoke("train", "--data", data, "--target", "y", "--epochs", "20", "--verbose", "0", "--save", model, *extra)
    assert result.exit_code == 0, result.output
    return model


def predictions(text):
    return list(csv.DictReader(io.StringIO(text)))


# ------------------------------------------------------------ records are never dropped
def test_an_all_empty_record_is_refused_with_its_line_not_skipped(tmp_path):
    model = train_model(tmp_path)
    rows = [[1, 2, 3], ["", "", ""], [4, 5, 6]]
    data = write_csv(tmp_path / "new.csv", ["f1", "f2", "f3"], rows)
    result = invoke("predict", model, data)
    usage_error(result, "line 3", "empty")
    assert result.stdout == ""  # refused before any row was printed
    # a truly blank line is not a record: the output still lines up with the records
    data.write_text("f1,f2,f3\n1,2,3\n\n-4,-5,-6\n")
    out = predictions(invoke("predict", model, data).output)
    assert [r["prediction"] for r in out] == ["yes", "no"]


def test_id_column_is_carried_through_predict_in_input_order(tmp_path):
    model = train_model(tmp_path)
    x, y = blobs(30, seed=5)
    ids = [f"cust-{i:03d}" for i in range(30)][::-1]
    data = write_csv(tmp_path / "new.csv", ["customer", "f3", "f2", "f1"], [[i, c, b, a] for i, (a, b, c) in zip(ids, x)])
    out_path = tmp_path / "preds.csv"
    result = invoke("predict", model, data, "--id-column", "customer", "--out", out_path)
    assert result.exit_code == 0, result.output
    rows = predictions(out_path.read_text())
    assert list(rows[0]) == ["customer", "prediction", "prob_no", "prob_yes"]
    assert [r["customer"] for r in rows] == ids
    assert np.mean([r["prediction"] == ("yes" if t else "no") for r, t in zip(rows, y)]) >= 0.9
    usage_error(invoke("predict", model, data, "--id-column", "nope"), "--id-column", "'nope'")


def test_predict_converts_in_chunks_and_keeps_every_row_in_order(tmp_path, monkeypatch):
    model = train_model(tmp_path)
    monkeypatch.setattr(csvdata, "CHUNK_ROWS", 7)
    x, y = blobs(50, seed=9)
    data = write_csv(tmp_path / "new.csv", ["n", "f1", "f2", "f3"], [[i, a, b, c] for i, (a, b, c) in enumerate(x)])
    seen = []
    real = gpunn.Sequential.predict

    def spy(self, x, *args, **kwargs):
        seen.append(len(x))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(gpunn.Sequential, "predict", spy)
    rows = predictions(invoke("predict", model, data, "--id-column", "n").output)
    assert seen == [7] * 7 + [1]
    assert [int(r["n"]) for r in rows] == list(range(50))


# ------------------------------------------------------------ model and preprocessing are one unit
def test_preprocessing_travels_inside_the_model_file(tmp_path):
    """Two jobs saving the same name: the labels and scaling always belong to the model that predicts."""
    model = train_model(tmp_path, labels=("no", "yes"), seed=0)
    first = model.read_bytes()
    train_model(tmp_path, labels=("cat", "dog"), seed=1)  # a second run replaces the model
    assert not (tmp_path / ("m.gpunn" + PREPROCESS_SUFFIX)).exists()
    data = write_csv(tmp_path / "new.csv", ["f1", "f2", "f3"], [[2, 1, 0], [-2, -1, 0]])
    assert [r["prediction"] for r in predictions(invoke("predict", model, data).output)] == ["dog", "cat"]
    model.write_bytes(first)  # ... and the first run's file brings its own labels back
    assert [r["prediction"] for r in predictions(invoke("predict", model, data).output)] == ["yes", "no"]


def test_old_model_files_with_a_sidecar_keep_working(tmp_path):
    model = train_model(tmp_path)
    info = gpunn.cli.load_preprocessing(model)
    gpunn.load_model(model).save(model)  # as older gpunn wrote it: no preprocessing inside
    (tmp_path / ("m.gpunn" + PREPROCESS_SUFFIX)).write_text(json.dumps(info))
    data = write_csv(tmp_path / "new.csv", ["f1", "f2", "f3"], [[2, 1, 0]])
    assert predictions(invoke("predict", model, data).output)[0]["prediction"] == "yes"


# ------------------------------------------------------------ targets
def test_missing_targets_are_an_error_naming_the_lines(tmp_path):
    rng = np.random.default_rng(0)
    values = [f"{v:.3f}" for v in rng.normal(size=40) * 10]
    for line, token in ((5, "NA"), (9, ""), (17, "nan"), (30, "null")):
        values[line - 2] = token
    data = write_csv(tmp_path / "d.csv", ["a", "price"], [[i, v] for i, v in enumerate(values)])
    out = usage_error(invoke("train", "--data", data, "--target", "price"), "'price'", "4 lines", "5, 9, 17, 30")
    assert "classes" not in out and "multiclass" not in out


def test_numeric_target_with_a_stray_string_is_not_turned_into_classes(tmp_path):
    rng = np.random.default_rng(1)
    values = [f"{v:.2f}" for v in rng.normal(size=60) * 100]
    values[33] = "twelve"
    data = write_csv(tmp_path / "d.csv", ["a", "price"], [[i, v] for i, v in enumerate(values)])
    out = usage_error(invoke("train", "--data", data, "--target", "price"), "line 35", "'twelve'", "--task")
    assert len(out) < 1200  # no dump of 60 class values
    assert values[0] not in out


def test_huge_regression_targets_are_a_usage_error_and_never_reach_json(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 2))
    y = rng.normal(size=40) * 1e300
    data = write_csv(tmp_path / "d.csv", ["a", "b", "y"], [[a, b, t] for (a, b), t in zip(x, y)])
    model = tmp_path / "m.gpunn"
    usage_error(invoke("train", "--data", data, "--target", "y", "--save", model), "'y'", "too large")
    assert not model.exists()
    # the metadata writer refuses non-finite numbers whatever the caller passes
    m = gpunn.Sequential([gpunn.layers.Dense(1, input_dim=2)])
    m.build()
    with pytest.raises(ValueError, match="user_metadata"):
        gpunn.saving.save_model(m, model, user_metadata={"scale": float("inf")})
    assert not model.exists()


def test_label_case_variants_are_reported_or_merged(tmp_path):
    x, y = blobs(80, seed=3)
    spelled = [("yes" if i % 2 else "Yes") if t else "no" for i, t in enumerate(y)]
    data = write_csv(tmp_path / "d.csv", ["f1", "f2", "f3", "y"], [[a, b, c, s] for (a, b, c), s in zip(x, spelled)])
    result = invoke("train", "--data", data, "--target", "y", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "'Yes' and 'yes'" in result.output and "--ignore-label-case" in result.output
    result = invoke("train", "--data", data, "--target", "y", "--epochs", "1", "--ignore-label-case")
    assert result.exit_code == 0, result.output
    assert "binary" in result.output and "merged" in result.output


# ------------------------------------------------------------ clear errors
def test_cells_overflowing_the_scaling_name_file_line_and_column(tmp_path):
    x, y = blobs(60, seed=4)
    rows = [[a, b, c, t] for (a, b, c), t in zip(x, y)]
    rows[41][1] = 1e308  # line 43; shuffled into the training part or not, the report names the file line
    data = write_csv(tmp_path / "d.csv", ["f1", "f2", "f3", "y"], rows)
    usage_error(invoke("train", "--data", data, "--target", "y"), "d.csv", "line 43", "'f2'", "too large")
    model = train_model(tmp_path)
    new = write_csv(tmp_path / "new.csv", ["f1", "f2", "f3"], [[1, 2, 3], [1, 2, 3], [4e307, 0, 0]])
    usage_error(invoke("predict", model, new), "new.csv", "line 4", "'f1'", "too large")


def test_hidden_sizes_that_cannot_be_allocated_name_hidden_and_bytes():
    out = usage_error(invoke("train", "--hidden", "1000000,1000000,1000000", "--epochs", "1"), "--hidden", "bytes")
    assert re.search(r"\d{1,3}(,\d{3}){4,} bytes", out), out


def test_seed_out_of_range_is_reported_as_seed():
    out = usage_error(invoke("train", "--seed", str(2**32), "--epochs", "1"), "--seed")
    assert "--test-size" not in out


def test_semicolon_separated_files_get_a_delimiter_hint_and_can_be_read(tmp_path):
    x, y = blobs(60, seed=6)
    data = write_csv(tmp_path / "d.csv", ["f1", "f2", "f3", "y"], [[a, b, c, t] for (a, b, c), t in zip(x, y)], delimiter=";")
    usage_error(invoke("train", "--data", data, "--target", "y"), "';'", "--delimiter")
    result = invoke("train", "--data", data, "--target", "y", "--delimiter", ";", "--epochs", "2", "--verbose", "0")
    assert result.exit_code == 0, result.output


def test_overlong_lines_are_refused_with_their_number(tmp_path, monkeypatch):
    monkeypatch.setattr(csvdata, "MAX_LINE_CHARS", 100)
    data = tmp_path / "d.csv"
    data.write_text("a,y\n1,0\n" + "9" * 500 + ",1\n")
    with pytest.raises(csvdata.CSVDataError, match="line 3 is longer than 100"):
        csvdata.read_training_csv(data, "y")


# ------------------------------------------------------------ rare classes
def test_binary_training_reports_baseline_precision_recall_auc_and_offers_class_weight(tmp_path):
    x, y = blobs(600, seed=7, positive_share=0.04)
    data = write_csv(tmp_path / "fraud.csv", ["f1", "f2", "f3", "fraud"], [[a, b, c, t] for (a, b, c), t in zip(x, y)])
    result = invoke("train", "--data", data, "--target", "fraud", "--epochs", "5", "--verbose", "0")
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"Majority-class baseline: 0\.9\d+ \(always '0'\)", out), out
    assert re.search(r"Class '1' \(\d+ of 120 held out\): precision [0-9.]+, recall [0-9.]+, ROC AUC 0\.\d+", out), out
    assert "--class-weight balanced" in out
    result = invoke("train", "--data", data, "--target", "fraud", "--epochs", "5", "--verbose", "1", "--class-weight", "balanced")
    assert result.exit_code == 0, result.output
    assert "class weights balanced" in result.output
    recall = float(re.search(r"recall ([0-9.]+)", result.output).group(1))
    assert recall >= 0.8


# ------------------------------------------------------------ resources
def _wide_csv(path, rows, cols, seed=0, regression=False):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, cols))
    with open(path, "w") as f:
        f.write(",".join(f"c{j}" for j in range(cols)) + ",y\n")
        for i, row in enumerate(values):
            target = f"{row.sum():.9f}" if regression else str(i % 2)
            f.write(",".join(f"{v:.6f}" for v in row) + f",{target}\n")
    return values


@pytest.mark.parametrize("regression", [False, True], ids=["classes", "regression"])
def test_reading_a_csv_takes_about_the_numeric_array_size(tmp_path, regression):
    path = tmp_path / "big.csv"
    values = _wide_csv(path, 20000, 20, regression=regression)
    tracemalloc.start()
    try:
        data = csvdata.read_training_csv(path, "y")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.allclose(data.X, values, atol=1e-6)
    assert peak < 1.5 * values.nbytes, f"peak {peak:,} bytes for a {values.nbytes:,}-byte array"


def _cpu_seconds_to_read(path, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        csvdata.read_training_csv(path, "y")
        best = min(best, time.process_time() - started)
    return best


def test_csv_work_is_linear_in_the_number_of_columns(tmp_path):
    """A scaling ratio, not a speed figure: 4x the columns may cost about 4x, not 16x (a per-column header
    scan made 40k columns take 8 s).  CPU time of this process, best of 3, so other load matters little."""
    narrow, wide = tmp_path / "narrow.csv", tmp_path / "wide.csv"
    _wide_csv(narrow, 4, 6000)
    _wide_csv(wide, 4, 24000)
    ratio = _cpu_seconds_to_read(wide) / _cpu_seconds_to_read(narrow)
    assert ratio < 9, f"reading 4x the columns took {ratio:.1f}x the CPU time"
