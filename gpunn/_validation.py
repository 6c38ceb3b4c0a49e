"""Checks at the API boundary: bad input fails early with a clear message.

Every error names the argument, what was expected and what was received.
"""

from __future__ import annotations

import numbers

import numpy as np


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:200]


def as_float_array(value, argument: str, dtype) -> np.ndarray:
    """A numeric NumPy array (cast to ``dtype``), or TypeError naming ``argument``."""
    if value is None:
        raise TypeError(f"{argument}: expected array-like numeric data, got None")
    if hasattr(value, "toarray") and hasattr(value, "nnz"):
        raise TypeError(f"{argument}: sparse matrices are not supported; pass a dense array (e.g. {argument}.toarray())")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and friends
        raise TypeError(f"{argument}: expected a rectangular array of numbers, got {_describe(value)} ({exc})") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{argument}: expected numeric data, got non-numeric values (dtype object)") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"{argument}: expected numeric data, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{argument}: expected real numbers, got complex dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def check_finite(arr: np.ndarray, argument: str) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        kind = "NaN" if np.isnan(arr[tuple(bad)]) else "infinity"
        where = f"row {bad[0]}" + (f", column {bad[1]}" if arr.ndim > 1 else "")
        raise ValueError(f"{argument}: expected finite values, found {kind} at {where}")


def features(x, dtype, n_features=None, argument: str = "x") -> np.ndarray:
    """2-D finite float features (M, K) with M >= 1 (and K == n_features when given)."""
    arr = as_float_array(x, argument, dtype)
    if arr.ndim != 2:
        raise ValueError(
            f"{argument}: expected a 2-D array (samples, features), got {arr.ndim}-D with shape {arr.shape}"
            + ("; reshape a single feature with x.reshape(-1, 1)" if arr.ndim == 1 else "")
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{argument}: expected at least one sample, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{argument}: expected at least one feature column, got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{argument}: the model expects {n_features} features per sample, got {arr.shape[1]} (shape {arr.shape})")
    check_finite(arr, argument)
    return np.ascontiguousarray(arr)


def sample_weights(sample_weight, n: int, dtype, argument: str = "sample_weight"):
    if sample_weight is None:
        return None
    w = as_float_array(sample_weight, argument, dtype)
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.ndim != 1:
        raise ValueError(f"{argument}: expected a 1-D array of one weight per sample, got shape {w.shape}")
    if w.shape[0] != n:
        raise ValueError(f"{argument}: expected {n} weights (one per sample of x), got {w.shape[0]}")
    check_finite(w, argument)
    if (w < 0).any():
        raise ValueError(f"{argument}: expected non-negative weights, found {w.min()!r}")
    return np.ascontiguousarray(w)


def positive_int(value, argument: str, allow_none_default=None, minimum: int = 1) -> int:
    if value is None and allow_none_default is not None:
        return allow_none_default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{argument}: expected a {kind} integer, got {value!r}")
    return int(value)
