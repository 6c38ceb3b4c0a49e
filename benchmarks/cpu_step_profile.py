"""Where one CPU training step's time goes, call by call (NumPy backend).

Runs the model's own training step (``Sequential.make_train_step``) on the
reference MLP 784-256-256-10 (ReLU, softmax cross-entropy) with its backend
behind a proxy that times every call; BLAS products and NumPy calls made
inside the backend are timed too (``np.matmul`` and the fused passes of
``cpu_fused`` are wrapped while the script runs).  Each figure is the
fastest of several steps (the machine is shared), and the table compares
the sum of the parts with a whole step timed without the proxy, and each
product with the float32 matrix-product ceiling of the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_step_profile.py --batches 1024,4096

Exit status 0 whatever the numbers (it measures; it does not judge).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1024,4096")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=60, help="profiled steps; each call's fastest counts")
    return p.parse_args()


class _Clock:
    """Per-label fastest and summed times of the calls of one step."""

    def __init__(self):
        self.step = defaultdict(float)
        self.best = {}

    def timed(self, label, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.step[label] += time.perf_counter() - t0
            return out

        return wrapper

    def end_step(self):
        for k, v in self.step.items():
            self.best[k] = min(self.best.get(k, np.inf), v)
        self.step = defaultdict(float)


def _shape_label(name, args):
    shapes = "x".join(str(a.shape) for a in args[:2] if hasattr(a, "shape"))
    return f"{name} {shapes}"


def _square_matmul_rate(n, repeats):
    """Best GFLOP/s of an n x n float32 product over ``repeats`` runs (a noisy machine needs many)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    out, best = np.empty_like(a), np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> int:
    args = _parse()
    from threadpoolctl import threadpool_limits

    import gpunn
    from gpunn.backend import cpu_fused, numpy_backend
    from gpunn.bench import contenders as bench
    from gpunn.bench.machine import cpu_name

    dims = bench.REFERENCE_DIMS
    flops = bench.train_flops_per_sample(dims)
    with threadpool_limits(limits=args.threads):
        print(f"CPU: {cpu_name()}; load average {os.getloadavg()}; BLAS threads {args.threads}")
        ceiling = max(_square_matmul_rate(2048, 10), _square_matmul_rate(1024, 40))
        print(f"float32 matmul ceiling (best of 1024^2 and 2048^2): {ceiling:.1f} GFLOP/s "
              "(raised below to the fastest product of a step, whichever is higher)")
        x, y = bench.synthetic_data(max(8192, max(int(b) for b in args.batches.split(","))))
        for batch in (int(b) for b in args.batches.split(",")):
            gpunn.set_seed(0)
            trainer = bench.GpunnTrainer("numpy", dims, args.optimizer, 0.01)
            model = trainer.model
            X, Y = x, y.astype(model.dtype)
            rng = np.random.default_rng(1)
            plain = model.make_train_step(batch)
            whole = np.inf
            for _ in range(args.steps):
                idx = rng.integers(0, x.shape[0], batch)
                t0 = time.perf_counter()
                plain.load_rows(X, Y, idx)
                plain.run()
                whole = min(whole, time.perf_counter() - t0)

            clock = _Clock()
            real_matmul = np.matmul
            saved = {}
            mm_calls = []

            def matmul(a, b, out=None, _real=real_matmul):
                label = f"matmul {a.shape}{'T' if not a.flags.c_contiguous else ''} @ {b.shape}{'T' if not b.flags.c_contiguous else ''}"
                mm_calls.append((label, a.shape[0] * a.shape[1] * b.shape[1] * 2))
                return clock.timed(label, _real)(a, b, out=out)

            numpy_backend.np.matmul = matmul  # the backend module's view of NumPy
            for name in ("bias_activation", "bias_activation_inplace", "activation_grad", "column_sums", "loss_grad", "optimizer_update", "apply_activation"):
                fn = getattr(cpu_fused, name, None)
                if fn is None:  # a pass this version does not have
                    continue
                saved[name] = fn
                setattr(cpu_fused, name, (lambda n, f: lambda *a: clock.timed(_shape_label(n, a[:1] if n != "loss_grad" else a[1:2]), f)(*a))(name, fn))
            try:
                b = model.backend

                class Proxy:
                    def __getattr__(self, attr):
                        v = getattr(b, attr)
                        if attr in ("take_rows", "softmax", "softmax_backward"):
                            return clock.timed(attr, v)
                        return v

                step = model.make_train_step(batch, backend=Proxy())
                for _ in range(args.steps):
                    idx = rng.integers(0, x.shape[0], batch)
                    step.load_rows(X, Y, idx)
                    step.run()
                    clock.end_step()
            finally:
                numpy_backend.np.matmul = real_matmul
                for name, fn in saved.items():
                    setattr(cpu_fused, name, fn)
            mm_flops = dict(mm_calls)
            ceiling = max([ceiling] + [mm_flops[k] / t / 1e9 for k, t in clock.best.items() if k in mm_flops])
            total = sum(clock.best.values())
            print(f"\nbatch {batch}, {args.optimizer}: whole step {whole * 1e3:.2f} ms "
                  f"({batch / whole:,.0f} samples/s, {flops * batch / whole / 1e9:.1f} GFLOP/s = "
                  f"{flops * batch / whole / 1e9 / ceiling:.0%} of ceiling); sum of fastest parts {total * 1e3:.2f} ms")
            for label, t in sorted(clock.best.items(), key=lambda kv: -kv[1]):
                extra = ""
                if label in mm_flops:
                    gf = mm_flops[label] / t / 1e9
                    extra = f"  {gf:6.1f} GFLOP/s ({gf / ceiling:.0%})"
                print(f"  {t * 1e3:8.3f} ms {t / total:5.1%}  {label}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
