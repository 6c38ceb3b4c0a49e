"""Synchronous data-parallel training on MPI (mpi4py) and, on GPUs, NCCL (CuPy).

Turn a single-process script into a multi-process one by calling
:func:`init` first and launching it with ``mpiexec``::

    import gpunn
    gpunn.distributed.init()          # before building any model
    model = gpunn.Sequential([...]); model.compile(...)
    model.fit(x, y, batch_size=256)   # the same full x, y on every rank

    $ mpiexec -n 4 python train.py

Replicated data (the default).  Every rank passes the same full data.
``batch_size`` is the *global* batch: each rank computes the forward and
backward pass of its contiguous slice of every global batch (rank ``r`` of
``R`` takes rows ``[B*r//R, B*(r+1)//R)`` of a batch of ``B`` rows), then one
in-place all-reduce sums the flat gradient buffer, each rank's gradient
weighted by its share of the rows (``local_rows / global_rows``).  Since the
loss gradient of a slice is ``sum_i w_i dl_i / local_rows``, the sum is
exactly the single-process gradient ``sum_i w_i dl_i / global_rows`` (up to
float rounding) for uneven last batches, sample and class weights and
regularizers alike.  Every rank then applies the same update to the same
weights, so the weights stay bitwise identical.  At the start of ``fit``
rank 0's weights, optimizer state and step count are broadcast, and each
epoch's shuffle order is drawn on rank 0 and broadcast: ranks never depend
on every user seeding alike, and rank 0 draws exactly the random numbers a
single-process ``fit`` would, so with the same seed it trains the same model.

Sharded data (``with gpunn.distributed.sharded(): model.fit(x_shard, ...)``).
Each rank passes its own part of the data (for data that does not fit one
host).  The number of steps per epoch is agreed across ranks:
``ceil(total_rows / batch_size)`` with ``total_rows`` the sum of the shards;
at each step rank ``r`` takes the next ``~rows_r / steps`` rows of its
shuffled shard, so every rank finishes its shard in the same number of
steps and no rank waits forever.  Each shard is shuffled on its own rank
(from a seed drawn on rank 0).  ``evaluate`` and validation inside the block
reduce over every rank's shard.

Logs.  The losses and metrics in History, in ``evaluate`` and passed to
callbacks are the global ones: the per-rank sums (weighted loss, metric
numerators and denominators, rows seen) are summed across ranks when they
are read.  The running figures on rank 0's progress bar are rank 0's own
share; the epoch's line is global.  The non-finite-loss check reads the
reduced loss, so all ranks take the same path (and roll back together).

Processes.  Only rank 0 prints progress and writes files: ``save`` /
``save_weights`` do nothing on other ranks, and ``ModelCheckpoint``,
``CSVLogger`` and any callback with ``main_process_only = True`` run on
rank 0 alone.  Pass the same callbacks on every rank.  ``predict`` and
``evaluate`` (replicated) run locally on every rank.  An exception on one
rank during ``fit``, or one left uncaught anywhere after :func:`init`,
prints the error and aborts the whole job (``MPI_Abort``, non-zero status)
instead of leaving the other ranks waiting in a collective.

GPUs.  On the ``cuda`` backend :func:`init` binds each rank to the GPU of
its local rank on the host and builds an NCCL communicator (unique id
broadcast over MPI); the all-reduce then runs on the stream gpunn's kernels
use, with no host synchronisation between backward, all-reduce and update.
Without NCCL (or under Numba's CUDA simulator) the gradient goes through
the host and MPI.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback

import numpy as np

from gpunn.random import generator

#: environment variables set by the MPI launchers (Open MPI, MPICH / Hydra, PMIx, Slurm)
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

_world = None  # the World after init()
_sharded = False  # inside a ``sharded()`` block

_MPI_HINT = "install the mpi extra: pip install 'gpunn[mpi]' (mpi4py and Open MPI from wheels)"


class ReplicaMismatchError(ValueError):
    """The ranks called ``fit`` with different models, data sizes or settings (raised on every rank)."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(f"gpunn.distributed needs mpi4py and an MPI library ({exc}); {_MPI_HINT}") from None
    return MPI


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (``mpiexec``, ``srun``)."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


