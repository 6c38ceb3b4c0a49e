"""The public seams benchmarks use: ``Sequential.make_train_step`` and ``gpunn.use_backend``."""

import numpy as np
import pytest

import gpunn
from gpunn import backend as backends
from gpunn.layers import Dense

from helpers import CountingBackend, multiclass_data, weights_equal


def _pair(seed=5, loss="sparse_categorical_crossentropy", optimizer="adam"):
    """Two compiled models with identical weights."""
    models = []
    for _ in range(2):
        gpunn.set_seed(seed)
        model = gpunn.Sequential([Dense(6, activation="relu", input_dim=4), Dense(3, activation="softmax")])
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy", "mae"])
        model.build()
        models.append(model)
    return models


def test_a_loaded_step_matches_train_on_batch():
    x, y = multiclass_data(3, n=12, features=4)
    w = np.linspace(0.5, 2.0, 12)
    reference, stepped = _pair()
    for _ in range(3):
        expected = reference.train_on_batch(x, y, sample_weight=w, return_dict=True)
    step = stepped.make_train_step(12)
    for _ in range(3):
        step.load(x, y, sample_weight=w)
        step.run()
    assert weights_equal(stepped.get_weights(), reference.get_weights())
    assert stepped.optimizer.iterations == 3
    logs = step.logs()
    assert list(logs) == ["loss", "accuracy", "mae"]
    assert np.isfinite(logs["loss"]) and logs["loss"] != expected["loss"]  # the mean over three steps, not the last


def test_load_rows_gathers_on_the_device_like_fit_does():
    x, y = multiclass_data(4, n=10, features=4)
    reference, stepped = _pair(optimizer="sgd")
    reference.fit(x, y, batch_size=5, epochs=1, shuffle=False, verbose=0)
    b = stepped.backend
    X, Y = b.asarray(x.astype(stepped.dtype)), b.asarray(y.astype(stepped.dtype))
    step = stepped.make_train_step(5)
    for start in (0, 5):
        step.load_rows(X, Y, b.asarray(np.arange(start, start + 5)))
        step.run()
    assert weights_equal(stepped.get_weights(), reference.get_weights())
    assert step.logs()["loss"] == pytest.approx(reference.history.history["loss"][0], rel=1e-5)


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8, np.float64])
def test_load_rows_takes_integer_labels_as_keras_does(label_dtype):
    """Integer class labels (and float64 rows next to a float32 model) are cast per batch, as Keras
    casts them: the same step as with labels already in the model's dtype."""
    x, labels = multiclass_data(4, n=10, features=4)
    reference, stepped = _pair(optimizer="sgd")
    b = stepped.backend
    X, Y = b.asarray(x.astype(reference.dtype)), b.asarray(labels.astype(reference.dtype))
    ref_step, step = reference.make_train_step(5), stepped.make_train_step(5)
    for start in (0, 5):
        index = b.asarray(np.arange(start, start + 5))
        ref_step.load_rows(X, Y, index)
        step.load_rows(b.asarray(x), b.asarray(labels.astype(label_dtype)), index)
        ref_step.run()
        step.run()
    assert weights_equal(stepped.get_weights(), reference.get_weights())
    with pytest.raises(TypeError, match="Y: expected a numeric array .*got dtype <U"):
        step.load_rows(X, b.asarray(labels.astype(str)), np.arange(5))


class Recorder:
    """A stand-in backend that records every call it forwards."""

    def __init__(self, backend):
        self._backend = backend
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if not callable(attr):
            return attr

        def recorded(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return recorded


def test_a_stand_in_backend_sees_every_numeric_call():
    x, y = multiclass_data(5, n=8, features=4)
    gpunn.set_seed(1)
    model = gpunn.Sequential([Dense(6, activation="gelu", input_dim=4, kernel_regularizer="l2"), Dense(3, activation="softmax")])
    model.compile(optimizer=gpunn.optimizers.Adam(clipnorm=1.0), loss="sparse_categorical_crossentropy", metrics=["mae"])
    model.build()
    real = model.backend
    proxy = Recorder(real)
    step = model.make_train_step(8, backend=proxy)
    b = model.backend
    step.load_rows(b.asarray(x.astype(model.dtype)), b.asarray(y.astype(model.dtype)), np.arange(8))
    step.run()
    assert model.backend is real and model.optimizer.iterations == 1
    assert proxy.calls.count("take_rows") == 2
    assert proxy.calls.count("linear_forward") == 2 and proxy.calls.count("linear_backward") == 2
    assert "loss_grad" in proxy.calls and "softmax" in proxy.calls and proxy.calls[-1] == "optimizer_update"


def test_run_reads_nothing_back_to_the_host(monkeypatch):
    device = CountingBackend()
    monkeypatch.setattr(backends, "current", lambda: device)
    x, y = multiclass_data(6, n=16, features=4)
    model = gpunn.Sequential([Dense(5, activation="tanh", input_dim=4), Dense(3, activation="softmax")])
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy", "mse"])
    step = model.make_train_step(4)  # builds the model: the input size is declared
    assert model.backend is device
    X, Y = device.asarray(x.astype(model.dtype)), device.asarray(y.astype(model.dtype))
    before = device.reads
    for start in range(0, 16, 4):
        step.load_rows(X, Y, np.arange(start, start + 4))
        step.run()
    assert device.reads == before
    assert set(step.logs()) == {"loss", "accuracy", "mse"}


def test_make_train_step_errors_name_the_problem():
    model = gpunn.Sequential([Dense(3, input_dim=2)])
    with pytest.raises(RuntimeError, match="make_train_step: the model must be compiled"):
        model.make_train_step(4)
    model.compile(optimizer="sgd", loss="mse")
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
            model.make_train_step(bad)
    with pytest.raises(TypeError, match="backend: expected an object with the Backend methods"):
        model.make_train_step(4, backend=object())
    step = model.make_train_step(4)
    with pytest.raises(ValueError, match="x: this step trains on exactly 4 rows, got 3"):
        step.load(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="x: the model expects 2 features"):
        step.load(np.zeros((4, 5)), np.zeros((4, 3)))
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(RuntimeError, match="recompiled since this step was made"):
        step.run()

    unknown = gpunn.Sequential([Dense(3)])
    unknown.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="input size is unknown"):
        unknown.make_train_step(4)


def test_use_backend_restores_the_previous_selection():
    before = (backends._requested, backends._resolved)
    with gpunn.use_backend("numpy") as name:
        assert name == "numpy" and gpunn.get_backend() == "numpy"
        model = gpunn.Sequential([Dense(2, input_dim=2)])
        model.build()
    assert model.backend.name == "numpy"
    assert (backends._requested, backends._resolved) == before
    with pytest.raises(ZeroDivisionError):
        with backends.use_backend("numpy"):
            1 / 0
    assert (backends._requested, backends._resolved) == before
    with pytest.raises(ValueError, match="backend: expected one of"):
        with gpunn.use_backend("tpu"):
            pass
    assert (backends._requested, backends._resolved) == before
