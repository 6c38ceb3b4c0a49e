"""Fused loss kernel: per-row loss, gradient and accuracy in one pass.

One thread handles one row of ``pred`` (rows are strided over the grid), so
row-wise reductions (softmax's max and sum, CCE's normaliser, argmax) need
no communication; the model's output width N is small.  Each thread sums
its rows' weighted loss and accuracy, the block reduces those through
shared memory (no warp shuffles, which the simulator lacks) and thread 0
adds the block's totals to ``sums`` with one ``cuda.atomic.add`` each.
"""

from __future__ import annotations

import functools

import numpy as np

from gpunn import codes
from gpunn.codes import LossKind
from gpunn._cuda import cuda, kernel_jit

from ._device import device, loss_function, numba_type
from ._launch import ceil_div, check, float_dtype, matrix_shape, variant

#: Threads per block: one row each.  A power of two (tree reduction).
#: Shared memory: 2 * 128 * 8 B = 2,048 B in float64 (limit 48 KB).
LOSS_THREADS = 128
#: Grid cap; beyond it threads loop over rows, and fewer atomics are issued.
LOSS_MAX_BLOCKS = 1024
assert LOSS_THREADS & (LOSS_THREADS - 1) == 0


def _row_function(dtype, kind, has_grad):
    """``row(pred, target, grad, i, gscale, param) -> (loss_i, hit_i)`` for one loss kind.

    ``gscale`` is ``w_i / (M*N)`` for the elementwise kinds that average over
    the outputs and ``w_i / M`` for the rest (see ``numpy_ops.loss_grad``);
    the gradient row is written only when ``has_grad``.  The math is
    ``opmath``'s; this only walks the row.
    """
    T = np.dtype(dtype).type
    function = loss_function(kind)
    sparse = kind.sparse
    summed = kind.summed

    if kind.elementwise:

        def row(pred, target, grad, i, gscale, param):
            n = pred.shape[1]
            loss = T(0)
            hits = T(0)
            for j in range(n):
                lj, gj, hj = function(pred[i, j], target[i, j], param)
                loss += lj
                hits += hj
                if has_grad:
                    grad[i, j] = gj * gscale
            return (loss if summed else loss / T(n)), hits / T(n)

    else:

        def row(pred, target, grad, i, gscale, param):
            return function(pred, target, grad, i, gscale, sparse, has_grad)

    return device(row)


@functools.lru_cache(maxsize=None)
def _loss_kernel(dtype, kind, has_weight, has_grad):
    T = np.dtype(dtype).type
    nbt = numba_type(dtype)
    kind = LossKind(kind)
    row = _row_function(dtype, kind, has_grad)
    classification = kind.classification
    per_output_mean = kind.elementwise and not kind.summed

    def kernel(pred, target, weight, grad, sums, param):
        s_loss = cuda.shared.array(LOSS_THREADS, nbt)
        s_hits = cuda.shared.array(LOSS_THREADS, nbt)
        m, n = pred.shape
        den = T(m * n) if per_output_mean else T(m)
        t = cuda.threadIdx.x
        loss = T(0)
        hits = T(0)
        for i in range(cuda.grid(1), m, cuda.gridsize(1)):
            w = weight[i] if has_weight else T(1)
            li, ci = row(pred, target, grad, i, w / den, param)
            loss += w * li
            hits += ci  # unweighted: Keras 3's plain metrics ignore sample weights
        s_loss[t] = loss
        s_hits[t] = hits
        cuda.syncthreads()
        step = LOSS_THREADS // 2
        while step > 0:
            if t < step:
                s_loss[t] += s_loss[t + step]
                s_hits[t] += s_hits[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            cuda.atomic.add(sums, 0, s_loss[0])
            if classification:
                cuda.atomic.add(sums, 1, s_hits[0])

    return kernel_jit(kernel, LOSS_THREADS, variant("loss", dtype, kind, f"weight={has_weight}", f"grad={has_grad}"))


def loss_grad(kind, pred, target, weight, grad, sums, param=0.0, stream=0):
    """Loss, gradient and accuracy of a batch in one kernel; see ``numpy_ops.loss_grad``.

    pred: (M, N) logits (``LOSS_SIGMOID_BCE``/``LOSS_SOFTMAX_*``) or
    outputs; target: (M, N) of pred's dtype, or (M,) class indices (any
    integer or float dtype) for ``codes.SPARSE_LOSSES``; weight: (M,) or
    None; grad: (M, N) output ``dL/dpred`` (``L = sum_i w_i l_i / M``) or
    None to skip; sums: (2,) float array, ``sums[0] += sum_i w_i l_i`` and,
    for classification kinds, ``sums[1] += sum_i correct_i`` (unweighted).
    """
    kind = codes.loss_kind(kind)
    M, N = matrix_shape("pred", pred)
    dt = float_dtype("pred", pred)
    if kind.sparse:
        check("target", target, (M,))
        if np.dtype(target.dtype).kind not in "iuf":
            raise ValueError(f"target: expected integer class indices, got dtype {target.dtype}")
    else:
        check("target", target, (M, N), dt)
    if weight is not None:
        check("weight", weight, (M,), dt)
    if grad is not None:
        check("grad", grad, (M, N), dt)
    check("sums", sums, (2,))
    float_dtype("sums", sums)
    if M == 0:
        return sums
    if N == 0:
        raise ValueError("pred: expected at least one output column, got 0")
    kernel = _loss_kernel(dt, kind, weight is not None, grad is not None)
    if kind.sparse:  # the row functions read class labels as target[i, 0]
        target = target.reshape(M, 1)
    blocks = min(ceil_div(M, LOSS_THREADS), LOSS_MAX_BLOCKS)
    # absent optional arrays are replaced by inputs of the right rank that
    # the specialised kernel never touches (never by an output: see linear.py)
    kernel[blocks, LOSS_THREADS, stream](
        pred, target, pred[0] if weight is None else weight, pred if grad is None else grad, sums, dt.type(param)
    )
    return sums
