"""The one guarded place that imports CuPy and ``numba.cuda``.

Everything else in gpunn (kernels included) gets them from here, so that a
machine without a GPU, CuPy or a CUDA driver imports gpunn cleanly, and so
that there is one answer to "why is CUDA unusable here?".

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the kernels run on
the CPU on NumPy arrays; CuPy is then not used at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

from gpunn import kernel_cache

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


#: Multiprocessors assumed under the simulator, which runs one block at a time.
SIMULATOR_MULTIPROCESSORS = 1


#: Multiprocessors of the target named by an active :func:`record_launches`.
_offline_multiprocessors: int | None = None


def multiprocessor_count() -> int:
    """Streaming multiprocessors of the current GPU (kernels size their grids by it)."""
    if _offline_multiprocessors is not None:
        return _offline_multiprocessors
    return _device_multiprocessors()


@functools.lru_cache(maxsize=1)
def _device_multiprocessors() -> int:
    if require_cuda().simulator:
        return SIMULATOR_MULTIPROCESSORS
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def kernel_jit(fn, threads_per_block=None, variant=None):
    """``cuda.jit(fn)``, declaring that every launch uses ``threads_per_block`` threads
    (when given) and caching its compiled specialisations on disk under ``variant``.

    The launch bound (PTX ``.maxntid``) lets ptxas budget registers for that
    block size instead of the 1024-thread worst case.  ``variant`` names the
    kernel with every compile-time parameter its factory closed over (dtype,
    tile, activation, flags): with it, each specialisation Numba compiles is
    kept in :mod:`gpunn.kernel_cache` and later processes load it instead of
    compiling.  The simulator's jit has neither option and gets a plain
    ``cuda.jit``.
    """
    if simulator_enabled():
        return cuda.jit(fn)
    dispatcher = cuda.jit(fn) if threads_per_block is None else cuda.jit(fn, launch_bounds=threads_per_block)
    if variant is not None:
        # the dispatcher consults ``_cache`` before compiling a signature and
        # offers it each kernel it compiled (numba-cuda internals, checked against 0.30)
        dispatcher._cache = DiskKernelCache(variant, dispatcher.targetoptions)
    return dispatcher


def target_cc(cc=None) -> tuple:
    """``(major, minor, suffix)`` of the cubins Numba builds for ``cc`` (default: the current
    device's): the ``"a"`` (architecture-specific) suffix from 9.0 on, as numba-cuda keys them."""
    if cc is None:
        from numba.cuda import dispatcher as dispatcher_module

        cc = dispatcher_module.get_current_device().compute_capability
    major, minor = int(cc[0]), int(cc[1])
    return (major, minor, "a" if (major, minor) >= (9, 0) else "")


@functools.lru_cache(maxsize=1)
def toolchain_versions() -> dict:
    """Versions of the compiler pieces outside the Python packages (NVVM), for cache keys."""
    try:
        from numba.cuda.cudadrv import nvvm

        return {"nvvm": ".".join(str(v) for v in nvvm.NVVM().get_version())}
    except Exception as exc:  # the key then says so, and stays distinct from a known version
        return {"nvvm": f"unknown ({type(exc).__name__})"}


class DiskKernelCache:
    """Stands in for a Numba dispatcher's cache: cubins kept in :mod:`gpunn.kernel_cache`.

    ``load_overload`` returns a kernel rebuilt from a stored cubin (Numba's
    launch path -- argument handling, streams -- is unchanged) or None;
    ``save_overload`` stores the cubin of a kernel Numba just compiled.
    Kernels that link extra files, use cooperative launches or were built
    with debug info are not cached.
    """

    def __init__(self, variant, options):
        self.variant = str(variant)
        self.options = {k: v for k, v in options.items() if k != "device"}

    @property
    def cache_path(self):
        root = kernel_cache.directory()
        return None if root is None else str(root)

    def key(self, argtypes, cc) -> dict:
        return kernel_cache.entry_key(self.variant, argtypes, cc, self.options, toolchain_versions())

    def load_overload(self, sig, target_context=None):
        from numba.cuda.core import sigutils

        store = kernel_cache.open_cache()
        if store is None:
            return None
        argtypes, _ = sigutils.normalize_signature(sig)
        cc = target_cc()
        entry = store.load(self.key(argtypes, cc))
        if entry is None:
            return None
        try:
            return rebuild_kernel(entry.meta["entry_name"], argtypes, cc, entry.payload)
        except Exception as exc:  # e.g. numba-cuda internals changed: compile as if uncached
            _cache_trouble(f"cannot rebuild a kernel from {store.path(self.key(argtypes, cc))} ({type(exc).__name__}: {exc})")
            return None

    def save_overload(self, sig, kernel):
        from numba.cuda.core import sigutils

        kernel_cache.count("compiled")
        store = kernel_cache.open_cache()
        library = kernel._codelibrary
        if store is None or kernel.cooperative or kernel.debug or library._linking_files or library.needs_cudadevrt:
            return
        try:
            argtypes, _ = sigutils.normalize_signature(sig)
            cc = target_cc()
            cubin = library.get_cubin(cc=cc)
            payload = bytes(getattr(cubin, "code", cubin))
        except Exception as exc:  # the kernel itself is compiled and usable; only caching fails
            _cache_trouble(f"cannot take the cubin of {self.variant} ({type(exc).__name__}: {exc})")
            return
        store.store(self.key(argtypes, cc), {"entry_name": kernel.entry_name, "cc": list(cc)}, payload)

    def flush(self):
        """Numba's ``Dispatcher`` API; entries are removed by deleting the directory."""


def _cache_trouble(message):
    import warnings

    warnings.warn(f"gpunn kernel cache: {message}; compiling instead", kernel_cache.KernelCacheWarning, stacklevel=3)


def rebuild_kernel(entry_name, argtypes, cc, cubin: bytes):
    """A launchable Numba kernel for ``argtypes`` from a cubin built for ``cc`` (no compilation).

    The same reconstruction numba-cuda's own cache performs
    (``_Kernel._rebuild`` over a ``CUDACodeLibrary`` holding only the cubin).
    """
    from numba.core import types
    from numba.core.typing import signature
    from numba.cuda import codegen as codegen_module
    from numba.cuda import dispatcher as dispatcher_module
    from numba.cuda.core.callconv import _MinimalCallHelper
    from numba.cuda.cudadrv.driver import ObjectCode

    cc = tuple(cc)
    image = ObjectCode.from_cubin(bytes(cubin), name=entry_name)
    library = codegen_module.CUDACodeLibrary._rebuild(
        codegen=None,
        name=entry_name,
        entry_name=entry_name,
        llvm_strs=None,
        ptx_cache={},
        # keyed as numba-cuda keys the current device's cubin, with or without the "a" suffix
        cubin_cache={cc: image, cc[:2]: image},
        linkerinfo_cache={},
        max_registers=None,
        nvvm_options={},
        needs_cudadevrt=False,
        nrt=False,
        use_cooperative=False,
        lto=False,
    )
    return dispatcher_module._Kernel._rebuild(
        cooperative=False,
        name=entry_name,
        signature=signature(types.none, *argtypes),
        codelibrary=library,
        debug=False,
        lineinfo=False,
        call_helper=_MinimalCallHelper(),
        extensions=[],
    )


def inlined_device_function(fn):
    """``cuda.jit(device=True)`` compiled once per signature and inlined by NVVM.

    Numba's own ``inline="always"`` re-types a copy of the function's IR in
    every caller, which costs seconds per kernel for a large unrolled body;
    ``forceinline`` compiles it once and lets LLVM inline the result.  The
    simulator's jit has no such option (nor any need for it).
    """
    if simulator_enabled():
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True)(fn)


