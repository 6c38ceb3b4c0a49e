"""Device functions shared by the kernels: activations and their derivatives.

Every function is built by a cached factory specialised on the dtype and the
activation code, so the compiled kernel has no branch on the code and all
constants have the data's dtype (a float64 literal would silently promote a
float32 kernel to float64 arithmetic).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import from_dtype

from gpunn import codes
from gpunn._cuda import cuda

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def numba_type(dtype):
    """The Numba scalar type for a NumPy dtype (for shared/local array declarations)."""
    return from_dtype(np.dtype(dtype))


def device(fn):
    return cuda.jit(device=True, inline=True)(fn)


@functools.lru_cache(maxsize=None)
def activation(dtype, act):
    """``(forward, derivative)`` device functions for activation code ``act``.

    ``forward(z, alpha) -> act(z)``; ``derivative(y, z, alpha) -> act'(z)``
    computed from the output ``y`` (ReLU, leaky ReLU, sigmoid, tanh) or the
    pre-activation ``z`` (GELU, see ``codes.ACT_NEEDS_PREACTIVATION``).
    ``alpha`` (leaky ReLU's slope) must already have the data's dtype.
    """
    T = np.dtype(dtype).type
    ZERO, ONE, HALF = T(0), T(1), T(0.5)
    SQRT_HALF, INV_SQRT_2PI = T(_SQRT_HALF), T(_INV_SQRT_2PI)

    if act == codes.ACT_LINEAR:

        def forward(z, alpha):
            return z

        def derivative(y, z, alpha):
            return ONE

    elif act == codes.ACT_RELU:

        def forward(z, alpha):
            return z if z > ZERO else ZERO

        def derivative(y, z, alpha):
            return ONE if y > ZERO else ZERO

    elif act == codes.ACT_LEAKY_RELU:

        def forward(z, alpha):
            return z if z > ZERO else alpha * z

        def derivative(y, z, alpha):
            return ONE if y > ZERO else alpha

    elif act == codes.ACT_SIGMOID:

        def forward(z, alpha):
            # two branches so exp never overflows
            if z >= ZERO:
                return ONE / (ONE + math.exp(-z))
            e = math.exp(z)
            return e / (ONE + e)

        def derivative(y, z, alpha):
            return y * (ONE - y)

    elif act == codes.ACT_TANH:

        def forward(z, alpha):
            return math.tanh(z)

        def derivative(y, z, alpha):
            return ONE - y * y

    elif act == codes.ACT_GELU:

        def forward(z, alpha):
            return z * (HALF * (ONE + math.erf(z * SQRT_HALF)))

        def derivative(y, z, alpha):
            cdf = HALF * (ONE + math.erf(z * SQRT_HALF))
            return cdf + z * (math.exp(-HALF * z * z) * INV_SQRT_2PI)

    else:
        raise ValueError(f"act: unknown activation code {act!r}")
    return device(forward), device(derivative)
