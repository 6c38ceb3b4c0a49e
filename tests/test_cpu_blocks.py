"""CPU inference in row blocks on the backend's own threads: same outputs whatever the
batch size or thread count, first bad row named, BLAS thread setting left as found."""

import os
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import gpunn
from gpunn.backend.numpy_backend import NumpyBackend, _equal_blocks
from helpers import numpy_blas_threads, run_in_threads

FEATURES = 300  # wide enough that a few hundred rows make several inference blocks


@pytest.fixture(scope="module")
def model():
    with gpunn.use_backend("numpy"):
        gpunn.set_seed(3)
        m = gpunn.Sequential(
            [
                gpunn.Input(shape=(FEATURES,)),
                gpunn.layers.Dense(600, activation="gelu"),
                gpunn.layers.Dense(33, activation="tanh"),
                gpunn.layers.Dense(5, activation="softmax"),
            ],
            dtype="float32",
        )
        m.build()
    return m


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(4).standard_normal((1500, FEATURES)).astype(np.float32)


def test_blocks_span_several_and_ragged(model, x):
    block = model.backend.inference_block_rows([FEATURES, 600, 33, 5])
    assert 1 < -(-len(x) // block) and len(x) % block


@pytest.mark.parametrize("rows, most, cores", [(1, 1024, 2), (5, 2, 4), (103, 10, 2), (1500, 1024, 2), (100_000, 1024, 2), (4097, 1024, 3), (10, 1024, 16), (2000, 1024, 64), (9000, 1024, 4)])
def test_equal_blocks_cover_the_rows_evenly_in_a_multiple_of_the_cores(rows, most, cores):
    blocks = _equal_blocks(rows, most, cores)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) <= most and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    fewest = -(-rows // most)
    if fewest > cores:
        assert len(blocks) % cores == 0 or len(blocks) == rows
        assert len(blocks) < fewest + cores and min(sizes) >= most // 2
    else:
        assert len(blocks) == fewest


def test_inference_blocks_are_tall_whatever_the_widths():
    backend = NumpyBackend()
    assert backend.inference_block_rows([784, 512, 10]) == 1024
    assert backend.inference_block_rows([784, 4096, 10]) == 512
    assert backend.inference_block_rows([10, 1 << 20, 10]) == 256


def test_predict_is_the_same_whatever_the_batch_size_and_threads(model, x):
    with threadpool_limits(limits=1):
        want = model.predict(x, batch_size=32, verbose=0)
    assert np.isfinite(want).all()
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            for batch_size in (2, 7, 32, 256, 1500, 100_000):
                got = model.predict(x, batch_size=batch_size, verbose=0)
                assert np.array_equal(got, want), (threads, batch_size)
    # one row alone goes through BLAS's matrix-vector path: equal to the last bits
    np.testing.assert_allclose(model.predict(x[100:101], verbose=0), want[100:101], rtol=1e-5, atol=1e-6)


def test_the_first_bad_row_is_named_when_several_blocks_fail(model, x):
    bad = x.copy()
    bad[1400, 7] = np.inf
    bad[950, 2] = np.nan
    with threadpool_limits(limits=2):
        for _ in range(3):
            with pytest.raises(ValueError, match=r"x: expected finite values, found NaN at row 950, column 2"):
                model.predict(bad, batch_size=16, verbose=0)


def test_blas_threads_are_restored_after_predict_success_failure_and_overlap(model, x):
    before = numpy_blas_threads()
    model.predict(x, verbose=0)
    bad = x.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError):
        model.predict(bad, verbose=0)
    assert numpy_blas_threads() == before
    outs = run_in_threads(lambda i: model.predict(x[i * 10 :], batch_size=64, verbose=0), 4)
    assert numpy_blas_threads() == before
    full = model.predict(x, verbose=0)
    for i, out in enumerate(outs):
        # equal to the last bits: OpenBLAS may keep its thread count when another thread
        # sets it, and its results change in the last bits with its thread count
        np.testing.assert_allclose(out, full[i * 10 :], rtol=1e-5, atol=1e-6)


def test_run_row_blocks_visits_each_block_once_and_raises_the_lowest_failure():
    backend = NumpyBackend()
    seen, lock = [], threading.Lock()

    def record(lo, hi):
        with lock:
            seen.append((lo, hi))

    with threadpool_limits(limits=2):
        backend.run_row_blocks(record, 103, 10)
    assert sorted(seen) == _equal_blocks(103, 10, len(os.sched_getaffinity(0)))
    assert all(hi - lo <= 10 for lo, hi in seen)

    starts = [lo for lo, _ in sorted(seen)]

    def fail(lo, hi):
        if lo in (starts[3], starts[7]):
            raise KeyError(lo)

    with threadpool_limits(limits=2):
        with pytest.raises(KeyError, match=str(starts[3])):
            backend.run_row_blocks(fail, 103, 10)


def test_normalization_and_dropout_layers_predict_the_same_whatever_the_batch_size(x):
    with gpunn.use_backend("numpy"):
        gpunn.set_seed(5)
        m = gpunn.Sequential(
            [
                gpunn.Input(shape=(FEATURES,)),
                gpunn.layers.Dense(400, activation="relu"),
                gpunn.layers.BatchNormalization(),
                gpunn.layers.Dropout(0.3),
                gpunn.layers.LayerNormalization(),
                gpunn.layers.Dense(3),
            ],
            dtype="float32",
        )
        m.compile(optimizer="adam", loss="mse")
        m.fit(x[:256], np.ones((256, 3), np.float32), batch_size=64, epochs=1, verbose=0)  # moving statistics move
    with threadpool_limits(limits=2):
        want = m.predict(x, batch_size=1500, verbose=0)
        for batch_size in (3, 64):
            assert np.array_equal(m.predict(x, batch_size=batch_size, verbose=0), want)


def _evaluation_model():
    with gpunn.use_backend("numpy"):
        gpunn.set_seed(8)
        m = gpunn.Sequential(
            [
                gpunn.Input(shape=(FEATURES,)),
                gpunn.layers.Dense(40, activation="relu", kernel_regularizer="l2"),
                gpunn.layers.BatchNormalization(),
                gpunn.layers.Dropout(0.3),
                gpunn.layers.Dense(5, activation="softmax"),
            ],
            dtype="float64",
        )
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy", "auc", "sparse_top_k_categorical_accuracy"])
        m.build()
    return m


def test_evaluate_without_batch_hooks_runs_in_blocks_with_the_batch_loops_result(x, monkeypatch):
    m = _evaluation_model()
    rng = np.random.default_rng(9)
    y, w = rng.integers(0, 5, len(x)), rng.uniform(0.1, 3.0, len(x))
    blocks = []
    run_blocks = NumpyBackend.run_row_blocks
    monkeypatch.setattr(NumpyBackend, "run_row_blocks", lambda self, fn, rows, most: blocks.append((rows, most)) or run_blocks(self, fn, rows, most))
    got = m.evaluate(x, y, sample_weight=w, batch_size=7, verbose=0, return_dict=True)
    assert blocks == [(len(x), m.backend.inference_block_rows([FEATURES, 40, 40, 40, 5]))]

    class Counter(gpunn.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches = 0

        def on_test_batch_end(self, batch, logs=None):
            self.batches += 1

    counter = Counter()
    want = m.evaluate(x, y, sample_weight=w, batch_size=7, verbose=0, return_dict=True, callbacks=[counter])
    assert counter.batches == -(-len(x) // 7) and len(blocks) == 1  # a batch hook: the batch loop
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