@dataclasses.dataclass(frozen=True)
class RecordedLaunch:
    """One kernel launch captured by :func:`record_launches` (never run)."""

    dispatcher: object
    argtypes: tuple
    threads_per_block: int


class _TargetDevice:
    """Stands in for the current device when compiling for a named target."""

    def __init__(self, cc):
        self.compute_capability = cc


def _offline_only():
    if cuda is None:
        raise RuntimeError(_NUMBA_CUDA_ERROR)
    if simulator_enabled():
        raise RuntimeError(
            "offline compilation needs the real CUDA target: unset NUMBA_ENABLE_CUDASIM for this process"
        )


@contextlib.contextmanager
def _compiling_for(cc):
    """Answer ``cc`` where numba-cuda asks the (absent) current device for its compute capability.

    Numba compiles a non-inlined ``cuda.jit(device=True)`` function for
    ``get_current_device().compute_capability``, which needs a driver even
    when the caller compiles for a named target.  The override replaces
    ``numba.cuda.dispatcher.get_current_device`` and the code library's
    default target (``CUDACodeLibrary._ensure_cc``; numba-cuda internals,
    last checked against 0.30) for this block only.
    """
    from numba.cuda import dispatcher as dispatcher_module

    from numba.cuda import codegen as codegen_module

    target = _TargetDevice(tuple(cc))
    saved = dispatcher_module.get_current_device
    saved_cc = codegen_module.CUDACodeLibrary._ensure_cc
    dispatcher_module.get_current_device = lambda: target
    # a code library asked for "the current device's" PTX or cubin builds the target's
    codegen_module.CUDACodeLibrary._ensure_cc = lambda self, asked: target_cc(cc) if asked is None else asked
    try:
        yield
    finally:
        dispatcher_module.get_current_device = saved
        codegen_module.CUDACodeLibrary._ensure_cc = saved_cc


