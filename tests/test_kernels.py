"""gpunn.kernels against their NumPy references in gpunn.backend.numpy_ops.

Runs in Numba's CUDA simulator where there is no GPU (tests/conftest.py
switches it on), which executes one Python thread per CUDA thread: shapes
stay tiny, but are chosen ragged (never multiples of the tile sizes, a
dimension of 1, a reduction longer than one K-tile, more than one block per
grid dimension) so that every guard and every tile edge is exercised.

Every output is poisoned with NaN before the launch so that an element a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpunn import codes
from gpunn._cuda import cuda_status
from gpunn.backend import numpy_ops
from gpunn.random import DropoutSpec

_STATUS = cuda_status()

pytestmark = [
    pytest.mark.simulator,
    pytest.mark.skipif(
        not _STATUS.usable, reason=f"neither Numba's CUDA simulator nor a usable GPU: {_STATUS.reason}"
    ),
]

if _STATUS.usable:
    from gpunn import kernels
    from gpunn.kernels import linear as linear_mod

ACTS = list(codes.Act)
ACT_IDS = [act.math_name for act in ACTS]
DTYPES = [np.float32, np.float64]
ALPHA = 0.15  # leaky ReLU's slope and ELU's alpha (ignored by the other activations)


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------


def tolerance(dtype, reduction=1):
    """rtol/atol for comparing a kernel against NumPy, loosened by the reduction length."""
    if np.dtype(dtype) == np.float64:
        return {"rtol": 1e-11, "atol": 1e-12 * max(reduction, 1)}
    return {"rtol": 2e-5, "atol": 2e-6 * max(reduction, 1)}


def rand(rng, shape, dtype, low=-1.5, high=1.5):
    """Random data with no zeros (a zero could hide an unapplied factor)."""
    a = rng.uniform(low, high, size=shape)
    a[a == 0] = 0.5
    return a.astype(dtype)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def assert_close(actual, expected, dtype, reduction=1, what=""):
    assert not np.isnan(actual).any(), f"{what}: unwritten (NaN) elements at {np.argwhere(np.isnan(actual))[:5].tolist()}"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tolerance(dtype, reduction))


def dropout_spec(dropout, step=3):
    """None, or a DropoutSpec of ``rate = dropout`` at training step ``step`` (host step array)."""
    if dropout is None:
        return None
    return DropoutSpec(dropout, 12345, np.array([step], np.int64))


def z_buffer(act, dropout, shape, dtype):
    """A NaN-poisoned z when the kernels need one, else None."""
    return poisoned(shape, dtype) if act in codes.ACT_KEEPS_Z or dropout is not None else None


def linear_inputs(seed, m, k, n, act, dtype, dropout=None):
    """x, w, b, dy and the reference forward's y, z (the pre-activation) for one layer."""
    rng = np.random.default_rng(seed)
    x = rand(rng, (m, k), dtype)
    w = rand(rng, (k, n), dtype, -1 / np.sqrt(k), 1 / np.sqrt(k))
    b = rand(rng, (n,), dtype)
    dy = rand(rng, (m, n), dtype)
    y = np.empty((m, n), dtype)
    z = np.empty((m, n), dtype) if act in codes.ACT_KEEPS_Z or dropout is not None else None
    numpy_ops.linear_forward(x, w, b, act, ALPHA, y, z, dropout_spec(dropout))
    return x, w, b, dy, y, z


def check_forward(m, k, n, act, dtype, bias, seed, tile=None, dropout=None):
    """y against the reference; z (private to the kernels) holds act'(z) (times the mask) where stored."""
    spec = dropout_spec(dropout)
    x, w, b, _, y_ref, z_ref = linear_inputs(seed, m, k, n, act, dtype, dropout)
    b = b if bias else None
    if not bias:
        y_ref = np.empty_like(y_ref)
        numpy_ops.linear_forward(x, w, None, act, ALPHA, y_ref, z_ref, spec)
    y = poisoned((m, n), dtype)
    z = z_buffer(act, dropout, (m, n), dtype)
    kernels.linear_forward(x, w, b, act, ALPHA, y, z, spec, tile=tile)
    assert_close(y, y_ref, dtype, k, "y")
    if linear_mod.stores_derivative(act, spec):
        stored = numpy_ops.activation_derivative(y_ref, z_ref, act, ALPHA)
        if spec is not None:
            stored = stored * numpy_ops.dropout_mask(spec, (m, n), dtype)
            # dropped elements are exactly 0 in both outputs
            dropped = ~numpy_ops.dropout_keep(spec, (m, n))
            assert (y[dropped] == 0).all() and (z[dropped] == 0).all()
        assert_close(z, stored, dtype, k, "z (stored derivative)")


