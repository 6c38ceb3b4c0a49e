"""Elementwise activation kernel, for outputs not fused into a linear layer."""

from __future__ import annotations

import functools

from gpunn._cuda import cuda, kernel_jit

from ._device import activation, device
from ._launch import ceil_div, check, check_act, float_dtype, variant

#: Threads per block of the grid-stride loop.
ACT_THREADS = 256
#: Grid cap; threads loop over the remaining elements.
ACT_MAX_BLOCKS = 4096


@functools.lru_cache(maxsize=None)
def _activation_kernel(dtype, act):
    forward, _ = activation(dtype, act)

    @device
    def apply(z, y, alpha):
        rows, cols = z.shape
        for idx in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
            r = idx // cols
            c = idx % cols
            y[r, c] = forward(z[r, c], alpha)

    def kernel(z, y, alpha):
        apply(z, y, alpha)

    def kernel_inplace(y, alpha):
        apply(y, y, alpha)

    # in place gets its own signature: passing one host array twice would
    # copy the stale input back over the result (see linear.py)
    return (
        kernel_jit(kernel, ACT_THREADS, variant("activation", dtype, act)),
        kernel_jit(kernel_inplace, ACT_THREADS, variant("activation.inplace", dtype, act)),
    )


def apply_activation(z, act, alpha, y, stream=0):
    """``y = act(z)`` elementwise; z, y: (M, N) or (N,) of one float dtype; y may be z."""
    if z is None or z.ndim not in (1, 2):
        raise ValueError("z: expected a 1-D or 2-D array")
    dt = float_dtype("z", z)
    check("y", y, z.shape, dt)
    act = check_act(act)
    if z.ndim == 1:
        z, y = z.reshape(1, -1), y.reshape(1, -1)
    n = z.shape[0] * z.shape[1]
    if n:
        blocks = min(ceil_div(n, ACT_THREADS), ACT_MAX_BLOCKS)
        kernel, kernel_inplace = _activation_kernel(dt, act)
        if y is z:
            kernel_inplace[blocks, ACT_THREADS, stream](y, dt.type(alpha))
        else:
            kernel[blocks, ACT_THREADS, stream](z, y, dt.type(alpha))
    return y


@functools.lru_cache(maxsize=None)
def _activation_backward_kernel(dtype, act):
    _, derivative = activation(dtype, act)

    def kernel(dy, y, z, dx, alpha):
        rows, cols = dy.shape
        for idx in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
            r = idx // cols
            c = idx % cols
            dx[r, c] = dy[r, c] * derivative(y[r, c], z[r, c], alpha)

    return kernel_jit(kernel, ACT_THREADS, variant("activation.backward", dtype, act))


def activation_backward(dy, y, z, act, alpha, dx, stream=0):
    """``dx = dy * act'(z)`` elementwise over (M, N) (the backward of :func:`apply_activation`).

    y: the forward's output; z: its input, read by the activations with
    ``Act.needs_preactivation`` (pass y when it is not needed).  dx must not
    alias dy, y or z.  Reference: ``dy * numpy_ops.activation_derivative(y, z, act, alpha)``.
    """
    if dy is None or dy.ndim != 2:
        raise ValueError("dy: expected a 2-D array")
    dt = float_dtype("dy", dy)
    for name, a in (("y", y), ("z", z), ("dx", dx)):
        check(name, a, dy.shape, dt)
    act = check_act(act)
    n = dy.shape[0] * dy.shape[1]
    if n:
        blocks = min(ceil_div(n, ACT_THREADS), ACT_MAX_BLOCKS)
        _activation_backward_kernel(dt, act)[blocks, ACT_THREADS, stream](dy, y, z, dx, dt.type(alpha))
    return dx
