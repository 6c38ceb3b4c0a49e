"""Every gpunn.kernels kernel on a real GPU, on large ragged shapes, against gpunn.backend.numpy_ops.

These are the correctness checks ``benchmarks/gpu_check.py`` runs (``pytest
-m gpu``).  Each check runs in two places:

* ``gpu`` (marked ``gpu``): a real CUDA device, shapes large enough to spread
  over many blocks, none a multiple of a tile (65,537 rows spill one row into
  a new tile); skipped, naming why, where there is no usable GPU;
* ``sim`` (marked ``simulator``): Numba's CUDA simulator on tiny ragged
  shapes and a few representative cases (it runs one Python thread per CUDA
  thread), so the same code is exercised on machines without a GPU.

The reference is ``numpy_ops`` in float64 on the same inputs; every output
buffer starts as NaN, so an element a kernel never writes fails.  The error
bound of a matrix product is relative to the magnitude of its terms
(``|x| @ |w|``), carried through the activation by its derivative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpunn import codes
from gpunn._cuda import cuda_status
from gpunn.backend import numpy_ops

_STATUS = cuda_status()
_REAL_GPU = _STATUS.usable and not _STATUS.simulator

GPU = pytest.param("gpu", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not _REAL_GPU, reason=f"needs a real CUDA GPU, and there is none here: {_STATUS.reason}"),
], id="gpu")  # fmt: skip
SIM = pytest.param("sim", marks=[
    pytest.mark.simulator,
    pytest.mark.skipif(not _STATUS.simulator, reason="runs in Numba's CUDA simulator only (a real GPU runs the large cases)"),
], id="sim")  # fmt: skip

if _STATUS.usable:
    from gpunn import kernels
    from gpunn._cuda import cuda

#: Problem sizes per place: linear (M, K, N) shapes, activation shape, loss rows, optimizer parameters.
SIZES = {
    "gpu": {
        # 65,537 rows: many row tiles, the last holding one row, and a weight gradient summed over all of
        # them; K = 785 and 1000: long reductions.  Modest otherwise: the float64 references run on the host.
        "linear": [(65537, 33, 17), (4099, 785, 255), (1023, 257, 129), (130, 1000, 1)],
        "act": (2053, 1025),
        "loss_rows": 65537,
        "params": 1_000_003,
    },
    "sim": {"linear": [(37, 19, 11)], "act": (7, 5), "loss_rows": 45, "params": 1003},
}

ACTS = list(codes.Act)
LOSSES = list(codes.LossKind)
ALPHA = 0.2  # the one parameter of leaky ReLU and ELU (ignored by the others)


def _cases(values, in_simulator=()):
    """(place, value) parameters: every value on the GPU, those in ``in_simulator`` in the simulator too."""
    out = []
    for v in values:
        out.append(pytest.param(GPU.values[0], v, marks=GPU.marks, id=f"gpu-{_id(v)}"))
        if v in in_simulator:
            out.append(pytest.param(SIM.values[0], v, marks=SIM.marks, id=f"sim-{_id(v)}"))
    return out


def _id(v):
    if isinstance(v, tuple):
        return "-".join(_id(x) for x in v)
    if isinstance(v, type):
        return np.dtype(v).name
    return getattr(v, "name", str(v)).lower()


# --------------------------------------------------------------------------
# Data and comparison
# --------------------------------------------------------------------------


def rand(rng, shape, dtype, scale=1.0):
    """Standard normal data (never exactly zero: a zero could hide an unapplied factor)."""
    a = rng.standard_normal(shape) * scale
    a[a == 0] = 0.5 * scale
    return a.astype(dtype)


def poisoned(shape, dtype):
    return cuda.to_device(np.full(shape, np.nan, dtype=dtype))


def tolerances(dtype):
    """Relative error of a product term, of an elementwise op, and an absolute floor."""
    if np.dtype(dtype) == np.float32:
        return {"gemm": 1e-4, "elem": 1e-5, "abs": 1e-6}
    return {"gemm": 1e-12, "elem": 1e-11, "abs": 1e-13}


def assert_within(got, ref, bound, what):
    """|got - ref| <= bound everywhere, and every element written (finite)."""
    got = np.asarray(got, dtype=np.float64)
    unwritten = ~np.isfinite(got) & np.isfinite(ref)
    assert not unwritten.any(), f"{what}: {int(unwritten.sum())} unwritten or non-finite elements, first at {np.argwhere(unwritten)[:3].tolist()}"
    excess = np.abs(got - ref) / bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess[worst] <= 1, (
        f"{what}: error {abs(got[worst] - ref[worst]):.3e} at {tuple(int(i) for i in worst)} is {excess[worst]:.2f}x "
        f"the bound {bound[worst]:.3e} (got {got[worst]!r}, expected {ref[worst]!r})"
    )


def act_slope(y64, z64, act):
    """|act'| at each element, from the reference's own derivative."""
    return np.abs(numpy_ops.multiply_activation_grad(np.ones_like(y64), y64, z64, act, ALPHA))


# --------------------------------------------------------------------------
# The fused linear layer
# --------------------------------------------------------------------------


def _derivative(z, act):
    y = numpy_ops.apply_activation(z, act, ALPHA, np.empty_like(z))
    return numpy_ops.activation_derivative(y, z, act, ALPHA)


def check_linear_forward(place, act, dtype, bias=True):
    """y against the float64 reference; z, private to the kernels, holds act'(pre-activation)
    for the activations in codes.ACT_KEEPS_Z (see kernels/linear.py)."""
    tol = tolerances(dtype)
    needs_z = act in codes.ACT_KEEPS_Z
    for m, k, n in SIZES[place]["linear"]:
        rng = np.random.default_rng(m + k + n)
        x, w, b = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype, 1 / math.sqrt(k)), rand(rng, (n,), dtype, 0.5)
        y, z = poisoned((m, n), dtype), poisoned((m, n), dtype) if needs_z else None
        kernels.linear_forward(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b) if bias else None, act, ALPHA, y, z)
        x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64) if bias else None
        y_ref, z_ref = np.empty((m, n)), np.empty((m, n))
        numpy_ops.linear_forward(x64, w64, b64, act, ALPHA, y_ref, z_ref)
        magnitude = np.abs(x64) @ np.abs(w64) + (np.abs(b64) if bias else 0)
        z_bound = tol["gemm"] * magnitude + tol["abs"]
        shape = f"{np.dtype(dtype).name} {_id(act)} bias={bias} M={m} K={k} N={n}"
        # the error of z reaches y through the activation's slope anywhere in z's error interval
        # (at a kink, e.g. relu6 at 6, the slope on the far side counts)
        slope = np.maximum.reduce([act_slope(*_shifted(z_ref, dz, act), act) for dz in (-z_bound, 0, z_bound)])
        assert_within(y.copy_to_host(), y_ref, slope * z_bound + tol["elem"] * np.abs(y_ref) + tol["abs"], f"linear_forward y {shape}")
        if needs_z:
            d_ref = _derivative(z_ref, act)
            d_error = np.maximum.reduce([np.abs(_derivative(z_ref + dz, act) - d_ref) for dz in (-z_bound, z_bound)])
            d_bound = d_error + tol["elem"] * np.abs(d_ref) + tol["abs"]
            assert_within(z.copy_to_host(), d_ref, d_bound, f"linear_forward z (stored derivative) {shape}")


def _shifted(z, dz, act):
    """(y, z) of the reference at z + dz."""
    z2 = z + dz
    return numpy_ops.apply_activation(z2, act, ALPHA, np.empty_like(z2)), z2


def check_linear_backward(place, act, dtype, bias=True):
    """From y and the z the forward kernel stores (act'(pre-activation) for codes.ACT_KEEPS_Z)."""
    tol = tolerances(dtype)
    needs_z = act in codes.ACT_KEEPS_Z
    for m, k, n in SIZES[place]["linear"]:
        rng = np.random.default_rng(m + 2 * k + n)
        x, w = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype, 1 / math.sqrt(k))
        z_in = rand(rng, (m, n), dtype)
        y_in = numpy_ops.apply_activation(z_in.astype(np.float64), act, ALPHA, np.empty((m, n))).astype(dtype)
        dy = rand(rng, (m, n), dtype)
        d_x, d_w, d_y, d_yin = (cuda.to_device(a) for a in (x, w, dy, y_in))
        d_z = cuda.to_device(_derivative(z_in.astype(np.float64), act).astype(dtype)) if needs_z else None
        dx, dw, db = poisoned((m, k), dtype), poisoned((k, n), dtype), poisoned((n,), dtype) if bias else None
        kernels.linear_backward_data(d_y, d_w, d_yin, d_z, act, ALPHA, dx)
        kernels.linear_backward_weight(d_x, d_y, d_yin, d_z, act, ALPHA, dw, db)
        f64 = {name: a.astype(np.float64) for name, a in dict(x=x, w=w, dy=dy, y=y_in, z=z_in).items()}
        z64 = f64["z"] if act in codes.ACT_NEEDS_PREACTIVATION else None
        dx_ref, dw_ref, db_ref = np.empty((m, k)), np.empty((k, n)), np.empty(n) if bias else None
        numpy_ops.linear_backward_data(f64["dy"].copy(), f64["w"], f64["y"], z64, act, ALPHA, dx_ref)
        numpy_ops.linear_backward_weight(f64["x"], f64["dy"].copy(), f64["y"], z64, act, ALPHA, dw_ref, db_ref)
        g = np.abs(numpy_ops.multiply_activation_grad(f64["dy"].copy(), f64["y"], z64, act, ALPHA))
        shape = f"{np.dtype(dtype).name} {_id(act)} bias={bias} M={m} K={k} N={n}"
        assert_within(dx.copy_to_host(), dx_ref, tol["gemm"] * (g @ np.abs(f64["w"]).T) + tol["abs"], f"linear_backward_data {shape}")
        batch = max(1.0, math.sqrt(m / 1024))  # the weight gradient sums over the batch
        dw_bound = batch * tol["gemm"] * (np.abs(f64["x"]).T @ g) + tol["abs"]
        assert_within(dw.copy_to_host(), dw_ref, dw_bound, f"linear_backward_weight dw {shape}")
        if bias:
            assert_within(db.copy_to_host(), db_ref, batch * tol["gemm"] * g.sum(axis=0) + tol["abs"], f"linear_backward_weight db {shape}")
        np.testing.assert_array_equal(d_y.copy_to_host(), dy, err_msg=f"the backward kernels must leave dy unchanged ({shape})")


