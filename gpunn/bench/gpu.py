"""Device-time measurements of gpunn's CUDA kernels and training step (``benchmarks/gpu_check.py``).

* ``time_ops``: the fused kernels against CuPy's unfused equivalents
  (``matmul``, add, ``maximum``; for backward ``multiply``, two ``matmul`` and
  ``sum``), timed with CUDA events on a primed queue (device time, no launch
  gaps) and end to end per call (host dispatch included), with GFLOP/s and
  the fraction of the FP32 peak computed from the device's attributes.
* ``time_training``: epochs of the reference MLP through the public
  ``model.make_train_step`` on device-resident data, against PyTorch eager
  FP32 on CUDA (TF32 off) where it is installed.
* ``time_graphs``: the same epochs with the whole step captured as a CUDA
  graph and replayed (``make_train_step(batch, graph=True)``) against eager
  launches of the same step.
* ``time_first_step``: a fresh process's time to its first training step with
  a cold and with a warm on-disk kernel cache (``gpunn.kernel_cache``).

Both interleave their contenders and judge every figure's windows with
:mod:`gpunn.bench.timing`.  Under Numba's CUDA simulator (``selftest``) every
code path runs on tiny shapes with host times, for development on machines
without a GPU.  The kernels' correctness is not checked here but by the
tests marked ``gpu`` in ``tests/test_gpu_kernels.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

import numpy as np

from gpunn import codes
from gpunn.bench import timing
from gpunn.bench.contenders import REFERENCE_DIMS, GpunnTrainer, TorchTrainer, synthetic_data

# (major, minor) -> FP32 CUDA cores per SM; a major alone covers its family.
FP32_CORES_PER_SM = {
    (3,): 192,
    (5,): 128,
    (6, 0): 64,
    (6,): 128,
    (7,): 64,
    (8, 0): 64,
    (8,): 128,
    (9,): 128,
    (10,): 128,
    (11,): 128,
    (12,): 128,
}
#: Max SM clocks (MHz) by name, for drivers that no longer report the clock attribute.
KNOWN_CLOCK_MHZ = {"H200": 1980, "H100": 1980, "A100": 1410, "L40S": 2520, "L4": 2040, "B200": 1965}

TARGET_FUSED_VS_UNFUSED = 1.3
TARGET_VS_SGEMM = 0.5
TARGET_STEP_VS_TORCH = 1.5
#: issue 11: a graph-replayed step's speed over PyTorch eager's, by batch (higher is better)
TARGET_GRAPH_SPEEDUP_VS_TORCH = {128: 3.0, 8192: 1.0}

#: Windows of a GPU figure: device times on a primed queue are steady, so 3 that agree within 5% suffice.
GPU_POLICY = timing.Policy(windows=3, quorum=2, margin=0.05, retry_windows=2, retries=2)


def cores_per_sm(major: int, minor: int):
    return FP32_CORES_PER_SM.get((major, minor), FP32_CORES_PER_SM.get((major,)))


def fp32_peak_gflops(sm_count: int, major: int, minor: int, clock_khz: float):
    """SMs x FP32 cores/SM x 2 (an FMA is two FLOPs) x clock, in GFLOP/s (None if unknown)."""
    cores = cores_per_sm(major, minor)
    if not cores or not sm_count or not clock_khz:
        return None
    return sm_count * cores * 2 * clock_khz * 1e3 / 1e9


class Device:
    """Where the timings run: CuPy arrays on a real GPU, NumPy under the simulator (host times)."""

    def __init__(self):
        from gpunn._cuda import array_module, cuda, launch_stream, require_cuda

        self.simulator = require_cuda().simulator
        self.cuda = cuda
        self.xp = array_module()
        self.stream = launch_stream()
        self._busy = None

    def dev(self, a):
        """What a kernel wrapper is given: Numba's view of a CuPy array (no stream sync), or the array."""
        if a is None or self.simulator:
            return a
        return self.cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=None, sync=False)

    def sync(self):
        if not self.simulator:
            self.xp.cuda.get_current_stream().synchronize()

    def randn(self, shape, dtype, seed, scale=1.0):
        return (self.xp.random.RandomState(seed).standard_normal(shape) * scale).astype(dtype)

    def _busy_op(self):
        """A cuBLAS SGEMM that keeps the GPU busy while the host queues the timed calls: (fn, seconds)."""
        if self._busy is None:
            cp = self.xp
            a = cp.ones((2048, 2048), cp.float32)
            c = cp.empty_like(a)

            def fn():
                cp.matmul(a, a, out=c)

            fn()
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(10):
                fn()
            stop.record()
            stop.synchronize()
            self._busy = (fn, cp.cuda.get_elapsed_time(start, stop) / 10 / 1e3)
        return self._busy

    def wall_per_call(self, fn, target_s):
        """(calls per window, end-to-end seconds per call with a sync after the loop)."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        single = max(time.perf_counter() - t0, 1e-6)
        reps = 1 if self.simulator else int(min(200, max(3, target_s / single)))
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        return reps, (time.perf_counter() - t0) / reps

    def device_window(self, fn, reps, wall, primed: list):
        """A window runner: device seconds per call, queued behind enough busy work that the GPU never waits.

        Appends to ``primed`` whether the queue stayed ahead of the GPU.
        Under the simulator a window is host time.
        """
        if self.simulator:

            def host_window():
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                primed.append(True)
                return (time.perf_counter() - t0) / reps

            return host_window
        cp = self.xp
        busy, busy_s = self._busy_op()
        n_prime = int(min(400, math.ceil(1.5 * wall * reps / max(busy_s, 1e-6)) + 2))
        start, stop = cp.cuda.Event(), cp.cuda.Event()

        def window():
            for _ in range(n_prime):
                busy()
            start.record()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            queued = time.perf_counter() - t0
            stop.record()
            stop.synchronize()
            primed.append(queued < 0.9 * n_prime * busy_s)
            return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps

        return window


@dataclass
class OpTime:
    """One op's device time per call (its windows judged), wall time per call, and whether the queue stayed primed."""

    device: timing.Timing
    wall_s: float
    primed: bool


