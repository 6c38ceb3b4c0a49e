"""One-command check of gpunn's CUDA kernels on a real GPU (issue 3), under 3 minutes.

    python benchmarks/gpu_check.py            # everything
    python benchmarks/gpu_check.py --only correctness,ops,train --budget 170

(a) correctness: every kernel of ``gpunn.kernels`` (fused linear forward,
    backward-data, backward-weight, the activation kernel, the fused loss and
    the three optimizers), float32 and float64, on large ragged shapes,
    against float64 references -- CuPy/cuBLAS for the matrix products and
    activations, ``gpunn.backend.numpy_ops`` (the reference the kernels are
    specified by) for losses and optimizers.  Output buffers start as NaN, so
    an element a kernel fails to write is caught.
(b) speed of the fused kernels against CuPy's unfused equivalents (``matmul``,
    add, ``maximum``; for backward ``multiply``, two ``matmul`` and ``sum``),
    timed with CUDA events on a primed queue (device time, no launch gaps)
    and also end to end per call (host dispatch included); ms, GFLOP/s and
    the fraction of the FP32 peak computed from the device's attributes
    (SMs x FP32 cores/SM x 2 x clock).
(c) a training epoch of the reference MLP 784-256-256-10 (softmax
    cross-entropy) at batch 128, 1024 and 8192, gpunn's CUDA backend against
    PyTorch eager FP32 on CUDA (TF32 off) where PyTorch is installed.

Targets reported against: fused forward >= 1.3x faster than CuPy unfused at
batch 65536 for 64->64 and 256->256; fused forward >= 0.5x cuBLAS SGEMM at
4096^3; a full training step within 1.5x of PyTorch eager at batch 8192.

Exit status: 0 all correctness checks passed, 1 some failed (targets are
reported, not judged), 2 no usable GPU here.  ``--selftest`` runs every code
path on Numba's CUDA simulator with tiny shapes (CPU only; for development).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))

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


def cores_per_sm(major: int, minor: int):
    return FP32_CORES_PER_SM.get((major, minor), FP32_CORES_PER_SM.get((major,)))


def fp32_peak_gflops(sm_count: int, major: int, minor: int, clock_khz: float):
    """SMs x FP32 cores/SM x 2 (an FMA is two FLOPs) x clock, in GFLOP/s (None if unknown)."""
    cores = cores_per_sm(major, minor)
    if not cores or not sm_count or not clock_khz:
        return None
    return sm_count * cores * 2 * clock_khz * 1e3 / 1e9


# --------------------------------------------------------------------------
# Float64 references written against an array module (numpy or cupy)
# --------------------------------------------------------------------------


def _special(xp):
    if xp.__name__ == "numpy":
        from scipy import special
    else:
        from gpunn import _cuda

        special = _cuda.cupy_special()
    return special.erf, special.expit


def ref_act(xp, z, act, alpha):
    from gpunn import codes

    erf, expit = _special(xp)
    if act == codes.ACT_LINEAR:
        return z.copy()
    if act == codes.ACT_RELU:
        return xp.maximum(z, 0)
    if act == codes.ACT_LEAKY_RELU:
        return xp.where(z > 0, z, alpha * z)
    if act == codes.ACT_SIGMOID:
        return expit(z)
    if act == codes.ACT_TANH:
        return xp.tanh(z)
    if act == codes.ACT_GELU:
        return z * 0.5 * (1 + erf(z * 0.7071067811865476))
    raise ValueError(act)


def ref_dact(xp, y, z, act, alpha):
    """act'(.) from the forward output y (or the pre-activation z for GELU), as numpy_ops defines it."""
    from gpunn import codes

    erf, _ = _special(xp)
    if act == codes.ACT_LINEAR:
        return xp.ones_like(y)
    if act == codes.ACT_RELU:
        return (y > 0).astype(y.dtype)
    if act == codes.ACT_LEAKY_RELU:
        return xp.where(y > 0, 1.0, alpha).astype(y.dtype)
    if act == codes.ACT_SIGMOID:
        return y * (1 - y)
    if act == codes.ACT_TANH:
        return 1 - y * y
    if act == codes.ACT_GELU:
        cdf = 0.5 * (1 + erf(z * 0.7071067811865476))
        pdf = xp.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    raise ValueError(act)


def violation(xp, got, ref, tol):
    """max(|got - ref| / tol) over all elements (inf where got is not finite), and max |got - ref|."""
    got = got.astype(xp.float64)
    err = xp.abs(got - ref)
    ratio = err / tol
    ratio = xp.where(xp.isfinite(got), ratio, xp.inf)
    return float(ratio.max()) if ratio.size else 0.0, float(err.max()) if err.size else 0.0


# --------------------------------------------------------------------------
# The environment: a real GPU (CuPy) or the simulator (NumPy)
# --------------------------------------------------------------------------


