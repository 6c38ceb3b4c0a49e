"""The CPU backend: BLAS matrix products with fused, in-place epilogues.

Matrix products go to BLAS through ``np.matmul(..., out=...)`` into buffers
the model reuses every step; the work around them (bias + activation,
activation derivative + bias gradient, loss + gradient + accuracy, optimizer
updates) runs as single compiled passes from :mod:`gpunn.backend.cpu_fused`.
Softmax (a row-wise operation, not an epilogue) uses NumPy's vectorised code.

Work made of independent row blocks (inference) runs on the backend's own
threads, one block per core at a time, each block's products and epilogues
back to back on that core; meanwhile BLAS runs one thread per call
(:class:`_BlasOneThread`), so its own threads never spin against ours.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpunn.backend import cpu_fused, numpy_ops
from gpunn.backend.base import Backend
from gpunn.codes import Act, Opt

#: Distinct (shape, dtype) scratch buffers a thread keeps before starting over.
_SCRATCH_SHAPES = 16

_NO_VECTOR = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


#: Rows of an inference block.  Every product packs its whole weight matrix
#: (K x N) before multiplying, so a block must be tall for that copy to be
#: small beside the block's M*K*N multiply-adds: on a 2-core AMD EPYC (Zen 5),
#: one thread, 1024-row blocks ran a 784-512-512-256-256-128-64-10 model 8%
#: faster than 160-row ones (sized to keep activations in L2) and a 2048-wide
#: one 35% faster than 64-row ones; blocks of 512-1536 rows were all within 3%.
_BLOCK_ROWS = 1024
#: ...unless the widest layer's activations of one block would exceed this many values
#: (8 MB in float32; each thread holds one such buffer per layer), with never fewer
#: than _MIN_BLOCK_ROWS rows.
_BLOCK_VALUES = 1 << 21
_MIN_BLOCK_ROWS = 256
#: Fewest rows per thread for a training step split in row shards (``row_shards``): each
#: thread runs its shard's products at one BLAS thread and its own epilogues, so the
#: epilogues run on every core.  Same 2-core AMD EPYC, MLP 784-256-256-10: step time of
#: two shards / the whole batch at two BLAS threads was 1.15 at batch 256, 0.96 at 512,
#: 0.94 at 1024, 0.87-0.89 at 2048-4096.
_SHARD_MIN_ROWS = 256
#: ...and at most this many rows per shard where the batch is larger (several shards per
#: thread): the weight-gradient product x.T @ g over 2048 rows ran at 85% of the ceiling,
#: over 1024 rows at 97% (fit at batch 4096 / 8192: 1.0% / 2.2% faster than one shard per thread).
_SHARD_MAX_ROWS = 1024


class _BlasOneThread:
    """Reference-counted "NumPy's BLAS at one thread" while our own threads run row blocks.

    The first entrant records the BLAS thread count (the user's setting, e.g.
    from ``threadpoolctl.threadpool_limits``) and sets 1; the last one out
    restores it, so overlapping calls from several user threads never leave
    the setting changed.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = []
        self._libs = None

    def _controllers(self):
        if self._libs is None:
            try:  # scikit-learn's dependency, so present wherever gpunn is installed
                from threadpoolctl import ThreadpoolController
            except ImportError:  # pragma: no cover - then no row-block threads (threads() is 1)
                self._libs = []
                return self._libs
            libs = ThreadpoolController().select(user_api="blas").lib_controllers
            numpy_libs = [lib for lib in libs if "numpy" in lib.filepath]
            self._libs = numpy_libs or libs
        return self._libs

    def threads(self) -> int:
        """The BLAS thread count the user has set (the one recorded while we hold it at 1)."""
        with self._lock:
            counts = [n for _, n in self._saved] if self._users else [lib.num_threads for lib in self._controllers()]
        return max(counts, default=1)

    def held(self) -> bool:
        """Whether BLAS is at one thread now.  (OpenBLAS 0.3.31 ignores a thread count set
        from another thread once the main thread has set and restored it.)"""
        return all(lib.num_threads == 1 for lib in self._controllers())

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                self._saved = [(lib, lib.num_threads) for lib in self._controllers()]
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(1)
            self._users += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(n)
                self._saved = []


