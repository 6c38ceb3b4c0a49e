"""gpunn's global random generator: ``set_seed(n)`` makes runs reproducible.

Initial weights, shuffling and validation splits all draw from it, on the
host, so the same seed and data give bit-identical weights on the NumPy
backend (and the same initial weights on every backend).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

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


class DropoutSpec(NamedTuple):
    """Inverted dropout applied to a fused layer's output (``backend.linear_forward(..., dropout=)``).

    rate: the probability of dropping an element, in [0, 1).  seed: the
    layer's seed (an int in [0, 2**64)).  step: a backend int64 array of
    shape (1,) holding the training step; it stays on the device and is read
    by the kernels when they run, so the caller updates it in place (and a
    captured CUDA graph sees the current value at every replay).

    Element (r, c) of an (M, N) output is kept when its uniform draw
    ``u = dropout_bits((first_row + r) * N + c, step, seed) * 2**-24``
    (``gpunn.opmath``, Philox4x32-10) is ``>= rate``; kept elements are scaled by
    ``1 / (1 - rate)``, dropped ones are 0.  ``first_row``: where these M rows
    start in the batch (a row shard of it; the CPU backend's training step),
    so that a shard draws the very elements the whole batch would; 0 for a
    whole batch, and always 0 on the CUDA backend, which never shards.
    """

    rate: float
    seed: int
    step: object
    first_row: int = 0

    @property
    def threshold(self) -> int:
        """``ceil(rate * 2**24)``: an element is kept when its 24 random bits are >= this."""
        return math.ceil(self.rate * (1 << 24))

    def scale(self, dtype):
        """``1 / (1 - rate)`` in ``dtype`` (the factor of kept elements)."""
        return np.dtype(dtype).type(1.0 / (1.0 - self.rate))

    def check(self, argument="dropout"):
        """ValueError naming ``argument`` unless rate, seed and step are as documented."""
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)) or not 0 <= rate < 1:
            raise ValueError(f"{argument}: rate must be a number in [0, 1), got {rate!r}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise ValueError(f"{argument}: seed must be an int in [0, 2**64), got {seed!r}")
        first = self.first_row
        if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or first < 0:
            raise ValueError(f"{argument}: first_row must be an int >= 0, got {first!r}")
        step = self.step
        if getattr(step, "shape", None) != (1,) or getattr(step, "dtype", None) != np.int64:
            got = f"shape {getattr(step, 'shape', None)}, dtype {getattr(step, 'dtype', None)}"
            raise ValueError(f"{argument}: step must be a backend int64 array of shape (1,), got {got}")
        return self
