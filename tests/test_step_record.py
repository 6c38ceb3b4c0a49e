"""Device-resident per-step values (StepRecord), the offset gather, and whole-step CUDA graphs.

The eager path -- kernels reading the step's scalars and batch offset from a
device array the host fills once per step -- runs here on both backends (the
CUDA one in the simulator).  Graph capture needs a GPU: the only GPU-only test
checks that replaying the captured step gives the same weights as eager
launches.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import backend_params, make_backend

import gpunn
from gpunn import opmath
from gpunn._cuda import cuda_status
from gpunn.backend import numpy_ops
from gpunn.training import StepRecord

DTYPES = (np.float32, np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("backend_name", list(backend_params()))
def test_gather_rows_matches_reference(backend_name, dtype):
    """Ragged rows and columns, offsets inside and partly outside the order, indices outside src."""
    backend = make_backend(backend_name)
    rng = np.random.default_rng(7)
    src = rng.standard_normal((53, 7)).astype(dtype)
    order = rng.permutation(53).astype(np.int64)
    order[5] = 99  # an index outside src: that row comes out NaN
    expected = {}
    for start, rows in ((0, 13), (17, 13), (45, 13), (-3, 5)):
        offset = np.array([start], np.int64)
        out = backend.asarray(np.full((rows, 7), np.nan, dtype))  # poisoned
        backend.gather_rows(backend.asarray(src), backend.asarray(order), backend.asarray(offset), out)
        expected[start] = numpy_ops.gather_rows(src, order, offset, np.zeros((rows, 7), dtype))
        np.testing.assert_array_equal(backend.to_numpy(out), expected[start])
    positions = 45 + np.arange(13)
    assert np.isnan(expected[45][positions >= 53]).all() and not np.isnan(expected[45][positions < 53]).any()
    assert np.isnan(expected[0][5]).all() and np.isnan(expected[-3][:3]).all() and not np.isnan(expected[-3][3:]).any()
    # 1-D sources (sparse targets, sample weights)
    out = backend.asarray(np.full(11, np.nan, dtype))
    backend.gather_rows(backend.asarray(src[:, 0].copy()), backend.asarray(order), backend.asarray(np.array([6], np.int64)), out)
    np.testing.assert_array_equal(backend.to_numpy(out), src[order[6:17], 0])


def test_gather_rows_reference_by_hand():
    src = np.arange(12.0).reshape(4, 3)
    out = np.empty((3, 3))
    numpy_ops.gather_rows(src, np.array([3, 0, 2, 1]), np.array([1]), out)
    np.testing.assert_array_equal(out, src[[0, 2, 1]])
    numpy_ops.gather_rows(src, np.array([3, 0, 2, 7]), np.array([2]), out)
    np.testing.assert_array_equal(out[0], src[2])
    assert np.isnan(out[1:]).all()  # index 7 and position 4 are outside


def test_gather_kernel_rejects_bad_arguments():
    from gpunn import kernels

    f = np.ones((4, 3), np.float32)
    offset = np.zeros(1, np.int64)
    order = np.arange(4)
    with pytest.raises(ValueError, match="out"):
        kernels.gather_rows(f, order, offset, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="out"):
        kernels.gather_rows(f, order, offset, np.ones((2, 3), np.float64))
    with pytest.raises(ValueError, match="order"):
        kernels.gather_rows(f, order.astype(np.float32), offset, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="offset"):
        kernels.gather_rows(f, order, np.zeros(2, np.int64), np.ones((2, 3), np.float32))


@pytest.mark.parametrize("backend_name", list(backend_params()))
def test_step_record_holds_the_step_values(backend_name):
    backend = make_backend(backend_name)
    record = StepRecord(backend, np.float32)
    hyper = (0.5, 1e-3, 0.1, 0.001, 1e-7, 0.0, 0.0, 0.0)
    record.fill(41, hyper, offset=128)
    assert record.step.shape == (1,) and record.step.dtype == np.int64
    assert int(backend.to_numpy(record.step)[0]) == 41 and int(backend.to_numpy(record.offset)[0]) == 128
    np.testing.assert_array_equal(backend.to_numpy(record.hyper), np.asarray(hyper, np.float32))
    assert record.hyper.shape == (opmath.OPTIMIZER_SCALARS,)
    record.fill(42, hyper)  # views stay views of the one buffer
    assert int(backend.to_numpy(record.buffer[0:8].view(np.int64))[0]) == 42


def _model(dtype="float32", optimizer=None, dropout=False):
    gpunn.utils.set_random_seed(3)
    layers = [gpunn.layers.Input((5,)), gpunn.layers.Dense(9, activation="tanh"), gpunn.layers.Dense(3)]
    model = gpunn.Sequential(layers, dtype=dtype)
    schedule = gpunn.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    model.compile(optimizer=optimizer or gpunn.optimizers.Adam(schedule), loss=gpunn.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(n=40):
    rng = np.random.default_rng(11)
    return rng.standard_normal((n, 5)).astype(np.float32), (np.arange(n) % 3).astype(np.float32)


@pytest.mark.parametrize("backend_name", list(backend_params()))
def test_run_rows_equals_load_rows_then_run(backend_name):
    """The device-offset gather trains exactly as the host-index gather, with a schedule."""
    x, y = _data()
    order = np.random.default_rng(2).permutation(40)
    weights = np.linspace(0.5, 1.5, 40).astype(np.float32)
    with gpunn.use_backend(backend_name):
        a, b = _model(), _model()
        step_a, step_b = a.make_train_step(7), b.make_train_step(7)
        xa, ya, wa = (a.backend.asarray(v) for v in (x, y, weights))
        step_b.bind_rows(xa, ya, order, sample_weight=wa)
        for start in (0, 7, 33, 14):
            step_a.load_rows(xa, ya, a.backend.asarray(order[start : start + 7]), sample_weight=wa)
            step_a.run()
            step_b.run_rows(start)
        np.testing.assert_array_equal(a.get_weights()[0], b.get_weights()[0])
        for wa_, wb_ in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa_, wb_)
        assert step_a.logs() == step_b.logs()
        assert a.optimizer.iterations == b.optimizer.iterations == 4
        assert int(b.backend.to_numpy(step_b.record.step)[0]) == 3  # the last step's number


@pytest.mark.parametrize("backend_name", list(backend_params()))
def test_train_step_matches_fit_with_the_record(backend_name):
    """fit (the trainer's own record) and a TrainStep (its own) give the same weights."""
    x, y = _data(21)
    with gpunn.use_backend(backend_name):
        a, b = _model(optimizer=gpunn.optimizers.RMSprop(0.01, momentum=0.5)), _model(optimizer=gpunn.optimizers.RMSprop(0.01, momentum=0.5))
        a.fit(x, y, batch_size=7, epochs=1, shuffle=False, verbose=0)
        step = b.make_train_step(7)
        for start in range(0, 21, 7):
            step.load(x[start : start + 7], y[start : start + 7])
            step.run()
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-7)


