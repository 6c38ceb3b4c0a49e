"""Data-parallel scaling of ``fit`` on this machine: 1 rank vs 2 ranks, same global batch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/distributed_scaling.py [--rounds 3] [--batch 512,2048]

Each measurement is its own ``mpiexec -n {1,2}`` job (jobs interleaved 1, 2, 1, 2, ...;
the fastest of ``--rounds`` is kept).  A job trains the reference MLP 784-256-256-10
(269,322 parameters, softmax cross-entropy, Adam) on 4096 synthetic MNIST-shaped rows
on the NumPy backend and reports

- step time: the fastest epoch's wall time / steps (after a warm-up epoch);
- all-reduce time: the mean time per step spent in the gradient reduction
  (weighting + the in-place ``MPI_Allreduce`` of the flat float32 gradient);
- the bare ``MPI_Allreduce`` of a buffer of the same size (fastest of 50).

The cores are split between the ranks (BLAS threads = cores // ranks), so
the comparison is "same machine, one process vs two"; the jobs run with
``--bind-to none`` (Open MPI would bind each rank of ``-n 1``/``-n 2`` to one
core, starving a 1-rank job's second BLAS thread).  Root needs
``OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`` (set here for
the jobs); ``--oversubscribe`` lets 2 ranks run on fewer cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROWS, FEATURES, HIDDEN, CLASSES = 4096, 784, 256, 10
EPOCHS = 3  # the first is a warm-up


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def worker(batch_sizes):
    """One job's measurements (run under mpiexec); rank 0 prints one JSON line."""
    import numpy as np
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    import gpunn
    from gpunn import distributed

    gpunn.set_backend("numpy")
    rank, size = distributed.init()
    threadpool_limits(max(1, (os.cpu_count() or 1) // size))
    rng = np.random.default_rng(0)
    x = rng.random((ROWS, FEATURES), dtype=np.float32)
    y = rng.integers(0, CLASSES, ROWS)

    reduce_seconds = []
    plain = distributed.Replicas.gradient_reduction

    def timed(self, backend, grads, local_rows, global_rows):
        started = time.perf_counter()
        plain(self, backend, grads, local_rows, global_rows)
        reduce_seconds.append(time.perf_counter() - started)

    distributed.Replicas.gradient_reduction = timed

    class EpochTimer(gpunn.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.started)

    results = []
    for batch in batch_sizes:
        gpunn.set_seed(1)
        model = gpunn.Sequential(
            [gpunn.Input(shape=(FEATURES,)), gpunn.layers.Dense(HIDDEN, activation="relu"),
             gpunn.layers.Dense(HIDDEN, activation="relu"), gpunn.layers.Dense(CLASSES, activation="softmax")]
        )  # fmt: skip
        model.compile("adam", "sparse_categorical_crossentropy")
        timer = EpochTimer()
        reduce_seconds.clear()
        model.fit(x, y, batch_size=batch, epochs=EPOCHS, verbose=0, callbacks=[timer])
        steps = -(-ROWS // batch)
        timed_steps = reduce_seconds[steps:]  # after the warm-up epoch
        results.append(
            {
                "batch": batch,
                "step_ms": min(timer.times[1:]) / steps * 1e3,
                "allreduce_ms": (sum(timed_steps) / len(timed_steps) * 1e3) if timed_steps else 0.0,
            }
        )
    params = model.count_params()
    buffer = np.ones(params, np.float32)
    bare = []
    for _ in range(50):
        MPI.COMM_WORLD.Barrier()
        started = time.perf_counter()
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        bare.append(time.perf_counter() - started)
    if rank == 0:
        print(json.dumps({"ranks": size, "params": params, "results": results, "bare_allreduce_ms": min(bare) * 1e3}))


def run_job(ranks, batch_sizes):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("mpiexec not found: pip install 'gpunn[mpi]'")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONWARNINGS="ignore")
    command = [mpiexec, "-n", str(ranks), "--oversubscribe", "--bind-to", "none", sys.executable, os.path.abspath(__file__), "--worker", "--batch", ",".join(map(str, batch_sizes))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"the {ranks}-rank job failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", default="512,2048", help="global batch sizes, comma-separated")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch.split(",")]
    if args.worker:
        worker(batch_sizes)
        return
    best = {}
    for _ in range(args.rounds):
        for ranks in (1, 2):  # interleaved
            job = run_job(ranks, batch_sizes)
            for row in job["results"]:
                key = (ranks, row["batch"])
                if key not in best or row["step_ms"] < best[key]["step_ms"]:
                    best[key] = dict(row, bare=job["bare_allreduce_ms"], params=job["params"])
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); NumPy backend; reference MLP 784-256-256-10 "
          f"({best[(1, batch_sizes[0])]['params']:,} float32 parameters); fastest of {args.rounds} interleaved rounds")  # fmt: skip
    print()
    print("| global batch | 1 rank step (ms) | 2 ranks step (ms) | speed-up | all-reduce per step, 2 ranks (ms) | bare MPI_Allreduce (ms) |")
    print("|---|---|---|---|---|---|")
    for batch in batch_sizes:
        one, two = best[(1, batch)], best[(2, batch)]
        print(
            f"| {batch} | {one['step_ms']:.2f} | {two['step_ms']:.2f} | {one['step_ms'] / two['step_ms']:.2f}x "
            f"| {two['allreduce_ms']:.3f} | {two['bare']:.3f} |"
        )


if __name__ == "__main__":
    main()
