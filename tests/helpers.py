"""Shared helpers for the core test suite: data, small models, gradients.

Everything here draws from ``np.random.default_rng`` with an explicit seed,
so every test sees fresh, non-trivial, reproducible numbers.
"""

from __future__ import annotations

import numpy as np

import gpunn
from gpunn.backend.numpy_backend import NumpyBackend
from gpunn.layers import Dense


def rng(seed):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------- data
def regression_data(seed, n=64, features=5, outputs=1):
    r = rng(seed)
    x = r.normal(size=(n, features))
    w = r.normal(size=(features, outputs))
    y = np.tanh(x @ w) + 0.1 * r.normal(size=(n, outputs))
    return x, y


def binary_data(seed, n=64, features=5):
    """Linearly separable-ish labels (0/1) of shape (n, 1)."""
    r = rng(seed)
    x = r.normal(size=(n, features))
    w = r.normal(size=features)
    y = (x @ w + 0.3 * r.normal(size=n) > 0).astype(np.float64).reshape(-1, 1)
    return x, y


def multiclass_data(seed, n=64, features=5, classes=3):
    """(x, integer labels of shape (n,)) with classes decided by a random linear map."""
    r = rng(seed)
    x = r.normal(size=(n, features))
    w = r.normal(size=(features, classes))
    labels = (x @ w + 0.3 * r.normal(size=(n, classes))).argmax(axis=1)
    return x, labels


def one_hot(labels, classes):
    out = np.zeros((len(labels), classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


# --------------------------------------------------------------------- models
def mlp(sizes, activation="relu", output_activation="linear", input_dim=None, dtype=None, **dense_kwargs):
    """``Sequential`` of Dense layers with ``sizes`` units (hidden ``activation``, last ``output_activation``)."""
    layers = []
    for i, units in enumerate(sizes):
        last = i == len(sizes) - 1
        kwargs = dict(dense_kwargs)
        if i == 0 and input_dim is not None:
            kwargs["input_dim"] = input_dim
        layers.append(Dense(units, activation=output_activation if last else activation, **kwargs))
    return gpunn.Sequential(layers, dtype=dtype)


def randomize_weights(model, seed, scale=0.6):
    """Replace every weight (biases too, so none sits at 0) with N(0, scale^2) draws."""
    r = rng(seed)
    model.set_weights([scale * r.normal(size=w.shape) for w in model.get_weights()])


def weights_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------ gradients
def analytic_gradient(model, x, y, sample_weight=None):
    """dL/dparams (flat, float64 copy) from the model's real training step.

    The model must be compiled with plain SGD (no momentum, no clipping):
    one ``train_on_batch`` fills ``model.grads`` and moves the parameters by
    exactly ``-lr * grads``; the parameters and the optimizer's step count
    are then put back, so the model is unchanged.
    """
    opt = model.optimizer
    assert isinstance(opt, gpunn.optimizers.SGD) and opt.momentum == 0
    before = model.params.copy()
    iterations = opt.iterations
    model.train_on_batch(x, y, sample_weight=sample_weight)
    grad = model.grads.astype(np.float64)
    rounding = 4 * np.finfo(before.dtype).eps * (np.abs(before).max() + 1)  # of p - lr*g, in the model's dtype
    np.testing.assert_allclose(model.params - before, -opt.learning_rate * grad, rtol=1e-6, atol=rounding)
    model.params[...] = before
    opt.iterations = iterations
    return grad


def numeric_gradient(model, x, y, sample_weight=None, h=1e-6):
    """Central finite differences of ``test_on_batch``'s loss w.r.t. each flat parameter."""
    params = model.params
    grad = np.empty(params.shape[0])
    for i in range(params.shape[0]):
        keep = params[i]
        params[i] = keep + h
        up = model.test_on_batch(x, y, sample_weight=sample_weight)
        params[i] = keep - h
        down = model.test_on_batch(x, y, sample_weight=sample_weight)
        params[i] = keep
        grad[i] = (up - down) / (2 * h)
    return grad


# ------------------------------------------------------------------- backends
def backend_params():
    """pytest params "numpy" and "cuda" (the latter marked simulator, skipped where CUDA cannot run)."""
    import pytest

    from gpunn._cuda import cuda_status

    status = cuda_status()
    yield pytest.param("numpy", id="numpy")
    yield pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.simulator,
            pytest.mark.skipif(not status.usable, reason=f"the CUDA backend cannot run here: {status.reason}"),
        ],
    )


def make_backend(name):
    """A fresh Backend object by name (the CUDA one runs in the simulator without a GPU)."""
    if name == "numpy":
        from gpunn.backend.numpy_backend import NumpyBackend

        return NumpyBackend()
    from gpunn.backend.cuda_backend import CudaBackend

    return CudaBackend()


# ------------------------------------------------------------------ backends
class CountingBackend(NumpyBackend):
    """A NumPy backend that poses as a device (any name but "numpy" takes the device code path)
    and counts its reads back to the host (``to_numpy`` calls) in ``reads``."""

    name = "counting-device"

    def __init__(self):
        super().__init__()
        self.reads = 0

    def to_numpy(self, a):
        self.reads += 1
        return super().to_numpy(a)


def numpy_blas_threads():
    """Thread counts of the BLAS NumPy uses (threadpoolctl's view)."""
    from threadpoolctl import threadpool_info

    infos = [i for i in threadpool_info() if i["user_api"] == "blas"]
    mine = [i for i in infos if "numpy" in i["filepath"]] or infos
    return [i["num_threads"] for i in mine]


def run_in_threads(fn, count):
    """``[fn(0), ..., fn(count - 1)]``, each call on its own thread, the calls released together
    (a barrier) so that they overlap; the first exception a call raised is re-raised here."""
    import threading

    results, errors = [None] * count, []
    barrier = threading.Barrier(count)

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
