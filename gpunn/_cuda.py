"""The one guarded place that imports CuPy and ``numba.cuda``.

Everything else in gpunn (kernels included) gets them from here, so that a
machine without a GPU, CuPy or a CUDA driver imports gpunn cleanly, and so
that there is one answer to "why is CUDA unusable here?".

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the kernels run on
the CPU on NumPy arrays; CuPy is then not used at all.
"""

from __future__ import annotations

import dataclasses
import functools
import os

try:  # numba-cuda provides numba.cuda; kernels can be *defined* without a GPU
    from numba import cuda  # noqa: F401  (re-exported for gpunn.kernels)

    _NUMBA_CUDA_ERROR = None
except Exception as exc:  # pragma: no cover - only without numba-cuda
    cuda = None
    _NUMBA_CUDA_ERROR = f"numba.cuda could not be imported ({exc}); install numba-cuda"

_INSTALL_HINT = "install the CUDA extra matching your driver: pip install 'gpunn[cuda12]' (or 'gpunn[cuda13]')"


def simulator_enabled() -> bool:
    """True when Numba's CUDA simulator is switched on for this process."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class CudaStatus:
    usable: bool
    simulator: bool
    reason: str
    device_name: str | None = None
    cupy_version: str | None = None


@functools.lru_cache(maxsize=1)
def cuda_status() -> CudaStatus:
    """Probe once whether the CUDA backend can run here, and why not."""
    if cuda is None:
        return CudaStatus(False, False, _NUMBA_CUDA_ERROR)
    if simulator_enabled():
        return CudaStatus(True, True, "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): kernels run on the CPU", "simulator")
    try:
        import cupy
    except Exception as exc:
        return CudaStatus(False, False, f"CuPy is not installed or failed to import ({exc}); {_INSTALL_HINT}")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return CudaStatus(
            False,
            False,
            f"no usable CUDA driver ({exc}); install an NVIDIA driver and check `nvidia-smi`",
            cupy_version=cupy.__version__,
        )
    if count == 0:
        return CudaStatus(False, False, "the CUDA driver reports no GPU device", cupy_version=cupy.__version__)
    try:
        if not cuda.is_available():
            return CudaStatus(
                False,
                False,
                "numba.cuda cannot use the GPU (driver or toolkit mismatch); "
                "install numba-cuda with the extra matching your CUDA version: " + _INSTALL_HINT,
                cupy_version=cupy.__version__,
            )
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception as exc:
        return CudaStatus(False, False, f"the GPU could not be initialised ({exc})", cupy_version=cupy.__version__)
    return CudaStatus(True, False, f"GPU found: {name}", name, cupy.__version__)


def require_cuda() -> CudaStatus:
    """Return the status if CUDA is usable, else raise RuntimeError with the reason."""
    status = cuda_status()
    if not status.usable:
        raise RuntimeError(f"the 'cuda' backend is unavailable: {status.reason}")
    return status


def device_overload(func):
    """Decorator registering a typing/implementation of ``func`` for Numba's CUDA target.

    The shared scalar math (:mod:`gpunn.opmath`) uses small helpers that
    Numba compiles through ``overload``; the CPU registration lives with the
    helper, the CUDA one is made here, where ``numba.cuda`` may be imported.
    Under the simulator device code runs as Python, so nothing is registered.
    """
    if cuda is None or simulator_enabled():
        return lambda overload_func: overload_func
    from numba.cuda.extending import overload

    return overload(func, target="cuda", inline="always", strict=False)


def get_cupy():
    """The cupy module (only on a real GPU; the simulator uses NumPy)."""
    status = require_cuda()
    if status.simulator:
        raise RuntimeError("CuPy is not used under the CUDA simulator")
    import cupy

    return cupy


def cupy_special():
    """``cupyx.scipy.special`` (erf, expit, ...) for GPU-side references."""
    get_cupy()
    from cupyx.scipy import special

    return special


def array_module():
    """numpy under the simulator, cupy on a real GPU."""
    if require_cuda().simulator:
        import numpy

        return numpy
    return get_cupy()


def launch_stream():
    """The stream kernels launch on: CuPy's current stream, wrapped for Numba.

    Returns 0 (the default stream) under the simulator, which has no
    external streams.
    """
    if require_cuda().simulator:
        return 0
    cupy = get_cupy()
    return _external_stream(cupy.cuda.get_current_stream().ptr)


@functools.lru_cache(maxsize=8)
def _external_stream(ptr):
    return cuda.external_stream(ptr)


def use_device(local_rank: int) -> int:
    """Make GPU ``local_rank % device count`` current for this process (one GPU per rank); returns its id."""
    cupy = get_cupy()
    device = local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


def nccl_module():
    """``cupy.cuda.nccl`` when NCCL is available (the nvidia-nccl wheel), else None."""
    get_cupy()
    try:
        from cupy.cuda import nccl
    except Exception:
        return None
    return nccl if getattr(nccl, "available", True) else None


def current_stream_ptr() -> int:
    """Raw pointer of CuPy's current stream, the one gpunn's kernels are queued on."""
    return get_cupy().cuda.get_current_stream().ptr