class NcclAllReduce:
    """In-place sum all-reduce of device arrays over an NCCL communicator.

    nccl: the ``cupy.cuda.nccl`` module (or a stand-in with the same
    names); comm: an ``NcclCommunicator``; stream_ptr: a function returning
    the raw pointer of the stream gpunn's kernels are queued on, so the
    reduction is ordered after backward and before the update on the device
    with no host synchronisation.
    """

    def __init__(self, nccl, comm, stream_ptr):
        self.nccl, self.comm, self.stream_ptr = nccl, comm, stream_ptr
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    @classmethod
    def create(cls, nccl, mpi_comm, stream_ptr):
        """Build the communicator: rank 0 makes the unique id, MPI broadcasts it."""
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        return cls(nccl, nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank()), stream_ptr)

    def __call__(self, array):
        """Sum ``array`` (contiguous, float32/float64, on this rank's GPU) across ranks, in place."""
        kind = self._types.get(np.dtype(array.dtype))
        if kind is None:
            raise TypeError(f"array: NCCL all-reduce supports float32 and float64, got {array.dtype}")
        if not array.flags.c_contiguous:
            raise ValueError("array: NCCL all-reduce needs a contiguous buffer")
        ptr = array.data.ptr
        self.comm.allReduce(ptr, ptr, array.size, kind, self.nccl.NCCL_SUM, self.stream_ptr())


class World:
    """The MPI world this process joined: communicator, rank, size, local rank, GPU reducer."""

    def __init__(self, comm, local_rank, device_allreduce=None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_rank = local_rank
        self.device_allreduce = device_allreduce

    # host collectives (NumPy buffers)
    def allreduce_host(self, array):
        """Sum of a NumPy array across ranks (a new array; float64 in, float64 out)."""
        MPI = _mpi()
        out = np.ascontiguousarray(array).copy()
        self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out

    def allreduce_inplace(self, array):
        MPI = _mpi()
        self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)

    def broadcast(self, array):
        """Rank 0's contents of the NumPy ``array``, in place on every rank."""
        self.comm.Bcast(array, root=0)

    def abort(self, message):
        sys.stderr.write(message)
        sys.stderr.flush()
        self.comm.Abort(1)


