"""The CPU backend: BLAS matrix products with fused, in-place epilogues.

Matrix products go to BLAS through ``np.matmul(..., out=...)`` into buffers
the model reuses every step; the work around them (bias + activation,
activation derivative + bias gradient, loss + gradient + accuracy, optimizer
updates) runs as single compiled passes from :mod:`gpunn.backend.cpu_fused`.
Softmax as a hidden activation goes through the NumPy reference code.
"""

from __future__ import annotations

import numpy as np

from gpunn import codes
from gpunn.backend import cpu_fused, numpy_ops
from gpunn.backend.base import Backend

_NO_VECTOR = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _c(a):
    """The array itself when C-contiguous (the compiled loops are specialised for that layout)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self):
        self._zero_cache = {}

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
        if act in codes.ACT_NEEDS_PREACTIVATION:
            if z is None:
                raise ValueError("z: this activation needs the pre-activation buffer, got None")
            np.matmul(x, w, out=z)
            cpu_fused.bias_activation(z, bias, act, float(alpha), y)
        else:
            np.matmul(x, w, out=y)
            if b is not None or act != codes.ACT_LINEAR:
                cpu_fused.bias_activation(y, bias, act, float(alpha), y)
        return y

    def linear_backward(self, x, w, dy, y, z, act, alpha, dx, dw, db):
        if act != codes.ACT_LINEAR:
            cpu_fused.activation_grad(dy, y, y if z is None else z, act, float(alpha))
        if db is not None:
            cpu_fused.column_sums(dy, db)
        np.matmul(x.T, dy, out=dw)
        if dx is not None:
            np.matmul(dy, w.T, out=dx)

    def _zeros(self, n, dtype):
        """A cached zero bias vector (layers without a bias share one code path)."""
        key = (n, np.dtype(dtype))
        zeros = self._zero_cache.get(key)
        if zeros is None:
            zeros = self._zero_cache[key] = np.zeros(n, dtype)
        return zeros

    def loss_grad(self, kind, pred, target, weight, grad, sums):
        none = _NO_VECTOR[pred.dtype]
        target2d = target.reshape(target.shape[0], -1)
        cpu_fused.loss_grad(
            kind,
            _c(pred),
            _c(target2d),
            none if weight is None else _c(weight),
            weight is not None,
            pred if grad is None else grad,
            grad is not None,
            sums,
        )
        return sums

    def sgd_update(self, params, grads, velocity, lr, momentum, nesterov):
        cpu_fused.sgd_update(params, grads, params if velocity is None else velocity, float(lr), float(momentum), bool(nesterov))

    def adam_update(self, params, grads, m, v, lr, beta1, beta2, epsilon, step, weight_decay):
        lr_t = lr * np.sqrt(1 - beta2**step) / (1 - beta1**step)
        cpu_fused.adam_update(params, grads, m, v, float(lr), float(lr_t), float(beta1), float(beta2), float(epsilon), float(weight_decay))

    def rmsprop_update(self, params, grads, velocity, average_grad, momentum_buf, lr, rho, momentum, epsilon):
        use_momentum = momentum_buf is not None and momentum > 0
        cpu_fused.rmsprop_update(
            params,
            grads,
            velocity,
            velocity if average_grad is None else average_grad,
            average_grad is not None,
            velocity if momentum_buf is None else momentum_buf,
            use_momentum,
            float(lr),
            float(rho),
            float(momentum),
            float(epsilon),
        )

    apply_activation = staticmethod(numpy_ops.apply_activation)
    softmax = staticmethod(numpy_ops.softmax)
    softmax_backward = staticmethod(numpy_ops.softmax_backward)
