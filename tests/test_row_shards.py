"""CPU training steps split in row shards (one per thread, BLAS at one thread each): the
shards' gradients, losses and metrics add up to the whole batch's, for every layer that
treats rows independently; other models train whole; BLAS settings are left as found."""

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import gpunn
from helpers import numpy_blas_threads, run_in_threads
from gpunn.backend import numpy_backend
from gpunn.backend.numpy_backend import NumpyBackend
from gpunn.training import Trainer

FEATURES = 12


@pytest.fixture
def shards(monkeypatch):
    """Small shards (4 rows each at least) on up to 3 threads, whatever this machine has; yields the
    list of shard splits the backend made, one entry per sharded step."""
    monkeypatch.setattr(numpy_backend, "_SHARD_MIN_ROWS", 4)
    monkeypatch.setattr(numpy_backend, "_usable_cores", lambda: 3)
    monkeypatch.setattr(numpy_backend._BLAS_ONE_THREAD, "threads", lambda: 3)
    made = []
    run = NumpyBackend.run_row_shards

    def spy(self, fn, split):
        made.append(list(split))
        return run(self, fn, split)

    monkeypatch.setattr(NumpyBackend, "run_row_shards", spy)
    return made


def _data(rows=101, outputs=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES))
    labels = rng.integers(0, outputs, rows)
    return x, labels, rng.uniform(0.2, 2.0, rows)


def _stack(kind):
    dense = gpunn.layers.Dense
    if kind == "mlp":
        return [dense(16, activation="relu"), dense(9, activation="gelu"), dense(3, activation="softmax")]
    if kind == "dropout":  # folded into the Dense before it, and on its own after a layer that does not fold it
        return [
            dense(16, activation="relu"),
            gpunn.layers.Dropout(0.4),
            gpunn.layers.LayerNormalization(),
            gpunn.layers.Dropout(0.25, seed=11),
            dense(3, activation="softmax"),
        ]
    if kind == "layers":  # every weightless row-wise layer, a frozen first Dense, regularizers, LayerNorm
        return [
            gpunn.layers.Rescaling(0.5, offset=0.1),
            dense(10, activation="linear", trainable=False),
            gpunn.layers.LeakyReLU(0.2),
            gpunn.layers.LayerNormalization(),
            dense(8, kernel_regularizer=gpunn.regularizers.L2(1e-3), bias_regularizer="l1"),
            gpunn.layers.Activation("swish"),
            gpunn.layers.Identity(),
            dense(3),
            gpunn.layers.Softmax(),
        ]
    raise ValueError(kind)


def _model(stack, optimizer, loss="sparse_categorical_crossentropy", metrics=("accuracy",), dtype="float64"):
    with gpunn.use_backend("numpy"):
        model = gpunn.Sequential([gpunn.Input(shape=(FEATURES,)), *_stack(stack)], dtype=dtype)
        model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
        model.build()
    return model


def _train(stack, loss, optimizer, y, sample_weight=None, batch_size=40, metrics=("accuracy",), dtype="float64", epochs=2, x=None):
    x = _data()[0] if x is None else x
    gpunn.set_seed(7)
    model = _model(stack, optimizer, loss, metrics, dtype)
    with gpunn.use_backend("numpy"):
        history = model.fit(x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    return model.get_weights(), history.history


def _close(a, b, rtol):
    (wa, ha), (wb, hb) = a, b
    for u, v in zip(wa, wb):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol)
    assert ha.keys() == hb.keys()
    for key in ha:
        np.testing.assert_allclose(ha[key], hb[key], rtol=rtol, atol=rtol, err_msg=key)


def _whole(monkeypatch, run):
    """``run()`` with row shards turned off."""
    with monkeypatch.context() as m:
        m.setattr(NumpyBackend, "row_shards", lambda self, rows, most=None: None)
        return run()


CASES = [
    ("mlp", "sparse_categorical_crossentropy", "adam", "labels", None),
    ("mlp", "categorical_crossentropy", "sgd", "onehot", "weights"),
    ("layers", "sparse_categorical_crossentropy", "rmsprop", "labels", "weights"),
    ("mlp", "huber", "adamw", "onehot", None),
    ("dropout", "sparse_categorical_crossentropy", "adam", "labels", "weights"),
]