class Env:
    def __init__(self, simulator: bool):
        self.simulator = simulator
        from gpunn import _cuda

        self.cuda = _cuda.cuda
        if simulator:
            import numpy

            self.xp = numpy
            self.stream = 0
        else:
            self.xp = _cuda.get_cupy()
            try:
                self.stream = _cuda.launch_stream()
            except Exception as exc:  # pragma: no cover - depends on the driver
                print(f"gpu_check: launch_stream() failed ({exc}); launching on the default stream")
                self.stream = 0
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
        a = self.xp.random.RandomState(seed).standard_normal(shape) * scale
        return a.astype(dtype)

    def rand(self, shape, dtype, seed):
        return self.xp.random.RandomState(seed).random_sample(shape).astype(dtype)

    def nan(self, shape, dtype):
        return self.xp.full(shape, self.xp.nan, dtype=dtype)

    def host(self, a):
        import numpy

        return numpy.asarray(a) if self.simulator else self.xp.asnumpy(a)

    # -- timing ------------------------------------------------------------
    def _busy_op(self):
        """A cuBLAS SGEMM that keeps the GPU busy while the host queues the timed calls."""
        if self._busy is None:
            cp = self.xp
            a = cp.ones((2048, 2048), cp.float32)
            c = cp.empty_like(a)
            fn = lambda: cp.matmul(a, a, out=c)  # noqa: E731
            fn()
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(10):
                fn()
            stop.record()
            stop.synchronize()
            self._busy = (fn, cp.cuda.get_elapsed_time(start, stop) / 10 / 1e3, (a, c))
        return self._busy

    def time_call(self, fn, target_s=0.03, windows=3):
        """(device seconds per call, wall seconds per call, queue stayed primed).

        Wall: end to end per call with a sync after the loop (host dispatch
        included).  Device: CUDA events around the calls, queued behind enough
        busy work that the GPU never waits for the host; the fastest of
        ``windows``.  Under the simulator both are host times.
        """
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        single = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(200, max(3, target_s / single)))
        if self.simulator:
            reps = 1
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        wall = (time.perf_counter() - t0) / reps
        if self.simulator:
            return wall, wall, True
        cp = self.xp
        busy, busy_s, _ = self._busy_op()
        n_prime = int(min(400, math.ceil(1.5 * wall * reps / max(busy_s, 1e-6)) + 2))
        best, primed_all = math.inf, True
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(windows):
            for _ in range(n_prime):
                busy()
            start.record()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            queued = time.perf_counter() - t0
            stop.record()
            stop.synchronize()
            best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps)
            primed_all &= queued < 0.9 * n_prime * busy_s
        return best, wall, primed_all


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


class Report:
    def __init__(self, budget_s):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.checks = []  # (name, ok, detail)
        self.ops = []  # dict rows
        self.train = []  # dict rows
        self.targets = []  # (text, met or None)
        self.notes = []
        self.device = {}

    def elapsed(self):
        return time.perf_counter() - self.t0

    def over_budget(self, share=1.0):
        return self.elapsed() > self.budget_s * share

    def log(self, msg):
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def check(self, name, ok, detail=""):
        self.checks.append((name, bool(ok), detail))
        if not ok:
            self.log(f"FAIL {name}: {detail}")


# --------------------------------------------------------------------------
# (a) correctness
# --------------------------------------------------------------------------


def _tolerances(dtype):
    import numpy as np

    if np.dtype(dtype) == np.float32:
        return {"gemm": 1e-4, "elem": 1e-5, "abs": 1e-6}
    return {"gemm": 1e-12, "elem": 1e-11, "abs": 1e-13}


