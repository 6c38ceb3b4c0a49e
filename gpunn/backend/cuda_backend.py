"""The CUDA backend: CuPy arrays, gpunn's fused Numba kernels for the numerics.

Under Numba's CUDA simulator the arrays are NumPy arrays and the same
kernels run on the CPU (slowly; that is how CI tests this backend).

No method here synchronises with the host: kernels are queued on CuPy's
current stream (``gpunn._cuda.launch_stream``) behind the CuPy work that
produced their inputs.
"""

from __future__ import annotations

import numpy as np

from gpunn import kernels
from gpunn._cuda import array_module, cuda, launch_stream, require_cuda
from gpunn.backend.base import Backend

#: Numba views of CuPy arrays kept for reuse; cleared when full.  A model
#: touches a few dozen distinct buffers, so this covers them many times over.
_VIEW_CACHE_SIZE = 512


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._simulator = require_cuda().simulator
        self.xp = array_module()
        self._views = {}

    # -- arrays ------------------------------------------------------------
    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        if self._simulator or isinstance(a, np.ndarray):
            return np.asarray(a)
        return self.xp.asnumpy(a)

    def upload(self, host, out):
        if self._simulator:
            out[...] = host
        else:
            # an asynchronous copy on the current stream: pageable host memory is staged by the
            # driver before the call returns, so ``host`` may be refilled at once
            out.set(np.ascontiguousarray(host), stream=self.xp.cuda.get_current_stream())
        return out

    def take_rows(self, src, index, out):
        self.xp.take(src, index, axis=0, out=out)
        return out

    def free_device_bytes(self):
        if self._simulator:
            return None
        free, _total = self.xp.cuda.runtime.memGetInfo()
        # CuPy's pool holds freed blocks that are free to us but not to the driver
        pool = self.xp.get_default_memory_pool()
        return int(free + pool.free_bytes())

    def release_cached_memory(self):
        if not self._simulator:
            self._views.clear()  # views of freed buffers must not outlive them
            self.xp.get_default_memory_pool().free_all_blocks()

    def synchronize(self):
        if not self._simulator:
            self.xp.cuda.get_current_stream().synchronize()

    def _dev(self, a):
        """``a`` as Numba sees it, converting a CuPy array once per buffer.

        Numba's own conversion of a CuPy argument costs more than a small
        kernel, so views are cached by (pointer, shape, strides, dtype).  The
        views hold no reference to the CuPy array (no leak) and skip the
        stream sync that ``as_cuda_array`` would do: a freed pointer reused by
        a new array of the same key describes that new array correctly.
        """
        if a is None or self._simulator or not isinstance(a, self.xp.ndarray):
            return a
        key = (a.data.ptr, a.shape, a.strides, a.dtype.char)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _VIEW_CACHE_SIZE:
                self._views.clear()
            view = cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=None, sync=False)
            self._views[key] = view
        return view

    def _stream(self):
        return 0 if self._simulator else launch_stream()

    # -- numerics (see numpy_ops for the exact meaning) ----------------------
    def _dropout(self, dropout):
        """The DropoutSpec with its step array as the kernels see it."""
        if dropout is None:
            return None
        if dropout.first_row:
            raise ValueError(f"dropout: first_row must be 0 on the CUDA backend (it trains whole batches), got {dropout.first_row!r}")
        return dropout._replace(step=self._dev(dropout.step))

    def linear_forward(self, x, w, b, act, alpha, y, z=None, dropout=None):
        d = self._dev
        kernels.linear_forward(d(x), d(w), d(b), act, alpha, d(y), d(z), self._dropout(dropout), stream=self._stream())
        return y

    def linear_backward(self, x, w, dy, y, z, act, alpha, dx, dw, db, dropout=None):
        """dw, db and (unless dx is None) dx; dy is left unchanged (the Backend contract)."""
        d = self._dev
        stream = self._stream()
        x, dy, y, z = d(x), d(dy), d(y), d(z)
        dropout = self._dropout(dropout)
        kernels.linear_backward_weight(x, dy, y, z, act, alpha, d(dw), d(db), dropout, stream=stream)
        if dx is not None:
            kernels.linear_backward_data(dy, d(w), y, z, act, alpha, d(dx), dropout, stream=stream)

    def dropout(self, x, y, mask, dropout):
        d = self._dev
        kernels.dropout(d(x), d(y), d(mask), self._dropout(dropout), stream=self._stream())
        return y

    def apply_activation(self, z, act, alpha, y):
        # y is z (in place) stays one object through the view cache
        kernels.apply_activation(self._dev(z), act, alpha, self._dev(y), stream=self._stream())
        return y

    def softmax(self, z, out):
        xp = self.xp
        xp.subtract(z, z.max(axis=1, keepdims=True), out=out)
        xp.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def softmax_backward(self, g, y):
        g -= (g * y).sum(axis=1, keepdims=True)
        g *= y
        return g

    def loss_grad(self, kind, pred, target, weight, grad, sums, param=0.0):
        d = self._dev
        kernels.loss_grad(kind, d(pred), d(target), d(weight), d(grad), d(sums), param, stream=self._stream())
        return sums

    def optimizer_update(self, opt, params, grads, state, hyper):
        d = self._dev
        hyper = d(hyper) if hasattr(hyper, "shape") else hyper
        kernels.optimizer_update(opt, d(params), d(grads), d(state), hyper, stream=self._stream())

    def gather_rows(self, src, order, offset, out):
        d = self._dev
        kernels.gather_rows(d(src), d(order), d(offset), d(out), stream=self._stream())
        return out
