"""gpunn.sklearn: scikit-learn's estimator checks, pipelines, grid search, pickling, ONNX."""

import pickle

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import gpunn
from gpunn.sklearn import GpunnClassifier, GpunnRegressor, expected_failed_checks


@pytest.fixture(autouse=True)
def numpy_backend():
    gpunn.set_backend("numpy")


# Small networks and few epochs keep scikit-learn's ~60 checks per estimator to seconds;
# the defaults are scikit-learn's MLP ones (tested below).
CHECKED = [
    GpunnClassifier(hidden_layer_sizes=(16,), epochs=20, learning_rate=0.01, random_state=0),
    GpunnRegressor(hidden_layer_sizes=(16,), epochs=20, learning_rate=0.01, random_state=0),
]


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failures_are_few_and_explained():
    for estimator in CHECKED:
        failures = expected_failed_checks(estimator)
        assert 1 <= len(failures) <= 3
        assert all(len(reason) > 40 for reason in failures.values())


def test_defaults_follow_scikit_learns_mlp():
    params = GpunnClassifier().get_params()
    assert params["hidden_layer_sizes"] == (100,) and params["epochs"] == 200 and params["batch_size"] == "auto"
    assert params["n_iter_no_change"] == 10 and params["tol"] == 1e-4 and params["activation"] == "relu"
    assert params["optimizer"] == "adam" and params["validation_fraction"] == 0.1
    assert set(GpunnRegressor().get_params()) == set(params) - {"class_weight"}


def cancer():
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)


def test_grid_search_with_two_jobs_then_onnx_serves_the_winner(tmp_path):
    """The issue's "done when": a grid search picks a GpunnClassifier, ONNX Runtime serves it identically."""
    X_train, X_test, y_train, y_test = cancer()
    labels = np.where(y_train == 1, "benign", "malignant")
    pipe = make_pipeline(StandardScaler(), GpunnClassifier(epochs=15, batch_size=32, random_state=0))
    grid = {"gpunnclassifier__hidden_layer_sizes": [(8,), (32,)], "gpunnclassifier__activation": ["relu", "tanh"]}
    search = GridSearchCV(pipe, grid, cv=2, n_jobs=2).fit(X_train, labels)
    assert search.best_score_ > 0.9
    best = search.best_estimator_
    scaled = best[0].transform(X_test).astype(np.float32)
    classifier = best[-1]
    assert list(classifier.classes_) == ["benign", "malignant"]
    classifier.export(tmp_path / "best.onnx")
    session = ort.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"features": scaled})
    assert label.tolist() == best.predict(X_test).tolist()
    assert np.abs(probabilities - best.predict_proba(X_test)).max() <= 1e-5


def test_pipeline_with_column_transformer_on_a_dataframe():
    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame(
        {
            "size": rng.normal(50, 10, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "weight": rng.normal(0, 1, n),
        }
    )
    y = (frame["size"] > 50).astype(int) ^ (frame["colour"] == "red").astype(int)
    columns = ColumnTransformer([("numbers", StandardScaler(), ["size", "weight"]), ("colour", OneHotEncoder(), ["colour"])])
    pipe = make_pipeline(columns, GpunnClassifier(hidden_layer_sizes=(16,), learning_rate=0.01, random_state=0))
    pipe.fit(frame, y)
    assert pipe.score(frame, y) > 0.9
    regressor = make_pipeline(columns, GpunnRegressor(hidden_layer_sizes=(16,), random_state=0))
    target = frame["size"] / 10 + (frame["colour"] == "blue")
    assert regressor.fit(frame, target).score(frame, target) > 0.9


def test_pickle_carries_a_gpunn_model_file_not_a_pickled_network():
    X_train, X_test, y_train, _ = cancer()
    model = GpunnClassifier(hidden_layer_sizes=(8,), epochs=5, random_state=0).fit(X_train / X_train.max(), y_train)
    blob = pickle.dumps(model)
    assert b"gpunn.models" not in blob and b"Sequential" not in blob  # the network is data inside
    assert b"gpunn-model" in blob
    again = pickle.loads(blob)
    assert isinstance(again.model_, gpunn.Sequential) and model.model_ is not None  # pickling left the original
    X = X_test / X_train.max()
    assert np.array_equal(again.predict_proba(X), model.predict_proba(X))
    assert list(again.feature_names_in_) == list(X_train.columns)


def test_random_state_reproducible_without_touching_global_randomness():
    X, y = np.random.default_rng(1).normal(size=(60, 4)), np.arange(60) % 3
    before = np.random.get_state()[1].copy()
    a = GpunnClassifier(hidden_layer_sizes=(6,), epochs=3, random_state=7).fit(X, y)
    b = GpunnClassifier(hidden_layer_sizes=(6,), epochs=3, random_state=7).fit(X, y)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    c = GpunnClassifier(hidden_layer_sizes=(6,), epochs=3, random_state=8).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))