@pytest.mark.parametrize("stack, loss, optimizer, target, weighted", CASES)
def test_sharded_training_equals_whole_batch_training(shards, monkeypatch, stack, loss, optimizer, target, weighted):
    x, labels, w = _data()
    y = labels if target == "labels" else np.eye(3)[labels]
    sw = w if weighted else None
    metrics = ("accuracy", "auc") if target == "onehot" else ("accuracy", "sparse_top_k_categorical_accuracy")
    sharded = _train(stack, loss, optimizer, y, sw, metrics=metrics)
    # 101 rows in batches of 40: two steps of 40 rows in 3 shards (14, 13, 13), one of 21 (7, 7, 7)
    assert shards and {len(s) for s in shards} == {3} and [(0, 14), (14, 27), (27, 40)] in shards
    count = len(shards)
    whole = _whole(monkeypatch, lambda: _train(stack, loss, optimizer, y, sw, metrics=metrics))
    assert len(shards) == count
    _close(sharded, whole, rtol=1e-12)


def test_several_shards_per_thread_equal_whole_batch_training(shards, monkeypatch):
    monkeypatch.setattr(numpy_backend, "_SHARD_MAX_ROWS", 8)
    x, labels, w = _data()
    run = lambda: _train("layers", "sparse_categorical_crossentropy", "adam", labels, w)  # noqa: E731
    sharded = run()
    # batches of 40 rows: 6 shards (a multiple of the 3 threads) of 6-7 rows; the last batch of 21: 3 of 7
    assert [len(s) for s in shards] == [6, 6, 3] * 2 and shards[0][:2] == [(0, 7), (7, 14)]
    _close(sharded, _whole(monkeypatch, run), rtol=1e-12)


def test_shards_respect_the_most_the_caller_allows(monkeypatch):
    backend = NumpyBackend()
    monkeypatch.setattr(numpy_backend, "_usable_cores", lambda: 2)
    with threadpool_limits(2, user_api="blas"):
        assert len(backend.row_shards(8192)) == 8
        for most, count in [(None, 8), (9, 8), (7, 6), (3, 2), (2, 2), (1, None)]:
            got = backend.row_shards(8192, most=most)
            assert (None if got is None else len(got)) == count, most


def test_float32_sharded_training_is_within_rounding_of_whole(shards, monkeypatch):
    x, labels, _ = _data(rows=200)
    run = lambda: _train("mlp", "sparse_categorical_crossentropy", "adam", labels, batch_size=64, dtype="float32", x=x)  # noqa: E731
    sharded = run()
    assert shards
    _close(sharded, _whole(monkeypatch, run), rtol=2e-5)


def test_sharded_training_is_deterministic(shards):
    _, labels, _ = _data()
    first = _train("mlp", "sparse_categorical_crossentropy", "adam", labels)
    second = _train("mlp", "sparse_categorical_crossentropy", "adam", labels)
    for u, v in zip(first[0], second[0]):
        np.testing.assert_array_equal(u, v)
    assert first[1] == second[1]


def test_train_on_batch_shards_too_and_matches(shards, monkeypatch):
    x, labels, w = _data(rows=30)

    def run():
        gpunn.set_seed(2)
        model = gpunn.Sequential([gpunn.Input(shape=(FEATURES,)), *_stack("mlp")], dtype="float64")
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        logs = [model.train_on_batch(x, labels, sample_weight=w, return_dict=True) for _ in range(3)]
        return model.get_weights(), {k: [d[k] for d in logs] for k in logs[0]}

    sharded = run()
    assert len(shards) == 3
    _close(sharded, _whole(monkeypatch, run), rtol=1e-12)


@pytest.mark.parametrize(
    "layers, loss",
    [
        ([gpunn.layers.Dense(8), gpunn.layers.BatchNormalization(), gpunn.layers.Dense(3, activation="softmax")], "sparse_categorical_crossentropy"),
        ([gpunn.layers.GaussianNoise(0.1), gpunn.layers.Dense(3, activation="softmax")], "sparse_categorical_crossentropy"),
    ],
    ids=["batchnorm", "gaussian-noise"],
)
def test_layers_with_batch_statistics_or_host_draws_train_whole(shards, layers, loss):
    x, labels, _ = _data()
    model = gpunn.Sequential([gpunn.Input(shape=(FEATURES,)), *layers])
    model.compile(optimizer="sgd", loss=loss)
    with gpunn.use_backend("numpy"):
        model.fit(x, labels, batch_size=40, epochs=1, verbose=0)
    assert shards == []


