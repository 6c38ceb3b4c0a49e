"""The CPU backend: BLAS matrix products with fused, in-place epilogues.

Matrix products go to BLAS through ``np.matmul(..., out=...)`` into buffers
the model reuses every step; the work around them (bias + activation,
activation derivative + bias gradient, loss + gradient + accuracy, optimizer
updates) runs as single compiled passes from :mod:`gpunn.backend.cpu_fused`.
Softmax (a row-wise operation, not an epilogue) uses NumPy's vectorised code.
"""

from __future__ import annotations

import threading

import numpy as np

from gpunn.backend import cpu_fused, numpy_ops
from gpunn.backend.base import Backend
from gpunn.codes import Act, Opt

#: Distinct (shape, dtype) scratch buffers a thread keeps before starting over.
_SCRATCH_SHAPES = 16

_NO_VECTOR = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _c(a):
    """The array itself when C-contiguous (the compiled loops are specialised for that layout)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self):
        self._zero_cache = {}
        self._local = threading.local()

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def take_rows(self, src, index, out):
        # mode="clip": with the default "raise", np.take writes through a temporary
        # buffer and copies it (3x slower); the indices here come from a permutation
        np.take(src, index, axis=0, out=out, mode="clip")
        return out

    def linear_forward(self, x, w, b, act, alpha, y, z=None):
        bias = self._zeros(y.shape[1], y.dtype) if b is None else b
        act = Act(act)
        slope = y.dtype.type(alpha)
        if act.needs_preactivation:
            if z is None:
                raise ValueError("z: this activation needs the pre-activation buffer, got None")
            np.matmul(x, w, out=z)
            cpu_fused.bias_activation(z, bias, act, slope, y)
        else:
            np.matmul(x, w, out=y)
            if b is not None or act != Act.LINEAR:
                cpu_fused.bias_activation(y, bias, act, slope, y)
        return y

    def linear_backward(self, x, w, dy, y, z, act, alpha, dx, dw, db):
        act = Act(act)
        if act == Act.LINEAR:
            g = dy
            if db is not None:
                cpu_fused.column_sums(dy, db)
        else:
            if act.needs_preactivation and z is None:
                raise ValueError(f"z: the derivative of {act.name.lower()} needs the pre-activation, got None")
            g = self._scratch(dy.shape, dy.dtype)
            cpu_fused.activation_grad(
                g, dy, y, y if z is None else z, act, dy.dtype.type(alpha),
                dw[0] if db is None else db, db is not None,
            )  # fmt: skip
        np.matmul(x.T, g, out=dw)
        if dx is not None:
            np.matmul(g, w.T, out=dx)

    def apply_activation(self, z, act, alpha, y):
        flat = z.ndim == 1
        z2, y2 = (z.reshape(1, -1), y.reshape(1, -1)) if flat else (z, y)
        cpu_fused.apply_activation(_c(z2), Act(act), z.dtype.type(alpha), y2)
        return y

    def _scratch(self, shape, dtype):
        """A per-thread buffer for g = dy * act'(.), so that dy is left unchanged (see Backend)."""
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = {}
        key = (shape, np.dtype(dtype))
        buf = cache.get(key)
        if buf is None:
            if len(cache) >= _SCRATCH_SHAPES:
                cache.clear()
            buf = cache[key] = np.empty(shape, dtype)
        return buf

    def _zeros(self, n, dtype):
        """A cached zero bias vector (layers without a bias share one code path)."""
        key = (n, np.dtype(dtype))
        zeros = self._zero_cache.get(key)
        if zeros is None:
            zeros = self._zero_cache[key] = np.zeros(n, dtype)
        return zeros

    def loss_grad(self, kind, pred, target, weight, grad, sums, param=0.0):
        none = _NO_VECTOR[pred.dtype]
        target2d = target.reshape(target.shape[0], -1)
        if target2d.dtype != pred.dtype:  # integer class labels: the loss pass reads pred's dtype
            target2d = target2d.astype(pred.dtype)
        cpu_fused.loss_grad(
            kind,
            _c(pred),
            _c(target2d),
            none if weight is None else _c(weight),
            weight is not None,
            pred if grad is None else grad,
            grad is not None,
            sums,
            param,
        )
        return sums

    def optimizer_update(self, opt, params, grads, state, hyper):
        T = params.dtype.type
        cpu_fused.optimizer_update(Opt(opt), params, grads, state, tuple(T(v) for v in hyper))

    softmax = staticmethod(numpy_ops.softmax)
    softmax_backward = staticmethod(numpy_ops.softmax_backward)
