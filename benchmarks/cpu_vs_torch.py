"""gpunn's NumPy backend against an idiomatic PyTorch CPU loop, side by side.

The CPU speed targets (issue 12): on the reference MLP 784-256-256-10 (ReLU,
softmax cross-entropy) with 2 threads, the NumPy backend trains at least
1.25x faster than PyTorch at batch 32 and 128 and 1.10x at batch >= 1024,
with SGD and with Adam, and reaches at least 80% of the float32
matrix-product ceiling at batch >= 1024.

Both contenders get the same data, the same initial weights and the same
batches (PyTorch replays gpunn's shuffles) and the same thread count
(``torch.set_num_threads`` and threadpoolctl for every BLAS).  They run
interleaved (A, B, B, A, ...) and each figure is the fastest of several
windows; the ceiling is the best large float32 ``np.matmul`` of the same run.
A figure whose 3 fastest windows disagree by more than ``--margin`` is retried
(``gpunn.bench.timing``) and, failing that, printed as UNRELIABLE, with a
warning above the final table.

Run it with OpenBLAS's kernel overrides unset (they force slower kernels)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_vs_torch.py

It prints the ratio gpunn/torch per (batch, optimizer) and the ceiling
fraction.  Exit status 0 whatever the numbers (it measures; it does not judge).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SPEED_TARGET = 1.25  # gpunn/torch throughput at the small batches (issue 12)
SPEED_BATCHES = (32, 128)
LARGE_SPEED_TARGET = 1.10  # gpunn/torch throughput at batch >= CEILING_MIN_BATCH (issue 12)
CEILING_TARGET = 0.80  # fraction of the matmul ceiling at large batches (issue 12)
CEILING_MIN_BATCH = 1024


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="32,128,1024,4096", help="comma-separated batch sizes")
    p.add_argument("--optimizers", default="sgd,adam", help="comma-separated: sgd, adam")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=5, help="timed windows per contender; the fastest counts")
    p.add_argument("--margin", type=float, default=0.05, help="a figure is reliable when its 3 fastest windows agree within this")
    p.add_argument("--retries", type=int, default=3, help="rounds of 3 more windows for a figure that is not reliable yet")
    p.add_argument("--window-s", type=float, default=0.4, help="target seconds of one timed epoch")
    p.add_argument("--max-samples", type=int, default=16384, help="cap on the samples of one epoch")
    p.add_argument("--ceiling-n", type=int, default=2048, help="side of the square matmul measuring the ceiling")
    return p.parse_args()


def main() -> int:
    args = _parse()
    try:
        import torch
    except ImportError:
        print("cpu_vs_torch: PyTorch is not installed (pip install torch); nothing to compare against.")
        return 2
    from threadpoolctl import threadpool_limits

    import gpunn
    from gpunn.bench import contenders as bench
    from gpunn.bench import machine, report, timing
    from gpunn.random import generator

    batches = [int(b) for b in args.batches.split(",")]
    optimizers = [o.strip() for o in args.optimizers.split(",")]
    lr = {"sgd": 0.01, "adam": 1e-3}
    dims = bench.REFERENCE_DIMS
    flops = bench.train_flops_per_sample(dims)
    t_start = time.perf_counter()
    policy = timing.Policy(args.windows, min(3, args.windows), args.margin, 3, args.retries)
    meter = machine.LoadMeter().start()

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        blas = machine.numpy_blas()
        print(f"CPU: {machine.cpu_label()}")
        print(
            f"BLAS: {blas.get('internal_api')} {blas.get('version')} kernel {blas.get('architecture')} "
            f"threads {blas.get('num_threads')}; torch {torch.__version__} threads {torch.get_num_threads()}"
        )
        for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            print(f"{var}={os.environ.get(var, 'unset')}")
        if any(v in os.environ for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")):
            print("warning: OpenBLAS kernel overrides are set; rerun with env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE")

        ceiling, ceiling_timing = report.matmul_ceiling(args.ceiling_n, policy)
        print(f"float32 matmul ceiling ({args.ceiling_n}^2): {ceiling:.1f} GFLOP/s (spread {ceiling_timing.spread:.1%})")

        x_all, y_all = bench.synthetic_data(max(args.max_samples, max(batches)))

        # Same math: from the same start, over the same batches, one SGD epoch agrees.
        gpunn.set_seed(0)
        g = bench.GpunnTrainer("numpy", dims, "sgd", lr["sgd"])
        replay = np.random.default_rng()
        replay.bit_generator.state = generator().bit_generator.state
        t = bench.TorchTrainer("cpu", dims, "sgd", lr["sgd"], weights=g.weights(), orders=replay)
        g.epoch(x_all[:2048], y_all[:2048], 128)
        t.epoch(x_all[:2048], y_all[:2048], 128)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(g.weights(), t.weights()))
        print(f"same start, same batches, one SGD epoch: max |w_gpunn - w_torch| = {diff:.2e}")

        rows = []
        for opt in optimizers:
            for batch in batches:
                g = bench.GpunnTrainer("numpy", dims, opt, lr[opt])
                replay = np.random.default_rng()
                replay.bit_generator.state = generator().bit_generator.state
                t = bench.TorchTrainer("cpu", dims, opt, lr[opt], weights=g.weights(), orders=replay)
                n_cal = min(len(x_all), 4 * batch)
                per_sample = 0.0
                for c in (g, t):
                    c.epoch(x_all[:n_cal], y_all[:n_cal], batch)  # warm-up
                    t0 = time.perf_counter()
                    c.epoch(x_all[:n_cal], y_all[:n_cal], batch)
                    per_sample = max(per_sample, (time.perf_counter() - t0) / n_cal)
                cap = max(batch, args.max_samples // batch * batch)
                n = min(cap, max(8 * batch, int(args.window_s / per_sample) // batch * batch))
                x, y = x_all[:n], y_all[:n]
                got = timing.measure({"gpunn": timing.epoch_window(g, x, y, batch), "torch": timing.epoch_window(t, x, y, batch)}, policy)
                rate_g, rate_t = n / got["gpunn"].best, n / got["torch"].best
                ok = timing.ratio_reliable(got["gpunn"], got["torch"])
                rows.append((batch, opt, n, rate_g, rate_t, rate_g / rate_t, rate_g * flops / 1e9, ok))
                spreads = f"spreads {got['gpunn'].spread:.1%}/{got['torch'].spread:.1%}" + ("" if ok else " UNRELIABLE")
                print(f"  batch {batch:5d} {opt:4s}: gpunn {rate_g:10,.0f}/s  torch {rate_t:10,.0f}/s  ratio {rate_g / rate_t:.2f}  {spreads}", flush=True)

        end_ceiling, end_timing = report.matmul_ceiling(args.ceiling_n, policy)
        if end_ceiling > ceiling:
            ceiling, ceiling_timing = end_ceiling, end_timing

    print()
    load = meter.stop()
    if report.busy(load):
        print(f"WARNING: the machine was busy ({load.text()}): absolute throughputs may understate this machine.")
    doubtful = sum(not r[-1] for r in rows) + (not ceiling_timing.reliable)
    if doubtful:
        print(
            f"WARNING: {doubtful} of {len(rows) + 1} figures are UNRELIABLE (their {policy.quorum} fastest windows disagree by "
            f"more than {policy.margin:.0%} after {policy.retries} retries); rerun on a quiet machine before quoting them."
        )
    print(f"CPU: {machine.cpu_label()}; load during the run: {load.text()}")
    print(f"float32 matmul ceiling (best of the run): {ceiling:.1f} GFLOP/s; {flops / 1e6:.3f} MFLOP per training sample")
    print(f"{'batch':>6} {'opt':>5} {'samples':>8} {'gpunn/s':>10} {'torch/s':>10} {'gpunn/torch':>12} {'GFLOP/s':>8} {'ceiling':>8}  target")
    for batch, opt, n, rg, rt, ratio, gf, ok in rows:
        print(f"{batch:6d} {opt:>5} {n:8d} {rg:10,.0f} {rt:10,.0f} {ratio:12.2f} {gf:8.1f} {gf / ceiling:8.0%}  {_verdicts(batch, ratio, gf / ceiling, ok)}")
    print(f"({time.perf_counter() - t_start:.0f} s)")
    return 0


def _verdicts(batch, ratio, ceiling_share, reliable):
    notes = []
    if batch in SPEED_BATCHES:
        notes.append(f"ratio>={SPEED_TARGET}: {'met' if ratio >= SPEED_TARGET else 'MISSED'}")
    if batch >= CEILING_MIN_BATCH:
        notes.append(f"ratio>={LARGE_SPEED_TARGET}: {'met' if ratio >= LARGE_SPEED_TARGET else 'MISSED'}")
        notes.append(f"ceiling>={CEILING_TARGET:.0%}: {'met' if ceiling_share >= CEILING_TARGET else 'MISSED'}")
    return "; ".join(notes) + ("" if reliable else "  (UNRELIABLE)")


if __name__ == "__main__":
    sys.exit(main())