def test_early_stopping_class_weight_and_parameter_errors():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 3))
    y = np.where(X[:, 0] > 1.0, "rare", "common")
    stopped = GpunnClassifier(hidden_layer_sizes=(8,), learning_rate=0.05, early_stopping=True, n_iter_no_change=3, random_state=0).fit(X, y)
    assert stopped.n_iter_ < 200 and len(stopped.validation_scores_) == stopped.n_iter_
    plain = GpunnClassifier(hidden_layer_sizes=(8,), epochs=5, random_state=0).fit(X, y)
    balanced = GpunnClassifier(hidden_layer_sizes=(8,), epochs=5, random_state=0, class_weight="balanced").fit(X, y)
    assert (balanced.predict(X) == "rare").sum() > (plain.predict(X) == "rare").sum()
    for params, fragment in (
        ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"),
        ({"activation": "sigmoidal"}, "activation"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"validation_fraction": 1.5}, "validation_fraction"),
    ):
        with pytest.raises(ValueError, match=fragment):
            GpunnClassifier(**params).fit(X, y)


def test_readme_grid_search_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "GridSearchCV" in b]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["search"].score(namespace["X_test"], namespace["y_test"]) >= 0.93
    capsys.readouterr()


def test_backend_parameter_selects_and_restores(monkeypatch):
    X, y = np.random.default_rng(3).normal(size=(30, 3)), np.arange(30) % 2
    model = GpunnClassifier(hidden_layer_sizes=(4,), epochs=2, backend="numpy").fit(X, y)
    assert model.model_.backend.name == "numpy" and gpunn.get_backend() == "numpy"
    with pytest.raises(ValueError, match="backend"):
        GpunnClassifier(backend="tpu").fit(X, y)
    assert gpunn.get_backend() == "numpy"


def test_too_few_samples_for_early_stopping_names_validation_fraction():
    X, y = np.arange(10.0).reshape(5, 2), np.array([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="validation_fraction: cannot hold out 0.1 of 5 samples"):
        GpunnClassifier(early_stopping=True).fit(X, y)


@pytest.mark.parametrize("outputs", [1, 2])
def test_regressor_exports_predictions_in_the_targets_units(tmp_path, outputs):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 3))
    y = X @ rng.normal(size=(3, outputs)) * 300 + 1000
    y = y[:, 0] if outputs == 1 else y
    model = GpunnRegressor(hidden_layer_sizes=(8,), epochs=5, random_state=0).fit(X, y)
    model.export(tmp_path / "r.onnx")
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    (prediction,) = session.run(["prediction"], {"features": X.astype(np.float32)})
    expected = model.predict(X)
    assert prediction.shape == expected.shape
    assert np.abs(prediction - expected).max() <= 1e-5 * model.target_scale_.max()


def test_a_samples_prediction_does_not_depend_on_its_batch():
    X = 3 * np.random.default_rng(5).uniform(size=(300, 3))
    for model in (GpunnRegressor(hidden_layer_sizes=(16,), epochs=2), GpunnClassifier(hidden_layer_sizes=(16,), epochs=2)):
        model.fit(X, (X[:, 0] > 1.5).astype(int))
        one_by_one = np.concatenate([model.predict(X[i : i + 1]) for i in range(len(X))])
        assert np.array_equal(model.predict(X), one_by_one)