def time_pair(device: Device, fns: dict, policy=GPU_POLICY, target_s=0.03) -> dict:
    """{name: OpTime} of each callable in ``fns``, their device windows interleaved."""
    runners, walls, primed = {}, {}, {}
    for name, fn in fns.items():
        reps, walls[name] = device.wall_per_call(fn, target_s)
        primed[name] = []
        runners[name] = device.device_window(fn, reps, walls[name], primed[name])
    got = timing.measure(runners, policy)
    return {name: OpTime(got[name], walls[name], all(primed[name])) for name in fns}


def sgemm_ceiling(n: int = 4096, repeats: int = 10) -> float:
    """Best GFLOP/s of an ``n x n`` float32 ``cupy.matmul`` (cuBLAS SGEMM) on the current GPU."""
    from gpunn._cuda import get_cupy

    cp = get_cupy()
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.matmul(a, b)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    best = math.inf
    for _ in range(repeats):
        start.record()
        cp.matmul(a, b, out=c)
        stop.record()
        stop.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2.0 * n**3 / best / 1e9


def describe_device(device: Device) -> dict:
    """{'name', 'cc', 'sms', 'clock_khz', 'clock_source', 'peak_gflops'} of the current device."""
    if device.simulator:
        return {"name": "Numba CUDA simulator", "cc": (0, 0), "sms": 0, "clock_khz": 0, "clock_source": "-", "peak_gflops": None}
    cp = device.xp
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    cc = dev.compute_capability
    major, minor = int(cc[:-1]), int(cc[-1])
    try:
        attrs = dev.attributes
    except Exception:  # older CuPy
        attrs = {}
    sms = attrs.get("MultiProcessorCount") or props.get("multiProcessorCount")
    clock = attrs.get("ClockRate") or props.get("clockRate")
    source = "device attribute"
    if not clock:
        known = next((mhz for key, mhz in KNOWN_CLOCK_MHZ.items() if key in name), None)
        clock, source = (known * 1000 if known else None), "table of known GPUs"
    peak = fp32_peak_gflops(sms, major, minor, clock)
    return {"name": name, "cc": (major, minor), "sms": sms, "clock_khz": clock, "clock_source": source, "peak_gflops": peak}