def check_linear(env, rep, dtype, act, shapes, with_bias=True, with_db=True, alpha=0.2, which=("fwd", "bwd_data", "bwd_weight")):
    import numpy as np

    from gpunn import codes, kernels

    xp, d = env.xp, env.dev
    tol = _tolerances(dtype)
    f64 = xp.float64
    needs_z = act in codes.ACT_NEEDS_PREACTIVATION
    a = alpha if act == codes.ACT_LEAKY_RELU else 0.0
    tag = f"{np.dtype(dtype).name} act={act}"
    lip = 1.2  # bound on |act'| of every activation (GELU's is ~1.13)
    for M, K, N in shapes:
        shape = f"M={M} K={K} N={N}"
        x = env.randn((M, K), dtype, 1)
        w = env.randn((K, N), dtype, 2, scale=1 / math.sqrt(K))
        b = env.randn((N,), dtype, 3, scale=0.5)
        x64, w64, b64 = x.astype(f64), w.astype(f64), b.astype(f64)
        if "fwd" in which:
            y, z = env.nan((M, N), dtype), env.nan((M, N), dtype) if needs_z else None
            kernels.linear_forward(d(x), d(w), d(b) if with_bias else None, act, a, d(y), d(z), stream=env.stream)
            env.sync()
            z_ref = x64 @ w64 + (b64 if with_bias else 0)
            mag = xp.abs(x64) @ xp.abs(w64) + (xp.abs(b64) if with_bias else 0)
            y_ref = ref_act(xp, z_ref, act, a)
            r, e = violation(xp, y, y_ref, lip * tol["gemm"] * mag + tol["elem"] * xp.abs(y_ref) + tol["abs"])
            rep.check(f"linear_forward {tag} bias={with_bias} {shape}", r <= 1, f"max err {e:.2e} ({r:.2f} of tolerance)")
            if needs_z:
                r, e = violation(xp, z, z_ref, tol["gemm"] * mag + tol["abs"])
                rep.check(f"linear_forward z {tag} {shape}", r <= 1, f"max err {e:.2e} ({r:.2f} of tolerance)")
        if "bwd_data" in which or "bwd_weight" in which:
            z_in = env.randn((M, N), dtype, 4)
            y_in = ref_act(xp, z_in.astype(f64), act, a).astype(dtype)
            dy = env.randn((M, N), dtype, 5)
            dy_before = dy.copy()
            g = dy.astype(f64) * ref_dact(xp, y_in.astype(f64), z_in.astype(f64), act, a)
            zz = z_in if needs_z else None
        if "bwd_data" in which:
            dx = env.nan((M, K), dtype)
            kernels.linear_backward_data(d(dy), d(w), d(y_in), d(zz), act, a, d(dx), stream=env.stream)
            env.sync()
            ref = g @ w64.T
            mag = xp.abs(g) @ xp.abs(w64).T
            r, e = violation(xp, dx, ref, tol["gemm"] * mag + tol["elem"] * xp.abs(ref) + tol["abs"])
            rep.check(f"linear_backward_data {tag} {shape}", r <= 1, f"max err {e:.2e} ({r:.2f} of tolerance)")
            rep.check(f"linear_backward_data leaves dy {tag} {shape}", bool((dy == dy_before).all()), "dy was modified")
        if "bwd_weight" in which:
            dw = env.nan((K, N), dtype)
            db = env.nan((N,), dtype) if with_db else None
            kernels.linear_backward_weight(d(x), d(dy), d(y_in), d(zz), act, a, d(dw), d(db), stream=env.stream)
            env.sync()
            # the reduction runs over the batch: allow for its length
            scale = max(1.0, math.sqrt(M / 1024))
            ref = x64.T @ g
            mag = xp.abs(x64).T @ xp.abs(g)
            r, e = violation(xp, dw, ref, scale * tol["gemm"] * mag + tol["elem"] * xp.abs(ref) + tol["abs"])
            rep.check(f"linear_backward_weight dw {tag} db={with_db} {shape}", r <= 1, f"max err {e:.2e} ({r:.2f} of tolerance)")
            if with_db:
                ref = g.sum(axis=0)
                r, e = violation(xp, db, ref, scale * tol["gemm"] * xp.abs(g).sum(axis=0) + tol["abs"])
                rep.check(f"linear_backward_weight db {tag} {shape}", r <= 1, f"max err {e:.2e} ({r:.2f} of tolerance)")
            rep.check(f"linear_backward_weight leaves dy {tag} {shape}", bool((dy == dy_before).all()), "dy was modified")


def check_activation(env, rep, dtype, act, shape):
    import numpy as np

    from gpunn import codes, kernels

    xp = env.xp
    tol = _tolerances(dtype)
    a = 0.2 if act == codes.ACT_LEAKY_RELU else 0.0
    z = env.randn(shape, dtype, 6, scale=3.0)
    ref = ref_act(xp, z.astype(xp.float64), act, a)
    y = env.nan(shape, dtype)
    kernels.apply_activation(env.dev(z), act, a, env.dev(y), stream=env.stream)
    env.sync()
    r, e = violation(xp, y, ref, tol["elem"] * xp.abs(ref) + tol["abs"])
    rep.check(f"apply_activation {np.dtype(dtype).name} act={act} shape={shape}", r <= 1, f"max err {e:.2e}")
    zz = z.copy()
    dz = env.dev(zz)
    kernels.apply_activation(dz, act, a, dz, stream=env.stream)  # in place
    env.sync()
    r, e = violation(xp, zz, ref, tol["elem"] * xp.abs(ref) + tol["abs"])
    rep.check(f"apply_activation in place {np.dtype(dtype).name} act={act} shape={shape}", r <= 1, f"max err {e:.2e}")


def _loss_inputs(env, kind, M, dtype):
    from gpunn import codes

    xp = env.xp
    n = 3 if kind in (codes.LOSS_SIGMOID_BCE, codes.LOSS_BCE, codes.LOSS_MSE, codes.LOSS_MAE) else 10
    logits = env.randn((M, n), dtype, 7, scale=3.0)
    labels = xp.random.RandomState(8).randint(0, n, M)
    onehot = xp.eye(n, dtype=dtype)[labels]
    binary = (env.rand((M, n), dtype, 9) > 0.5).astype(dtype)
    if kind == codes.LOSS_SIGMOID_BCE:
        return logits, binary
    if kind == codes.LOSS_SOFTMAX_CCE:
        return logits, onehot
    if kind == codes.LOSS_SOFTMAX_SPARSE_CCE:
        return logits, labels.astype(dtype)
    if kind == codes.LOSS_BCE:
        return (1 / (1 + xp.exp(-logits.astype(xp.float64)))).astype(dtype), binary
    if kind == codes.LOSS_CCE:
        return env.rand((M, n), dtype, 10) + dtype(0.01), onehot
    if kind == codes.LOSS_SPARSE_CCE:
        return env.rand((M, n), dtype, 10) + dtype(0.01), labels.astype(dtype)
    return logits, env.randn((M, n), dtype, 11)  # MSE, MAE


