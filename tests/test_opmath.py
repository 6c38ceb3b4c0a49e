"""The shared scalar math (gpunn.opmath) and its two compilations.

Each op's arithmetic is written once, in gpunn.opmath, and compiled by
Numba's CPU njit into the NumPy backend's passes and by Numba's CUDA target
into the kernels.  Here: every op code resolves to its functions; the CPU
compilation gives bit for bit what the same function gives when run as plain
float32 Python (NumPy scalars) wherever the arithmetic is the same (+ - * /,
comparisons, min/max), and within a few units in the last place (a tolerance, for
cancelling derivatives) where a transcendental function's library
implementation may differ; and the CUDA
kernels (in the simulator without a GPU) give bit for bit the CPU passes'
results for those ops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpunn import opmath
from gpunn._cuda import cuda_status
from gpunn.backend import cpu_fused
from gpunn.codes import Act, LossKind, Opt

#: Activations whose forward and derivative use only exactly rounded operations.
EXACT = {Act.LINEAR, Act.RELU, Act.LEAKY_RELU, Act.SOFTSIGN, Act.RELU6, Act.HARD_SIGMOID}
ALPHA = np.float32(0.3)

_STATUS = cuda_status()
needs_cuda = [
    pytest.mark.simulator,
    pytest.mark.skipif(not _STATUS.usable, reason=f"the CUDA backend cannot run here: {_STATUS.reason}"),
]


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((6, 9)) * 4).astype(dtype)
    z[0, :5] = [0, -3, 3, 6, -0.0]  # the kinks
    return z


def ulps(a, b):
    """Distance in units in the last place between float32 arrays."""
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, np.int64(-(2**31)) - ia, ia)
    ib = np.where(ib < 0, np.int64(-(2**31)) - ib, ib)
    return np.abs(ia - ib)


def test_every_op_code_resolves_to_registered_scalar_functions():
    registered = set(opmath.SCALAR_FUNCTIONS)
    for act in Act:
        forward, derivative = opmath.activation_functions(act)
        assert {forward, derivative} <= registered, act
        assert forward.__name__ == act.math_name
    for kind in LossKind:
        assert opmath.loss_function(kind) in registered, kind
    for opt in Opt:
        name = "adam" if opt == Opt.ADAMW else opt.name.lower()
        assert getattr(opmath, f"{name}_step") in registered, opt


def test_codes_are_validated_by_the_enums():
    from gpunn import codes

    assert codes.activation(3) is Act.SIGMOID
    for bad in (99, -1, "relu", True, None):
        with pytest.raises(ValueError, match="act"):
            codes.activation(bad)
    with pytest.raises(ValueError, match="kind"):
        codes.loss_kind(42)


@pytest.mark.parametrize("act", list(Act), ids=lambda a: a.math_name)
def test_cpu_compilation_matches_the_python_function(act):
    z = _inputs()
    forward, derivative = opmath.activation_functions(act)
    alpha = np.float32(act.default_alpha or ALPHA)
    with np.errstate(all="ignore"):
        expected_y = np.array([[forward(v, alpha) for v in row] for row in z], dtype=np.float32)
    y = np.full_like(z, np.nan)
    cpu_fused.apply_activation(z, act, alpha, y)
    dy = np.ones_like(z)
    g = np.full_like(z, np.nan)
    cpu_fused.activation_grad(g, dy, y, z, act, alpha, np.zeros(z.shape[1], np.float32), False)
    with np.errstate(all="ignore"):
        expected_g = np.array(
            [[derivative(yv, zv, alpha) for yv, zv in zip(yr, zr)] for yr, zr in zip(y, z)], dtype=np.float32
        )
    assert y.dtype == np.float32
    if act in EXACT:
        np.testing.assert_array_equal(y, expected_y)
        np.testing.assert_array_equal(g, expected_g)
    else:  # Python's double-precision libm vs the compiled float32 expf/tanhf/erff
        assert ulps(y, expected_y).max() <= 4
        # derivatives such as mish's 1 - tanh^2 cancel, so compare them by value, not ulps
        np.testing.assert_allclose(g, expected_g, rtol=1e-5, atol=1e-6)


def test_python_math_keeps_float32():
    """``like`` makes constants take the argument's type, so float32 stays float32."""
    z = np.float32(0.7)
    for act in EXACT:
        forward, _ = opmath.activation_functions(act)
        assert isinstance(forward(z, np.float32(0.2)), np.float32), act
    assert isinstance(opmath.like(z, 0.5), np.float32)
    assert isinstance(opmath.like(np.float64(1), 0.5), np.float64)


@pytest.mark.parametrize("act", sorted(EXACT), ids=lambda a: a.math_name)
@pytest.mark.parametrize("kernel_path", ["epilogue", "elementwise"])
def test_cuda_kernels_match_cpu_passes_bit_for_bit(act, kernel_path):
    if not _STATUS.usable:
        pytest.skip(f"the CUDA backend cannot run here: {_STATUS.reason}")
    from gpunn import kernels

    z = _inputs()
    alpha = np.float32(act.default_alpha or ALPHA)
    cpu = np.full_like(z, np.nan)
    gpu = np.full_like(z, np.nan)
    if kernel_path == "elementwise":
        cpu_fused.apply_activation(z, act, alpha, cpu)
        kernels.apply_activation(z, act, alpha, gpu)
    else:  # the forward epilogue after an exact product (x = identity)
        eye = np.eye(z.shape[1], dtype=np.float32)
        zeros = np.zeros(z.shape[1], np.float32)
        cpu_z = (z @ eye).astype(np.float32)
        cpu_fused.bias_activation(cpu_z, zeros, act, alpha, cpu)
        kernels.linear_forward(z, eye, zeros, act, alpha, gpu, np.full_like(z, np.nan) if act.keeps_z else None)
    np.testing.assert_array_equal(gpu, cpu)


@pytest.mark.parametrize("kind", [k for k in LossKind if k.elementwise], ids=lambda k: k.name.lower())
def test_elementwise_losses_from_python_and_cpu_agree(kind):
    rng = np.random.default_rng(int(kind))
    positive = kind in (LossKind.BCE, LossKind.POISSON, LossKind.MSLE, LossKind.KL_DIVERGENCE)
    p = rng.uniform(0.05, 0.95, (4, 3)).astype(np.float32) if positive else rng.standard_normal((4, 3)).astype(np.float32)
    t = (rng.uniform(size=(4, 3)) > 0.5).astype(np.float32)
    grad = np.full_like(p, np.nan)
    sums = np.zeros(2, np.float64)
    cpu_fused.loss_grad(kind, p, t, p[:, 0], False, grad, True, sums, 0.7)
    element = opmath.loss_function(kind)
    values = [[element(pv, tv, np.float32(0.7)) for pv, tv in zip(pr, tr)] for pr, tr in zip(p, t)]
    per_row = 1 if kind.summed else p.shape[1]
    loss = sum(float(v[0]) for row in values for v in row) / per_row
    expected_grad = np.array([[v[1] for v in row] for row in values], np.float32) / np.float32(p.shape[0] * per_row)
    assert sums[0] == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)
    assert math.isfinite(sums[1])