# --------------------------------------------------------------------------
# Fused kernels against CuPy's unfused equivalents
# --------------------------------------------------------------------------


def op_shapes(selftest: bool):
    """(forward (M, K, N, kind) shapes, backward (M, K, N) shapes)."""
    if selftest:
        return [(64, 16, 16, "fwd relu"), (32, 8, 8, "sgemm")], [(64, 16, 16)]
    forward = [(65536, 64, 64, "fwd relu"), (65536, 256, 256, "fwd relu"), (8192, 784, 256, "fwd relu"), (4096, 4096, 4096, "sgemm")]
    return forward, [(65536, 256, 256), (8192, 784, 256)]


def _op_row(name, flop, times, ref_name, peak):
    fused, ref = times["fused"], times["ref"]
    row = {
        "op": name,
        "fused_ms": fused.device.best * 1e3,
        "fused_wall_ms": fused.wall_s * 1e3,
        "gflops": flop / fused.device.best / 1e9,
        "ref": ref_name,
        "ref_ms": ref.device.best * 1e3,
        "ref_wall_ms": ref.wall_s * 1e3,
        "speedup": ref.device.best / fused.device.best,
        "primed": fused.primed and ref.primed,
        "reliable": timing.ratio_reliable(fused.device, ref.device),
    }
    row["peak"] = row["gflops"] / peak if peak else None
    return row


def _forward_pair(device, m, k, n, kind):
    from gpunn import kernels

    xp, d, s = device.xp, device.dev, device.stream
    x = device.randn((m, k), np.float32, 1)
    w = device.randn((k, n), np.float32, 2, scale=1 / math.sqrt(k))
    b = device.randn((n,), np.float32, 3)
    y, y2 = xp.empty((m, n), np.float32), xp.empty((m, n), np.float32)
    dx_, dw_, db_, dy_ = d(x), d(w), d(b), d(y)
    if kind == "sgemm":
        return {
            "fused": lambda: kernels.linear_forward(dx_, dw_, None, codes.ACT_LINEAR, 0.0, dy_, None, stream=s),
            "ref": lambda: xp.matmul(x, w, out=y2),
        }, "SGEMM (matmul)"

    def ref():
        xp.matmul(x, w, out=y2)
        xp.add(y2, b, out=y2)
        xp.maximum(y2, 0, out=y2)

    return {"fused": lambda: kernels.linear_forward(dx_, dw_, db_, codes.ACT_RELU, 0.0, dy_, None, stream=s), "ref": ref}, "CuPy matmul+add+maximum"


def _backward_pair(device, m, k, n):
    from gpunn import kernels

    xp, d, s = device.xp, device.dev, device.stream
    x = device.randn((m, k), np.float32, 1)
    w = device.randn((k, n), np.float32, 2, scale=1 / math.sqrt(k))
    y = xp.maximum(device.randn((m, n), np.float32, 4), 0)
    dy = device.randn((m, n), np.float32, 5)
    dx, dw, db = xp.empty((m, k), np.float32), xp.empty((k, n), np.float32), xp.empty((n,), np.float32)
    g = xp.empty((m, n), np.float32)
    v = {key: d(a) for key, a in dict(x=x, w=w, y=y, dy=dy, dx=dx, dw=dw, db=db).items()}

    def fused():
        kernels.linear_backward_weight(v["x"], v["dy"], v["y"], None, codes.ACT_RELU, 0.0, v["dw"], v["db"], stream=s)
        kernels.linear_backward_data(v["dy"], v["w"], v["y"], None, codes.ACT_RELU, 0.0, v["dx"], stream=s)

    def ref():
        xp.multiply(dy, y > 0, out=g)
        xp.matmul(g, w.T, out=dx)
        xp.matmul(x.T, g, out=dw)
        g.sum(axis=0, out=db)

    return {"fused": fused, "ref": ref}