def check_loss(env, rep, dtype, kind, M, with_weight=True, with_grad=True):
    import numpy as np

    from gpunn import kernels
    from gpunn.backend import numpy_ops

    xp, d = env.xp, env.dev
    dtype = np.dtype(dtype).type
    tol = _tolerances(dtype)
    pred, target = _loss_inputs(env, kind, M, dtype)
    weight = env.rand((M,), dtype, 12) + dtype(0.5) if with_weight else None
    grad = env.nan(pred.shape, dtype) if with_grad else None
    sums = xp.asarray([1.5, 2.5], dtype=dtype)  # the kernel adds to what is there
    kernels.loss_grad(kind, d(pred), d(target), d(weight), d(grad), d(sums), stream=env.stream)
    env.sync()
    h = lambda a: None if a is None else env.host(a).astype(np.float64)  # noqa: E731
    ref_grad = np.empty(pred.shape) if with_grad else None
    ref_sums = np.array([1.5, 2.5])
    numpy_ops.loss_grad(kind, h(pred), h(target), h(weight), ref_grad, ref_sums)
    tag = f"{np.dtype(dtype).name} kind={kind} weight={with_weight} M={M}"
    if with_grad:
        got = env.host(grad)
        r, e = violation(np, got, ref_grad, tol["elem"] * np.abs(ref_grad) + 10 * tol["abs"] * np.abs(ref_grad).max())
        rep.check(f"loss_grad grad {tag}", r <= 1, f"max err {e:.2e}")
    got = env.host(sums).astype(np.float64)
    rel = np.abs(got - ref_sums) / np.maximum(np.abs(ref_sums), 1)
    limit = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    rep.check(f"loss_grad sums {tag}", bool((rel <= limit).all()), f"got {got.tolist()} expected {ref_sums.tolist()}")


def check_optimizer(env, rep, dtype, name, variant, P):
    import numpy as np

    from gpunn import kernels
    from gpunn.backend import numpy_ops

    xp, d = env.xp, env.dev
    tol = _tolerances(dtype)
    p = env.randn((P,), dtype, 13)
    g = env.randn((P,), dtype, 14, scale=0.1)
    bufs = {
        "velocity": env.randn((P,), dtype, 15, scale=0.01),
        "m": env.randn((P,), dtype, 16, scale=0.01),
        "v": env.rand((P,), dtype, 17) * dtype(0.01) + dtype(0.001),
        "average_grad": env.randn((P,), dtype, 18, scale=0.001),
        "momentum_buf": env.randn((P,), dtype, 19, scale=0.01),
    }
    if name == "rmsprop":
        bufs["velocity"] = bufs["v"].copy()
    host = {k: env.host(v).astype(np.float64) for k, v in bufs.items()}
    hp, hg = env.host(p).astype(np.float64), env.host(g).astype(np.float64)
    if name == "sgd":
        momentum, nesterov = variant
        vel = bufs["velocity"] if momentum else None
        kernels.sgd_update(d(p), d(g), d(vel), 0.01, momentum, nesterov, stream=env.stream)
        numpy_ops.sgd_update(hp, hg, host["velocity"] if momentum else None, 0.01, momentum, nesterov)
        outs = [("params", p, hp)] + ([("velocity", vel, host["velocity"])] if momentum else [])
    elif name == "adam":
        (wd,) = variant
        kernels.adam_update(d(p), d(g), d(bufs["m"]), d(bufs["v"]), 1e-3, 0.9, 0.999, 1e-7, 7, wd, stream=env.stream)
        numpy_ops.adam_update(hp, hg, host["m"], host["v"], 1e-3, 0.9, 0.999, 1e-7, 7, wd)
        outs = [("params", p, hp), ("m", bufs["m"], host["m"]), ("v", bufs["v"], host["v"])]
    else:
        centered, momentum = variant
        avg = bufs["average_grad"] if centered else None
        mb = bufs["momentum_buf"] if momentum else None
        kernels.rmsprop_update(d(p), d(g), d(bufs["velocity"]), d(avg), d(mb), 1e-3, 0.9, momentum, 1e-7, stream=env.stream)
        numpy_ops.rmsprop_update(
            hp, hg, host["velocity"], host["average_grad"] if centered else None, host["momentum_buf"] if momentum else None,
            1e-3, 0.9, momentum, 1e-7,
        )  # fmt: skip
        outs = [("params", p, hp), ("velocity", bufs["velocity"], host["velocity"])]
        outs += [("average_grad", avg, host["average_grad"])] if centered else []
        outs += [("momentum_buf", mb, host["momentum_buf"])] if momentum else []
    env.sync()
    for label, got, ref in outs:
        r, e = violation(np, env.host(got), ref, tol["elem"] * np.abs(ref) + tol["abs"] * np.abs(ref).max())
        rep.check(f"{name}_update {label} {np.dtype(dtype).name} {variant} P={P}", r <= 1, f"max err {e:.2e}")