@pytest.mark.parametrize("place, act", _cases(ACTS, in_simulator=(codes.ACT_GELU,)))
def test_linear_forward_float32(place, act):
    check_linear_forward(place, act, np.float32)


@pytest.mark.parametrize("place, act", _cases(ACTS, in_simulator=(codes.ACT_SIGMOID,)))
def test_linear_backward_float32(place, act):
    check_linear_backward(place, act, np.float32)


@pytest.mark.parametrize("place, act", _cases([codes.ACT_RELU, codes.ACT_GELU], in_simulator=(codes.ACT_RELU,)))
def test_linear_float64(place, act):
    check_linear_forward(place, act, np.float64)
    check_linear_backward(place, act, np.float64)


@pytest.mark.parametrize("place", [GPU])
def test_linear_without_bias(place):
    check_linear_forward(place, codes.ACT_RELU, np.float32, bias=False)
    check_linear_backward(place, codes.ACT_RELU, np.float32, bias=False)


# --------------------------------------------------------------------------
# The activation kernel
# --------------------------------------------------------------------------


def check_activation(place, act, dtype, shape):
    tol = tolerances(dtype)
    z = rand(np.random.default_rng(6), shape, dtype, 3.0)
    ref = numpy_ops.apply_activation(z.astype(np.float64), act, ALPHA, np.empty(shape))
    bound = tol["elem"] * np.abs(ref) + tol["abs"]
    y = poisoned(shape, dtype)
    kernels.apply_activation(cuda.to_device(z), act, ALPHA, y)
    assert_within(y.copy_to_host(), ref, bound, f"apply_activation {np.dtype(dtype).name} {_id(act)} {shape}")
    zz = cuda.to_device(z)
    kernels.apply_activation(zz, act, ALPHA, zz)
    assert_within(zz.copy_to_host(), ref, bound, f"apply_activation in place {np.dtype(dtype).name} {_id(act)} {shape}")