def check_backward(m, k, n, act, dtype, bias, seed, tile=None, dropout=None):
    """Gradients from the kernels' own forward (y, z) against the reference's."""
    spec = dropout_spec(dropout)
    x, w, b, dy, y_ref, z_ref = linear_inputs(seed, m, k, n, act, dtype, dropout)
    dy_before = dy.copy()
    dx_ref, dw_ref = np.empty((m, k), dtype), np.empty((k, n), dtype)
    db_ref = np.empty(n, dtype) if bias else None
    numpy_ops.linear_backward_data(dy, w, y_ref, z_ref, act, ALPHA, dx_ref, spec)
    numpy_ops.linear_backward_weight(x, dy, y_ref, z_ref, act, ALPHA, dw_ref, db_ref, spec)

    y, z = poisoned((m, n), dtype), z_buffer(act, dropout, (m, n), dtype)
    kernels.linear_forward(x, w, b, act, ALPHA, y, z, spec, tile=tile)
    dx, dw = poisoned((m, k), dtype), poisoned((k, n), dtype)
    db = poisoned(n, dtype) if bias else None
    kernels.linear_backward_data(dy, w, y, z, act, ALPHA, dx, spec, tile=tile)
    kernels.linear_backward_weight(x, dy, y, z, act, ALPHA, dw, db, spec, tile=tile)
    np.testing.assert_array_equal(dy, dy_before, err_msg="dy must be left unchanged")
    assert_close(dx, dx_ref, dtype, n, "dx")
    assert_close(dw, dw_ref, dtype, m, "dw")
    if bias:
        assert_close(db, db_ref, dtype, m, "db")


# --------------------------------------------------------------------------
# fused linear layer
# --------------------------------------------------------------------------