def run_correctness(env, rep, selftest):
    import numpy as np

    from gpunn import codes

    f32, f64 = np.float32, np.float64
    acts = [codes.ACT_LINEAR, codes.ACT_RELU, codes.ACT_LEAKY_RELU, codes.ACT_SIGMOID, codes.ACT_TANH, codes.ACT_GELU]
    if selftest:
        # tiny: the simulator runs every CUDA thread as a Python thread
        shapes = [(37, 19, 11)]
        m_loss, p_opt, act_shape = 45, 1003, (7, 5)
        acts32 = [codes.ACT_RELU, codes.ACT_GELU]
    else:
        # ragged: none a multiple of the 64x64x16 tiles; 65537 rows spill one row into a new tile
        shapes = [(65537, 257, 129), (4099, 785, 255), (1023, 33, 10), (130, 1000, 1)]
        m_loss, p_opt, act_shape = 65537, 1_000_003, (4099, 1025)
        acts32 = acts
    plan = []
    for act in acts32:
        plan.append(("linear", (f32, act, shapes)))
    plan.append(("linear", (f32, codes.ACT_RELU, shapes[:1], False, False)))  # no bias, no db
    for act in (codes.ACT_RELU, codes.ACT_GELU):
        plan.append(("linear", (f64, act, shapes[:2])))
    for act in acts32:
        plan.append(("act", (f32, act, act_shape)))
        plan.append(("act", (f32, act, (act_shape[1],))))
    plan.append(("act", (f64, codes.ACT_GELU, act_shape)))
    kinds = [
        codes.LOSS_SIGMOID_BCE, codes.LOSS_SOFTMAX_CCE, codes.LOSS_SOFTMAX_SPARSE_CCE, codes.LOSS_BCE,
        codes.LOSS_CCE, codes.LOSS_SPARSE_CCE, codes.LOSS_MSE, codes.LOSS_MAE,
    ]  # fmt: skip
    for kind in kinds:
        plan.append(("loss", (f32, kind, m_loss)))
    plan.append(("loss", (f32, codes.LOSS_SOFTMAX_SPARSE_CCE, m_loss, False, True)))
    plan.append(("loss", (f32, codes.LOSS_SOFTMAX_SPARSE_CCE, m_loss, True, False)))
    plan.append(("loss", (f64, codes.LOSS_SOFTMAX_SPARSE_CCE, m_loss)))
    for variant in ((0.0, False), (0.9, False), (0.9, True)):
        plan.append(("opt", (f32, "sgd", variant, p_opt)))
    for variant in ((0.0,), (0.01,)):
        plan.append(("opt", (f32, "adam", variant, p_opt)))
    for variant in ((False, 0.0), (True, 0.0), (False, 0.9), (True, 0.9)):
        plan.append(("opt", (f32, "rmsprop", variant, p_opt)))
    plan.append(("opt", (f64, "adam", (0.0,), p_opt)))
    funcs = {"linear": check_linear, "act": check_activation, "loss": check_loss, "opt": check_optimizer}
    for i, (what, args) in enumerate(plan):
        if rep.over_budget(0.45):
            rep.notes.append(f"correctness: {len(plan) - i} of {len(plan)} groups skipped (time budget)")
            break
        try:
            funcs[what](env, rep, *args)
        except Exception as exc:
            rep.check(f"{what} {args[:2]}", False, f"raised {type(exc).__name__}: {exc}")
            traceback.print_exc()
    passed = sum(ok for _, ok, _ in rep.checks)
    rep.log(f"correctness: {passed}/{len(rep.checks)} checks passed")


# --------------------------------------------------------------------------
# (b) fused kernels against CuPy unfused equivalents
# --------------------------------------------------------------------------


