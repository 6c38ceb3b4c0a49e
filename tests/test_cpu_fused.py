"""The NumPy backend's compiled epilogues against the plain NumPy reference (numpy_ops)."""

import numpy as np
import pytest

from gpunn import codes
from gpunn.backend import numpy_ops as reference
from gpunn.backend.numpy_backend import NumpyBackend

BACKEND = NumpyBackend()
DTYPES = [np.float32, np.float64]
ACTS = list(codes.Act)


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_backward_match_reference(dtype, act, bias):
    rng = np.random.default_rng(100 + act * 2 + bias)
    m, k, n = 5, 7, 3
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    needs_z = act in codes.ACT_NEEDS_PREACTIVATION
    results = []
    for impl in (reference, BACKEND):
        y, z = poisoned((m, n), dtype), poisoned((m, n), dtype) if needs_z else None
        impl.linear_forward(x, w, b, act, 0.1, y, z)
        results.append((y, z))
    (y_ref, z_ref), (y_fast, z_fast) = results
    np.testing.assert_allclose(y_fast, y_ref, **tolerance(dtype))
    if needs_z:
        np.testing.assert_allclose(z_fast, z_ref, **tolerance(dtype))

    dy = rng.standard_normal((m, n)).astype(dtype)
    grads = []
    for impl in (reference, BACKEND):
        dx, dw, db = poisoned((m, k), dtype), poisoned((k, n), dtype), poisoned(n, dtype) if bias else None
        impl.linear_backward(x, w, dy.copy(), y_ref, z_ref, act, 0.1, dx, dw, db)
        grads.append((dx, dw, db))
    for got, want in zip(grads[1], grads[0]):
        if want is not None:
            np.testing.assert_allclose(got, want, **tolerance(dtype))


def _loss_inputs(kind, rng, m, n, dtype):
    if kind in (codes.LOSS_BCE, codes.LOSS_CCE, codes.LOSS_SPARSE_CCE):
        pred = rng.uniform(0.02, 0.98, (m, n)).astype(dtype)
    else:
        pred = rng.standard_normal((m, n)).astype(dtype)
    if kind in codes.SPARSE_LOSSES:
        target = rng.integers(0, n, m).astype(dtype)
    elif kind in (codes.LOSS_SOFTMAX_CCE, codes.LOSS_CCE):
        target = rng.dirichlet(np.ones(n), m).astype(dtype)
    else:
        target = rng.uniform(0, 1, (m, n)).astype(dtype)
    return pred, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", range(8))
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_grad_matches_reference(dtype, kind, weighted):
    rng = np.random.default_rng(200 + kind * 2 + weighted)
    m, n = 6, 4
    pred, target = _loss_inputs(kind, rng, m, n, dtype)
    weight = rng.uniform(0.5, 2.0, m).astype(dtype) if weighted else None
    out = []
    for impl in (reference, BACKEND):
        grad, sums = poisoned((m, n), dtype), np.array([0.5, 0.25], dtype)
        impl.loss_grad(kind, pred, target, weight, grad, sums)
        out.append((grad, sums))
    np.testing.assert_allclose(out[1][0], out[0][0], **tolerance(dtype))
    np.testing.assert_allclose(out[1][1], out[0][1], **tolerance(dtype))
    # without a gradient buffer only the sums change
    sums = np.array([0.5, 0.25], dtype)
    BACKEND.loss_grad(kind, pred, target, weight, None, sums)
    np.testing.assert_allclose(sums, out[0][1], **tolerance(dtype))


OPTIMIZER_CASES = {
    "sgd": ("sgd", {}),
    "sgd_momentum": ("sgd", {"momentum": 0.9}),
    "sgd_nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
    "adam": ("adam", {"learning_rate": 0.01}),
    "adamw_amsgrad": ("adamw", {"learning_rate": 0.01, "amsgrad": True}),
    "rmsprop_centered_momentum": ("rmsprop", {"learning_rate": 0.01, "centered": True, "momentum": 0.5}),
    "nadam": ("nadam", {"learning_rate": 0.01}),
    "adagrad": ("adagrad", {"learning_rate": 0.01}),
    "adadelta": ("adadelta", {"learning_rate": 1.0}),
    "adamax": ("adamax", {"learning_rate": 0.01}),
    "lion": ("lion", {"learning_rate": 0.01}),
    "ftrl": ("ftrl", {"learning_rate": 0.1, "l1_regularization_strength": 0.001}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
@pytest.mark.parametrize("size", [37, 70_001])
def test_optimizer_updates_match_reference(dtype, case, size):
    """The compiled optimizer pass against numpy_ops.optimizer_step, 3 steps, small and large buffers."""
    from gpunn import optimizers

    name, config = OPTIMIZER_CASES[case]
    optimizer = optimizers.get({"name": name, **config})
    optimizer.build(BACKEND, size, dtype)
    rng = np.random.default_rng(300)
    params = rng.standard_normal(size).astype(dtype)
    expected = params.copy()
    slots = {k: v.copy() for k, v in optimizer.slots.items()}
    for step in range(1, 4):
        grads = rng.standard_normal(size).astype(dtype)
        reference.optimizer_step(name, expected, grads, slots, optimizer.learning_rate, step, optimizer.get_config())
        optimizer.apply(params, grads, [(0, size)])
    np.testing.assert_allclose(params, expected, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)
    for slot, value in slots.items():
        np.testing.assert_allclose(optimizer.slots[slot], value, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)


def test_compiled_passes_are_looked_up_by_layout_and_writability():
    """Each array layout (C, F, strided) and read-only input gets its own compiled version:
    a version compiled for one layout must never be handed an array of another."""
    from gpunn.backend import cpu_fused

    rng = np.random.default_rng(7)
    base = rng.standard_normal((6, 10)).astype(np.float32)
    readonly = base.copy()
    readonly.flags.writeable = False
    inputs = [base, np.asfortranarray(base), base[:, ::2], base.T, readonly]
    for z in inputs:
        want = poisoned(z.shape, np.float32)
        reference.apply_activation(np.array(z), codes.Act.TANH, 0.0, want)
        got = poisoned(z.shape, np.float32)
        cpu_fused.apply_activation(z, codes.Act.TANH, np.float32(0), got)
        np.testing.assert_allclose(got, want, **tolerance(np.float32))
    z = base[:, ::2]
    cpu_fused.apply_activation(np.asfortranarray(base[:, :5]), codes.Act.RELU, np.float32(0), poisoned((6, 5), np.float32))
    got = poisoned(z.shape, np.float32)
    cpu_fused.apply_activation(z, codes.Act.RELU, np.float32(0), got)  # strided after F: not the F version
    np.testing.assert_array_equal(got, np.maximum(z, 0))