# (M, K, N): K = 20 > BK spans two K-tiles; 1x1x1; a dimension of 1
SMALL = (5, 20, 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_linear_forward_every_activation(act, bias, dtype):
    check_forward(*SMALL, act, dtype, bias, seed=100 + 10 * act + bias)


# without a bias only db's skip changes, so one dtype covers it (time in the simulator)
@pytest.mark.parametrize(
    "bias,dtype",
    [(True, np.float32), (True, np.float64), (False, np.float32)],
    ids=["bias-f32", "bias-f64", "nobias-f32"],
)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_linear_backward_every_activation(act, bias, dtype):
    check_backward(*SMALL, act, dtype, bias, seed=200 + 10 * act + bias)


RAGGED = [
    pytest.param((1, 1, 1), codes.ACT_RELU, np.float32, id="1x1x1-relu-f32"),
    pytest.param((3, 1, 9), codes.ACT_GELU, np.float64, id="k1-gelu-f64"),
    pytest.param((1, 33, 1), codes.ACT_SIGMOID, np.float64, id="m1n1-k33-sigmoid-f64"),
    # several blocks along M, N and (backward data) K; K spans 3 K-tiles
    pytest.param((70, 37, 66), codes.ACT_LEAKY_RELU, np.float32, id="70x37x66-leaky-f32"),
    pytest.param((67, 65, 3), codes.ACT_GELU, np.float64, id="67x65x3-gelu-f64"),
]


@pytest.mark.parametrize("shape,act,dtype", RAGGED)
def test_linear_ragged_shapes(shape, act, dtype):
    seed = 300 + sum(shape)
    check_forward(*shape, act, dtype, True, seed)
    check_backward(*shape, act, dtype, True, seed + 1)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_backward_split_reduction(monkeypatch, bias):
    """Reductions split over blocks that add into dx, dw and db atomically (small-grid path)."""
    monkeypatch.setattr(linear_mod, "multiprocessor_count", lambda: 64)
    monkeypatch.setattr(linear_mod, "SPLIT_MIN_SLICES", 1)
    m, k, n = 70, 5, 37
    assert linear_mod.plan(m, k, n, 64, True, np.float64).splits > 1  # dx: reduction over n
    assert linear_mod.plan(k, n, m, 64, True, np.float64).splits > 1  # dw: reduction over m
    check_backward(m, k, n, codes.ACT_TANH, np.float64, bias, seed=400 + bias)


TILE_CASES = [
    pytest.param(tile, dtype, id=f"{tile.name}-{np.dtype(dtype).name}")
    for dtype in DTYPES
    for tile in (linear_mod.TILES[np.dtype(dtype)] if _STATUS.usable else ())
]


@pytest.mark.parametrize("tile,dtype", TILE_CASES)
def test_linear_every_tile_on_ragged_shapes(tile, dtype):
    """Each tile: an interior block (fast unchecked loop), edge blocks and a partial last slice."""
    m, k, n = tile.bm + 3, 2 * tile.bk + 3, tile.bn + 5
    check_forward(m, k, n, codes.ACT_GELU, dtype, True, seed=450, tile=tile.name)
    check_backward(m, k, n, codes.ACT_GELU, dtype, True, seed=451, tile=tile.name)


DROPOUT_CASES = [
    pytest.param((5, 20, 7), codes.Act.RELU, np.float32, 0.5, None, id="5x20x7-relu-f32-0.5"),
    pytest.param((5, 20, 7), codes.Act.SIGMOID, np.float64, 0.3, None, id="5x20x7-sigmoid-f64-0.3"),
    pytest.param((3, 9, 11), codes.Act.GELU, np.float32, 0.2, None, id="3x9x11-gelu-f32-0.2"),
    pytest.param((3, 9, 11), codes.Act.LINEAR, np.float64, 0.7, None, id="3x9x11-linear-f64-0.7"),
    pytest.param((67, 19, 66), codes.Act.SOFTPLUS, np.float32, 0.4, "64x64", id="67x19x66-softplus-f32-edges"),
    pytest.param((35, 19, 33), codes.Act.MISH, np.float64, 0.25, "32x32-f64", id="35x19x33-mish-f64-edges"),
]


@pytest.mark.parametrize("shape,act,dtype,rate,tile", DROPOUT_CASES)
def test_linear_dropout_against_reference(shape, act, dtype, rate, tile):
    """The mask made in the forward epilogue (and reused through z in backward) is the reference's."""
    seed = 600 + sum(shape)
    check_forward(*shape, act, dtype, True, seed, tile=tile, dropout=rate)
    check_backward(*shape, act, dtype, True, seed + 1, tile=tile, dropout=rate)


def test_linear_dropout_needs_z_and_a_step_array():
    x, w, y = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="z"):
        kernels.linear_forward(x, w, None, codes.Act.RELU, 0.0, y, None, dropout_spec(0.5))
    with pytest.raises(ValueError, match="step"):
        kernels.linear_forward(x, w, None, codes.Act.RELU, 0.0, y, y.copy(), DropoutSpec(0.5, 1, np.zeros(1, np.int32)))
    with pytest.raises(ValueError, match="rate"):
        kernels.linear_forward(x, w, None, codes.Act.RELU, 0.0, y, y.copy(), DropoutSpec(1.0, 1, np.zeros(1, np.int64)))


def test_linear_rejects_unknown_tile():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="tile"):
        kernels.linear_forward(x, np.ones((4, 2), np.float32), None, codes.ACT_RELU, 0.0, np.ones((3, 2), np.float32), tile="7x7")


# --------------------------------------------------------------------------
# elementwise activation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_apply_activation(act, dtype):
    rng = np.random.default_rng(500 + act)
    z = rand(rng, (4, 9), dtype, -4, 4)
    ref = numpy_ops.apply_activation(z, act, ALPHA, np.empty_like(z))
    y = poisoned(z.shape, dtype)
    kernels.apply_activation(z, act, ALPHA, y)
    assert_close(y, ref, dtype, what="y")


