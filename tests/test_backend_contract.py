"""Each backend against the contract written in gpunn/backend/base.py.

For every numeric operation: arguments the contract calls read only are
bitwise unchanged afterwards, outputs are fully written (they are poisoned
with NaN first), arguments updated in place hold the reference's values, and
everything matches gpunn.backend.numpy_ops.  The CUDA backend runs in
Numba's simulator where there is no GPU, so shapes are tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import backend_params, make_backend

from gpunn.backend import numpy_ops
from gpunn.backend.numpy_backend import NumpyBackend
from gpunn.codes import Act, LossKind
from gpunn.random import DropoutSpec



@pytest.fixture(params=list(backend_params()))
def backend(request):
    return make_backend(request.param)


M, K, N = 5, 3, 4
DTYPE = np.float32
TOL = dict(rtol=2e-5, atol=2e-6)


def _rand(rng, shape):
    a = rng.uniform(-1.5, 1.5, size=shape)
    a[np.abs(a) < 0.05] = 0.5  # no zeros: a zero hides an unapplied factor
    return a.astype(DTYPE)


class Arrays:
    """Host arrays moved to the backend; ``read_only`` names are checked unchanged afterwards."""

    def __init__(self, backend, **arrays):
        self.backend = backend
        self.host = {k: (None if v is None else np.array(v)) for k, v in arrays.items()}
        self.dev = {k: (None if v is None else backend.asarray(v.copy())) for k, v in self.host.items()}

    def __getitem__(self, name):
        return self.dev[name]

    def out(self, name):
        return self.backend.to_numpy(self.dev[name])

    def assert_unchanged(self, *names):
        for name in names:
            after = self.out(name)
            assert np.array_equal(after, self.host[name], equal_nan=True), f"{name} is read only but changed"

    def assert_written(self, *names):
        for name in names:
            assert not np.isnan(self.out(name)).any(), f"{name} is an output but was not fully written"


def _spec(backend, rate, step=7):
    return None if rate is None else DropoutSpec(rate, 99, backend.asarray(np.array([step], np.int64)))


def _z_buffer(act, rate):
    return np.full((M, N), np.nan, DTYPE) if act.keeps_z or rate is not None else None


@pytest.mark.parametrize("rate", [None, 0.4], ids=["plain", "dropout"])
@pytest.mark.parametrize("act", [Act.LINEAR, Act.RELU, Act.GELU, Act.ELU, Act.SOFTPLUS], ids=lambda a: a.name.lower())
def test_linear_forward_contract(backend, act, rate):
    rng = np.random.default_rng(int(act))
    a = Arrays(
        backend,
        x=_rand(rng, (M, K)),
        w=_rand(rng, (K, N)),
        b=_rand(rng, (N,)),
        y=np.full((M, N), np.nan, DTYPE),
        z=_z_buffer(act, rate),
    )
    spec = _spec(backend, rate)
    backend.linear_forward(a["x"], a["w"], a["b"], act, act.default_alpha, a["y"], a["z"], spec)
    backend.synchronize()
    a.assert_unchanged("x", "w", "b")
    a.assert_written("y")  # z is private to the backend's linear_backward: no value is promised
    y_ref = np.empty((M, N), DTYPE)
    z_ref = _z_buffer(act, rate)
    host_spec = None if spec is None else spec._replace(step=backend.to_numpy(spec.step))
    numpy_ops.linear_forward(a.host["x"], a.host["w"], a.host["b"], act, act.default_alpha, y_ref, z_ref, host_spec)
    np.testing.assert_allclose(a.out("y"), y_ref, **TOL)
    if spec is not None:
        assert backend.to_numpy(spec.step).tolist() == [7], "the step array is read only"


@pytest.mark.parametrize("rate", [None, 0.5], ids=["plain", "dropout"])
@pytest.mark.parametrize("act", [Act.LINEAR, Act.SIGMOID, Act.SWISH, Act.SOFTPLUS], ids=lambda a: a.name.lower())
@pytest.mark.parametrize("with_dx_db", [True, False], ids=["dx-db", "no-dx-db"])
def test_linear_backward_contract_leaves_dy_unchanged(backend, act, with_dx_db, rate):
    """Backward from what the same backend's forward left in y and z (z is backend-private)."""
    rng = np.random.default_rng(10 + int(act))
    x, w, b = _rand(rng, (M, K)), _rand(rng, (K, N)), _rand(rng, (N,))
    spec = _spec(backend, rate)
    host_spec = None if spec is None else spec._replace(step=np.array([7], np.int64))
    y_ref, z_ref = np.empty((M, N), DTYPE), _z_buffer(act, rate)
    numpy_ops.linear_forward(x, w, b, act, act.default_alpha, y_ref, z_ref, host_spec)
    fwd = Arrays(backend, x=x, w=w, b=b, y=np.empty((M, N), DTYPE), z=_z_buffer(act, rate))
    backend.linear_forward(fwd["x"], fwd["w"], fwd["b"], act, act.default_alpha, fwd["y"], fwd["z"], spec)
    backend.synchronize()
    a = Arrays(
        backend,
        x=x,
        w=w,
        dy=_rand(rng, (M, N)),
        y=fwd.out("y"),
        z=None if fwd["z"] is None else fwd.out("z"),
        dx=np.full((M, K), np.nan, DTYPE) if with_dx_db else None,
        dw=np.full((K, N), np.nan, DTYPE),
        db=np.full((N,), np.nan, DTYPE) if with_dx_db else None,
    )
    backend.linear_backward(a["x"], a["w"], a["dy"], a["y"], a["z"], act, act.default_alpha, a["dx"], a["dw"], a["db"], spec)
    backend.synchronize()
    a.assert_unchanged("x", "w", "dy", "y", *(["z"] if a["z"] is not None else []))
    outputs = ["dw"] + (["dx", "db"] if with_dx_db else [])
    a.assert_written(*outputs)
    ref = {"dx": np.empty((M, K), DTYPE), "dw": np.empty((K, N), DTYPE), "db": np.empty((N,), DTYPE)}
    numpy_ops.linear_backward(x, w, a.host["dy"], y_ref, z_ref, act, act.default_alpha, ref["dx"], ref["dw"], ref["db"], host_spec)
    for name in outputs:
        np.testing.assert_allclose(a.out(name), ref[name], **TOL, err_msg=name)


