"""Row shards (training) and row blocks (evaluate) on the CPU backend, the way users drive them:
user metrics, callbacks, interrupted fits, errors inside a shard.  Each compares against the
same run with shards off (float64, tight tolerance) or against Keras's per-batch meaning."""

import numpy as np
import pytest

import gpunn
from test_row_shards import FEATURES, _close, _data, _whole, shards  # noqa: F401  (shards: fixture)


def _mlp(metrics=("accuracy",), loss="sparse_categorical_crossentropy", optimizer="adam"):
    gpunn.set_seed(7)
    model = gpunn.Sequential(
        [gpunn.Input(shape=(FEATURES,)), gpunn.layers.Dense(16, activation="relu"), gpunn.layers.Dense(3, activation="softmax")],
        dtype="float64",
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return model


def _batch_mean_of_max(y_true, y_pred):
    """A Keras-style metric function returning one value per batch (Keras averages the batches)."""
    return np.mean(np.abs(y_pred).max(axis=1))


class _LargestOutput(gpunn.metrics.Metric):
    """A user Metric whose state is not a sum over rows (the largest output seen)."""

    name = "largest"

    def update(self, xp, pred, target, weight, state):
        state[0] = max(state[0], float(pred.max()))
        state[1] = 1

    def compute(self, state):
        return float(state[0])


@pytest.mark.parametrize("metric", [_batch_mean_of_max, _LargestOutput()], ids=["batch-scalar-fn", "max-state"])
def test_user_metrics_train_as_whole_batches(shards, monkeypatch, metric):
    x, labels, _ = _data()

    def run():
        model = _mlp(metrics=["accuracy", metric])
        history = model.fit(x, labels, batch_size=40, epochs=2, verbose=0)
        return model.get_weights(), history.history

    sharded = run()
    assert shards == []  # a split batch would count a batch's value once per shard
    _close(sharded, _whole(monkeypatch, run), rtol=1e-12)


def test_evaluate_counts_a_batch_scalar_metric_once_per_batch():
    x, labels, _ = _data()
    model = _mlp(metrics=[_batch_mean_of_max])
    with gpunn.use_backend("numpy"):
        got = model.evaluate(x, labels, batch_size=40, verbose=0, return_dict=True)
        pred = model.predict(x, verbose=0)
    # Keras: the mean over the batches of 40, 40 and 21 rows of the function's value
    want = np.mean([_batch_mean_of_max(None, pred[lo : lo + 40]) for lo in range(0, len(x), 40)])
    assert got["_batch_mean_of_max"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("invert", [False, True])
def test_a_model_starting_with_normalization_trains_in_shards_and_matches(shards, monkeypatch, invert):
    x, labels, w = _data()

    def run():
        gpunn.set_seed(7)
        norm = gpunn.layers.Normalization(invert=invert)
        norm.adapt(x)
        middle = gpunn.layers.Normalization(mean=np.linspace(-1, 1, 16), variance=np.linspace(0.5, 2, 16), invert=invert)
        model = gpunn.Sequential(
            [gpunn.Input(shape=(FEATURES,)), norm, gpunn.layers.Dense(16, activation="tanh"), middle, gpunn.layers.Dense(3, activation="softmax")],
            dtype="float64",
        )
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(x, labels, sample_weight=w, batch_size=40, epochs=2, verbose=0)
        return model.get_weights(), history.history

    sharded = run()
    assert shards and {len(s) for s in shards} == {3}
    _close(sharded, _whole(monkeypatch, run), rtol=1e-12)


class _CentredSquared(gpunn.losses.Loss):
    """A user loss whose per-sample values depend on the batch (centred on its mean)."""

    def call(self, y_true, y_pred):
        d = y_pred - y_true
        return ((d - d.mean(axis=0)) ** 2).sum(axis=-1)

    def gradient(self, y_true, y_pred):
        d = y_pred - y_true
        return 2 * (d - d.mean(axis=0))


def test_evaluate_runs_a_user_loss_on_the_callers_batches():
    x, labels, _ = _data()
    y = np.eye(3)[labels]
    model = _mlp(metrics=[], loss=_CentredSquared())
    with gpunn.use_backend("numpy"):
        got = model.evaluate(x, y, batch_size=40, verbose=0)
        pred = model.predict(x, verbose=0)
    # Keras: the loss of each batch of 40, 40 and 21 rows, averaged over the rows
    want = sum(_CentredSquared().call(y[lo : lo + 40], pred[lo : lo + 40]).sum() for lo in range(0, len(x), 40)) / len(x)
    assert got == pytest.approx(want, rel=1e-12)


_NESTED_PREDICT = """
import numpy as np, gpunn
from gpunn import checks
from gpunn.backend import numpy_backend
# what a (1024, 128, 128) image batch does on 2 cores: each 256-row block's input check is
# itself large enough to run on every core, from inside a block
checks._PARALLEL_FINITE_VALUES = 64
numpy_backend._usable_cores = lambda: 2
numpy_backend._BLAS_ONE_THREAD.threads = lambda: 2
model = gpunn.Sequential([gpunn.Input(shape=(8,)), gpunn.layers.Dense(3)])
model.build()
x = np.random.default_rng(0).standard_normal((3000, 8))
np.testing.assert_allclose(model.predict(x, batch_size=256, verbose=0), x.astype(np.float32) @ model.get_weights()[0], rtol=1e-5, atol=1e-5)
x[2500, 3] = np.nan
try:
    model.predict(x, verbose=0)
except ValueError as exc:
    assert "2500" in str(exc), exc
else:
    raise AssertionError("a NaN input was not reported")
print("done")
"""


def test_predict_whose_blocks_check_their_input_on_every_core_does_not_deadlock():
    import subprocess
    import sys

    # in a child process: the deadlock hung the caller forever (a pool worker waiting on a
    # helper queued behind itself)
    done = subprocess.run([sys.executable, "-c", _NESTED_PREDICT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]


def test_an_interrupt_while_waiting_on_the_helpers_returns_only_after_they_stop(monkeypatch):
    """Ctrl-C reaches the caller while a pool thread still runs a block writing into the
    caller's buffers: the caller must not hand those buffers back (to the workspace pool)
    before that block ends."""
    import concurrent.futures
    import threading

    from gpunn.backend import numpy_backend

    started, release, finished = threading.Event(), threading.Event(), []

    def run(i):
        if threading.current_thread().name.startswith("gpunn-rows"):
            started.set()
            release.wait(10)
            finished.append(i)
        else:
            started.wait(10)

    def interrupted(self, timeout=None):
        threading.Timer(0.3, release.set).start()
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures.Future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        numpy_backend._run_blocks(run, 2, 2)
    assert started.is_set() and len(finished) == 1


def test_large_input_checks_keep_to_the_blas_thread_limit(monkeypatch):
    import threading

    from threadpoolctl import threadpool_limits

    from gpunn import checks
    from gpunn.backend import numpy_backend

    monkeypatch.setattr(checks, "_PARALLEL_FINITE_VALUES", 64)
    monkeypatch.setattr(numpy_backend, "_usable_cores", lambda: 2)
    seen = set()
    isfinite = np.isfinite

    def spy(a, *args, **kwargs):
        seen.add(threading.current_thread().name)
        return isfinite(a, *args, **kwargs)

    monkeypatch.setattr(np, "isfinite", spy)
    x = np.ones((400, 8))
    with threadpool_limits(1, user_api="blas"):
        checks.finite(x, "x")
    assert seen == {threading.current_thread().name}


def test_evaluate_in_row_blocks_holds_few_block_sums_at_once(monkeypatch):
    import weakref

    from threadpoolctl import threadpool_limits

    from gpunn.backend import numpy_backend
    from gpunn.training import Trainer

    monkeypatch.setattr(numpy_backend, "_MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(numpy_backend, "_BLOCK_ROWS", 8)
    x, labels, w = _data(rows=400)
    model = _mlp(metrics=["accuracy", gpunn.metrics.AUC(multi_label=True, num_labels=3)])
    with gpunn.use_backend("numpy"):
        want = model.evaluate(x, labels, sample_weight=w, batch_size=400, verbose=0, callbacks=[_PerBatch()], return_dict=True)
        made, alive = [], []
        accumulators = Trainer.accumulators

        def spy(self, *args, **kwargs):
            alive.append(sum(ref() is not None for ref in made))
            acc = accumulators(self, *args, **kwargs)
            made.append(weakref.ref(acc))
            return acc

        monkeypatch.setattr(Trainer, "accumulators", spy)
        got = model.evaluate(x, labels, sample_weight=w, batch_size=400, verbose=0, return_dict=True)
        assert len(made) == 1 + 50  # the call's own, one per block of 8 rows
        made.clear(), alive.clear()
        with threadpool_limits(1, user_api="blas"):  # blocks in order on this thread
            alone = model.evaluate(x, labels, sample_weight=w, batch_size=400, verbose=0, return_dict=True)
    # a block's sums wait only for the blocks before it to finish (before: every block's, to the end)
    assert len(made) == 1 + 50 and max(alive) <= 2
    for logs in (got, alone):
        assert logs.keys() == want.keys()
        for key in logs:
            assert logs[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


class _PerBatch(gpunn.callbacks.Callback):
    """Overrides a per-batch test hook: evaluate then runs the caller's batches, whole."""

    def on_test_batch_end(self, batch, logs=None):
        pass


def test_a_worker_pool_handed_out_stays_usable_when_a_larger_one_replaces_it(monkeypatch):
    """Two threads running row blocks at once with different thread counts (a small and a large
    predict on a many-core machine): one may be handed the pool just before the other grows it."""
    from gpunn.backend import numpy_backend

    monkeypatch.setattr(numpy_backend, "_POOL", [])
    small = numpy_backend._worker_pool(1)
    large = numpy_backend._worker_pool(3)
    assert large is not small and numpy_backend._worker_pool(2) is large
    assert small.submit(lambda: 7).result(timeout=30) == 7


def test_row_blocks_do_not_wait_for_a_pool_busy_with_another_threads_blocks():
    """A training step beside a long predict in another thread: when the pool's workers are all
    busy, the caller runs every block itself and returns without waiting for them."""
    import threading

    from gpunn.backend import numpy_backend

    release = threading.Event()
    pool = numpy_backend._worker_pool(1)
    busy = [pool.submit(release.wait, 60) for _ in range(pool._max_workers)]
    safety = threading.Timer(10, release.set)
    safety.start()
    try:
        done = []
        numpy_backend._run_blocks(done.append, 4, 2)
        assert sorted(done) == [0, 1, 2, 3] and not release.is_set()
    finally:
        release.set()
        safety.cancel()
        for future in busy:
            future.result(timeout=60)