def test_apply_activation_in_place_and_1d():
    rng = np.random.default_rng(510)
    z = rand(rng, (3, 5), np.float64, -3, 3)
    ref = numpy_ops.apply_activation(z, codes.ACT_GELU, ALPHA, np.empty_like(z))
    kernels.apply_activation(z, codes.ACT_GELU, ALPHA, z)
    assert_close(z, ref, np.float64, what="in place")
    v = rand(rng, (11,), np.float32)
    out = poisoned(11, np.float32)
    kernels.apply_activation(v, codes.ACT_TANH, ALPHA, out)
    assert_close(out, np.tanh(v), np.float32, what="1-D")


# --------------------------------------------------------------------------
# fused losses
# --------------------------------------------------------------------------

LOSS_KINDS = [
    codes.LOSS_SIGMOID_BCE,
    codes.LOSS_SOFTMAX_CCE,
    codes.LOSS_SOFTMAX_SPARSE_CCE,
    codes.LOSS_BCE,
    codes.LOSS_CCE,
    codes.LOSS_SPARSE_CCE,
    codes.LOSS_MSE,
    codes.LOSS_MAE,
]
LOSS_IDS = ["sigmoid_bce", "softmax_cce", "softmax_sparse_cce", "bce", "cce", "sparse_cce", "mse", "mae"]


def loss_inputs(kind, m, n, dtype, seed):
    """pred and target suited to ``kind``; probability kinds get a clipped row."""
    rng = np.random.default_rng(seed)
    if kind in (codes.LOSS_BCE, codes.LOSS_CCE, codes.LOSS_SPARSE_CCE):
        pred = rand(rng, (m, n), dtype, 0.02, 0.98)
        # values beyond the clip range exercise the zero-gradient branch
        pred[0, 0] = 1
        if n > 1:
            pred[0, 1] = 1e-9
    else:
        pred = rand(rng, (m, n), dtype, -3, 3)
    if kind in codes.SPARSE_LOSSES:
        target = rng.integers(0, n, size=m).astype(np.int64)
    elif kind == codes.LOSS_CCE:
        target = np.eye(n, dtype=dtype)[rng.integers(0, n, size=m)]
    elif kind == codes.LOSS_SOFTMAX_CCE:
        target = rand(rng, (m, n), dtype, 0.05, 1)
        target /= target.sum(axis=1, keepdims=True)
    elif kind in (codes.LOSS_SIGMOID_BCE, codes.LOSS_BCE):
        target = rand(rng, (m, n), dtype, 0.01, 0.99)
    else:
        target = rand(rng, (m, n), dtype, -3, 3)
    return pred, target


def check_loss(kind, m, n, dtype, weighted, with_grad, seed):
    pred, target = loss_inputs(kind, m, n, dtype, seed)
    weight = rand(np.random.default_rng(seed + 1), (m,), dtype, 0.1, 2) if weighted else None
    sums_ref = np.array([0.75, -0.5], dtype)  # nonzero: the kernel must add, not overwrite
    grad_ref = np.empty((m, n), dtype) if with_grad else None
    numpy_ops.loss_grad(kind, pred, target, weight, grad_ref, sums_ref)

    sums = np.array([0.75, -0.5], dtype)
    grad = poisoned((m, n), dtype) if with_grad else None
    pred_before = pred.copy()
    kernels.loss_grad(kind, pred, target, weight, grad, sums)
    np.testing.assert_array_equal(pred, pred_before)
    assert_close(sums, sums_ref, dtype, m * n, "sums")
    if with_grad:
        assert_close(grad, grad_ref, dtype, n, "grad")


@pytest.mark.parametrize("weighted,with_grad", [(False, True), (True, True), (True, False), (False, False)],
                         ids=["grad", "weighted-grad", "weighted-nograd", "nograd"])  # fmt: skip
@pytest.mark.parametrize("kind", LOSS_KINDS, ids=LOSS_IDS)
def test_loss_float64(kind, weighted, with_grad):
    check_loss(kind, 9, 5, np.float64, weighted, with_grad, seed=600 + 10 * kind + 2 * weighted + with_grad)


@pytest.mark.parametrize("kind", LOSS_KINDS, ids=LOSS_IDS)
def test_loss_float32(kind):
    check_loss(kind, 7, 3, np.float32, True, True, seed=700 + kind)