def test_dropout_contract(backend):
    rng = np.random.default_rng(8)
    a = Arrays(backend, x=_rand(rng, (M, N)), y=np.full((M, N), np.nan, DTYPE), mask=np.full((M, N), np.nan, DTYPE))
    spec = _spec(backend, 0.3, step=11)
    backend.dropout(a["x"], a["y"], a["mask"], spec)
    backend.synchronize()
    a.assert_unchanged("x")
    a.assert_written("y", "mask")
    y_ref, mask_ref = np.empty((M, N), DTYPE), np.empty((M, N), DTYPE)
    numpy_ops.dropout(a.host["x"], y_ref, mask_ref, spec._replace(step=np.array([11], np.int64)))
    np.testing.assert_array_equal(a.out("mask"), mask_ref)
    np.testing.assert_array_equal(a.out("y"), y_ref)


def test_linear_forward_with_dropout_needs_z(backend):
    rng = np.random.default_rng(9)
    a = Arrays(backend, x=_rand(rng, (M, K)), w=_rand(rng, (K, N)), y=np.zeros((M, N), DTYPE))
    with pytest.raises(ValueError, match="z"):
        backend.linear_forward(a["x"], a["w"], None, Act.RELU, 0.0, a["y"], None, _spec(backend, 0.5))


def test_linear_backward_refuses_missing_preactivation(backend):
    rng = np.random.default_rng(3)
    a = Arrays(backend, x=_rand(rng, (M, K)), w=_rand(rng, (K, N)), dy=_rand(rng, (M, N)), dw=np.zeros((K, N), DTYPE))
    with pytest.raises(ValueError, match="z"):
        backend.linear_backward(a["x"], a["w"], a["dy"], a["dy"], None, Act.GELU, 0.0, None, a["dw"], None)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