def _local_rank_and_size(MPI, comm):
    """(rank among the processes on this host, number of them)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


#: variables by which a user (or launcher) already chose the threads per process
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _share_cores(local_size):
    """Give each of the ``local_size`` processes on this host its share of the cores for BLAS /
    OpenMP (every process would otherwise start one thread per core and oversubscribe them):
    ``min(cores this process may run on, cores // local_size)``, unless a thread-count
    variable says otherwise.  Returns the threads per process, or None."""
    if local_size < 2 or any(name in os.environ for name in THREAD_VARIABLES):
        return None
    from threadpoolctl import threadpool_limits

    # a launcher that binds each process to some cores (Open MPI binds to a core for -n <= 2) has
    # already split them: never run more threads than the cores this process may use
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, min(allowed, (os.cpu_count() or 1) // local_size))
    threadpool_limits(threads)
    return threads


def _bind_gpu(MPI, comm, local_rank):
    """On a real GPU with the cuda backend: use GPU ``local_rank`` and build NCCL (else None)."""
    from gpunn import backend as backends
    from gpunn._cuda import cuda_status, current_stream_ptr, nccl_module, use_device

    if backends.get_backend() != "cuda" or cuda_status().simulator:
        return None
    use_device(local_rank)
    nccl = nccl_module()
    if nccl is None:
        return None
    return NcclAllReduce.create(nccl, comm, current_stream_ptr)


def init(comm=None):
    """Start (or join) MPI's world communicator; returns ``(rank, size)``.

    comm: an mpi4py communicator to use instead of ``MPI.COMM_WORLD``.
    Call it once, before building models: on the ``cuda`` backend it binds
    this process to the GPU of its local rank on the host and builds an
    NCCL communicator.  The processes on one host share its cores: each
    limits its BLAS / OpenMP threads to ``cores // processes on the host``
    unless ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` or ``MKL_NUM_THREADS``
    is set.  After it, an uncaught exception on any rank aborts the whole
    job (see the module doc).  Calling it again returns the same.
    """
    global _world
    if _world is not None:
        return _world.rank, _world.size
    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    local_rank, local_size = _local_rank_and_size(MPI, comm)
    _share_cores(local_size)
    world = World(comm, local_rank)
    if world.size > 1:  # first: a failure binding the GPU on one rank must not hang the others
        _install_excepthook(world)
    world.device_allreduce = _bind_gpu(MPI, comm, local_rank)
    _world = world
    return world.rank, world.size


def _install_excepthook(world):
    previous = sys.excepthook

    def abort_job(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        world.abort(f"gpunn.distributed: uncaught {exc_type.__name__} on rank {world.rank} of {world.size}; aborting the job\n")

    sys.excepthook = abort_job


def initialized() -> bool:
    return _world is not None


def rank() -> int:
    """This process's rank in the world (0 before :func:`init`)."""
    return 0 if _world is None else _world.rank


def size() -> int:
    """Number of processes (1 before :func:`init`)."""
    return 1 if _world is None else _world.size


def local_rank() -> int:
    """This process's rank among the processes on its host (0 before :func:`init`)."""
    return 0 if _world is None else _world.local_rank


def nccl_enabled() -> bool:
    """Whether gradients are all-reduced by NCCL on the GPU (else by MPI through the host)."""
    return _world is not None and _world.device_allreduce is not None


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes files."""
    return rank() == 0


@contextlib.contextmanager
def sharded():
    """Within the block, ``fit`` and ``evaluate`` take each rank's own shard of the data."""
    global _sharded
    saved, _sharded = _sharded, True
    try:
        yield
    finally:
        _sharded = saved


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for before :func:`init`)."""
    if _world is not None:
        _world.comm.Barrier()


# ---------------------------------------------------------------------------------------------
# what the training loop asks of the processes (gpunn.fit_loop uses replicas())
# ---------------------------------------------------------------------------------------------


class BatchPlan:
    """Which rows this rank trains on at each step of an epoch.

    steps: steps per epoch (the same on every rank); ``local(step)`` the
    (start, stop) of this rank's rows within its epoch order;
    ``global_rows(step)`` the rows of that step over all ranks.
    """

    def __init__(self, steps, bounds, totals):
        self.steps = steps
        self._bounds, self._totals = bounds, totals

    def local(self, step):
        return self._bounds[step], self._bounds[step + 1]

    def global_rows(self, step):
        return self._totals[step]

    @classmethod
    def single(cls, rows, batch_size):
        steps = math.ceil(rows / batch_size)
        bounds = [min(rows, s * batch_size) for s in range(steps + 1)]
        return cls(steps, bounds, [bounds[s + 1] - bounds[s] for s in range(steps)])


class Local:
    """One process: the training loop's collectives are identities."""

    size = 1
    is_main = True
    combine_evaluation = None

    def select_callbacks(self, callbacks, file_writers=()):
        return list(callbacks)

    def start(self, trainer, data, settings):
        return None

    def plan(self, rows, batch_size):
        return BatchPlan.single(rows, batch_size)

    def order(self, rows, shuffle):
        return generator().permutation(rows) if shuffle else np.arange(rows)

    def combine(self, values):
        return values

    def all_true(self, flag):
        return bool(flag)

    def any_true(self, flag):
        return bool(flag)

    gradient_reduction = None

    def fail(self, exc):
        return None


class Replicas(Local):
    """Several processes training one model data-parallel (see the module doc)."""

    def __init__(self, world, sharded_data):
        self.world = world
        self.size, self.is_main = world.size, world.rank == 0
        self.sharded_data = sharded_data
        self.combine_evaluation = self.combine if sharded_data else None
        self._shard_rows = None

    def select_callbacks(self, callbacks, file_writers=()):
        """Every callback on rank 0; elsewhere all but instances of ``file_writers`` (classes)
        and callbacks with ``main_process_only = True``."""
        if self.is_main:
            return list(callbacks)
        return [cb for cb in callbacks if not (isinstance(cb, file_writers) or getattr(cb, "main_process_only", False))]

    # -- start of fit ------------------------------------------------------------
    def start(self, trainer, data, settings):
        """Check the ranks agree, then give every rank rank 0's weights and optimizer state.

        data: the training data (``rows``, and arrays ``x``, ``t``, ``w`` or None)."""
        self._agree(trainer, data, settings)
        self._broadcast_state(trainer)

    def _agree(self, trainer, data, settings):
        optimizer, data_rows = trainer.optimizer, data.rows
        mine = {
            "parameters": int(trainer.params.shape[0]),
            "dtype": str(trainer.dtype),
            "optimizer": type(optimizer).__name__,
            "optimizer slots": sorted(optimizer.slots),
            "batch_size": settings["batch_size"],
            "epochs": settings["epochs"],
            "initial_epoch": settings["initial_epoch"],
            "shuffle": settings["shuffle"],
            "data mode": "sharded" if self.sharded_data else "replicated",
        }
        if not self.sharded_data:
            mine["training rows"] = data_rows
            mine["training data (sums of x, y, weights)"] = _fingerprint(data)
        everyone = self.world.comm.allgather((mine, data_rows))
        for key, value in mine.items():
            seen = [theirs[key] for theirs, _ in everyone]
            if any(v != seen[0] for v in seen):
                hint = " (with different data on each rank, fit inside `with gpunn.distributed.sharded():`)" if "training" in key else ""
                raise ReplicaMismatchError(f"fit: the ranks disagree on {key}: {seen} (rank order){hint}")
        self._shard_rows = [rows for _, rows in everyone]
        if self.sharded_data and min(self._shard_rows) == 0:
            raise ReplicaMismatchError(f"fit: every rank needs training rows in sharded mode, got {self._shard_rows} (rank order)")

    def _broadcast_state(self, trainer):
        b, optimizer = trainer.backend, trainer.optimizer
        buffers = [trainer.params] + [optimizer.slots[k] for k in sorted(optimizer.slots)]
        for buf in buffers:
            host = np.ascontiguousarray(b.to_numpy(buf))
            self.world.broadcast(host)
            buf[...] = b.asarray(host)
        iterations, rate = self.world.comm.bcast((optimizer.iterations, optimizer.learning_rate), root=0)
        optimizer.iterations = iterations
        if getattr(optimizer, "learning_rate_schedule", None) is None:  # a schedule follows the step count
            optimizer.learning_rate = rate

    # -- batches ------------------------------------------------------------------
    def plan(self, rows, batch_size):
        if self.sharded_data:
            return self._sharded_plan(batch_size)
        plan = BatchPlan.single(rows, batch_size)
        r, n, bounds = self.world.rank, self.size, plan._bounds
        starts = [bounds[s] + (bounds[s + 1] - bounds[s]) * r // n for s in range(plan.steps)]
        stops = [bounds[s] + (bounds[s + 1] - bounds[s]) * (r + 1) // n for s in range(plan.steps)]
        return _SlicedPlan(plan.steps, starts, stops, plan._totals)

    def _sharded_plan(self, batch_size):
        shard_rows = self._shard_rows
        steps = math.ceil(sum(shard_rows) / batch_size)
        per_rank = [[rows * s // steps for s in range(steps + 1)] for rows in shard_rows]
        totals = [sum(b[s + 1] - b[s] for b in per_rank) for s in range(steps)]
        return BatchPlan(steps, per_rank[self.world.rank], totals)

    def order(self, rows, shuffle):
        if self.sharded_data:
            seed = int(generator().integers(2**62)) if (shuffle and self.is_main) else 0
            seed = self.world.comm.bcast(seed, root=0)
            return np.random.default_rng([seed, self.world.rank]).permutation(rows) if shuffle else np.arange(rows)
        order = generator().permutation(rows) if (shuffle and self.is_main) else np.arange(rows)
        order = np.ascontiguousarray(order, dtype=np.int64)
        if shuffle:
            self.world.broadcast(order)
        return order

    # -- reductions --------------------------------------------------------------------
    def combine(self, values):
        return self.world.allreduce_host(np.asarray(values, dtype=np.float64))

    def all_true(self, flag):
        return bool(self.combine([0.0 if flag else 1.0])[0] == 0)

    def any_true(self, flag):
        return bool(self.combine([1.0 if flag else 0.0])[0] > 0)

    def gradient_reduction(self, backend, grads, local_rows, global_rows):
        """Sum ``grads`` (P,) across ranks, each weighted by ``local_rows / global_rows``, in place."""
        if local_rows != global_rows:
            grads *= grads.dtype.type(local_rows / global_rows)
        device = self.world.device_allreduce
        if device is not None and not isinstance(grads, np.ndarray):
            device(grads)
        elif isinstance(grads, np.ndarray):
            self.world.allreduce_inplace(grads)
        else:  # a device array without NCCL: through the host
            host = np.ascontiguousarray(backend.to_numpy(grads))
            self.world.allreduce_inplace(host)
            grads[...] = backend.asarray(host)

    def fail(self, exc):
        """Abort the job: the other ranks may be waiting in a collective for this one."""
        lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.world.abort(f"{lines}gpunn.distributed: rank {self.world.rank} of {self.size} failed during fit; aborting the job\n")


class _SlicedPlan(BatchPlan):
    """Replicated data: this rank's contiguous slice of every global batch."""

    def __init__(self, steps, starts, stops, totals):
        super().__init__(steps, None, totals)
        self._starts, self._stops = starts, stops

    def local(self, step):
        return self._starts[step], self._stops[step]


def _fingerprint(data):
    """Float64 sums of the training arrays: equal on ranks holding the same data (one pass each)."""
    arrays = (data.x, data.t, data.w)
    return [None if a is None else float(a.sum(dtype=np.float64)) for a in arrays]


def replicas():
    """What the training loop runs with: :class:`Local`, or :class:`Replicas` after :func:`init` with several ranks."""
    if _world is None or _world.size == 1:
        return Local()
    return Replicas(_world, _sharded)

