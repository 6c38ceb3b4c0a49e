"""Fused optimizer kernels: one launch updates every parameter of a model.

Parameters and gradients live in flat 1-D buffers (all the layers' tensors
are views into them) and the optimizer's state in one (slots, P) buffer, so
one grid-stride kernel per optimizer reads each element's gradient and state
once and writes the new values once.  The per-element update is
``opmath``'s, the same function the CPU backend inlines; the step's scalars
(learning rate, bias corrections) come from the host, in the data's dtype,
either as launch arguments or in a small device array the host fills once
per step (what a captured CUDA graph reads at each replay).
"""

from __future__ import annotations

import functools

from gpunn import codes, opmath
from gpunn._cuda import cuda, kernel_jit

from . import _device  # noqa: F401  (registers opmath for the CUDA target)
from ._launch import ceil_div, check, float_dtype, variant

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
def _optimizer_kernel(dtype, opt):
    step = opmath.optimizer_step(opt)

    def kernel(p, g, state, h):
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            p[i] = step(p[i], g[i], state, i, h)

    return kernel_jit(kernel, OPT_THREADS, variant("optimizer", dtype, codes.optimizer(opt)))


def optimizer_update(opt, params, grads, state, hyper, stream=0):
    """One optimizer step in place over flat buffers (see ``Backend.optimizer_update``).

    params, grads: (P,); state: (S, P) with S >= 1; hyper: the step's
    ``opmath.OPTIMIZER_SCALARS`` scalars, either host floats (passed by
    value in the data's dtype) or a device array (OPTIMIZER_SCALARS,) of the
    data's dtype that the kernel reads -- the device-resident form lets a
    captured CUDA graph see each step's learning rate and bias corrections.
    """
    opt = codes.optimizer(opt)
    dt = _check_flat(params, grads=grads)
    check("grads", grads, params.shape, dt)
    if state is None or state.ndim != 2 or state.shape[1] != params.shape[0] or state.shape[0] < 1:
        raise ValueError(f"state: expected a ({{slots}}, {params.shape[0]}) array, got {None if state is None else tuple(state.shape)}")
    float_dtype("state", state)
    if hasattr(hyper, "shape"):
        check("hyper", hyper, (opmath.OPTIMIZER_SCALARS,), dt)
        h = hyper
    else:
        if len(hyper) != opmath.OPTIMIZER_SCALARS:
            raise ValueError(f"hyper: expected {opmath.OPTIMIZER_SCALARS} scalars, got {len(hyper)}")
        h = tuple(dt.type(v) for v in hyper)
    _launch(_optimizer_kernel(dt, opt), params, stream, params, grads, state, h)