@contextlib.contextmanager
def record_launches(cc, multiprocessors):
    """Capture kernel launches instead of running them (no GPU or driver needed).

    Inside the block, ``kernel[grid, block, stream](*args)`` appends a
    :class:`RecordedLaunch` (the dispatcher, the Numba types of ``args``,
    the threads per block) to the yielded list and runs nothing, so the
    package's own launch wrappers can be called on small NumPy arrays to
    learn every kernel variant and its exact signature; launch wrappers that
    size grids by :func:`multiprocessor_count` see ``multiprocessors``.  Overrides
    ``CUDADispatcher.configure`` (numba-cuda internals) for this block only,
    and is refused under the simulator.
    """
    _offline_only()
    from numba.cuda import dispatcher as dispatcher_module

    launches: list[RecordedLaunch] = []

    class _Recorder:
        def __init__(self, kernel, blockdim):
            self.kernel = kernel
            self.blockdim = blockdim

        def __call__(self, *args):
            dims = self.blockdim if isinstance(self.blockdim, tuple) else (self.blockdim,)
            threads = 1
            for d in dims:
                threads *= int(d)
            argtypes = tuple(self.kernel.typeof_pyval(a) for a in args)
            launches.append(RecordedLaunch(self.kernel, argtypes, threads))

    def configure(self, griddim, blockdim, stream=0, sharedmem=0):
        return _Recorder(self, blockdim)

    global _offline_multiprocessors
    saved = dispatcher_module.CUDADispatcher.configure
    dispatcher_module.CUDADispatcher.configure = configure
    _offline_multiprocessors = int(multiprocessors)
    try:
        with _compiling_for(cc):
            yield launches
    finally:
        dispatcher_module.CUDADispatcher.configure = saved
        _offline_multiprocessors = None


def compile_ptx(launch: RecordedLaunch, cc) -> str:
    """PTX of a recorded launch's kernel for compute capability ``cc`` (no GPU or driver needed)."""
    _offline_only()
    options = launch.dispatcher.targetoptions
    with _compiling_for(cc):
        ptx, _ = cuda.compile_ptx(
            launch.dispatcher.py_func,
            launch.argtypes,
            cc=tuple(cc),
            fastmath=bool(options.get("fastmath", False)),
            launch_bounds=options.get("launch_bounds"),
        )
    return ptx


def compile_kernel(launch: RecordedLaunch, cc):
    """Numba's compiled kernel for a recorded launch, its cubin linked for ``cc`` (nvJitLink;
    no GPU or driver needed): what :class:`DiskKernelCache` stores after a first launch."""
    _offline_only()
    from numba.cuda import dispatcher as dispatcher_module

    with _compiling_for(cc):
        kernel = dispatcher_module._Kernel(launch.dispatcher.py_func, launch.argtypes, **launch.dispatcher.targetoptions)
        kernel._codelibrary.get_cubin(cc=target_cc(cc))
    return kernel


class GraphCaptureError(RuntimeError):
    """A CUDA graph could not be captured (the work is then run with eager launches)."""


def graph_capture_unavailable() -> str | None:
    """Why CUDA graphs cannot be captured in this process, or None when they can."""
    status = cuda_status()
    if not status.usable:
        return status.reason
    if status.simulator:
        return "Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) runs kernels on the CPU and has no CUDA graphs"
    cupy = get_cupy()
    if not hasattr(cupy.cuda.Stream, "begin_capture"):
        return f"CuPy {cupy.__version__} has no stream capture (needs CuPy >= 10)"
    return None


class CapturedGraph:
    """A captured CUDA graph with what its replays rely on: the private memory pool that served
    the capture's temporary allocations (their addresses are baked into the graph)."""

    def __init__(self, graph, pool):
        self._graph = graph
        self._pool = pool

    def launch(self):
        """Replay the graph on CuPy's current stream (queued; no host synchronisation)."""
        self._graph.launch(get_cupy().cuda.get_current_stream())


@contextlib.contextmanager
def graph_memory(pool):
    """Serve CuPy allocations from ``pool`` (a :func:`graph_pool`) inside the block."""
    with get_cupy().cuda.using_allocator(pool.malloc):
        yield


def graph_pool():
    """A private CuPy memory pool for a graph's warm-up run and capture."""
    return get_cupy().cuda.MemoryPool()


def capture_graph(body, pool) -> CapturedGraph:
    """Capture every launch and copy ``body()`` queues into one CUDA graph, without running them.

    Work goes to a private non-blocking stream in relaxed capture mode, with
    CuPy's allocations served from ``pool``: run ``body`` once eagerly inside
    :func:`graph_memory` first, so the capture reuses blocks the pool already
    holds and every address the graph bakes in stays reserved for it.  Numba
    kernels follow CuPy's current stream (:func:`launch_stream`), so they are
    captured too.  Anything that synchronises with the host (reading a
    device value) fails the capture: :class:`GraphCaptureError` says why.
    """
    reason = graph_capture_unavailable()
    if reason is not None:
        raise GraphCaptureError(reason)
    cupy = get_cupy()
    current = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)
    # the capture stream starts after the work queued so far (outside the graph)
    stream.wait_event(current.record())
    graph = None
    try:
        with stream, graph_memory(pool):
            stream.begin_capture()  # CuPy's default mode is relaxed: allocations may happen
            try:
                body()
            finally:
                graph = stream.end_capture()
    except Exception as exc:
        raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
    current.wait_event(stream.record())
    return CapturedGraph(graph, pool)