@pytest.mark.parametrize("place, act", _cases(ACTS, in_simulator=(codes.ACT_TANH,)))
def test_activation_float32_2d_and_1d(place, act):
    shape = SIZES[place]["act"]
    check_activation(place, act, np.float32, shape)
    check_activation(place, act, np.float32, (shape[1],))


@pytest.mark.parametrize("place", [GPU, SIM])
def test_activation_float64(place):
    check_activation(place, codes.ACT_GELU, np.float64, SIZES[place]["act"])


# --------------------------------------------------------------------------
# The fused loss
# --------------------------------------------------------------------------


#: Huber's delta; the other kinds ignore the parameter.
LOSS_PARAM = {codes.LossKind.HUBER: 0.7}


def loss_inputs(kind, m, dtype):
    """(pred, target) of ``m`` rows as the loss kind expects them."""
    rng = np.random.default_rng(7)
    n = 10 if kind in codes.SPARSE_LOSSES or not kind.elementwise else 3
    labels = rng.integers(0, n, m)
    onehot = np.eye(n, dtype=dtype)[labels]
    if kind in (codes.LOSS_BCE, codes.LOSS_CCE, codes.LOSS_SPARSE_CCE):
        pred = rng.uniform(0.02, 0.98, (m, n)).astype(dtype)
    elif kind in (codes.LossKind.POISSON, codes.LossKind.MSLE, codes.LossKind.KL_DIVERGENCE):
        pred = rng.uniform(0.05, 0.95, (m, n)).astype(dtype)
    else:
        pred = rand(rng, (m, n), dtype, 2.0)
    if kind in codes.SPARSE_LOSSES:
        target = labels.astype(dtype)
    elif kind in (codes.LOSS_SOFTMAX_CCE, codes.LOSS_CCE, codes.LossKind.CATEGORICAL_HINGE):
        target = onehot
    elif kind in (codes.LOSS_SIGMOID_BCE, codes.LOSS_BCE):
        target = (rng.random((m, n)) > 0.5).astype(dtype)
    elif kind in (codes.LossKind.HINGE, codes.LossKind.SQUARED_HINGE):
        target = rng.choice([-1.0, 1.0], (m, n)).astype(dtype)
    elif kind in (codes.LossKind.POISSON, codes.LossKind.MSLE, codes.LossKind.KL_DIVERGENCE):
        target = rng.uniform(0.05, 0.95, (m, n)).astype(dtype)
    elif kind == codes.LossKind.MAPE:  # targets away from zero: the loss divides by them
        target = (rng.choice([-1.0, 1.0], (m, n)) * rng.uniform(0.5, 2.0, (m, n))).astype(dtype)
    else:
        target = rand(rng, (m, n), dtype)
    return pred, target


