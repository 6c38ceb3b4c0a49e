"""Backend selection: ``"numpy"`` (CPU), ``"cuda"`` (CuPy + gpunn's Numba kernels), or ``"auto"``.

The choice comes from :func:`set_backend`, else the ``GPUNN_BACKEND``
environment variable, else ``"auto"``: CUDA where a usable GPU is present,
NumPy otherwise (said once, at info level, with the reason).  Asking
explicitly for ``"cuda"`` where it cannot run raises :class:`RuntimeError`
with the reason; there is never a silent fallback from an explicit request.
"""

from __future__ import annotations

import contextlib
import logging
import os

from gpunn.backend.base import Backend

logger = logging.getLogger("gpunn")

BACKEND_NAMES = ("numpy", "cuda", "auto")

_requested: str | None = None
_instances: dict[str, Backend] = {}
_resolved: Backend | None = None


def _validate_name(name) -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    return name.lower()


def _make(name: str) -> Backend:
    if name not in _instances:
        if name == "numpy":
            from gpunn.backend.numpy_backend import NumpyBackend

            _instances[name] = NumpyBackend()
        else:
            from gpunn._cuda import require_cuda

            require_cuda()
            from gpunn.backend.cuda_backend import CudaBackend

            _instances[name] = CudaBackend()
    return _instances[name]


def _resolve(name: str) -> Backend:
    if name != "auto":
        return _make(name)
    from gpunn._cuda import cuda_status

    status = cuda_status()
    if status.usable and not status.simulator:
        logger.info("gpunn: backend 'auto' chose 'cuda' (%s)", status.reason)
        return _make("cuda")
    why = "the CUDA simulator is only used when asked for explicitly" if status.simulator else status.reason
    logger.info("gpunn: backend 'auto' chose 'numpy' because CUDA is unusable: %s", why)
    return _make("numpy")


def set_backend(name: str) -> str:
    """Select the backend for models built from now on; returns the resolved name.

    Raises RuntimeError when ``"cuda"`` is requested but cannot run here.
    """
    global _requested, _resolved
    name = _validate_name(name)
    backend = _resolve(name)
    _requested, _resolved = name, backend
    return backend.name


@contextlib.contextmanager
def use_backend(name: str):
    """Select backend ``name`` for a block, then restore the previous selection::

        with gpunn.use_backend("numpy"):
            model = build_model()   # built on NumPy

    Yields the resolved name (``"numpy"`` or ``"cuda"``).  Like
    :func:`set_backend` this is process-wide, not per thread.  The previous
    selection comes back even when the block raises, and also when it was
    still the unresolved default (``GPUNN_BACKEND`` / ``"auto"``).
    """
    global _requested, _resolved
    saved = (_requested, _resolved)
    resolved = set_backend(name)
    try:
        yield resolved
    finally:
        _requested, _resolved = saved


def current() -> Backend:
    """The active Backend object (resolving the default on first use)."""
    global _requested, _resolved
    if _resolved is None:
        env = os.environ.get("GPUNN_BACKEND")
        name = _validate_name(env) if env else "auto"
        _resolved = _resolve(name)
        _requested = name
    return _resolved


def get_backend() -> str:
    """Name of the active backend: ``"numpy"`` or ``"cuda"``."""
    return current().name


def get(name: str | None) -> Backend:
    """The Backend object for ``name`` (None: the active one)."""
    if name is None:
        return current()
    return _resolve(_validate_name(name))


def clear_session(free_memory=True):
    """Keras's ``backend.clear_session()``: see :func:`gpunn.utils.clear_session` (harmless to call)."""
    from gpunn import utils

    utils.clear_session(free_memory)
