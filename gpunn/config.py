"""Global settings: the default float type of new models (Keras's floatx)."""

from __future__ import annotations

from gpunn import checks

_FLOATX = "float32"


def floatx() -> str:
    return _FLOATX


def set_floatx(dtype) -> None:
    """Use ``"float32"`` (default) or ``"float64"`` (e.g. for gradient checks) in new models."""
    global _FLOATX
    _FLOATX = checks.float_dtype(dtype)