def time_ops(device: Device, selftest: bool, peak, over_budget=lambda share: False, policy=GPU_POLICY):
    """(rows, targets, notes): each fused kernel against its unfused CuPy equivalent, device time."""
    rows, targets, notes = [], [], []
    forward, backward = op_shapes(selftest)
    for m, k, n, kind in forward:
        if over_budget(0.65):
            notes.append(f"ops: {kind} {m}x{k}->{n} skipped (time budget)")
            continue
        fns, ref_name = _forward_pair(device, m, k, n, kind)
        label = f"fwd linear {m}x{k}->{n} (GEMM)" if kind == "sgemm" else f"fwd relu {m}x{k}->{n}"
        row = _op_row(label, 2.0 * m * k * n, time_pair(device, fns, policy), ref_name, peak)
        rows.append(row)
        if kind == "sgemm":
            targets.append((f"fused forward at {m}x{k}x{n}: {row['speedup']:.2f}x of cuBLAS SGEMM speed (target >= {TARGET_VS_SGEMM})", row["speedup"] >= TARGET_VS_SGEMM))
        elif ((k, n) in ((64, 64), (256, 256)) and m >= 65536) or selftest:
            targets.append(
                (f"fused forward {m}x{k}->{n}: {row['speedup']:.2f}x faster than CuPy unfused (target >= {TARGET_FUSED_VS_UNFUSED})", row["speedup"] >= TARGET_FUSED_VS_UNFUSED)
            )
    for m, k, n in backward:
        if over_budget(0.7):
            notes.append(f"ops: backward {m}x{k}->{n} skipped (time budget)")
            continue
        rows.append(_op_row(f"bwd relu {m}x{k}->{n}", 4.0 * m * k * n, time_pair(device, _backward_pair(device, m, k, n), policy), "CuPy multiply+2 matmul+sum", peak))
    return rows, targets, notes


# --------------------------------------------------------------------------
# A training epoch: gpunn's CUDA backend against PyTorch eager
# --------------------------------------------------------------------------


def device_epoch(trainer: GpunnTrainer, x, y, batch, seed=0):
    """(epoch(), steps): shuffled epochs of ``model.make_train_step`` on data already on the device."""
    model = trainer.model
    b = model.backend
    X, Y = b.asarray(x, dtype=model.dtype), b.asarray(y, dtype=model.dtype)
    step = model.make_train_step(batch)
    n = x.shape[0]
    steps = n // batch
    rng = np.random.default_rng(seed)

    def epoch():
        order = b.asarray(rng.permutation(n).astype(np.int64))
        for i in range(steps):
            step.load_rows(X, Y, order[i * batch : (i + 1) * batch])
            step.run()
        b.synchronize()

    return epoch, steps


def bound_epoch(trainer: GpunnTrainer, x, y, batch, graph, seed=0):
    """(epoch(), steps, step): shuffled epochs whose batches are gathered on the device at an
    offset read from the step's record (``bind_rows`` + ``run_rows``), eager or as CUDA graphs."""
    model = trainer.model
    b = model.backend
    X, Y = b.asarray(x, dtype=model.dtype), b.asarray(y, dtype=model.dtype)
    step = model.make_train_step(batch, graph=graph)
    n = x.shape[0]
    steps = n // batch
    rng = np.random.default_rng(seed)

    def epoch():
        step.bind_rows(X, Y, rng.permutation(n))
        for i in range(steps):
            step.run_rows(i * batch)
        b.synchronize()

    return epoch, steps, step


