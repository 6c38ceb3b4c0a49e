"""Fused optimizer kernels: one launch updates every parameter of a model.

Parameters, gradients and optimizer state live in flat 1-D buffers (all the
layers' tensors are views into them), so one grid-stride kernel reads each
element's gradient and state once and writes the new values once.  The
scalar hyper-parameters (and Adam's bias-corrected step size) are computed
on the host (``opmath.adam_scalars``), in the data's dtype; the per-element
update is ``opmath``'s, the same function the CPU backend inlines.
"""

from __future__ import annotations

import functools

from gpunn import opmath
from gpunn._cuda import cuda

from . import _device  # noqa: F401  (registers opmath for the CUDA target)
from ._launch import ceil_div, check, float_dtype

#: Threads per block; each thread strides over the buffer.
OPT_THREADS = 256
#: Grid cap: enough blocks to fill a large GPU several times over.
OPT_MAX_BLOCKS = 4096


def _launch(kernel, params, stream, *args):
    n = params.shape[0]
    if n:
        blocks = min(ceil_div(n, OPT_THREADS), OPT_MAX_BLOCKS)
        kernel[blocks, OPT_THREADS, stream](*args)


def _check_flat(params, **buffers):
    """params' dtype; every named buffer (None allowed) must match its shape and dtype."""
    if params is None or params.ndim != 1:
        raise ValueError("params: expected a 1-D array")
    dt = float_dtype("params", params)
    for name, buf in buffers.items():
        if buf is not None:
            check(name, buf, params.shape, dt)
    return dt


@functools.lru_cache(maxsize=None)
def _sgd_kernel(dtype, use_momentum, nesterov):
    def kernel(p, g, v, lr, momentum):
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            pi, vi = opmath.sgd_step(p[i], g[i], v[i], lr, momentum, use_momentum, nesterov)
            p[i] = pi
            if use_momentum:
                v[i] = vi

    return cuda.jit(kernel)


def sgd_update(params, grads, velocity, lr, momentum, nesterov, stream=0):
    """SGD in place on flat (P,) arrays (``opmath.sgd_step``; see ``numpy_ops.sgd_update``).

    momentum == 0: ``p -= lr g`` (velocity may be None); otherwise
    ``v = momentum v - lr g`` and ``p += v`` (Nesterov: ``p += momentum v - lr g``).
    """
    use_momentum = momentum != 0
    if use_momentum and velocity is None:
        raise ValueError("velocity: SGD with momentum needs a velocity buffer, got None")
    dt = _check_flat(params, grads=grads, velocity=velocity if use_momentum else None)
    check("grads", grads, params.shape, dt)
    kernel = _sgd_kernel(dt, use_momentum, bool(nesterov) and use_momentum)
    T = dt.type
    # without momentum the (never written) grads stand in for the velocity
    _launch(kernel, params, stream, params, grads, velocity if use_momentum else grads, T(lr), T(momentum))


@functools.lru_cache(maxsize=None)
def _adam_kernel(dtype):
    def kernel(p, g, m, v, decay, lr_t, one_m_b1, one_m_b2, eps):
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            p[i], m[i], v[i] = opmath.adam_step(p[i], g[i], m[i], v[i], decay, lr_t, one_m_b1, one_m_b2, eps)

    return cuda.jit(kernel)


def adam_update(params, grads, m, v, lr, beta1, beta2, epsilon, step, weight_decay, stream=0):
    """Adam / AdamW in place on flat (P,) arrays (``opmath.adam_step``; see ``numpy_ops.adam_update``).

    ``p *= 1 - lr wd`` (AdamW only); ``m += (g - m)(1 - b1)``;
    ``v += (g^2 - v)(1 - b2)``; ``p -= lr sqrt(1 - b2^t)/(1 - b1^t) m / (sqrt(v) + eps)``
    with t = ``step`` (1-based).
    """
    dt = _check_flat(params, grads=grads, m=m, v=v)
    for name, buf in (("grads", grads), ("m", m), ("v", v)):
        check(name, buf, params.shape, dt)
    scalars = [dt.type(s) for s in opmath.adam_scalars(lr, beta1, beta2, epsilon, step, weight_decay)]
    _launch(_adam_kernel(dt), params, stream, params, grads, m, v, *scalars)


@functools.lru_cache(maxsize=None)
def _rmsprop_kernel(dtype, centered, use_momentum):
    def kernel(p, g, v, a, mb, lr, rho, one_m_rho, momentum, eps):
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            pi, vi, ai, mi = opmath.rmsprop_step(
                p[i], g[i], v[i], a[i], mb[i], lr, rho, one_m_rho, momentum, eps, centered, use_momentum
            )
            p[i] = pi
            v[i] = vi
            if centered:
                a[i] = ai
            if use_momentum:
                mb[i] = mi

    return cuda.jit(kernel)


def rmsprop_update(params, grads, velocity, average_grad, momentum_buf, lr, rho, momentum, epsilon, stream=0):
    """RMSprop in place on flat (P,) arrays (``opmath.rmsprop_step``; Keras 3 rule).

    ``v = rho v + (1 - rho) g^2``; centered (``average_grad`` not None):
    ``a = rho a + (1 - rho) g``, ``d = v - a^2``, else ``d = v``;
    ``inc = lr g / sqrt(d + eps)``; momentum (``momentum_buf`` not None and
    momentum > 0): ``mb = momentum mb + inc; p -= mb``, else ``p -= inc``.
    """
    dt = _check_flat(params, grads=grads, velocity=velocity, average_grad=average_grad, momentum_buf=momentum_buf)
    for name, buf in (("grads", grads), ("velocity", velocity)):
        check(name, buf, params.shape, dt)
    centered = average_grad is not None
    use_momentum = momentum_buf is not None and momentum > 0
    T = dt.type
    kernel = _rmsprop_kernel(dt, centered, use_momentum)
    # absent state buffers: grads stands in, read but never written
    _launch(
        kernel, params, stream,
        params, grads, velocity,
        average_grad if centered else grads, momentum_buf if use_momentum else grads,
        T(lr), T(rho), T(1 - rho), T(momentum), T(epsilon),
    )  # fmt: skip