def check_loss(place, kind, dtype, weighted=True, with_grad=True):
    tol = tolerances(dtype)
    m = SIZES[place]["loss_rows"]
    pred, target = loss_inputs(kind, m, dtype)
    param = LOSS_PARAM.get(kind, 0.0)
    weight = (np.random.default_rng(12).random(m) + 0.5).astype(dtype) if weighted else None
    grad = poisoned(pred.shape, dtype) if with_grad else None
    sums = cuda.to_device(np.array([1.5, 2.5], dtype=dtype))  # the kernel adds to what is there
    kernels.loss_grad(kind, cuda.to_device(pred), cuda.to_device(target), cuda.to_device(weight) if weighted else None, grad, sums, param)
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    ref_grad = np.empty(pred.shape) if with_grad else None
    ref_sums = np.array([1.5, 2.5])
    numpy_ops.loss_grad(kind, f64(pred), f64(target), f64(weight), ref_grad, ref_sums, param)
    what = f"loss_grad {np.dtype(dtype).name} {_id(kind)} weighted={weighted} M={m}"
    if with_grad:
        bound = tol["elem"] * np.abs(ref_grad) + 10 * tol["abs"] * np.abs(ref_grad).max()
        assert_within(grad.copy_to_host(), ref_grad, bound, f"{what} grad")
    limit = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    assert_within(sums.copy_to_host(), ref_sums, limit * np.maximum(np.abs(ref_sums), 1), f"{what} sums")


@pytest.mark.parametrize("place, kind", _cases(LOSSES, in_simulator=(codes.LOSS_SOFTMAX_SPARSE_CCE, codes.LossKind.HUBER)))
def test_loss_float32(place, kind):
    check_loss(place, kind, np.float32)


@pytest.mark.parametrize("place", [GPU, SIM])
def test_loss_unweighted_without_grad_and_float64(place):
    check_loss(place, codes.LOSS_SOFTMAX_SPARSE_CCE, np.float32, weighted=False)
    check_loss(place, codes.LOSS_SOFTMAX_SPARSE_CCE, np.float32, with_grad=False)
    check_loss(place, codes.LOSS_SOFTMAX_SPARSE_CCE, np.float64)