def time_graphs(selftest: bool, over_budget=lambda share: False, policy=GPU_POLICY):
    """(dims text, rows, targets, notes): a training step replayed as a CUDA graph against eager
    launches of the same step, and against PyTorch eager FP32 where it is installed.

    The gpunn contenders start from the same weights and run the same device-gather step; under
    the simulator graphs are unavailable and both columns are eager (``graph="auto"``).
    """
    if selftest:
        dims, n, batches = (20, 16, 16, 3), 8, (8,)
    else:
        dims, n, batches = REFERENCE_DIMS, 65536, (128, 1024, 8192)
    x, y = synthetic_data(n, dims)
    rows, targets, notes = [], [], []
    torch = _torch_cuda(selftest, notes)
    for batch in batches:
        if over_budget(0.95):
            notes.append(f"graphs: batch {batch} skipped (time budget)")
            continue
        eager = GpunnTrainer("cuda", dims, "adam", 1e-3)
        graphed = GpunnTrainer("cuda", dims, "adam", 1e-3, weights=eager.weights())
        eager_epoch, steps, _ = bound_epoch(eager, x, y, batch, graph=False)
        graph_epoch, _, graph_step = bound_epoch(graphed, x, y, batch, graph="auto" if selftest else True)
        eager_epoch()
        graph_epoch()  # warm-up run, then the capture at the second step
        runners = {"eager": _seconds(eager_epoch), "graph": _seconds(graph_epoch)}
        if torch is not None:
            t = TorchTrainer("cpu" if selftest else "cuda", dims, "adam", 1e-3, weights=eager.weights())
            t.epoch(x, y, batch)
            runners["torch"] = _seconds(lambda t=t, batch=batch: t.epoch(x, y, batch))
        got = timing.measure(runners, policy)
        row = {
            "batch": batch, "steps": steps, "eager_step_ms": got["eager"].best / steps * 1e3,
            "graph_step_ms": got["graph"].best / steps * 1e3, "speedup": got["eager"].best / got["graph"].best,
            "captured": bool(graph_step.graph), "reliable": all(v.reliable for v in got.values()),
        }  # fmt: skip
        if "torch" in got:
            row["torch_step_ms"] = got["torch"].best / steps * 1e3
            row["vs_torch"] = got["torch"].best / got["graph"].best
            wanted = TARGET_GRAPH_SPEEDUP_VS_TORCH.get(batch)
            if wanted is not None and row["captured"]:
                targets.append((f"graph-replayed step at batch {batch} (adam): {row['vs_torch']:.2f}x PyTorch eager's speed (target >= {wanted})", row["vs_torch"] >= wanted))
        rows.append(row)
        if not graph_step.graph:
            notes.append(f"graphs: batch {batch}: no graph was captured (eager in both columns)")
    return "-".join(map(str, dims)), rows, targets, notes


#: A fresh process: import gpunn, build and compile a small model, one training step, synchronise.
FIRST_STEP_SCRIPT = textwrap.dedent(
    """
    import json, time
    start = time.perf_counter()
    import numpy as np
    import gpunn
    from gpunn import kernel_cache

    with gpunn.use_backend("cuda"):
        model = gpunn.Sequential([gpunn.Input(shape=(32,)), gpunn.layers.Dense(64, activation="relu"),
                                  gpunn.layers.Dense(10, activation="softmax")], dtype="float32")
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        x = np.random.default_rng(0).standard_normal((256, 32)).astype(np.float32)
        y = (np.arange(256) % 10).astype(np.float32)
        model.train_on_batch(x, y)
        model.backend.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - start, "stats": vars(kernel_cache.stats)}))
    """
)


def time_first_step(selftest: bool, timeout_s=600.0):
    """{"cold", "warm"}: each a fresh process's seconds from start to its first finished training
    step and its kernel-cache counters, first with an empty cache directory, then with the one the
    first process filled."""
    env = dict(os.environ)
    if selftest:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.pop("GPUNN_KERNEL_CACHE", None)
    result = {}
    with tempfile.TemporaryDirectory(prefix="gpunn-kernel-cache-") as cache_dir:
        env["GPUNN_KERNEL_CACHE_DIR"] = cache_dir
        for name in ("cold", "warm"):
            proc = subprocess.run([sys.executable, "-c", FIRST_STEP_SCRIPT], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=cache_dir)
            if proc.returncode != 0:
                raise RuntimeError(f"first-step process ({name} cache) failed: {proc.stderr.strip().splitlines()[-1:]}")
            result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _torch_cuda(selftest, notes):
    """The torch module set up for an FP32 comparison (TF32 off), or None (with a note why)."""
    try:
        import torch
    except ImportError:
        notes.append("train: PyTorch is not installed; gpunn only")
        return None
    if not selftest and not torch.cuda.is_available():
        notes.append("train: PyTorch is installed but torch.cuda.is_available() is False; gpunn only")
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch


