"""The small set of operations every backend implements, and their contract.

A model touches its numbers only through these methods (and, for cheap
bookkeeping such as slicing or a norm, through ``backend.xp``, which is
``numpy`` or ``cupy``), so a new backend implements just this class.

The contract below is what every backend follows and what
``tests/test_backend_contract.py`` checks each backend against: the shapes
of the arguments, which arguments are outputs (written), which are read
only (left unchanged), and which are updated in place.  The numbers
themselves are specified by the function of the same name in
:mod:`gpunn.backend.numpy_ops`.  Arrays of one call share one float dtype
(float32 or float64); ``act`` is a :class:`gpunn.codes.Act`, ``kind`` a
:class:`gpunn.codes.LossKind`.  ``M`` is the batch, ``K`` a layer's inputs,
``N`` its outputs, ``P`` the number of parameters.  No method synchronises
with the host.
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

    def upload(self, host, out):
        """``out[...] = host`` for a host NumPy array, queued behind earlier work without waiting
        for it (``host`` may be reused as soon as this returns).  Returns ``out``."""
        out[...] = host
        return out

    def take_rows(self, src, index, out):
        """``out[:] = src[index]`` for a 1-D integer ``index`` (a batch gather)."""
        self.xp.take(src, index, axis=0, out=out)
        return out

    def gather_rows(self, src, order, offset, out):
        """``out[:] = src[order[offset[0] : offset[0] + len(out)]]``: a batch gather whose start is
        read from ``offset``, an integer array (1,) on the backend (so a captured CUDA graph gathers
        the batch the host named for this step).  src (R, C) or (R,) of out's dtype; order (n,)
        integer row indices.  Positions outside ``order`` or indices outside ``src`` give NaN rows."""
        from gpunn.backend import numpy_ops

        return numpy_ops.gather_rows(src, order, offset, out)

    def free_device_bytes(self):
        """Free memory on the device the arrays live on, or None when host memory is used."""
        return None

    def release_cached_memory(self):
        """Return memory the backend's allocator keeps cached to the device (no-op on the CPU)."""

    def synchronize(self):
        """Wait until queued work is done (no-op on the CPU)."""

    # -- numerics (see numpy_ops for the exact values) --------------------------
    def linear_forward(self, x, w, b, act, alpha, y, z=None, dropout=None):
        """``y = act(x @ w + b)``, times the dropout mask when ``dropout`` is given; returns ``y``.

        Read only: x (M, K), w (K, N), b (N,) or None.  Written: y (M, N).
        z (M, N) is *backend-private*: it receives what this backend's
        :meth:`linear_backward` needs (NumPy keeps the pre-activation; CUDA
        stores ``act'(x @ w + b)``, times the mask with dropout), and nothing
        else may read it.  z is required when ``act.keeps_z`` or ``dropout``
        is given (pass None otherwise; a backend may then use y as scratch).
        dropout: None or a :class:`gpunn.random.DropoutSpec`; its ``step`` is
        a backend int64 array of shape (1,), read when the work runs (never
        on the host by a GPU backend).  ``y = act(.) * 1/(1 - rate)`` where the
        mask keeps an element, 0 where it drops it (``numpy_ops.dropout_keep``).
        Its ``first_row`` (rows of a shard of the batch) is honoured by backends
        with ``row_shards`` and must be 0 for the others (ValueError).
        """
        raise NotImplementedError

    def linear_backward(self, x, w, dy, y, z, act, alpha, dx, dw, db, dropout=None):
        """Gradients of the fused layer, with ``g = dy * act'(.)`` (times the mask) formed internally.

        Read only (left unchanged): x (M, K), w (K, N), dy (M, N) dL/dy, y
        (M, N) the forward output, z (M, N) exactly as this backend's
        :meth:`linear_forward` left it (required when it was), dropout the
        forward's DropoutSpec or None.  Written: dw (K, N) ``= x.T @ g``; db
        (N,) ``= sum over the batch of g``, skipped when None; dx (M, K)
        ``= g @ w.T``, skipped when None (the first layer).  With dropout
        ``g = dy * (act'(.) * mask)``.
        """
        raise NotImplementedError

    def dropout(self, x, y, mask, dropout):
        """Dropout on its own (a Dropout layer not folded into its Dense); returns ``y``.

        Read only: x (M, N).  Written: mask (M, N) ``1/(1 - rate)`` where
        DropoutSpec ``dropout`` keeps an element, else 0 (the mask
        :meth:`linear_forward` applies); y (M, N), not aliasing x, ``x *
        1/(1 - rate)`` where kept, else 0.
        """
        raise NotImplementedError

    def apply_activation(self, z, act, alpha, y):
        """``y = act(z)`` elementwise, z and y (M, N) or (N,); ``y`` may be ``z`` (in place),
        otherwise z is left unchanged.  Returns ``y``."""
        raise NotImplementedError

    def softmax(self, z, out):
        """Row-wise softmax of z (M, N) into out (M, N), which may be z.  Returns ``out``."""
        raise NotImplementedError

    def softmax_backward(self, g, y):
        """In place on g (M, N): ``g = y * (g - sum_j g * y)`` (softmax's
        Jacobian-vector product from its output y, read only).  Returns ``g``."""
        raise NotImplementedError

    def loss_grad(self, kind, pred, target, weight, grad, sums, param=0.0):
        """Loss, gradient and hit count of one batch; returns ``sums``.

        Read only: pred (M, N) (logits for the kinds that fold an output
        activation in), target (M, N), or (M,) class indices for sparse
        kinds, weight (M,) or None.  Written: grad (M, N) ``dL/dpred`` of
        ``L = sum_i w_i l_i / M``, skipped when None.  Updated: sums (2,)
        ``sums[0] += sum_i w_i l_i``, ``sums[1] += sum_i hit_i`` (unweighted,
        classification kinds only).  param: the kind's parameter (``kind.param``,
        e.g. Huber's delta), ignored by kinds without one.
        """
        raise NotImplementedError

    def optimizer_update(self, opt, params, grads, state, hyper):
        """One optimizer step over flat buffers, element by element (``opmath.<opt.step>``).

        opt: a :class:`gpunn.codes.Opt`.  Updated in place: params (P,) and
        state (S, P), one row per slot of ``opt.slots`` up to the last the
        optimizer uses.  Read only: grads (P,).  hyper: the step's
        ``opmath.OPTIMIZER_SCALARS`` scalars (the Optimizer computes them), as host floats
        or as a backend array (OPTIMIZER_SCALARS,) of params' dtype (read on the device:
        the per-step record a captured CUDA graph reads).
        """
        raise NotImplementedError

    def __repr__(self):
        return f"<gpunn backend {self.name!r}>"