# --------------------------------------------------------------------------
# The optimizers
# --------------------------------------------------------------------------

#: One configuration per optimizer code (and flag) the kernel runs.
OPTIMIZER_CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {}),
    ("adam", {"amsgrad": True}),
    ("adamw", {"weight_decay": 0.05}),
    ("rmsprop", {}),
    ("rmsprop", {"centered": True, "momentum": 0.6}),
    ("nadam", {}),
    ("adagrad", {}),
    ("adadelta", {"learning_rate": 0.5}),
    ("adamax", {}),
    ("lion", {}),
    ("ftrl", {"l1_regularization_strength": 0.01, "l2_regularization_strength": 0.02, "beta": 0.1}),
]


def check_optimizer(place, name, config, dtype, steps=2):
    """``steps`` updates of ``name`` on the device and in numpy_ops (float64) from the same state.

    Each buffer's change is compared, so a small error in a small update is
    not hidden by the buffer's magnitude; the result's own rounding is the
    floor, and where the update itself is ill-conditioned in the data's dtype
    (FTRL's difference of square roots) the bound widens by 16x the farthest
    numpy_ops in that dtype lands from float64.
    """
    from gpunn import optimizers
    from gpunn.backend.numpy_backend import NumpyBackend

    tol = tolerances(dtype)
    size = SIZES[place]["params"]
    optimizer = optimizers.get({"name": name, "learning_rate": 0.05, **config})
    optimizer.build(NumpyBackend(), size, dtype)  # the state's layout and initial values
    rng = np.random.default_rng(13)
    params = rand(rng, (size,), dtype)
    state = optimizer.state.copy()
    state += rng.uniform(0.05, 0.5, state.shape).astype(dtype)  # non-trivial state (second moments positive)
    if "average_gradient" in optimizer.slots:
        state[1] *= 0.3  # the centered form needs v - a^2 > 0
    slot_rows = {slot: optimizer.code.slots.index(slot) for slot in optimizer.slots}
    params_ref = params.astype(np.float64)
    slots_ref = {slot: state[row].astype(np.float64) for slot, row in slot_rows.items()}
    params_low, slots_low = params.copy(), {slot: state[row].copy() for slot, row in slot_rows.items()}
    d_params, d_state = cuda.to_device(params), cuda.to_device(state)
    for step in range(1, steps + 1):
        grads = rand(rng, (size,), dtype, 0.1)
        optimizer.iterations = step - 1
        kernels.optimizer_update(optimizer.code, d_params, cuda.to_device(grads), d_state, optimizer.step_scalars())
        numpy_ops.optimizer_step(name, params_ref, grads.astype(np.float64), slots_ref, optimizer.learning_rate, step, optimizer.get_config())
        numpy_ops.optimizer_step(name, params_low, grads, slots_low, optimizer.learning_rate, step, optimizer.get_config())
    eps = np.finfo(dtype).eps
    got_state = d_state.copy_to_host()
    pairs = [("params", params, d_params.copy_to_host(), params_ref, params_low)]
    pairs += [(slot, state[row], got_state[row], slots_ref[slot], slots_low[slot]) for slot, row in slot_rows.items()]
    for label, before, got, ref, low in pairs:
        before = before.astype(np.float64)
        change = ref - before
        bound = steps * (tol["elem"] * np.abs(change) + 2 * eps * np.abs(ref)) + tol["abs"] * 1e-3
        bound += 16 * np.abs(low.astype(np.float64) - ref).max()
        assert_within(got.astype(np.float64) - before, change, bound, f"{name} {config} {label} {np.dtype(dtype).name} P={size}")


@pytest.mark.parametrize(
    "place, case",
    _cases([(n, tuple(c.items())) for n, c in OPTIMIZER_CASES], in_simulator=(("adam", ()), ("ftrl", tuple(OPTIMIZER_CASES[-1][1].items())))),
)
def test_optimizer_float32(place, case):
    name, config = case
    check_optimizer(place, name, dict(config), np.float32)


@pytest.mark.parametrize("place", [GPU, SIM])
def test_optimizer_float64(place):
    check_optimizer(place, "adam", {}, np.float64)