def _seconds(fn):
    def window():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return window


def time_training(selftest: bool, over_budget=lambda share: False, policy=GPU_POLICY):
    """(dims text, rows, targets, notes): gpunn's device epoch against PyTorch's per (optimizer, batch)."""
    if selftest:
        dims, n, batches, optimizers = (20, 16, 16, 3), 8, (8,), ("sgd",)
    else:
        dims, n, batches, optimizers = REFERENCE_DIMS, 65536, (128, 1024, 8192), ("sgd", "adam")
    x, y = synthetic_data(n, dims)
    rows, targets, notes = [], [], []
    torch = _torch_cuda(selftest, notes)
    for opt in optimizers:
        lr = 0.01 if opt == "sgd" else 1e-3
        for batch in batches:
            if over_budget(0.92):
                notes.append(f"train: {opt} batch {batch} skipped (time budget)")
                continue
            g = GpunnTrainer("cuda", dims, opt, lr)
            epoch, steps = device_epoch(g, x, y, batch)
            epoch()  # warm-up: compiles kernels on first use
            runners = {"gpunn": _seconds(epoch)}
            if torch is not None:
                t = TorchTrainer("cpu" if selftest else "cuda", dims, opt, lr, weights=g.weights())
                t.epoch(x, y, batch)
                runners["torch"] = _seconds(lambda t=t, batch=batch: t.epoch(x, y, batch))
            got = timing.measure(runners, policy)
            row = {"opt": opt, "batch": batch, "steps": steps, "gpunn_step_ms": got["gpunn"].best / steps * 1e3, "reliable": all(v.reliable for v in got.values())}
            if "torch" in got:
                row["torch_step_ms"] = got["torch"].best / steps * 1e3
                row["ratio"] = got["gpunn"].best / got["torch"].best
            t0 = time.perf_counter()
            g.epoch(x, y, batch)  # the public fit(): includes the host -> device copy of the data
            row["fit_epoch_ms"] = (time.perf_counter() - t0) * 1e3
            row["gpunn_acc"] = float(np.mean(g.predict(x) == y))
            rows.append(row)
            if "ratio" in row and (batch == 8192 or selftest):
                targets.append(
                    (f"training step at batch {batch} ({opt}): {row['ratio']:.2f}x PyTorch eager's time (target <= {TARGET_STEP_VS_TORCH})", row["ratio"] <= TARGET_STEP_VS_TORCH)
                )
    return "-".join(map(str, dims)), rows, targets, notes


# --------------------------------------------------------------------------
# The printed summary
# --------------------------------------------------------------------------


def _device_line(dev):
    peak = dev.get("peak_gflops")
    cores = cores_per_sm(*dev["cc"]) if dev.get("sms") else "-"
    return (
        f"device: {dev.get('name')}  sm_{dev['cc'][0]}{dev['cc'][1]}  SMs {dev.get('sms')}  cores/SM {cores}  "
        f"clock {((dev.get('clock_khz') or 0) / 1e3):.0f} MHz ({dev.get('clock_source')})  "
        f"FP32 peak {f'{peak / 1e3:.1f} TFLOP/s' if peak else 'unknown'}"
    )


