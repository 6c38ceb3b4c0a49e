"""Batch gather at a device-resident offset: ``out[i] = src[order[offset[0] + i]]``.

The offset is read from a device array rather than passed by value, so one
captured CUDA graph gathers a different batch at each replay (the host
writes the offset into the step's record; see ``gpunn.training.StepRecord``).
"""

from __future__ import annotations

import functools

import numpy as np

from gpunn._cuda import cuda, kernel_jit

from ._launch import ceil_div, float_dtype, variant

#: Threads per block of the grid-stride loop.
GATHER_THREADS = 256
#: Grid cap; threads loop over the remaining elements.
GATHER_MAX_BLOCKS = 4096


@functools.lru_cache(maxsize=None)
def _gather_kernel(dtype):
    T = np.dtype(dtype).type

    def kernel(src, order, offset, out):
        rows, cols = out.shape
        start = offset[0]
        for idx in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
            i = idx // cols
            j = idx % cols
            value = T(np.nan)
            k = start + i
            # guarded: an offset or index outside the data yields NaN rows
            # (the host checks both before a launch; this keeps a bad one from
            # reading out of bounds)
            if 0 <= k < order.shape[0]:
                r = order[k]
                if 0 <= r < src.shape[0]:
                    value = src[r, j]
            out[i, j] = value

    return kernel_jit(kernel, GATHER_THREADS, variant("gather", dtype))


def gather_rows(src, order, offset, out, stream=0):
    """``out[i] = src[order[offset[0] + i]]`` for ``i < out.shape[0]``; see ``numpy_ops.gather_rows``.

    src: (R, C) or (R,) float array; order: (n,) integer row indices; offset:
    (1,) integer array on the device; out: (M, C) or (M,) of src's dtype.
    Rows whose position or index falls outside ``order`` or ``src`` come out NaN.
    """
    if src is None or src.ndim not in (1, 2):
        raise ValueError("src: expected a 1-D or 2-D array")
    dt = float_dtype("src", src)
    if out is None or out.ndim != src.ndim or (src.ndim == 2 and out.shape[1] != src.shape[1]):
        raise ValueError(f"out: expected a {src.ndim}-D array with src's row shape {tuple(src.shape[1:])}, got {None if out is None else tuple(out.shape)}")
    if np.dtype(out.dtype) != dt:
        raise ValueError(f"out: expected dtype {dt}, got {np.dtype(out.dtype)}")
    if order is None or order.ndim != 1 or np.dtype(order.dtype).kind not in "iu":
        raise ValueError("order: expected a 1-D integer array")
    if offset is None or tuple(offset.shape) != (1,) or np.dtype(offset.dtype).kind not in "iu":
        raise ValueError("offset: expected an integer array of shape (1,)")
    if src.ndim == 1:
        src, out = src.reshape(src.shape[0], 1), out.reshape(out.shape[0], 1)
    n = out.shape[0] * out.shape[1]
    if n:
        blocks = min(ceil_div(n, GATHER_THREADS), GATHER_MAX_BLOCKS)
        _gather_kernel(dt)[blocks, GATHER_THREADS, stream](src, order, offset, out)
    return out
