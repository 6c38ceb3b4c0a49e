"""Weight initializers by Keras name; all draw from gpunn's seeded generator.

Values are drawn on the host in float64 and cast, so the same seed gives the
same weights on every backend.
"""

from __future__ import annotations

import numpy as np

from gpunn import random as grandom
from gpunn.checks import lookup

_TRUNC_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def _truncated_normal(rng, shape, stddev):
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2
    return out * stddev


def _fans(shape):
    if len(shape) == 1:
        return shape[0], shape[0]
    return shape[0], shape[1]


def glorot_uniform(shape, rng):
    fan_in, fan_out = _fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape)


def glorot_normal(shape, rng):
    fan_in, fan_out = _fans(shape)
    return _truncated_normal(rng, shape, np.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC_NORMAL_STD)


def he_uniform(shape, rng):
    fan_in, _ = _fans(shape)
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, shape)


def he_normal(shape, rng):
    fan_in, _ = _fans(shape)
    return _truncated_normal(rng, shape, np.sqrt(2.0 / fan_in) / _TRUNC_NORMAL_STD)


def lecun_uniform(shape, rng):
    fan_in, _ = _fans(shape)
    limit = np.sqrt(3.0 / fan_in)
    return rng.uniform(-limit, limit, shape)


def lecun_normal(shape, rng):
    fan_in, _ = _fans(shape)
    return _truncated_normal(rng, shape, np.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD)


def orthogonal(shape, rng):
    if len(shape) < 2:
        return rng.standard_normal(shape)
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    return q.T if rows < cols else q


def random_normal(shape, rng):
    return rng.normal(0.0, 0.05, shape)


def random_uniform(shape, rng):
    return rng.uniform(-0.05, 0.05, shape)


def zeros(shape, rng):
    return np.zeros(shape)


def ones(shape, rng):
    return np.ones(shape)


_TABLE = {
    f.__name__: f
    for f in (
        glorot_uniform,
        glorot_normal,
        he_uniform,
        he_normal,
        lecun_uniform,
        lecun_normal,
        orthogonal,
        random_normal,
        random_uniform,
        zeros,
        ones,
    )
}


def names() -> list[str]:
    return sorted(_TABLE)


def get(identifier, argument: str = "kernel_initializer"):
    """Resolve an initializer name (or a callable ``f(shape, rng) -> array``)."""
    if callable(identifier):
        return identifier
    return lookup(argument, "initializer", identifier, _TABLE)


def initialize(identifier, shape, dtype, argument: str = "kernel_initializer"):
    """Draw an initial array of ``shape`` with gpunn's generator, cast to ``dtype``."""
    values = np.asarray(get(identifier, argument)(tuple(shape), grandom.generator()), dtype=np.float64)
    if values.shape != tuple(shape):
        raise ValueError(f"{argument}: initializer returned shape {values.shape}, expected {tuple(shape)}")
    return values.astype(dtype)
