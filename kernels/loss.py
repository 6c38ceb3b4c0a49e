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
import math

import numpy as np

from gpunn import codes
from gpunn._cuda import cuda

from ._device import device, numba_type
from ._launch import ceil_div, check, float_dtype, matrix_shape

#: Threads per block: one row each.  A power of two (tree reduction).
#: Shared memory: 2 * 128 * 8 B = 2,048 B in float64 (limit 48 KB).
LOSS_THREADS = 128
#: Grid cap; beyond it threads loop over rows, and fewer atomics are issued.
LOSS_MAX_BLOCKS = 1024
assert LOSS_THREADS & (LOSS_THREADS - 1) == 0

_MEAN_KINDS = (codes.LOSS_SIGMOID_BCE, codes.LOSS_BCE, codes.LOSS_MSE, codes.LOSS_MAE)


def _constants(dtype):
    T = np.dtype(dtype).type
    return T, T(0), T(1), T(0.5), T(codes.EPSILON), T(1) - T(codes.EPSILON)


@functools.lru_cache(maxsize=None)
def _element_function(dtype, kind):
    """``element(p, t) -> (loss, dloss/dp)`` for the kinds averaged over outputs."""
    T, ZERO, ONE, HALF, EPS, ONE_M_EPS = _constants(dtype)
    TWO = T(2)

    if kind == codes.LOSS_SIGMOID_BCE:

        def element(p, t):
            e = math.exp(-abs(p))
            # sigmoid(p) from e = exp(-|p|), stable for either sign
            s = ONE / (ONE + e) if p >= ZERO else e / (ONE + e)
            return max(p, ZERO) - p * t + math.log1p(e), s - t

    elif kind == codes.LOSS_BCE:

        def element(p, t):
            pc = min(max(p, EPS), ONE_M_EPS)
            g = ZERO
            # the clip's derivative is 0 outside (eps, 1 - eps)
            if EPS < p < ONE_M_EPS:
                g = (pc - t) / (pc * (ONE - pc))
            return -(t * math.log(pc) + (ONE - t) * math.log(ONE - pc)), g

    elif kind == codes.LOSS_MSE:

        def element(p, t):
            d = p - t
            return d * d, TWO * d

    else:  # LOSS_MAE

        def element(p, t):
            d = p - t
            return abs(d), ONE if d > ZERO else (-ONE if d < ZERO else ZERO)

    return device(element)


@functools.lru_cache(maxsize=None)
def _categorical_helpers(dtype, sparse):
    """``(argmax_row, class_of, target_at)`` device functions.

    ``class_of(target, i)`` is row i's class (the label, or the target's
    first argmax); ``target_at(target, i, j, label)`` the target
    probability of class j (one-hot of ``label`` for sparse targets).
    """
    T, ZERO, ONE, _, _, _ = _constants(dtype)

    @device
    def argmax_row(a, i):
        best = a[i, 0]
        arg = 0
        for j in range(1, a.shape[1]):
            if a[i, j] > best:
                best = a[i, j]
                arg = j
        return arg, best

    if sparse:

        def class_of(target, i):
            return int(target[i])

        def target_at(target, i, j, label):
            return ONE if j == label else ZERO

    else:

        def class_of(target, i):
            return argmax_row(target, i)[0]

        def target_at(target, i, j, label):
            return target[i, j]

    return argmax_row, device(class_of), device(target_at)


