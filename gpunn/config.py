"""Global settings: the default float type of new models (Keras's floatx)."""

from __future__ import annotations

import numpy as np

_FLOATX = "float32"
FLOAT_TYPES = ("float32", "float64")


def floatx() -> str:
    return _FLOATX


def set_floatx(dtype) -> None:
    """Use ``"float32"`` (default) or ``"float64"`` (e.g. for gradient checks) in new models."""
    global _FLOATX
    _FLOATX = check_dtype(dtype)


def check_dtype(dtype, argument: str = "dtype") -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in FLOAT_TYPES:
        raise ValueError(f"{argument}: expected 'float32' or 'float64', got {dtype!r}")
    return name
