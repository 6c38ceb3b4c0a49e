"""Device out-of-memory errors turned into a clear ``DeviceMemoryError``.

A CuPy or CUDA out-of-memory error raised inside a model method becomes a
:class:`DeviceMemoryError` naming the method, the batch size and the bytes
asked for; the model's per-batch buffers are released first so the same
model can be used again (e.g. with a smaller ``batch_size``).
"""

from __future__ import annotations

import functools
import inspect
import numbers
import re


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


def release(backend, drop_buffers) -> None:
    """Drop a model's per-batch buffers (``drop_buffers()``) and return the backend's cached blocks."""
    drop_buffers()
    if backend is not None:
        backend.release_cached_memory()


def guard(drop_buffers):
    """Decorator for a model method: a GPU out-of-memory error becomes a DeviceMemoryError.

    ``drop_buffers(model)`` releases the model's per-batch buffers.  The
    batch size reported is the method's ``batch_size`` argument (32 when
    left at None), or the number of samples for the ``*_on_batch`` methods.
    The original exception is not chained: its traceback would keep the
    failed call's device arrays alive.
    """

    def decorate(method):
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
            release(self.backend, lambda: drop_buffers(self))
            raise error

        return wrapper

    return decorate


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