def run_ops(env, rep, selftest, peak):
    import numpy as np

    from gpunn import codes, kernels

    xp, d, s = env.xp, env.dev, env.stream
    f32 = np.float32
    if selftest:
        fwd_shapes = [(64, 16, 16, "fwd relu"), (32, 8, 8, "sgemm")]
        bwd_shapes = [(64, 16, 16)]
    else:
        fwd_shapes = [
            (65536, 64, 64, "fwd relu"),
            (65536, 256, 256, "fwd relu"),
            (8192, 784, 256, "fwd relu"),
            (4096, 4096, 4096, "sgemm"),
        ]
        bwd_shapes = [(65536, 256, 256), (8192, 784, 256)]

    def row(name, flop, fused, ref, ref_name):
        dev_f, wall_f, primed_f = fused
        dev_r, wall_r, primed_r = ref
        out = {
            "op": name,
            "fused_ms": dev_f * 1e3,
            "fused_wall_ms": wall_f * 1e3,
            "gflops": flop / dev_f / 1e9,
            "ref": ref_name,
            "ref_ms": dev_r * 1e3,
            "ref_wall_ms": wall_r * 1e3,
            "speedup": dev_r / dev_f,
            "primed": primed_f and primed_r,
        }
        out["peak"] = out["gflops"] / peak if peak else None
        rep.ops.append(out)
        rep.log(
            f"{name}: fused {out['fused_ms']:.3f} ms ({out['gflops']:,.0f} GFLOP/s), {ref_name} {out['ref_ms']:.3f} ms, "
            f"speedup {out['speedup']:.2f}x (wall per call {out['fused_wall_ms']:.3f} vs {out['ref_wall_ms']:.3f} ms)"
        )
        return out

    for M, K, N, kind in fwd_shapes:
        if rep.over_budget(0.65):
            rep.notes.append(f"ops: {kind} {M}x{K}->{N} skipped (time budget)")
            continue
        x = env.randn((M, K), f32, 1)
        w = env.randn((K, N), f32, 2, scale=1 / math.sqrt(K))
        b = env.randn((N,), f32, 3)
        y, y2 = xp.empty((M, N), f32), xp.empty((M, N), f32)
        dx_, dw_, db_, dy_ = d(x), d(w), d(b), d(y)
        flop = 2.0 * M * K * N
        if kind == "sgemm":
            fused = lambda: kernels.linear_forward(dx_, dw_, None, codes.ACT_LINEAR, 0.0, dy_, None, stream=s)  # noqa: E731
            ref = lambda: xp.matmul(x, w, out=y2)  # noqa: E731
            r = row(f"fwd linear {M}x{K}->{N} (GEMM)", flop, env.time_call(fused), env.time_call(ref), "SGEMM (matmul)")
            rep.targets.append(
                (f"fused forward at {M}x{K}x{N}: {r['speedup']:.2f}x of cuBLAS SGEMM speed (target >= {TARGET_VS_SGEMM})", r["speedup"] >= TARGET_VS_SGEMM)
            )
        else:

            def fused():
                kernels.linear_forward(dx_, dw_, db_, codes.ACT_RELU, 0.0, dy_, None, stream=s)

            def ref():
                xp.matmul(x, w, out=y2)
                xp.add(y2, b, out=y2)
                xp.maximum(y2, 0, out=y2)

            r = row(f"fwd relu {M}x{K}->{N}", flop, env.time_call(fused), env.time_call(ref), "CuPy matmul+add+maximum")
            if (K, N) in ((64, 64), (256, 256)) and M >= 65536 or selftest:
                rep.targets.append(
                    (f"fused forward {M}x{K}->{N}: {r['speedup']:.2f}x faster than CuPy unfused (target >= {TARGET_FUSED_VS_UNFUSED})", r["speedup"] >= TARGET_FUSED_VS_UNFUSED)
                )
        del x, w, b, y, y2
    for M, K, N in bwd_shapes:
        if rep.over_budget(0.7):
            rep.notes.append(f"ops: backward {M}x{K}->{N} skipped (time budget)")
            continue
        x = env.randn((M, K), f32, 1)
        w = env.randn((K, N), f32, 2, scale=1 / math.sqrt(K))
        y = xp.maximum(env.randn((M, N), f32, 4), 0)
        dy = env.randn((M, N), f32, 5)
        dx, dw, db = xp.empty((M, K), f32), xp.empty((K, N), f32), xp.empty((N,), f32)
        g = xp.empty((M, N), f32)
        v = {k: d(a) for k, a in dict(x=x, w=w, y=y, dy=dy, dx=dx, dw=dw, db=db).items()}

        def fused():
            kernels.linear_backward_weight(v["x"], v["dy"], v["y"], None, codes.ACT_RELU, 0.0, v["dw"], v["db"], stream=s)
            kernels.linear_backward_data(v["dy"], v["w"], v["y"], None, codes.ACT_RELU, 0.0, v["dx"], stream=s)

        def ref():
            xp.multiply(dy, y > 0, out=g)
            xp.matmul(g, w.T, out=dx)
            xp.matmul(x.T, g, out=dw)
            g.sum(axis=0, out=db)

        row(f"bwd relu {M}x{K}->{N}", 4.0 * M * K * N, env.time_call(fused), env.time_call(ref), "CuPy multiply+2 matmul+sum")
        del x, w, y, dy, dx, dw, db, g


# --------------------------------------------------------------------------
# (c) a training epoch: gpunn's CUDA backend against PyTorch eager
# --------------------------------------------------------------------------