def test_apply_activation_contract(backend, in_place):
    rng = np.random.default_rng(4)
    a = Arrays(backend, z=_rand(rng, (M, N)), y=np.full((M, N), np.nan, DTYPE))
    out = a["z"] if in_place else a["y"]
    backend.apply_activation(a["z"], Act.SOFTPLUS, 0.0, out)
    backend.synchronize()
    ref = numpy_ops.apply_activation(a.host["z"], Act.SOFTPLUS, 0.0, np.empty((M, N), DTYPE))
    if in_place:
        np.testing.assert_allclose(a.out("z"), ref, **TOL)
    else:
        a.assert_unchanged("z")
        np.testing.assert_allclose(a.out("y"), ref, **TOL)


@pytest.mark.parametrize("kind", [LossKind.SIGMOID_BCE, LossKind.SOFTMAX_SPARSE_CCE, LossKind.MSE], ids=lambda k: k.name.lower())
def test_loss_grad_contract(backend, kind):
    rng = np.random.default_rng(20 + int(kind))
    pred = _rand(rng, (M, N))
    if kind.sparse:
        target = rng.integers(0, N, M).astype(DTYPE)
    elif kind.classification:
        target = (rng.uniform(size=(M, N)) > 0.5).astype(DTYPE)
    else:
        target = _rand(rng, (M, N))
    start = np.array([0.25, 1.0], DTYPE)  # sums accumulate: they must not be reset
    a = Arrays(
        backend,
        pred=pred,
        target=target,
        weight=rng.uniform(0.5, 2, M).astype(DTYPE),
        grad=np.full((M, N), np.nan, DTYPE),
        sums=start,
    )
    backend.loss_grad(kind, a["pred"], a["target"], a["weight"], a["grad"], a["sums"])
    backend.synchronize()
    a.assert_unchanged("pred", "target", "weight")
    a.assert_written("grad")
    ref_grad, ref_sums = np.empty((M, N), DTYPE), start.copy()
    numpy_ops.loss_grad(kind, pred, target, a.host["weight"], ref_grad, ref_sums)
    np.testing.assert_allclose(a.out("grad"), ref_grad, **TOL)
    np.testing.assert_allclose(a.out("sums"), ref_sums, rtol=1e-5)


@pytest.mark.parametrize(
    "name, config",
    [("sgd", {"momentum": 0.9, "nesterov": True}), ("adamw", {"amsgrad": True}), ("rmsprop", {"centered": True, "momentum": 0.5})],
    ids=["sgd-nesterov", "adamw-amsgrad", "rmsprop-centered-momentum"],
)
def test_optimizer_contract(backend, name, config):
    from gpunn import optimizers

    rng = np.random.default_rng(7)
    P = 9
    optimizer = optimizers.get({"name": name, "learning_rate": 0.01, **config})
    optimizer.build(NumpyBackend(), P, DTYPE)
    state = np.abs(_rand(rng, optimizer.state.shape))
    if name == "rmsprop":
        state[1] /= 3  # keeps v - a^2 > 0 for the centered form
    a = Arrays(backend, params=_rand(rng, (P,)), grads=_rand(rng, (P,)), state=state)
    optimizer.iterations = 2
    backend.optimizer_update(optimizer.code, a["params"], a["grads"], a["state"], optimizer.step_scalars())
    backend.synchronize()
    a.assert_unchanged("grads")
    params, slots = a.host["params"].copy(), {s: state[optimizer.code.slots.index(s)].copy() for s in optimizer.slots}
    numpy_ops.optimizer_step(name, params, a.host["grads"], slots, optimizer.learning_rate, 3, optimizer.get_config())
    np.testing.assert_allclose(a.out("params"), params, **TOL)
    for slot, value in slots.items():
        np.testing.assert_allclose(a.out("state")[optimizer.code.slots.index(slot)], value, **TOL, err_msg=slot)