@pytest.mark.parametrize(
    "kind,m,n",
    [
        pytest.param(codes.LOSS_SOFTMAX_SPARSE_CCE, 300, 4, id="softmax_sparse-3blocks"),
        pytest.param(codes.LOSS_SIGMOID_BCE, 6, 1, id="sigmoid_bce-n1"),
        pytest.param(codes.LOSS_MSE, 1, 1, id="mse-1x1"),
    ],
)
def test_loss_shapes(kind, m, n):
    check_loss(kind, m, n, np.float64, True, True, seed=800 + m + n)


# --------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------

P = 37  # ragged parameter count
STEPS = 2

#: One configuration per optimizer code (and flag) the kernels can run.
OPTIMIZER_CONFIGS = [
    pytest.param("sgd", {}, id="sgd"),
    pytest.param("sgd", {"momentum": 0.9}, id="sgd-momentum"),
    pytest.param("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}, id="sgd-nesterov-wd"),
    pytest.param("adam", {}, id="adam"),
    pytest.param("adam", {"amsgrad": True}, id="adam-amsgrad"),
    pytest.param("adamw", {"weight_decay": 0.05}, id="adamw"),
    pytest.param("rmsprop", {}, id="rmsprop"),
    pytest.param("rmsprop", {"centered": True, "momentum": 0.6}, id="rmsprop-centered-momentum"),
    pytest.param("nadam", {}, id="nadam"),
    pytest.param("adagrad", {}, id="adagrad"),
    pytest.param("adadelta", {"learning_rate": 0.5}, id="adadelta"),
    pytest.param("adamax", {}, id="adamax"),
    pytest.param("lion", {}, id="lion"),
    pytest.param("ftrl", {"l1_regularization_strength": 0.01, "l2_regularization_strength": 0.02, "beta": 0.1,
                          "l2_shrinkage_regularization_strength": 0.03}, id="ftrl"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,config", OPTIMIZER_CONFIGS)
def test_optimizer_kernels(name, config, dtype):
    """``STEPS`` updates with fresh gradients through the kernel and numpy_ops.optimizer_step."""
    from gpunn import optimizers
    from gpunn.backend.numpy_backend import NumpyBackend

    config = {"learning_rate": 0.05, **config}
    optimizer = optimizers.get({"name": name, **config})
    optimizer.build(NumpyBackend(), P, dtype)  # state layout and initial values (e.g. Adagrad's 0.1)
    rng = np.random.default_rng(900 + len(name))
    params = rand(rng, (P,), dtype)
    state = optimizer.state.copy()
    state += rand(rng, state.shape, dtype, 0.05, 0.5)  # non-trivial state (second moments positive)
    if optimizer.slots.keys() >= {"average_gradient"}:
        state[1] *= 0.3  # the centered form needs v - a^2 > 0
    params_ref = params.copy()
    slots_ref = {slot: state[optimizer.code.slots.index(slot)].copy() for slot in optimizer.slots}
    # the same update reading its scalars from a device array (the step record a CUDA graph replays)
    params_dev, state_dev = params.copy(), state.copy()
    for step in range(1, STEPS + 1):
        grads = rand(rng, (P,), dtype)
        optimizer.iterations = step - 1
        lr = optimizer.learning_rate
        kernels.optimizer_update(optimizer.code, params, grads, state, optimizer.step_scalars())
        kernels.optimizer_update(optimizer.code, params_dev, grads, state_dev, np.asarray(optimizer.step_scalars(), dtype))
        numpy_ops.optimizer_step(name, params_ref, grads, slots_ref, lr, step, optimizer.get_config())
    np.testing.assert_array_equal(params_dev, params)
    np.testing.assert_array_equal(state_dev, state)
    assert_close(params, params_ref, dtype, what="params")
    for slot, value in slots_ref.items():
        assert_close(state[optimizer.code.slots.index(slot)], value, dtype, what=slot)


def _f(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


BAD_CALLS = [
    pytest.param(lambda: kernels.linear_forward(_f(4, 3), _f(2, 5), None, 0, 0.0, _f(4, 5)), "w", id="fwd-w-rows"),
    pytest.param(lambda: kernels.linear_forward(_f(4, 3), _f(3, 5), _f(4), 0, 0.0, _f(4, 5)), "b", id="fwd-b"),
    pytest.param(lambda: kernels.linear_forward(_f(4, 3), _f(3, 5), None, 0, 0.0, _f(5, 4)), "y", id="fwd-y"),
    pytest.param(lambda: kernels.linear_forward(_f(4, 3), _f(3, 5), None, codes.ACT_GELU, 0.0, _f(4, 5)), "z",
                 id="fwd-gelu-needs-z"),
    pytest.param(lambda: kernels.linear_forward(_f(4, 3), _f(3, 5, dtype=np.float64), None, 0, 0.0, _f(4, 5)), "w",
                 id="fwd-dtype-mix"),
    pytest.param(lambda: kernels.linear_forward(_f(4, 3, dtype=np.int32), _f(3, 5), None, 0, 0.0, _f(4, 5)), "x",
                 id="fwd-int"),
    pytest.param(lambda: kernels.linear_forward(_f(4, 3), _f(3, 5), None, 99, 0.0, _f(4, 5)), "act", id="fwd-act"),
    pytest.param(lambda: kernels.linear_backward_data(_f(4, 5), _f(3, 5), _f(4, 5), None, 0, 0.0, _f(4, 4)), "dx",
                 id="bwd-data-dx"),
    pytest.param(lambda: kernels.linear_backward_data(_f(4, 5), _f(3, 6), _f(4, 5), None, 0, 0.0, _f(4, 3)), "w",
                 id="bwd-data-w"),
    pytest.param(lambda: kernels.linear_backward_weight(_f(4, 3), _f(4, 5), _f(4, 5), None, 0, 0.0, _f(3, 5), _f(4)),
                 "db", id="bwd-weight-db"),
    pytest.param(lambda: kernels.linear_backward_weight(_f(4, 3), _f(5, 5), _f(5, 5), None, 0, 0.0, _f(3, 5), None),
                 "dy", id="bwd-weight-dy"),
    pytest.param(lambda: kernels.loss_grad(codes.LOSS_MSE, _f(4, 3), _f(4, 2), None, None, _f(2)), "target",
                 id="loss-target"),
    pytest.param(lambda: kernels.loss_grad(codes.LOSS_SPARSE_CCE, _f(4, 3), _f(4, 3), None, None, _f(2)), "target",
                 id="loss-sparse-target"),
    pytest.param(lambda: kernels.loss_grad(codes.LOSS_MSE, _f(4, 3), _f(4, 3), _f(3), None, _f(2)), "weight",
                 id="loss-weight"),
    pytest.param(lambda: kernels.loss_grad(codes.LOSS_MSE, _f(4, 3), _f(4, 3), None, _f(3, 4), _f(2)), "grad",
                 id="loss-grad"),
    pytest.param(lambda: kernels.loss_grad(codes.LOSS_MSE, _f(4, 3), _f(4, 3), None, None, _f(3)), "sums",
                 id="loss-sums"),
    pytest.param(lambda: kernels.loss_grad(42, _f(4, 3), _f(4, 3), None, None, _f(2)), "kind", id="loss-kind"),
    pytest.param(lambda: kernels.optimizer_update(codes.Opt.SGD, _f(5), _f(4), _f(1, 5), (0.0,) * 8), "grads",
                 id="opt-grads"),
    pytest.param(lambda: kernels.optimizer_update(codes.Opt.ADAM, _f(5), _f(5), _f(2, 6), (0.0,) * 8), "state",
                 id="opt-state"),
    pytest.param(lambda: kernels.optimizer_update(codes.Opt.ADAM, _f(5), _f(5), _f(2, 5), (0.0,) * 3), "hyper",
                 id="opt-hyper"),
    pytest.param(lambda: kernels.optimizer_update(77, _f(5), _f(5), _f(2, 5), (0.0,) * 8), "opt", id="opt-code"),
    pytest.param(lambda: kernels.optimizer_update(codes.Opt.ADAM, _f(5), _f(5), _f(2, 5), _f(7)), "hyper", id="hyper-array-size"),
    pytest.param(lambda: kernels.optimizer_update(codes.Opt.ADAM, _f(5), _f(5), _f(2, 5), _f(8, dtype=np.float64)), "hyper",
                 id="hyper-array-dtype"),
]  # fmt: skip


@pytest.mark.parametrize("call,name", BAD_CALLS)
def test_wrappers_reject_bad_arguments(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


# --------------------------------------------------------------------------
# the CUDA backend (same kernels, driven through the Backend interface)
# --------------------------------------------------------------------------


def test_cuda_backend_matches_numpy_backend():
    from gpunn.backend.cuda_backend import CudaBackend
    from gpunn.backend.numpy_backend import NumpyBackend

    gpu, cpu = CudaBackend(), NumpyBackend()
    assert gpu.name == "cuda"
    x, w, b, dy, _, _ = linear_inputs(1000, 6, 18, 4, codes.ACT_GELU, np.float64)
    out = {}
    for be in (gpu, cpu):
        X, W, B = be.asarray(x), be.asarray(w), be.asarray(b)
        y, z = be.zeros((6, 4), np.float64), be.zeros((6, 4), np.float64)
        be.linear_forward(X, W, B, codes.ACT_GELU, ALPHA, y, z)
        dx, dw, db = be.zeros((6, 18), np.float64), be.zeros((18, 4), np.float64), be.zeros(4, np.float64)
        be.linear_backward(X, W, be.asarray(dy.copy()), y, z, codes.ACT_GELU, ALPHA, dx, dw, db)
        p = be.softmax(y, be.zeros((6, 4), np.float64))
        g = be.asarray(dy.copy())
        be.softmax_backward(g, p)
        sums = be.zeros(2, np.float64)
        grad = be.zeros((6, 4), np.float64)
        be.loss_grad(codes.LOSS_SOFTMAX_CCE, y, p, None, grad, sums)
        params, state = be.asarray(w.copy().ravel()), be.zeros((2, 72), np.float64)
        be.optimizer_update(codes.Opt.ADAM, params, dw.ravel(), state, (1.0, 0.01, 0.1, 0.001, 1e-7, 0.0, 0.0, 0.0))
        be.synchronize()
        # z is private to each backend's linear_backward (CUDA stores GELU's derivative there)
        out[be.name] = [be.to_numpy(a) for a in (y, dx, dw, db, p, g, sums, grad, params)]
    for got, want in zip(out["cuda"], out["numpy"]):
        assert_close(got, want, np.float64, 20)


# --------------------------------------------------------------------------
# a real GPU: one large ragged problem (skipped in the simulator)
# --------------------------------------------------------------------------

_REAL_GPU = _STATUS.usable and not _STATUS.simulator


@pytest.mark.gpu
@pytest.mark.skipif(not _REAL_GPU, reason="needs a real CUDA GPU (numba.cuda.is_available() is False / simulator on)")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_large_ragged_problem_on_gpu(dtype):
    from gpunn._cuda import cuda

    m, k, n = 4099, 517, 263
    act = codes.ACT_GELU
    x, w, b, dy, y_ref, z_ref = linear_inputs(1100, m, k, n, act, dtype)
    dev = {name: cuda.to_device(a) for name, a in dict(x=x, w=w, b=b, dy=dy).items()}
    y, z = cuda.to_device(poisoned((m, n), dtype)), cuda.to_device(poisoned((m, n), dtype))
    kernels.linear_forward(dev["x"], dev["w"], dev["b"], act, ALPHA, y, z)
    dx, dw, db = (cuda.to_device(poisoned(s, dtype)) for s in ((m, k), (k, n), (n,)))
    kernels.linear_backward_data(dev["dy"], dev["w"], y, z, act, ALPHA, dx)
    kernels.linear_backward_weight(dev["x"], dev["dy"], y, z, act, ALPHA, dw, db)
    dx_ref, dw_ref, db_ref = np.empty((m, k), dtype), np.empty((k, n), dtype), np.empty(n, dtype)
    numpy_ops.linear_backward_data(dy, w, y_ref, z_ref, act, ALPHA, dx_ref)
    numpy_ops.linear_backward_weight(x, dy, y_ref, z_ref, act, ALPHA, dw_ref, db_ref)
    loose = {"rtol": 1e-3, "atol": 1e-3} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-9}
    stored = numpy_ops.activation_derivative(y_ref, z_ref, act, ALPHA)  # what the forward keeps in z for GELU
    for got, want in ((y, y_ref), (z, stored), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        np.testing.assert_allclose(got.copy_to_host(), want, **loose)