def ops_table(rows) -> list[str]:
    lines = [f"{'op':34} {'fused ms':>9} {'GFLOP/s':>9} {'%peak':>6} {'ref ms':>8} {'speedup':>8} {'fused/ref wall ms per call':>27}  ref"]
    for r in rows:
        pk = f"{r['peak']:.0%}" if r["peak"] else "-"
        wall = f"{r['fused_wall_ms']:.3f}/{r['ref_wall_ms']:.3f}"
        flags = ("" if r["primed"] else " (host-bound: device time includes launch gaps)") + ("" if r["reliable"] else " UNRELIABLE")
        lines.append(f"{r['op']:34} {r['fused_ms']:9.3f} {r['gflops']:9,.0f} {pk:>6} {r['ref_ms']:8.3f} {r['speedup']:7.2f}x {wall:>27}  {r['ref']}{flags}")
    return lines


def train_table(dims, rows) -> list[str]:
    lines = [f"{'train ' + dims:24} {'batch':>6} {'steps':>6} {'gpunn ms/step':>14} {'torch ms/step':>14} {'gpunn/torch time':>17} {'fit() epoch ms':>15} {'train acc':>10}"]
    for r in rows:
        torch_ms = f"{r['torch_step_ms']:.3f}" if "torch_step_ms" in r else "-"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        flag = "" if r["reliable"] else "  UNRELIABLE"
        lines.append(f"{r['opt']:24} {r['batch']:6d} {r['steps']:6d} {r['gpunn_step_ms']:14.3f} {torch_ms:>14} {ratio:>17} {r['fit_epoch_ms']:15.1f} {r['gpunn_acc']:10.3f}{flag}")
    return lines


def graph_table(dims, rows) -> list[str]:
    lines = [f"{'graphs ' + dims + ' (adam)':28} {'batch':>6} {'steps':>6} {'eager ms/step':>14} {'graph ms/step':>14} {'eager/graph time':>17} {'torch ms/step':>14} {'torch/graph time':>17}"]
    for r in rows:
        flag = ("" if r["captured"] else "  (not captured: eager)") + ("" if r["reliable"] else "  UNRELIABLE")
        torch_ms = f"{r['torch_step_ms']:.3f}" if "torch_step_ms" in r else "-"
        vs_torch = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else "-"
        lines.append(
            f"{'':28} {r['batch']:6d} {r['steps']:6d} {r['eager_step_ms']:14.3f} {r['graph_step_ms']:14.3f} {r['speedup']:16.2f}x {torch_ms:>14} {vs_torch:>17}{flag}"
        )
    return lines


def first_step_lines(first) -> list[str]:
    lines = ["first step of a fresh process (import, build, compile, one train_on_batch):"]
    for name in ("cold", "warm"):
        run = first[name]
        st = run["stats"]
        lines.append(
            f"  {name} kernel cache: {run['seconds']:.2f} s  (kernels compiled {st['compiled']}, loaded from the cache {st['hits']}, stored {st['stored']})"
        )
    return lines


def summary_lines(dev, correctness: str, ops, train, targets, notes, cpu: str, policy=GPU_POLICY, graphs=None, first=None) -> list[str]:
    """The closing summary of gpu_check: device, correctness verdict, tables, targets, notes."""
    lines = ["", "=" * 100, "gpu_check summary", _device_line(dev), f"host CPU: {cpu}", f"correctness: {correctness}"]
    if ops:
        lines += ["", *ops_table(ops)]
    if train:
        lines += ["", *train_table(*train)]
    if graphs:
        lines += ["", *graph_table(*graphs)]
    if first:
        lines += ["", *first_step_lines(first)]
    unreliable = sum(not r["reliable"] for r in ops) + (sum(not r["reliable"] for r in train[1]) if train else 0)
    unreliable += sum(not r["reliable"] for r in graphs[1]) if graphs else 0
    if unreliable:
        lines += ["", f"WARNING: {unreliable} figure(s) UNRELIABLE: their {policy.quorum} fastest windows disagree by more than {policy.margin:.0%}."]
    if targets:
        lines += ["", "targets:"] + [f"  [{'met' if met else 'MISSED'}] {text}" for text, met in targets]
    lines += [f"note: {note}" for note in notes]
    return lines
