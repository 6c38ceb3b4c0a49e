"""Faults lose nothing; gradients are right for random models.

* A non-finite loss stops ``fit`` with NonFiniteLossError naming the epoch
  and batch and suggesting a lower learning rate; the model keeps exactly
  the weights (and optimizer state) it had before the bad batch.
  ``TerminateOnNaN`` keeps Keras's behaviour (no error).
* A GPU out-of-memory error (a fake CuPy ``OutOfMemoryError`` raised by a
  backend allocation) becomes ``DeviceMemoryError`` naming the batch size
  and the bytes requested; the model stays usable with a smaller batch.
* Asking for CUDA where it cannot run raises RuntimeError with the reason.
* Property test (hypothesis): random stacks, activations, losses and shapes
  have gradients that match central finite differences (float64).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import analytic_gradient, numeric_gradient, rng, weights_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpunn
from gpunn import _cuda
from gpunn import backend as backends
from gpunn.callbacks import TerminateOnNaN
from gpunn.layers import Dense
from gpunn.models import DeviceMemoryError, NonFiniteLossError


# ------------------------------------------------------------ non-finite loss
def _diverging(seed=0, lr=0.5):
    gpunn.set_seed(seed)
    model = gpunn.Sequential([Dense(8, activation="relu", input_dim=4), Dense(1)], dtype="float32")
    model.compile(optimizer=gpunn.optimizers.SGD(learning_rate=lr, momentum=0.5), loss="mse")
    r = rng(seed)
    x = r.normal(size=(48, 4)) * 3
    y = r.normal(size=(48, 1)) * 1e3
    return model, x, y


def _reference_stop(seed, batch_size, lr=0.5):
    """State (weights, optimizer slots, step count) fit must keep, and the (epoch, batch) where it
    must stop, by stepping by hand: the newest state whose loss was finite and whose predictions
    on the training data are finite."""
    model, x, y = _diverging(seed, lr)
    n = x.shape[0]
    finite_loss = []  # states whose batch loss was finite
    for epoch in range(50):
        for step, start in enumerate(range(0, n, batch_size)):
            before = (model.get_weights(), {k: v.copy() for k, v in model.optimizer.slots.items()}, model.optimizer.iterations)
            loss = model.train_on_batch(x[start : start + batch_size], y[start : start + batch_size])
            if np.isfinite(loss):
                finite_loss.append(before)
            if not np.isfinite(loss) or not all(np.isfinite(w).all() for w in model.get_weights()):
                for state in reversed(finite_loss):
                    model.set_weights(state[0])
                    if np.isfinite(model.predict(x, verbose=0)).all():
                        return state, epoch, step
                raise AssertionError("no state qualifies")
    raise AssertionError("the reference did not diverge")


@pytest.mark.parametrize("seed, batch_size", [(0, 4), (1, 8), (2, 16)])
def test_non_finite_loss_stops_with_the_last_finite_weights(seed, batch_size):
    (weights, slots, iterations), epoch, step = _reference_stop(seed, batch_size)
    model, x, y = _diverging(seed)
    with pytest.raises(NonFiniteLossError) as info:
        model.fit(x, y, epochs=50, batch_size=batch_size, shuffle=False, verbose=0)
    message = str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert f"epoch {epoch + 1}, batch {step + 1}" in message
    assert "lower learning rate" in message and "0.5" in message
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert weights_equal(model.get_weights(), weights)
    assert model.optimizer.iterations == iterations
    for k, v in slots.items():
        assert np.array_equal(model.optimizer.slots[k], v)
    # the model is consistent and usable: its predictions are finite, and training again
    # from it fails the same way, keeping a state no older than the one it started from
    assert np.isfinite(model.predict(x, verbose=0)).all()
    with pytest.raises(NonFiniteLossError):
        model.fit(x, y, epochs=50, batch_size=batch_size, shuffle=False, verbose=0)
    assert np.isfinite(model.predict(x, verbose=0)).all()
    assert model.optimizer.iterations >= iterations


def test_terminate_on_nan_keeps_keras_behaviour(capsys):
    model, x, y = _diverging(0)
    history = model.fit(x, y, epochs=50, batch_size=4, shuffle=False, verbose=0, callbacks=[TerminateOnNaN()])
    assert model.stop_training
    assert len(history.epoch) < 50
    assert "Invalid loss, terminating training" in capsys.readouterr().out


# ------------------------------------------------------------ GPU out of memory
class OutOfMemoryError(MemoryError):
    """Shaped like cupy.cuda.memory.OutOfMemoryError (size, total, limit)."""

    def __init__(self, size, total, limit=0):
        self._size, self._total, self._limit = size, total, limit
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes).")


OutOfMemoryError.__module__ = "cupy.cuda.memory"


class CudaAPIError(Exception):
    """Shaped like numba.cuda.cudadrv.driver.CudaAPIError."""

    def __init__(self, code, msg):
        self.code, self.msg = code, msg
        super().__init__(code, msg)

    def __str__(self):
        return f"[{self.code}] {self.msg}"


CudaAPIError.__module__ = "numba.cuda.cudadrv.driver"

LIMIT = 4096  # bytes: a (64, 32) float32 buffer fails, an (8, 32) one fits


@pytest.fixture
def tight_memory(monkeypatch):
    """The model's backend raises a CuPy-style OutOfMemoryError for any buffer over LIMIT bytes."""
    gpunn.set_seed(0)
    model = gpunn.Sequential([Dense(32, activation="relu", input_dim=3), Dense(1)], dtype="float32")
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.build()
    backend = model.backend
    real_empty = backend.empty
    failures = []

    def empty(shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > LIMIT:
            failures.append(nbytes)
            raise OutOfMemoryError(nbytes, 123_456_789)
        return real_empty(shape, dtype)

    monkeypatch.setattr(backend, "empty", empty)
    # as on a GPU backend, predict runs batch_size rows at a time (the CPU's own
    # row blocks are sized for its caches, whatever batch_size)
    monkeypatch.setattr(backend, "run_row_blocks", None)
    r = rng(3)
    return model, r.normal(size=(128, 3)), r.normal(size=(128, 1)), failures


CALLS = {
    "fit": lambda m, x, y, bs: m.fit(x, y, batch_size=bs, epochs=1, verbose=0),
    "evaluate": lambda m, x, y, bs: m.evaluate(x, y, batch_size=bs, verbose=0),
    "predict": lambda m, x, y, bs: m.predict(x, batch_size=bs, verbose=0),
    "train_on_batch": lambda m, x, y, bs: m.train_on_batch(x[:bs], y[:bs]),
    "test_on_batch": lambda m, x, y, bs: m.test_on_batch(x[:bs], y[:bs]),
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_gpu_out_of_memory_names_the_batch_and_the_model_stays_usable(tight_memory, method):
    model, x, y, failures = tight_memory
    before = model.get_weights()
    with pytest.raises(DeviceMemoryError) as info:
        CALLS[method](model, x, y, 64)
    message = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert message.startswith(f"{method}: the GPU ran out of memory with batch_size=64")
    assert f"requested {failures[-1]:,} bytes" in message and "123,456,789 bytes already in use" in message
    assert "smaller batch_size (e.g. 16)" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no traceback pinning device memory
    assert model._trainer is None  # the per-batch buffers were dropped
    assert weights_equal(model.get_weights(), before)
    # usable afterwards, with a batch that fits
    CALLS[method](model, x, y, 8)
    assert np.isfinite(model.predict(x, batch_size=8, verbose=0)).all()
    assert np.isfinite(model.evaluate(x, y, batch_size=8, verbose=0)).all()


def test_numba_driver_out_of_memory_is_translated_too(tight_memory, monkeypatch):
    model, x, y, _ = tight_memory

    def empty(shape, dtype):
        raise CudaAPIError(2, "Call to cuMemAlloc results in CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(model.backend, "empty", empty)
    with pytest.raises(DeviceMemoryError, match=r"fit: the GPU ran out of memory with batch_size=32: requested an unknown number of bytes"):
        model.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("error", [RuntimeError("kernel launch failed"), MemoryError("host out of memory"), ValueError("x")])
def test_other_errors_pass_through_unchanged(tight_memory, monkeypatch, error):
    model, x, y, _ = tight_memory

    def empty(shape, dtype):
        raise error

    monkeypatch.setattr(model.backend, "empty", empty)
    with pytest.raises(type(error)) as info:
        model.fit(x, y, epochs=1, verbose=0)
    assert info.value is error


def test_out_of_memory_frees_the_device_memory_pool(monkeypatch):
    from gpunn import device_memory
    from gpunn.backend.cuda_backend import CudaBackend

    freed = []

    class Pool:
        def free_all_blocks(self):
            freed.append(True)

    class FakeXp:
        @staticmethod
        def get_default_memory_pool():
            return Pool()

    # the CUDA backend (as on a GPU, with a stand-in for CuPy) returns its pool's cached blocks
    backend = CudaBackend.__new__(CudaBackend)
    backend._simulator, backend.xp, backend._views = False, FakeXp, {"stale": object()}

    dropped = []
    device_memory.release(backend, lambda: dropped.append(True))
    assert freed == [True] and dropped == [True] and backend._views == {}


def test_explicit_cuda_where_unusable_raises_with_the_reason(monkeypatch):
    reason = "no usable CUDA driver (cudaErrorNoDevice); install an NVIDIA driver and check `nvidia-smi`"
    monkeypatch.setattr(_cuda, "cuda_status", lambda: _cuda.CudaStatus(False, False, reason))
    monkeypatch.setattr(backends, "_instances", {})
    monkeypatch.setattr(backends, "_resolved", None)
    monkeypatch.setattr(backends, "_requested", None)
    with pytest.raises(RuntimeError, match="the 'cuda' backend is unavailable: no usable CUDA driver"):
        gpunn.set_backend("cuda")
    monkeypatch.setenv("GPUNN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cudaErrorNoDevice"):
        gpunn.Sequential([Dense(1, input_dim=2)]).build()
    # "auto" falls back to NumPy, saying why, instead of failing
    monkeypatch.setenv("GPUNN_BACKEND", "auto")
    assert gpunn.set_backend("auto") == "numpy"
    with pytest.raises(ValueError, match="backend: expected one of"):
        gpunn.set_backend("tpu")


# ------------------------------------------------------- gradient property test
HIDDEN = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "linear", "softmax"]
# loss, from_logits, output activation (None: any), targets, minimum outputs
LOSSES = [
    ("mse", False, None, "real", 1),
    ("mae", False, None, "real", 1),
    ("binary_crossentropy", False, "sigmoid", "unit", 1),
    ("binary_crossentropy", True, None, "unit", 1),
    ("categorical_crossentropy", False, "softmax", "soft", 2),
    ("categorical_crossentropy", True, None, "soft", 2),
    ("categorical_crossentropy", False, "sigmoid", "soft", 2),
    ("sparse_categorical_crossentropy", False, "softmax", "labels", 2),
    ("sparse_categorical_crossentropy", True, None, "labels", 2),
    ("sparse_categorical_crossentropy", False, "sigmoid", "labels", 2),
]


@st.composite
def _problems(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 6)) for _ in range(depth)]
    loss, from_logits, out_act, targets, min_out = draw(st.sampled_from(LOSSES))
    widths[-1] = max(widths[-1], min_out)
    acts = [draw(st.sampled_from(HIDDEN)) for _ in range(depth)]
    if out_act is not None:
        acts[-1] = out_act
    return dict(
        input_dim=draw(st.integers(1, 6)),
        widths=widths,
        acts=acts,
        use_bias=[draw(st.booleans()) for _ in range(depth)],
        l2=draw(st.sampled_from([None, 0.01])),
        loss=loss,
        from_logits=from_logits,
        targets=targets,
        batch=draw(st.integers(1, 5)),
        weighted=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
    )