def test_a_user_loss_trains_whole(shards):
    x, labels, _ = _data()

    class Squared(gpunn.losses.Loss):
        def call(self, y_true, y_pred):
            return ((y_true - y_pred) ** 2).sum(axis=-1)

        def gradient(self, y_true, y_pred):
            return 2 * (y_pred - y_true)

    model = gpunn.Sequential([gpunn.Input(shape=(FEATURES,)), gpunn.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=Squared())
    model.fit(x, np.eye(3)[labels], batch_size=40, epochs=1, verbose=0)
    assert shards == []


def test_without_shards_when_blas_is_limited_to_one_thread_or_batches_are_small(monkeypatch):
    backend = NumpyBackend()
    monkeypatch.setattr(numpy_backend, "_usable_cores", lambda: 2)
    with threadpool_limits(2, user_api="blas"):
        assert backend.row_shards(2 * numpy_backend._SHARD_MIN_ROWS) == [(0, 256), (256, 512)]
        assert backend.row_shards(2 * numpy_backend._SHARD_MIN_ROWS - 1) is None
        assert backend.row_shards(1001) == [(0, 501), (501, 1001)]
    with threadpool_limits(1, user_api="blas"):
        assert backend.row_shards(100_000) is None
    monkeypatch.setattr(numpy_backend, "_usable_cores", lambda: 1)
    with threadpool_limits(2, user_api="blas"):
        assert backend.row_shards(100_000) is None


def test_models_trained_in_threads_at_once_each_equal_their_lone_result(shards):
    x, labels, _ = _data()
    optimizers = ("adam", "sgd", "rmsprop")
    # the seed and the shuffles come from the process-wide generator: fix the start, no shuffle
    start = [_model("mlp", opt).get_weights() for opt in optimizers]

    def train(i):
        model = _model("mlp", optimizers[i])
        model.set_weights(start[i])
        model.fit(x, labels, batch_size=40, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    alone = [train(i) for i in range(3)]
    results = run_in_threads(train, 3)
    assert len(shards) >= 6 * 3 * 2
    for got, want in zip(results, alone):
        for u, v in zip(got, want):
            np.testing.assert_array_equal(u, v)


def test_blas_threads_are_as_found_after_sharded_training(shards):
    before = numpy_blas_threads()
    _, labels, _ = _data()
    _train("mlp", "sparse_categorical_crossentropy", "sgd", labels)
    assert shards and numpy_blas_threads() == before


def test_gradients_into_redirects_only_this_thread_and_restores():
    from gpunn.layer_base import gradients_into

    model = gpunn.Sequential([gpunn.Input(shape=(3,)), gpunn.layers.Dense(2)])
    model.build()
    dense = model.layers[0]
    own = dense.kernel_grad
    flat = np.zeros_like(model.grads)
    seen = []
    with gradients_into(flat):
        redirected = dense.kernel_grad
        worker = threading.Thread(target=lambda: seen.append(dense.kernel_grad))
        worker.start()
        worker.join()
    assert np.shares_memory(redirected, flat) and redirected.shape == (3, 2)
    assert np.shares_memory(seen[0], model.grads) and not np.shares_memory(seen[0], flat)
    assert np.shares_memory(dense.kernel_grad, own)


def test_trainer_shards_only_on_its_own_backend(shards):
    """A stand-in backend (e.g. the benchmark's timing proxy) sees whole batches."""
    _, labels, _ = _data()
    model = gpunn.Sequential([gpunn.Input(shape=(FEATURES,)), *_stack("mlp")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.build()
    trainer = model._get_trainer()
    assert isinstance(trainer, Trainer)
    assert trainer._row_shards(trainer.backend, 40) is not None
    assert trainer._row_shards(NumpyBackend(), 40) is None


def test_a_model_too_large_for_a_gradient_buffer_per_shard_trains_whole(shards, monkeypatch):
    from gpunn import training

    _, labels, _ = _data()
    _train("mlp", "sparse_categorical_crossentropy", "sgd", labels, epochs=1)
    assert shards
    shards.clear()
    params = 12 * 16 + 16 + 16 * 9 + 9 + 9 * 3 + 3
    monkeypatch.setattr(training, "_SHARD_GRADIENT_BYTES", 2 * params * 8 - 1)  # float64: less than 2 buffers
    _train("mlp", "sparse_categorical_crossentropy", "sgd", labels, epochs=1)
    assert shards == []


def test_a_subclass_with_its_own_call_trains_whole_unless_it_says_otherwise(shards):
    class BatchCentred(gpunn.layers.Dense):  # uses the whole batch: must not be split
        def call(self, backend, x, y, z, activation=None, training=False, folded=None):
            return super().call(backend, x - x.mean(axis=0), y, z, activation, training, folded)

    class Renamed(gpunn.layers.Dense):  # only its constructor differs
        def __init__(self, units, **kwargs):
            super().__init__(units, activation="relu", **kwargs)

    class DeclaredRowWise(BatchCentred):
        rows_independent = True

    assert not BatchCentred.rows_independent and Renamed.rows_independent and DeclaredRowWise.rows_independent
    x, labels, _ = _data()
    for first, sharded in ((BatchCentred(8), False), (Renamed(8), True)):
        shards.clear()
        model = gpunn.Sequential([gpunn.Input(shape=(FEATURES,)), first, gpunn.layers.Dense(3, activation="softmax")])
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        model.fit(x, labels, batch_size=40, epochs=1, verbose=0)
        assert bool(shards) == sharded
