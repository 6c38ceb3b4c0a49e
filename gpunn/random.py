"""gpunn's global random generator: ``set_seed(n)`` makes runs reproducible.

Initial weights, shuffling and validation splits all draw from it, on the
host, so the same seed and data give bit-identical weights on the NumPy
backend (and the same initial weights on every backend).
"""

from __future__ import annotations

import contextlib

import numpy as np

from gpunn import checks

_generator = np.random.default_rng()


def set_seed(seed: int) -> None:
    """Seed gpunn's generator (and NumPy's legacy global one, as Keras does)."""
    seed = checks.positive_int(seed, "seed", minimum=0)
    global _generator
    _generator = np.random.default_rng(int(seed))
    np.random.seed(int(seed) % 2**32)


def generator() -> np.random.Generator:
    return _generator


@contextlib.contextmanager
def seeded(seed: int):
    """Seed gpunn's generator for a block, then put back the previous generator and
    NumPy's legacy global state, so that a library call (e.g. a scikit-learn estimator's
    ``fit(random_state=...)``) is reproducible without reseeding the caller's randomness.

    Like :func:`set_seed` this is process-wide, not per thread.
    """
    global _generator
    saved_generator, saved_legacy = _generator, np.random.get_state()
    set_seed(seed)
    try:
        yield
    finally:
        _generator = saved_generator
        np.random.set_state(saved_legacy)