def test_run_rows_checks_its_arguments():
    x, y = _data()
    with gpunn.use_backend("numpy"):
        model = _model()
        step = model.make_train_step(8)
        with pytest.raises(RuntimeError, match="bind_rows"):
            step.run_rows(0)
        with pytest.raises(ValueError, match="order"):
            step.bind_rows(x, y, np.array([0, 40]))
        with pytest.raises(ValueError, match="order"):
            step.bind_rows(x, y, np.array([0.0, 1.0]))
        with pytest.raises(ValueError, match="X"):
            step.bind_rows(x[:, :4], y, np.arange(40))
        with pytest.raises(ValueError, match="sample_weight"):
            step.bind_rows(x, y, np.arange(40), sample_weight=np.ones(3, np.float32))
        step.bind_rows(x, y, np.arange(40))
        with pytest.raises(ValueError, match="start"):
            step.run_rows(33)
        with pytest.raises(ValueError, match="start"):
            step.run_rows(-1)


def test_graph_switch_is_checked():
    with gpunn.use_backend("numpy"):
        model = _model()
        with pytest.raises(ValueError, match="graph: CUDA graphs are unavailable here: the model's backend is 'numpy'"):
            model.make_train_step(8, graph=True)
        for bad in ("yes", 0, 1, None):
            with pytest.raises(ValueError, match="graph: expected True, False or 'auto'"):
                model.make_train_step(8, graph=bad)
        assert model.make_train_step(8, graph="auto").graph is False
        assert model.make_train_step(8).graph is False
        with pytest.raises(ValueError, match="stand-in backend"):
            model.make_train_step(8, backend=model.backend, graph=True)


