"""Dropout on its own (a ``Dropout`` layer not folded into the Dense before it).

The mask is the one the fused linear forward makes in its epilogue
(``opmath.dropout_keep``: Philox4x32-10 of the element's row-major index, the
training step and the layer seed), so a Dense followed by Dropout gives the
same numbers folded or not.  Reference: ``numpy_ops.dropout``.
"""

from __future__ import annotations

import functools

import numpy as np

from gpunn import opmath
from gpunn._cuda import cuda, kernel_jit

from ._launch import ceil_div, check, float_dtype, matrix_shape

#: Threads per block of the grid-stride loop.
DROPOUT_THREADS = 256
#: Grid cap; threads loop over the remaining elements.
DROPOUT_MAX_BLOCKS = 4096


@functools.lru_cache(maxsize=None)
def _dropout_kernel(dtype):
    T = np.dtype(dtype).type
    ZERO = T(0)
    keep_element = opmath.dropout_keep

    def kernel(x, y, mask, seed, step, threshold, scale):
        rows, cols = x.shape
        stepv = np.uint64(step[0])
        for idx in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
            r = idx // cols
            c = idx % cols
            if keep_element(np.uint64(idx), stepv, seed, threshold):
                y[r, c] = x[r, c] * scale
                mask[r, c] = scale
            else:
                y[r, c] = ZERO
                mask[r, c] = ZERO

    return kernel_jit(kernel, DROPOUT_THREADS)


def dropout(x, y, mask, dropout, stream=0):
    """``mask = 1 / (1 - rate)`` where kept, else 0; ``y = x * 1 / (1 - rate)`` where kept, else 0.

    x, y, mask: (M, N) of one float dtype (y must not alias x); dropout: a
    :class:`gpunn.random.DropoutSpec` whose step is a device int64 (1,) array.
    """
    shape = matrix_shape("x", x)
    dt = float_dtype("x", x)
    check("y", y, shape, dt)
    check("mask", mask, shape, dt)
    dropout.check()
    n = shape[0] * shape[1]
    if n:
        blocks = min(ceil_div(n, DROPOUT_THREADS), DROPOUT_MAX_BLOCKS)
        args = (x, y, mask, np.uint64(dropout.seed), dropout.step, np.uint64(dropout.threshold), dropout.scale(dt))
        _dropout_kernel(dt)[blocks, DROPOUT_THREADS, stream](*args)
    return y
