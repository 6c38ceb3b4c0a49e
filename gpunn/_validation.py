"""Checks at the API boundary: bad input fails early with a clear message.

Every error names the argument, what was expected and what was received.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import re

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
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype, copy=False)
    if out is not arr and np.issubdtype(arr.dtype, np.floating) and arr.size:
        overflow = np.isinf(out) & np.isfinite(arr)
        if overflow.any():
            at = np.argwhere(overflow)[0]
            where = ", ".join(f"{axis} {i}" for axis, i in zip(("row", "column", "index 2", "index 3"), at))
            raise ValueError(
                f"{argument}: expected values representable in {np.dtype(dtype).name} "
                f"(|x| <= {np.finfo(dtype).max:.3g}), got {float(arr[tuple(at)]):.6g} at {where}; rescale the data"
            )
    return out


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


def verbose(value, argument: str = "verbose") -> int:
    """Keras's verbose: 'auto', 0 (silent), 1 (progress bar) or 2 (one line per epoch)."""
    if value == "auto" and isinstance(value, str):
        return 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in (0, 1, 2):
        raise ValueError(f"{argument}: expected 'auto', 0, 1 or 2, got {value!r}")
    return int(value)


def metric(identifier, argument: str = "metrics") -> None:
    """A metric name (``"accuracy"`` included) or Metric instance; else an error listing the names."""
    from gpunn import metrics as metrics_mod
    from gpunn._names import unknown_name_error

    if isinstance(identifier, metrics_mod.Metric):
        return
    if not isinstance(identifier, str):
        raise TypeError(
            f"{argument}: expected metric names (str) or gpunn.metrics.Metric instances, "
            f"got {type(identifier).__name__} {identifier!r}"[:300]
        )
    if identifier.strip().lower() not in metrics_mod.names():
        raise unknown_name_error(argument, "metric", identifier, metrics_mod.names())


# ------------------------------------------------------------ device memory
class DeviceMemoryError(MemoryError):
    """The GPU ran out of memory; the message names the batch size and the bytes requested.

    The model's per-batch buffers are released first, so the same model can
    be used again, e.g. with a smaller ``batch_size``.
    """


#: exception type names that mean "the device is out of memory"
_OOM_TYPE_NAMES = ("OutOfMemoryError",)
_OOM_TEXT = re.compile(r"out[ _]of[ _]memory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation", re.IGNORECASE)


def is_device_oom(exc: BaseException) -> bool:
    """True for CuPy's ``OutOfMemoryError`` and CUDA driver/runtime out-of-memory errors.

    Matched by type name and module, so neither CuPy nor Numba is imported here.
    """
    if isinstance(exc, DeviceMemoryError):
        return False
    name, module = type(exc).__name__, type(exc).__module__ or ""
    if name in _OOM_TYPE_NAMES:
        return True
    gpu_module = module.split(".")[0] in ("cupy", "cupy_backends", "numba", "numba_cuda", "cuda")
    return gpu_module and bool(_OOM_TEXT.search(str(exc)))


def _requested_bytes(exc):
    size = getattr(exc, "_size", None)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size)
    found = re.search(r"allocating ([\d,]+) bytes", str(exc))
    return int(found.group(1).replace(",", "")) if found else None


def device_memory_error(exc, what: str, batch_size) -> DeviceMemoryError:
    """The DeviceMemoryError that replaces the out-of-memory ``exc`` raised in ``what``."""
    requested = _requested_bytes(exc)
    asked = "an unknown number of bytes" if requested is None else f"{requested:,} bytes ({requested / 2**20:.1f} MiB)"
    total = getattr(exc, "_total", None)
    so_far = f", {total:,} bytes already in use" if isinstance(total, int) and total >= 0 else ""
    smaller = max(1, batch_size // 4) if isinstance(batch_size, int) else None
    hint = f"try a smaller batch_size (e.g. {smaller})" if smaller and smaller < batch_size else "try a smaller model or less data"
    return DeviceMemoryError(
        f"{what}: the GPU ran out of memory with batch_size={batch_size}: requested {asked}{so_far}. "
        f"The training data and one set of buffers per batch size live on the GPU; {hint}. "
        f"The model's buffers were released and it can be used again. [{type(exc).__name__}: {exc}]"
    )


def _release_device_memory(model) -> None:
    """Drop the model's per-batch buffers and return cached blocks to the device."""
    model._workspaces = {}
    if model.backend is not None:
        model.backend.release_cached_memory()


def guard_device_memory(method):
    """Decorate a Sequential method so a GPU out-of-memory error becomes a DeviceMemoryError.

    The batch size reported is the method's ``batch_size`` argument (32 when
    left at None), or the number of samples for the ``*_on_batch`` methods.
    The original exception is not chained: its traceback would keep the
    failed call's device arrays alive.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        error = None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not is_device_oom(exc):
                raise
            error = device_memory_error(exc, method.__name__, _batch_size_of(signature, self, args, kwargs))
        _release_device_memory(self)
        raise error

    return wrapper


def _batch_size_of(signature, self, args, kwargs):
    try:
        bound = signature.bind(self, *args, **kwargs).arguments
    except TypeError:  # pragma: no cover - the call itself would have failed first
        return None
    if "batch_size" in bound or "batch_size" in signature.parameters:
        size = bound.get("batch_size")
        return 32 if size is None else size
    x = bound.get("x")
    try:
        return len(x)
    except TypeError:
        return None
