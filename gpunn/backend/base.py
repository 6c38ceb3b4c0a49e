"""The small set of operations every backend implements.

A model touches its numbers only through these methods (and, for cheap
bookkeeping such as slicing or a norm, through ``backend.xp``, which is
``numpy`` or ``cupy``), so a new backend implements just this class.

Semantics of each numeric method are defined, with shapes, by the function
of the same name in :mod:`gpunn.backend.numpy_ops`.
"""

from __future__ import annotations

import numpy as np


class Backend:
    #: "numpy" or "cuda"
    name: str = ""
    #: array module for generic array work (numpy or cupy)
    xp = np

    # -- arrays ------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """A backend array holding ``a`` (copied to the device if needed)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        """A host NumPy array holding ``a``."""
        return np.asarray(a)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def take_rows(self, src, index, out):
        """``out[:] = src[index]`` for a 1-D integer ``index`` (a batch gather)."""
        self.xp.take(src, index, axis=0, out=out)
        return out

    def free_device_bytes(self):
        """Free memory on the device the arrays live on, or None when host memory is used."""
        return None

    def release_cached_memory(self):
        """Return memory the backend's allocator keeps cached to the device (no-op on the CPU)."""

    def synchronize(self):
        """Wait until queued work is done (no-op on the CPU)."""

    # -- numerics (see numpy_ops for the exact meaning) ----------------------
    def linear_forward(self, x, w, b, act, alpha, y, z=None):
        raise NotImplementedError

    def linear_backward(self, x, w, dy, y, z, act, alpha, dx, dw, db):
        raise NotImplementedError

    def apply_activation(self, z, act, alpha, y):
        raise NotImplementedError

    def softmax(self, z, out):
        raise NotImplementedError

    def softmax_backward(self, g, y):
        raise NotImplementedError

    def loss_grad(self, kind, pred, target, weight, grad, sums):
        raise NotImplementedError

    def sgd_update(self, params, grads, velocity, lr, momentum, nesterov):
        raise NotImplementedError

    def adam_update(self, params, grads, m, v, lr, beta1, beta2, epsilon, step, weight_decay):
        raise NotImplementedError

    def rmsprop_update(self, params, grads, velocity, average_grad, momentum_buf, lr, rho, momentum, epsilon):
        raise NotImplementedError

    def __repr__(self):
        return f"<gpunn backend {self.name!r}>"