@functools.lru_cache(maxsize=None)
def _row_function(dtype, kind, has_grad):
    """``row(pred, target, grad, i, gscale) -> (loss_i, correct_i)`` for one loss kind.

    ``gscale`` is ``w_i / (M*N)`` for the kinds averaged over outputs and
    ``w_i / M`` for cross-entropies (see ``numpy_ops.loss_grad``); the
    gradient row is written only when ``has_grad``.
    """
    T, ZERO, ONE, HALF, EPS, ONE_M_EPS = _constants(dtype)
    argmax_row, class_of, target_at = _categorical_helpers(dtype, kind in codes.SPARSE_LOSSES)

    if kind in _MEAN_KINDS:
        element = _element_function(dtype, kind)
        classification = kind in codes.CLASSIFICATION_LOSSES
        # logits are positive beyond 0, probabilities beyond 0.5
        threshold = ZERO if kind == codes.LOSS_SIGMOID_BCE else HALF

        def row(pred, target, grad, i, gscale):
            n = pred.shape[1]
            loss = ZERO
            hits = ZERO
            for j in range(n):
                p = pred[i, j]
                t = target[i, j]
                lj, gj = element(p, t)
                loss += lj
                if classification and (p > threshold) == (t > HALF):
                    hits += ONE
                if has_grad:
                    grad[i, j] = gj * gscale
            return loss / T(n), hits / T(n)

    elif kind in (codes.LOSS_SOFTMAX_CCE, codes.LOSS_SOFTMAX_SPARSE_CCE):

        def row(pred, target, grad, i, gscale):
            n = pred.shape[1]
            amax, zmax = argmax_row(pred, i)
            label = class_of(target, i)
            sumexp = ZERO
            tsum = ZERO
            tdot = ZERO
            for j in range(n):
                shifted = pred[i, j] - zmax
                t = target_at(target, i, j, label)
                sumexp += math.exp(shifted)
                tsum += t
                tdot += t * shifted
            lse = math.log(sumexp)
            if has_grad:
                for j in range(n):
                    g = math.exp(pred[i, j] - zmax - lse) * tsum - target_at(target, i, j, label)
                    grad[i, j] = g * gscale
            return lse * tsum - tdot, ONE if amax == label else ZERO

    elif kind in (codes.LOSS_CCE, codes.LOSS_SPARSE_CCE):

        def row(pred, target, grad, i, gscale):
            n = pred.shape[1]
            amax, _ = argmax_row(pred, i)
            label = class_of(target, i)
            s = ZERO
            for j in range(n):
                s += pred[i, j]
            loss = ZERO
            tm_sum = ZERO  # sum of t over the classes whose q = p/s is not clipped
            for j in range(n):
                t = target_at(target, i, j, label)
                q = pred[i, j] / s
                loss -= t * math.log(min(max(q, EPS), ONE_M_EPS))
                if EPS < q < ONE_M_EPS:
                    tm_sum += t
            if has_grad:
                common = tm_sum / s
                for j in range(n):
                    g = common
                    q = pred[i, j] / s
                    if EPS < q < ONE_M_EPS:
                        g -= target_at(target, i, j, label) / pred[i, j]
                    grad[i, j] = g * gscale
            return loss, ONE if amax == label else ZERO

    else:
        raise ValueError(f"kind: unknown loss code {kind!r}")
    return device(row)


@functools.lru_cache(maxsize=None)
def _loss_kernel(dtype, kind, has_weight, has_grad):
    T = np.dtype(dtype).type
    nbt = numba_type(dtype)
    row = _row_function(dtype, kind, has_grad)
    classification = kind in codes.CLASSIFICATION_LOSSES
    mean_kind = kind in _MEAN_KINDS

    def kernel(pred, target, weight, grad, sums):
        s_loss = cuda.shared.array(LOSS_THREADS, nbt)
        s_hits = cuda.shared.array(LOSS_THREADS, nbt)
        m, n = pred.shape
        den = T(m * n) if mean_kind else T(m)
        t = cuda.threadIdx.x
        loss = T(0)
        hits = T(0)
        for i in range(cuda.grid(1), m, cuda.gridsize(1)):
            w = weight[i] if has_weight else T(1)
            li, ci = row(pred, target, grad, i, w / den)
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

    return cuda.jit(kernel)


def loss_grad(kind, pred, target, weight, grad, sums, stream=0):
    """Loss, gradient and accuracy of a batch in one kernel; see ``numpy_ops.loss_grad``.

    pred: (M, N) logits (``LOSS_SIGMOID_BCE``/``LOSS_SOFTMAX_*``) or
    outputs; target: (M, N) of pred's dtype, or (M,) class indices (any
    integer or float dtype) for ``codes.SPARSE_LOSSES``; weight: (M,) or
    None; grad: (M, N) output ``dL/dpred`` (``L = sum_i w_i l_i / M``) or
    None to skip; sums: (2,) float array, ``sums[0] += sum_i w_i l_i`` and,
    for classification kinds, ``sums[1] += sum_i correct_i`` (unweighted).
    """
    if kind not in _MEAN_KINDS and kind not in codes.CLASSIFICATION_LOSSES:
        raise ValueError(f"kind: unknown loss code {kind!r}")
    M, N = matrix_shape("pred", pred)
    dt = float_dtype("pred", pred)
    if kind in codes.SPARSE_LOSSES:
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
    blocks = min(ceil_div(M, LOSS_THREADS), LOSS_MAX_BLOCKS)
    # absent optional arrays are replaced by inputs of the right rank that
    # the specialised kernel never touches (never by an output: see linear.py)
    kernel[blocks, LOSS_THREADS, stream](
        pred, target, pred[0] if weight is None else weight, pred if grad is None else grad, sums
    )
    return sums