def _targets(kind, r, batch, outputs):
    if kind == "real":
        return r.normal(size=(batch, outputs))
    if kind == "unit":
        return r.uniform(size=(batch, outputs))
    if kind == "soft":
        return r.dirichlet(np.ones(outputs), size=batch)
    return r.integers(0, outputs, size=batch)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=_problems())
def test_random_models_have_gradients_matching_finite_differences(p):
    r = rng(p["seed"])
    layers = []
    for i, (units, act, bias) in enumerate(zip(p["widths"], p["acts"], p["use_bias"])):
        layers.append(
            Dense(
                units,
                activation=act,
                use_bias=bias,
                input_dim=p["input_dim"] if i == 0 else None,
                kernel_regularizer=None if p["l2"] is None else gpunn.regularizers.L2(p["l2"]),
            )
        )
    model = gpunn.Sequential(layers, dtype="float64")
    model.compile(optimizer=gpunn.optimizers.SGD(learning_rate=0.01), loss={"name": p["loss"], "from_logits": p["from_logits"]})
    model.build()
    model.set_weights([0.7 * r.normal(size=w.shape) for w in model.get_weights()])
    x = r.normal(size=(p["batch"], p["input_dim"]))
    y = _targets(p["targets"], r, p["batch"], p["widths"][-1])
    w = r.uniform(0.2, 2.0, size=p["batch"]) if p["weighted"] else None
    numeric = numeric_gradient(model, x, y, sample_weight=w)
    analytic = analytic_gradient(model, x, y, sample_weight=w)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)
