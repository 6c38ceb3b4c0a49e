"""The CPU backend: NumPy arrays, BLAS matrix products, in-place epilogues."""

from __future__ import annotations

import numpy as np

from gpunn.backend import numpy_ops
from gpunn.backend.base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def take_rows(self, src, index, out):
        np.take(src, index, axis=0, out=out)
        return out

    linear_forward = staticmethod(numpy_ops.linear_forward)
    linear_backward = staticmethod(numpy_ops.linear_backward)
    apply_activation = staticmethod(numpy_ops.apply_activation)
    softmax = staticmethod(numpy_ops.softmax)
    softmax_backward = staticmethod(numpy_ops.softmax_backward)
    loss_grad = staticmethod(numpy_ops.loss_grad)
    sgd_update = staticmethod(numpy_ops.sgd_update)
    adam_update = staticmethod(numpy_ops.adam_update)
    rmsprop_update = staticmethod(numpy_ops.rmsprop_update)
