"""One-command check of gpunn's CUDA kernels on a real GPU, under 3 minutes.

    python benchmarks/gpu_check.py            # everything
    python benchmarks/gpu_check.py --only correctness,ops,train,graphs,cache --budget 170
    python benchmarks/gpu_check.py --selftest # every path in Numba's CUDA simulator, tiny shapes (CPU only)

Needs ``pip install '.[cuda12,test]'`` (CuPy, numba-cuda, pytest and the
``bench`` extra).  This file is only the driver:

(a) correctness: the tests marked ``gpu`` in ``tests/test_gpu_kernels.py``
    (every kernel, float32 and float64, large ragged shapes, against
    ``gpunn.backend.numpy_ops``), ``tests/test_step_record.py`` (CUDA graph
    replay gives eager's weights) and ``tests/test_kernel_cache.py`` (a second
    process reaches its first step without JIT), run by pytest;
(b) ops: ``gpunn.bench.gpu.time_ops`` -- the fused kernels against CuPy's
    unfused equivalents, device time on a primed queue, GFLOP/s and the
    fraction of the FP32 peak;
(c) train: ``gpunn.bench.gpu.time_training`` -- epochs of the reference MLP
    784-256-256-10 through ``model.make_train_step`` at batch 128, 1024 and
    8192, against PyTorch eager FP32 on CUDA where it is installed;
(d) graphs: ``gpunn.bench.gpu.time_graphs`` -- the same Adam step replayed as
    a CUDA graph (``make_train_step(batch, graph=True)``) against eager launches
    and PyTorch eager FP32 (targets: >= 3x PyTorch's speed at batch 128, >= 1x
    at 8192);
(e) cache: ``gpunn.bench.gpu.time_first_step`` -- a fresh process's time to
    its first training step with a cold, then a warm on-disk kernel cache.

Targets reported against: fused forward >= 1.3x faster than CuPy unfused at
batch 65536 for 64->64 and 256->256; fused forward >= 0.5x cuBLAS SGEMM at
4096^3; a full training step within 1.5x of PyTorch eager at batch 8192.

Exit status: 0 all correctness checks passed, 1 some failed (targets are
reported, not judged), 2 no usable GPU here (or pytest missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests", "test_gpu_kernels.py")
#: also run by (a): graph replay vs eager weights, a second process's first step without JIT
MORE_GPU_TESTS = [os.path.join(REPO, "tests", name) for name in ("test_step_record.py", "test_kernel_cache.py")]
SECTIONS = ("correctness", "ops", "train", "graphs", "cache")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    p.add_argument("--budget", type=float, default=170.0, help="seconds; later items are skipped past their share")
    p.add_argument("--selftest", action="store_true", help="run every code path in Numba's CUDA simulator, tiny shapes")
    args = p.parse_args(argv)
    args.sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    return args


def no_gpu_reason(selftest):
    """Why this run cannot go ahead, or None."""
    from gpunn._cuda import cuda_status

    status = cuda_status()
    if selftest:
        return None if status.simulator else "--selftest needs the simulator, but numba.cuda was imported before it could be enabled"
    if not status.usable or status.simulator:
        why = "the Numba CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM)" if status.simulator else status.reason
        return (
            f"no usable GPU here: {why}. This check needs an NVIDIA GPU with CuPy and numba-cuda "
            "(pip install '.[cuda12,test]'); nothing was run."
        )
    return None


def run_correctness(selftest, timeout_s):
    """(passed, one-line verdict): pytest over the kernel tests, ``-m gpu`` (``-m simulator`` in a selftest)."""
    if importlib.util.find_spec("pytest") is None:
        return False, "not run: pytest is not installed (pip install '.[cuda12,test]')"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "simulator" if selftest else "gpu", TESTS, *MORE_GPU_TESTS]
    # cwd tests/: the installed gpunn is imported, not the checkout's (which lacks gpunn.kernels)
    try:
        proc = subprocess.run(cmd, cwd=os.path.dirname(TESTS), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"FAILED: the kernel tests did not finish within {timeout_s:.0f} s"
    print(proc.stdout + proc.stderr, flush=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    return proc.returncode == 0, ("passed: " if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode}): ") + last


def main(argv=None) -> int:
    args = _parse(argv)
    if args.selftest:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    reason = no_gpu_reason(args.selftest)
    if reason:
        print(f"gpu_check: {reason}")
        return 2
    from gpunn.bench import gpu, machine, timing

    t0 = time.perf_counter()
    over_budget = lambda share: time.perf_counter() - t0 > args.budget * share  # noqa: E731
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    device = gpu.Device()
    dev = gpu.describe_device(device)
    log(f"device: {dev['name']}; sections: {', '.join(sorted(args.sections))}; budget {args.budget:.0f} s")
    passed, correctness = True, "not run"
    if "correctness" in args.sections:
        passed, correctness = run_correctness(args.selftest, max(120.0, 0.6 * args.budget))
        log(f"correctness: {correctness}")
    ops, train, graphs, first, targets, notes = [], None, None, None, [], []
    # in the simulator timings mean nothing: one pass through every path is enough
    policy = timing.Policy(2, 2, 10.0, 1, 0) if args.selftest else gpu.GPU_POLICY
    for section in ("cache", "ops", "train", "graphs"):  # cache first: its processes start cold
        if section not in args.sections:
            continue
        try:
            if section == "ops":
                ops, more_targets, more_notes = gpu.time_ops(device, args.selftest, dev["peak_gflops"], over_budget, policy)
            elif section == "train":
                dims, rows, more_targets, more_notes = gpu.time_training(args.selftest, over_budget, policy)
                train = (dims, rows)
            elif section == "graphs":
                dims, rows, more_targets, more_notes = gpu.time_graphs(args.selftest, over_budget, policy)
                graphs = (dims, rows)
            else:
                first, more_targets, more_notes = gpu.time_first_step(args.selftest), [], []
            targets += more_targets
            notes += more_notes
            log(f"{section}: done")
        except Exception as exc:
            notes.append(f"{section}: stopped by {type(exc).__name__}: {exc}")
            traceback.print_exc()
    print("\n".join(gpu.summary_lines(dev, correctness, ops, train, targets, notes, machine.cpu_label(), policy, graphs, first)))
    log("done")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
