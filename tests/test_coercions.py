"""Issue 9, silent coercions: bool settings, weights that overflow the model dtype, NumPy scalar types;
and predict converting its input in chunks (memory bounded with tracemalloc, never timed)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gpunn
from gpunn import callbacks, losses
from gpunn.layers import Dense


@pytest.fixture(autouse=True)
def numpy_backend():
    gpunn.set_backend("numpy")
    yield
    gpunn.set_backend("numpy")


def model(dtype=None, input_dim=3):
    gpunn.set_seed(0)
    m = gpunn.Sequential([Dense(4, activation="relu", input_dim=input_dim), Dense(1)], dtype=dtype)
    m.compile(optimizer="sgd", loss="mse")
    m.build()
    return m


@pytest.mark.parametrize(
    "make",
    [
        lambda: callbacks.EarlyStopping(restore_best_weights="false"),
        lambda: callbacks.ModelCheckpoint("m.gpunn", save_best_only="false"),
        lambda: callbacks.ModelCheckpoint("m.gpunn", save_weights_only="no"),
        lambda: callbacks.CSVLogger("log.csv", append="false"),
        lambda: losses.get({"name": "binary_crossentropy", "from_logits": "false"}),
        lambda: model().evaluate(np.ones((2, 3)), np.ones((2, 1)), verbose=0, return_dict="false"),
        lambda: gpunn.load_model("unused.gpunn", compile="false"),
    ],
    ids=["restore_best_weights", "save_best_only", "save_weights_only", "append", "from_logits", "return_dict", "compile"],
)
def test_string_booleans_are_refused_not_taken_as_true(make):
    with pytest.raises(TypeError, match="expected a bool"):
        make()


def test_numpy_bools_are_booleans():
    assert callbacks.EarlyStopping(restore_best_weights=np.bool_(True)).restore_best_weights is True
    assert losses.get({"name": "mse", "from_logits": np.False_}).from_logits is False


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_set_weights_refuses_values_that_overflow_the_model_dtype(dtype):
    m = model(dtype)
    weights = m.get_weights()
    before = [w.copy() for w in weights]
    weights[0] = weights[0].astype(np.float64)
    weights[0][1, 2] = 1e39 if dtype == "float32" else 1e308
    if dtype == "float32":
        with pytest.raises(ValueError, match=r"weights: layer .*kernel.*float32.*1e\+39 at row 1, column 2"):
            m.set_weights(weights)
        assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), before))
    else:
        m.set_weights(weights)  # representable: stored as given
        assert m.get_weights()[0][1, 2] == 1e308


@pytest.mark.parametrize("scalar", [np.float32, np.float64, float])
def test_numpy_float_widths_are_accepted_alike(scalar):
    opt = gpunn.optimizers.Adam(learning_rate=scalar(0.01), beta_1=scalar(0.9))
    assert opt.learning_rate == pytest.approx(0.01) and type(opt.learning_rate) is float
    reg = gpunn.regularizers.L2(scalar(0.001))
    assert reg.l2 == pytest.approx(0.001)
    m = model()
    history = m.fit(np.ones((10, 3)), np.ones((10, 1)), epochs=1, verbose=0, validation_split=scalar(0.2))
    assert "val_loss" in history.history


def test_predict_converts_its_input_in_chunks():
    m = model(input_dim=50)
    x = np.random.default_rng(0).normal(size=(100_000, 50))  # float64, 40 MB
    expected_head = m.predict(x[:1000], batch_size=256, verbose=0)
    tracemalloc.start()
    try:
        out = m.predict(x, batch_size=256, verbose=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(out[:1000], expected_head)
    # the output (400 kB) plus a chunk of converted rows, not a float32 copy and a mask of the whole input
    assert peak < 0.15 * x.nbytes, f"predict on a {x.nbytes:,}-byte input peaked at {peak:,} bytes"
    x[77_777, 3] = np.nan
    with pytest.raises(ValueError, match="x: expected finite values, found NaN at row 77777, column 3"):
        m.predict(x, batch_size=256, verbose=0)
