"""Inference from many threads at once on one model; concurrent training refused."""

import threading

import numpy as np
import pytest

import gpunn
from gpunn.callbacks import Callback
from gpunn.layers import Dense

from helpers import multiclass_data, run_in_threads

THREADS = 8
ROWS = 150


def _model():
    gpunn.set_seed(7)
    model = gpunn.Sequential([Dense(32, activation="gelu", input_dim=6), Dense(16, activation="relu"), Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy", "mae"])
    model.build()
    return model


def test_single_row_predicts_from_many_threads_match_a_serial_run():
    model = _model()
    x = np.random.default_rng(3).normal(size=(ROWS, 6))
    reference = np.concatenate([model.predict(x[i : i + 1], verbose=0) for i in range(ROWS)])
    results = np.full((THREADS, ROWS, 3), np.nan)

    calls = (lambda row: model.predict(row, verbose=0), model, model.predict_on_batch)

    def work(t):
        for k, i in enumerate(np.random.default_rng(t).permutation(ROWS)):  # each thread in its own order
            results[t, i] = calls[(k + t) % 3](x[i : i + 1])[0]

    run_in_threads(work, THREADS)
    for t in range(THREADS):
        np.testing.assert_array_equal(results[t], reference)


def test_evaluate_and_batched_predict_from_many_threads_match_a_serial_run():
    model = _model()
    x, y = multiclass_data(5, n=37, features=6)
    weights = [np.linspace(0.5, 1.5 + t, 37) for t in range(THREADS)]
    expected = [model.evaluate(x, y, sample_weight=w, batch_size=5, verbose=0, return_dict=True) for w in weights]
    predicted = model.predict(x, batch_size=7, verbose=0)
    got, outputs = [None] * THREADS, [None] * THREADS

    def work(t):
        for _ in range(10):
            got[t] = model.evaluate(x, y, sample_weight=weights[t], batch_size=5, verbose=0, return_dict=True)
            outputs[t] = model.predict(x, batch_size=7, verbose=0)
            assert got[t] == expected[t]
            np.testing.assert_array_equal(outputs[t], predicted)

    run_in_threads(work, THREADS)


def test_a_second_concurrent_fit_is_refused_with_a_clear_error():
    model = _model()
    x, y = multiclass_data(6, n=16, features=6)
    inside, release = threading.Event(), threading.Event()

    class Pause(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            inside.set()
            release.wait(timeout=30)

    errors = []

    def first():
        try:
            model.fit(x, y, epochs=1, verbose=0, callbacks=[Pause()])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(timeout=30)
        for call in (lambda: model.fit(x, y, epochs=1, verbose=0), lambda: model.train_on_batch(x, y)):
            with pytest.raises(RuntimeError, match=r"(fit|train_on_batch): this model is already training"):
                call()
        # inference is still allowed while it trains
        assert model.predict(x, verbose=0).shape == (16, 3)
    finally:
        release.set()
        thread.join()
    assert errors == []
    model.fit(x, y, epochs=1, verbose=0)  # free again afterwards


def test_fit_from_inside_a_callback_is_refused():
    model = _model()
    x, y = multiclass_data(7, n=8, features=6)
    seen = []

    class Nested(Callback):
        def on_epoch_end(self, epoch, logs=None):
            with pytest.raises(RuntimeError, match="fit: this model is already training"):
                self.model.fit(x, y, epochs=1, verbose=0)
            seen.append(epoch)

    model.fit(x, y, epochs=2, verbose=0, callbacks=[Nested()])
    assert seen == [0, 1]
