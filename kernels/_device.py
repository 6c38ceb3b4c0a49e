"""The shared scalar math of :mod:`gpunn.opmath`, made callable from CUDA kernels.

The math itself is not written here: each activation, loss and optimizer
step is the very function the CPU passes inline.  Importing this module
registers every ``opmath`` scalar function as its own implementation for
Numba's CUDA target (inlined into the calling kernel), and ``opmath.like``
with a CUDA typing, so a float32 kernel has no float64 arithmetic.  Under the
simulator device code runs as Python and calls the functions directly.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import from_dtype

from gpunn import opmath
from gpunn._cuda import cuda, device_overload
from gpunn.codes import Act, LossKind

device_overload(opmath.like)(opmath.like_impl)
for _fn in opmath.SCALAR_FUNCTIONS:
    device_overload(_fn)(lambda *args, _fn=_fn: _fn)


def numba_type(dtype):
    """The Numba scalar type for a NumPy dtype (for shared/local array declarations)."""
    return from_dtype(np.dtype(dtype))


def device(fn):
    return cuda.jit(device=True, inline=True)(fn)


@functools.lru_cache(maxsize=None)
def activation(dtype, act):
    """``(forward, derivative)`` device-callable functions for activation code ``act``.

    ``forward(z, alpha) -> act(z)``; ``derivative(y, z, alpha) -> act'(z)``
    computed from the output ``y``, and from the pre-activation ``z`` for
    activations with ``Act.needs_preactivation``.  ``alpha`` (the
    activation's parameter) must already have the data's dtype.  ``dtype``
    is part of the key only because kernels are built per dtype: the math is
    dtype-generic.
    """
    return opmath.activation_functions(Act(act))


def loss_function(kind):
    """Loss ``kind``'s function: elementwise ``(p, t) -> (loss, grad, hit)`` or row-wise
    ``(pred, target, grad, i, gscale, sparse, has_grad) -> (loss_i, hit_i)``."""
    return opmath.loss_function(LossKind(kind))