def _gpunn_device_epoch(trainer, x, y, batch):
    """An epoch of gpunn steps on device-resident data (fit's loop without callbacks/progress)."""
    import numpy as np

    m = trainer.model
    b = m.backend
    X, T = b.asarray(x), b.asarray(y.astype(m.dtype))
    train_step = m.make_train_step(batch)
    n = x.shape[0]
    steps = n // batch
    rng = np.random.default_rng(0)

    def epoch():
        order = b.asarray(rng.permutation(n).astype(np.int64))
        for step in range(steps):
            train_step.load_rows(X, T, order[step * batch : (step + 1) * batch])
            train_step.run()
        b.synchronize()

    return epoch, steps


def run_train(env, rep, selftest):
    import numpy as np

    sys.path.insert(0, os.path.dirname(_HERE))
    from gpunn import bench

    if selftest:
        dims, n, batches, windows = (20, 16, 16, 3), 8, (8,), 1
    else:
        dims, n, batches, windows = bench.REFERENCE_DIMS, 65536, (128, 1024, 8192), 3
    rep.train_dims = "-".join(map(str, dims))
    x, y = bench.synthetic_data(n, dims)
    torch_device = "cpu" if selftest else "cuda"
    torch = None
    try:
        import torch

        if not selftest and not torch.cuda.is_available():
            rep.notes.append("train: PyTorch is installed but torch.cuda.is_available() is False; gpunn only")
            torch = None
        elif torch is not None:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
    except ImportError:
        rep.notes.append("train: PyTorch is not installed; gpunn only")
    for opt in ("sgd",) if selftest else ("sgd", "adam"):
        lr = 0.01 if opt == "sgd" else 1e-3
        for batch in batches:
            if rep.over_budget(0.92):
                rep.notes.append(f"train: {opt} batch {batch} skipped (time budget)")
                continue
            out = {"opt": opt, "batch": batch, "steps": n // batch}
            try:
                g = bench.GpunnTrainer("cuda", dims, opt, lr)
                epoch, steps = _gpunn_device_epoch(g, x, y, batch)
                epoch()  # warm-up (compiles kernels on first use)
                contenders = [("gpunn", epoch)]
                if torch is not None:
                    t = bench.TorchTrainer(torch_device, dims, opt, lr, weights=g.weights())
                    t.epoch(x, y, batch)
                    contenders.append(("torch", lambda: t.epoch(x, y, batch)))
                best = {k: math.inf for k, _ in contenders}
                for w in range(windows):
                    for name, fn in contenders if w % 2 == 0 else contenders[::-1]:
                        t0 = time.perf_counter()
                        fn()
                        best[name] = min(best[name], time.perf_counter() - t0)
                out["gpunn_step_ms"] = best["gpunn"] / steps * 1e3
                if "torch" in best:
                    out["torch_step_ms"] = best["torch"] / steps * 1e3
                    out["ratio"] = best["gpunn"] / best["torch"]
                t0 = time.perf_counter()
                g.epoch(x, y, batch)  # the public fit(): includes the host -> device copy of the data
                out["fit_epoch_ms"] = (time.perf_counter() - t0) * 1e3
                out["gpunn_acc"] = float(np.mean(g.predict(x) == y))
            except Exception as exc:
                rep.check(f"train {opt} batch {batch}", False, f"raised {type(exc).__name__}: {exc}")
                traceback.print_exc()
                continue
            rep.train.append(out)
            rep.log(
                f"train {opt} batch {batch}: gpunn {out['gpunn_step_ms']:.3f} ms/step"
                + (f", torch {out['torch_step_ms']:.3f} ms/step, time ratio {out['ratio']:.2f}" if "ratio" in out else "")
                + f"; fit() epoch {out['fit_epoch_ms']:.1f} ms"
            )
            if "ratio" in out and (batch == 8192 or selftest):
                rep.targets.append(
                    (f"training step at batch {batch} ({opt}): {out['ratio']:.2f}x PyTorch eager's time (target <= {TARGET_STEP_VS_TORCH})", out["ratio"] <= TARGET_STEP_VS_TORCH)
                )


# --------------------------------------------------------------------------
# Device description and the summary
# --------------------------------------------------------------------------


def describe_device(env):
    """{'name', 'cc', 'sms', 'clock_khz', 'peak_gflops'} of the current device."""
    if env.simulator:
        return {"name": "Numba CUDA simulator", "cc": (0, 0), "sms": 0, "clock_khz": 0, "peak_gflops": None}
    cp = env.xp
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    cc = dev.compute_capability
    major, minor = int(cc[:-1]), int(cc[-1])
    attrs = {}
    try:
        attrs = dev.attributes
    except Exception:
        pass
    sms = attrs.get("MultiProcessorCount") or props.get("multiProcessorCount")
    clock = attrs.get("ClockRate") or props.get("clockRate")
    source = "device attribute"
    if not clock:
        try:
            clock = env.cuda.get_current_device().CLOCK_RATE
        except Exception:
            clock = None
    if not clock:
        known = next((mhz for key, mhz in KNOWN_CLOCK_MHZ.items() if key in name), None)
        clock, source = (known * 1000 if known else None), "table of known GPUs"
    peak = fp32_peak_gflops(sms, major, minor, clock)
    return {"name": name, "cc": (major, minor), "sms": sms, "clock_khz": clock, "clock_source": source, "peak_gflops": peak}


def summary(rep):
    dev = rep.device
    lines = ["", "=" * 100, "gpu_check summary"]
    peak = dev.get("peak_gflops")
    lines.append(
        f"device: {dev.get('name')}  sm_{dev['cc'][0]}{dev['cc'][1]}  SMs {dev.get('sms')}  "
        f"cores/SM {cores_per_sm(*dev['cc']) if dev.get('sms') else '-'}  clock {((dev.get('clock_khz') or 0) / 1e3):.0f} MHz  "
        f"FP32 peak {f'{peak / 1e3:.1f} TFLOP/s' if peak else 'unknown'}"
    )
    failed = [c for c in rep.checks if not c[1]]
    lines.append(f"correctness: {len(rep.checks) - len(failed)}/{len(rep.checks)} passed" + (f"; FAILED: {len(failed)}" if failed else ""))
    for name, _, detail in failed[:20]:
        lines.append(f"  FAIL {name}: {detail}")
    if rep.ops:
        lines.append("")
        lines.append(f"{'op':34} {'fused ms':>9} {'GFLOP/s':>9} {'%peak':>6} {'ref ms':>8} {'speedup':>8} {'fused/ref wall ms per call':>27}  ref")
        for r in rep.ops:
            pk = f"{r['peak']:.0%}" if r["peak"] else "-"
            wall = f"{r['fused_wall_ms']:.3f}/{r['ref_wall_ms']:.3f}"
            flag = "" if r["primed"] else " (host-bound: device time includes launch gaps)"
            lines.append(f"{r['op']:34} {r['fused_ms']:9.3f} {r['gflops']:9,.0f} {pk:>6} {r['ref_ms']:8.3f} {r['speedup']:7.2f}x {wall:>27}  {r['ref']}{flag}")
    if rep.train:
        lines.append("")
        lines.append(f"{'train ' + getattr(rep, 'train_dims', ''):24} {'batch':>6} {'steps':>6} {'gpunn ms/step':>14} {'torch ms/step':>14} {'gpunn/torch time':>17} {'fit() epoch ms':>15} {'train acc':>10}")
        for r in rep.train:
            torch_ms = f"{r['torch_step_ms']:.3f}" if "torch_step_ms" in r else "-"
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            lines.append(f"{r['opt']:24} {r['batch']:6d} {r['steps']:6d} {r['gpunn_step_ms']:14.3f} {torch_ms:>14} {ratio:>17} {r['fit_epoch_ms']:15.1f} {r['gpunn_acc']:10.3f}")
    if rep.targets:
        lines.append("")
        lines.append("targets:")
        for text, met in rep.targets:
            lines.append(f"  [{'met' if met else 'MISSED'}] {text}")
    for note in rep.notes:
        lines.append(f"note: {note}")
    lines.append(f"total {rep.elapsed():.1f} s")
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="correctness,ops,train", help="comma-separated sections: correctness, ops, train")
    p.add_argument("--budget", type=float, default=170.0, help="seconds; later items are skipped past their share")
    p.add_argument("--selftest", action="store_true", help="run every code path on Numba's CUDA simulator, tiny shapes")
    args = p.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"correctness", "ops", "train"}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    if args.selftest:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout without installing
    from gpunn._cuda import cuda_status

    status = cuda_status()
    if args.selftest:
        if not status.simulator:
            print("gpu_check: --selftest needs the simulator, but numba.cuda was imported before it could be enabled")
            return 2
    elif not status.usable or status.simulator:
        why = "the Numba CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM)" if status.simulator else status.reason
        print(f"gpu_check: no usable GPU here: {why}. This check needs an NVIDIA GPU with CuPy and numba-cuda "
              "(pip install 'gpunn[cuda12]'); nothing was run.")  # fmt: skip
        return 2
    rep = Report(args.budget)
    env = Env(args.selftest)
    rep.device = describe_device(env)
    rep.log(f"device: {rep.device['name']}; sections: {', '.join(sorted(sections))}; budget {args.budget:.0f} s")
    if "correctness" in sections:
        run_correctness(env, rep, args.selftest)
    if "ops" in sections:
        try:
            run_ops(env, rep, args.selftest, rep.device["peak_gflops"])
        except Exception as exc:
            rep.notes.append(f"ops: stopped by {type(exc).__name__}: {exc}")
            traceback.print_exc()
    if "train" in sections:
        try:
            run_train(env, rep, args.selftest)
        except Exception as exc:
            rep.notes.append(f"train: stopped by {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return summary(rep)


if __name__ == "__main__":
    sys.exit(main())