@pytest.mark.simulator
@pytest.mark.skipif(not cuda_status().simulator, reason="checks the simulator's refusal (this machine has a GPU)")
def test_graphs_are_refused_in_the_simulator_and_auto_runs_eager():
    x, y = _data(16)
    with gpunn.use_backend("cuda"):
        model = _model()
        with pytest.raises(ValueError, match="simulator"):
            model.make_train_step(8, graph=True)
        step = model.make_train_step(8, graph="auto")
        assert step.graph is False
        step.load(x[:8], y[:8])
        step.run()
        step.run()
        assert model.optimizer.iterations == 2


def _gpu_ready():
    status = cuda_status()
    return status.usable and not status.simulator


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason=f"needs a CUDA GPU (CUDA graphs cannot be captured here: {cuda_status().reason})")
def test_graph_replay_gives_the_same_weights_as_eager_launches():
    """Adam with an exponential-decay schedule, no dropout: 6 steps of graph replay (after the
    warm-up run and the capture) against the same steps with eager launches, both feeding
    batches through the device-offset gather (run_rows) and through load + run."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((96, 5)).astype(np.float32)
    y = (np.arange(96) % 3).astype(np.float32)
    order = rng.permutation(96)
    with gpunn.use_backend("cuda"):
        eager, graphed = _model(), _model()
        steps = {"eager": eager.make_train_step(16), "graph": graphed.make_train_step(16, graph=True)}
        assert steps["graph"].graph is True
        for model, step in zip((eager, graphed), steps.values()):
            xs, ys = model.backend.asarray(x), model.backend.asarray(y)
            step.bind_rows(xs, ys, order)
            for start in (0, 16, 32, 48, 64, 80, 0, 16):
                step.run_rows(start)
            for start in (0, 16, 32):
                step.load(x[start : start + 16], y[start : start + 16])
                step.run()
        assert steps["graph"].graph is True  # captured, not fallen back
        assert len([g for g in steps["graph"]._graphs.values() if g is not None]) == 2
        for we, wg in zip(eager.get_weights(), graphed.get_weights()):
            np.testing.assert_allclose(wg, we, rtol=2e-6, atol=1e-7)
        le, lg = steps["eager"].logs(), steps["graph"].logs()
        assert le.keys() == lg.keys() and all(abs(le[k] - lg[k]) <= 1e-5 * max(1.0, abs(le[k])) for k in le)
        assert eager.optimizer.iterations == graphed.optimizer.iterations == 11


# -- the graph bookkeeping, without a GPU: a stand-in capture with a graph's semantics -----------

_STEP_CALLS = ("gather_rows", "linear_forward", "linear_backward", "loss_grad", "optimizer_update", "softmax", "softmax_backward", "dropout")


class _Replay:
    """A "graph" of recorded backend calls: each replay runs them again with the very arguments
    they were captured with -- host scalars frozen, arrays read as they are at replay time."""

    def __init__(self, calls):
        self.calls = calls
        self.launches = 0

    def launch(self):
        self.launches += 1
        for method, args, kwargs in self.calls:
            method(*args, **kwargs)


def _stand_in_capture(monkeypatch, backend, fail=False):
    import contextlib

    import gpunn._cuda
    import gpunn.training

    graphs = []

    def capture_graph(body, pool):
        if fail:
            raise gpunn._cuda.GraphCaptureError("stand-in failure")
        calls = []
        originals = {name: getattr(backend, name) for name in _STEP_CALLS}
        for name in _STEP_CALLS:
            setattr(backend, name, lambda *a, _m=originals[name], **k: calls.append((_m, a, k)))
        try:
            body()
        finally:
            for name in _STEP_CALLS:
                delattr(backend, name)
        graphs.append(_Replay(calls))
        return graphs[-1]

    monkeypatch.setattr(gpunn.training, "_graph_mode", lambda graph, model_backend, stand_in: graph is True)
    monkeypatch.setattr(gpunn._cuda, "capture_graph", capture_graph)
    monkeypatch.setattr(gpunn._cuda, "graph_pool", lambda: None)
    monkeypatch.setattr(gpunn._cuda, "graph_memory", lambda pool: contextlib.nullcontext())
    return graphs


def _eager_and_graphed(run_both):
    with gpunn.use_backend("numpy"):
        eager, graphed = _model(), _model()
        run_both(eager, eager.make_train_step(8), graphed, graphed.make_train_step(8, graph=True))
    return eager, graphed


def test_replayed_steps_read_every_per_step_value_from_the_record(monkeypatch):
    """Replays with frozen host arguments (what a CUDA graph does) give the eager weights bit for
    bit: the schedule's learning rate, Adam's bias corrections and the batch start all change at
    every step and reach the kernels only through the record."""
    x, y = _data()
    order = np.random.default_rng(4).permutation(40)
    graphs = _stand_in_capture(monkeypatch, gpunn.backend.current())

    def run_both(eager, eager_step, graphed, graph_step):
        for model, step in ((eager, eager_step), (graphed, graph_step)):
            step.bind_rows(model.backend.asarray(x), model.backend.asarray(y), order)
            for start in (0, 8, 16, 24, 32, 8):
                step.run_rows(start)
            for start in (0, 8, 16):
                step.load(x[start : start + 8], y[start : start + 8])
                step.run()

    eager, graphed = _eager_and_graphed(run_both)
    assert len(graphs) == 2 and [g.launches for g in graphs] == [5, 2]  # warm-up, capture + launch, replays
    assert {m.__name__ for g in graphs for m, _, _ in g.calls} >= {"gather_rows", "linear_forward", "linear_backward", "loss_grad", "optimizer_update"}
    for we, wg in zip(eager.get_weights(), graphed.get_weights()):
        np.testing.assert_array_equal(wg, we)
    assert eager.optimizer.iterations == graphed.optimizer.iterations == 9


def test_failed_capture_warns_once_and_runs_eager(monkeypatch):
    x, y = _data(24)
    _stand_in_capture(monkeypatch, gpunn.backend.current(), fail=True)

    def run_both(eager, eager_step, graphed, graph_step):
        for step in (eager_step, graph_step):
            step.load(x[:8], y[:8])
            if step is graph_step:
                step.run()
                with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph .*stand-in failure"):
                    step.run()
                assert step.graph is False
                step.run()
            else:
                for _ in range(3):
                    step.run()

    eager, graphed = _eager_and_graphed(run_both)
    for we, wg in zip(eager.get_weights(), graphed.get_weights()):
        np.testing.assert_array_equal(wg, we)
    assert eager.optimizer.iterations == graphed.optimizer.iterations == 3


def test_dropout_masks_follow_the_step_record_in_replays(monkeypatch):
    """Dropout's Philox mask is keyed by the record's device step: replays draw each step's own
    masks, folded into the Dense before it or on its own (after the input), as eager steps do."""
    x, y = _data(16)
    graphs = _stand_in_capture(monkeypatch, gpunn.backend.current())
    with gpunn.use_backend("numpy"):
        weights = []
        for graph in (False, True):
            gpunn.utils.set_random_seed(9)
            model = gpunn.Sequential([gpunn.layers.Input((5,)), gpunn.layers.Dropout(0.2), gpunn.layers.Dense(6), gpunn.layers.Dropout(0.3), gpunn.layers.Dense(3)])
            model.compile(optimizer="adam", loss=gpunn.losses.SparseCategoricalCrossentropy(from_logits=True))
            step = model.make_train_step(8, graph=graph)
            for start in (0, 8, 0, 8, 0):
                step.load(x[start : start + 8], y[start : start + 8])
                step.run()
            weights.append(model.get_weights())
    assert len(graphs) == 1  # captured once, replayed three times
    for we, wg in zip(*weights):
        np.testing.assert_array_equal(wg, we)


def test_layers_with_host_keyed_draws_are_not_captured(monkeypatch):
    """GaussianNoise draws from a generator keyed on the host: a graph would replay one draw, so
    the step refuses to capture (warning) and trains eagerly, like an eager step."""
    x, y = _data(16)
    graphs = _stand_in_capture(monkeypatch, gpunn.backend.current())
    with gpunn.use_backend("numpy"):
        weights = []
        for graph in (False, True):
            gpunn.utils.set_random_seed(9)
            model = gpunn.Sequential([gpunn.layers.Input((5,)), gpunn.layers.Dense(6), gpunn.layers.Dropout(0.3), gpunn.layers.GaussianNoise(0.1), gpunn.layers.Dense(3)])
            model.compile(optimizer="adam", loss=gpunn.losses.SparseCategoricalCrossentropy(from_logits=True))
            step = model.make_train_step(8, graph=graph)
            step.load(x[:8], y[:8])
            step.run()
            if graph:
                with pytest.warns(RuntimeWarning, match=r"gaussian_noise(_\d+)? draw per-step random numbers"):
                    step.run()
            else:
                step.run()
            step.run()
            weights.append(model.get_weights())
    assert not graphs
    for we, wg in zip(*weights):
        np.testing.assert_array_equal(wg, we)