_BLAS_ONE_THREAD = _BlasOneThread()
_POOL: list = []  # the process's worker pool, made on first use (emptied in a forked child)
_POOL_LOCK = threading.Lock()
#: per thread: ``inside`` is True while the thread runs one of _run_blocks' blocks
_IN_BLOCK = threading.local()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _worker_pool(threads):
    with _POOL_LOCK:
        if not _POOL or _POOL[0]._max_workers < threads:
            # a larger pool replaces it, unshut: another thread may have been handed the old one
            # and not yet submitted to it (a shut-down pool refuses, RuntimeError); its idle
            # threads exit once nothing refers to it
            _POOL.clear()
            _POOL.append(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpunn-rows"))
        return _POOL[0]


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads
    os.register_at_fork(after_in_child=_POOL.clear)


def _equal_blocks(rows, most, cores):
    """``[lo, hi)`` bounds of blocks of at most ``most`` rows covering ``range(rows)``, sizes
    within one row: the fewest such blocks, their count rounded up to a multiple of ``cores``
    when there are more blocks than cores (so no block is smaller than about ``most / 2``)."""
    count = -(-rows // max(1, most))
    if count > cores:
        count = min(rows, -(-count // cores) * cores)
    size, extra = divmod(rows, max(1, count))
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def _run_blocks(run, count, threads):
    """``run(i)`` for i in range(count) on up to ``threads`` threads (the caller's and the
    pool's), each taking the next index when done, with BLAS held at one thread meanwhile.
    Runs them in order on the caller alone when ``threads`` <= 1 or BLAS could not be held
    (ours and BLAS's own threads would then fight over the cores), and when called from
    within a block (e.g. predict's per-block input check on a large block): the outer call
    already keeps every core busy, and a pool worker waiting on helpers queued behind itself
    would deadlock.  After the others stop, the error of the lowest failing index is raised."""
    if threads <= 1 or getattr(_IN_BLOCK, "inside", False):
        for i in range(count):
            run(i)
        return
    errors = {}
    order = itertools.count()  # next() on it is atomic under the GIL

    def drain():
        _IN_BLOCK.inside = True
        try:
            while True:
                i = next(order)
                if i >= count or (errors and i > min(errors)):
                    return
                try:
                    run(i)
                except BaseException as exc:  # re-raised in the caller below
                    errors[i] = exc
                    return
        finally:
            _IN_BLOCK.inside = False

    with _BLAS_ONE_THREAD as blas:
        helpers = [_worker_pool(threads - 1).submit(drain) for _ in range(threads - 1)] if blas.held() else []
        try:
            drain()
            for helper in helpers:
                # a helper still queued (the pool busy with another thread's blocks, e.g. a
                # long predict beside a training step) has nothing left to do: drop it
                # rather than wait for the other thread's work to end
                if not helper.cancel():
                    helper.result()
        except BaseException as exc:  # e.g. Ctrl-C while waiting on the helpers
            # they write into the caller's buffers (a training step's pooled workspace): stop
            # them at their next block and return only once they have
            errors.setdefault(-1, exc)
            concurrent.futures.wait(helpers)
            raise
    if errors:
        raise errors[min(errors)]


def run_on_cores(run, count):
    """``run(i)`` for i in range(count) on up to one thread per core (the caller's and the
    backend's pool), for memory-bound NumPy work that releases the GIL; see _run_blocks.
    No more threads than NumPy's BLAS may use, as row blocks: ``threadpool_limits(1)`` (or
    gpunn.distributed's share of the cores per process) is how users keep a process to one core."""
    _run_blocks(run, count, min(count, _usable_cores(), _BLAS_ONE_THREAD.threads()))


def _dropout_scalars(dropout, dtype, width):
    """(seed, step, threshold, scale, base) of a DropoutSpec for the compiled passes on (M, width)
    arrays (step read on the host; base: the index of the first element, first_row * width)."""
    dropout.check()
    step = np.uint64(int(dropout.step[0]))
    base = np.uint64(int(dropout.first_row) * width)
    return np.uint64(dropout.seed), step, np.uint64(dropout.threshold), dropout.scale(dtype), base


def _c(a):
    """The array itself when C-contiguous (the compiled loops are specialised for that layout)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self):
        self._zero_cache = {}
        self._local = threading.local()

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def take_rows(self, src, index, out):
        # mode="clip": with the default "raise", np.take writes through a temporary
        # buffer and copies it (3x slower); the indices here come from a permutation
        np.take(src, index, axis=0, out=out, mode="clip")
        return out

    def linear_forward(self, x, w, b, act, alpha, y, z=None, dropout=None):
        bias = self._zeros(y.shape[1], y.dtype) if b is None else b
        act = Act(act)
        slope = y.dtype.type(alpha)
        if dropout is not None:
            # z keeps act'(x @ w + b) times the mask: backward is then one multiply per element
            if z is None:
                raise ValueError("z: dropout needs the z buffer, got None")
            np.matmul(x, w, out=z)
            cpu_fused.bias_activation_dropout(z, bias, act, slope, y, *_dropout_scalars(dropout, y.dtype, y.shape[1]))
        elif act.needs_preactivation:
            if z is None:
                raise ValueError("z: this activation needs the pre-activation buffer, got None")
            np.matmul(x, w, out=z)
            cpu_fused.bias_activation(z, bias, act, slope, y)
        else:
            np.matmul(x, w, out=y)
            if b is not None or act != Act.LINEAR:
                cpu_fused.bias_activation_inplace(y, bias, act, slope)
        return y

    def linear_backward(self, x, w, dy, y, z, act, alpha, dx, dw, db, dropout=None):
        act = Act(act)
        if dropout is not None:
            if z is None:
                raise ValueError("z: dropout needs the z buffer of the forward pass, got None")
            g = self._scratch(dy.shape, dy.dtype)
            cpu_fused.stored_grad(g, dy, z, dw[0] if db is None else db, db is not None)
        elif act == Act.LINEAR:
            g = dy
            if db is not None:
                cpu_fused.column_sums(dy, db)
        else:
            if act.needs_preactivation and z is None:
                raise ValueError(f"z: the derivative of {act.name.lower()} needs the pre-activation, got None")
            g = self._scratch(dy.shape, dy.dtype)
            cpu_fused.activation_grad(
                g, dy, y, y if z is None or not act.needs_preactivation else z, act, dy.dtype.type(alpha),
                dw[0] if db is None else db, db is not None,
            )  # fmt: skip
        np.matmul(x.T, g, out=dw)
        if dx is not None:
            np.matmul(g, w.T, out=dx)

    def dropout(self, x, y, mask, dropout):
        """Dropout on its own (see Backend.dropout)."""
        cpu_fused.dropout_apply(_c(x), y, mask, *_dropout_scalars(dropout, y.dtype, y.shape[1]))
        return y

    def inference_block_rows(self, widths) -> int:
        """Most rows per inference block for layers of these widths (input first); see _BLOCK_ROWS."""
        return max(_MIN_BLOCK_ROWS, min(_BLOCK_ROWS, _BLOCK_VALUES // max(1, max(widths))))

    def run_row_blocks(self, fn, rows, block_rows):
        """Call ``fn(lo, hi)`` for each block ``[lo, hi)`` of ``range(rows)``, blocks of at most
        ``block_rows`` rows.

        The blocks are of equal size (within one row) and, when there are more
        blocks than the process has cores, their number is a multiple of the
        cores, so that threads finish together; the blocks depend on ``rows``,
        ``block_rows`` and the cores, never on the thread count.
        Blocks go to as many threads as NumPy's BLAS may use (and the process
        has cores for), each taking the next block when done, with BLAS
        at one thread per call meanwhile; ``fn`` must only touch its own rows.
        The error of the lowest failing block is raised after the others stop.
        """
        blocks = _equal_blocks(rows, block_rows, _usable_cores())
        _run_blocks(lambda i: fn(*blocks[i]), len(blocks), min(len(blocks), _usable_cores(), _BLAS_ONE_THREAD.threads()))

    def row_shards(self, rows, most=None):
        """``[lo, hi)`` bounds splitting a training batch of ``rows`` into row shards of equal size
        (within one row) for :meth:`run_row_shards`, or None when it is better left whole.

        At least one shard per thread, each of at most _SHARD_MAX_ROWS rows where that
        takes no more than ``most`` shards (None: no limit), their count a multiple of the
        threads.  None when the process may use fewer than two threads (cores, or NumPy's
        BLAS threads as the user set them), when some thread would get fewer than
        _SHARD_MIN_ROWS rows, or when ``most`` is below the thread count.
        """
        if rows < 2 * _SHARD_MIN_ROWS:  # before asking BLAS: this runs every training step
            return None
        threads = min(_usable_cores(), _BLAS_ONE_THREAD.threads())
        if threads < 2 or rows < threads * _SHARD_MIN_ROWS or (most is not None and most < threads):
            return None
        # at most ``most`` shards after _equal_blocks rounds their count up to a multiple of the threads
        most = rows if most is None else most // threads * threads
        size = max(min(_SHARD_MAX_ROWS, -(-rows // threads)), -(-rows // most))
        return _equal_blocks(rows, size, threads)

    def run_row_shards(self, fn, shards):
        """Call ``fn(i, lo, hi)`` for each shard ``i`` of :meth:`row_shards` on one thread per
        core, each thread taking the next shard when done, with BLAS at one thread per call
        (as :meth:`run_row_blocks`); ``fn`` must only touch its own rows and buffers.  The
        error of the lowest failing shard is raised."""
        threads = min(len(shards), _usable_cores(), _BLAS_ONE_THREAD.threads())
        _run_blocks(lambda i: fn(i, *shards[i]), len(shards), threads)

    def apply_activation(self, z, act, alpha, y):
        flat = z.ndim == 1
        z2, y2 = (z.reshape(1, -1), y.reshape(1, -1)) if flat else (z, y)
        cpu_fused.apply_activation(_c(z2), Act(act), z.dtype.type(alpha), y2)
        return y

    def _scratch(self, shape, dtype):
        """A per-thread buffer for g = dy * act'(.), so that dy is left unchanged (see Backend)."""
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = {}
        key = (shape, np.dtype(dtype))
        buf = cache.get(key)
        if buf is None:
            if len(cache) >= _SCRATCH_SHAPES:
                cache.clear()
            buf = cache[key] = np.empty(shape, dtype)
        return buf

    def _zeros(self, n, dtype):
        """A cached zero bias vector (layers without a bias share one code path)."""
        key = (n, np.dtype(dtype))
        zeros = self._zero_cache.get(key)
        if zeros is None:
            zeros = self._zero_cache[key] = np.zeros(n, dtype)
        return zeros

    def loss_grad(self, kind, pred, target, weight, grad, sums, param=0.0):
        none = _NO_VECTOR[pred.dtype]
        target2d = target.reshape(target.shape[0], -1)
        if target2d.dtype != pred.dtype:  # integer class labels: the loss pass reads pred's dtype
            target2d = target2d.astype(pred.dtype)
        cpu_fused.loss_grad(
            kind,
            _c(pred),
            _c(target2d),
            none if weight is None else _c(weight),
            weight is not None,
            pred if grad is None else grad,
            grad is not None,
            sums,
            param,
        )
        return sums

    def optimizer_update(self, opt, params, grads, state, hyper):
        T = params.dtype.type
        cpu_fused.optimizer_update(Opt(opt), params, grads, state, tuple(T(v) for v in hyper))

    softmax = staticmethod(numpy_ops.softmax)
    softmax_backward = staticmethod(numpy_ops.softmax_backward)
