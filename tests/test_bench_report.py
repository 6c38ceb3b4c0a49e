"""`gpunn bench`: the report and its plots exist and hold a row per contender present.

No number is asserted: the machines are shared and noisy.  The report comes
from the real command line, ``gpunn bench --quick`` (under a minute on 2 cores),
as users and CI run it.
"""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gpunn
from gpunn import bench
from gpunn._cuda import cuda_status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected_contenders():
    """(present, absent) row names, decided independently of gpunn.bench."""
    status = cuda_status()
    cuda = status.usable and not status.simulator
    torch = importlib.util.find_spec("torch") is not None
    torch_cuda = False
    if torch:
        import torch as _torch

        torch_cuda = _torch.cuda.is_available()
    sklearn = importlib.util.find_spec("sklearn") is not None
    rows = {
        bench.GPUNN_NUMPY: True,
        bench.GPUNN_CUDA: cuda,
        bench.TORCH_CPU: torch,
        bench.TORCH_CUDA: torch_cuda,
        bench.SKLEARN: sklearn,
    }
    return [k for k, v in rows.items() if v], [k for k, v in rows.items() if not v]


def _section(text, title):
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start : nxt if nxt != -1 else len(text)]


def _table_rows(section):
    return {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "gpunn", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(out),  # cwd: import the installed gpunn
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path = os.path.join(str(out), "report.md")
    with open(path, encoding="utf-8") as fh:
        return path, fh.read()


def test_report_and_plots_exist(report):
    path, text = report
    assert os.path.basename(path) == "report.md"
    out = os.path.dirname(path)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"throughput.png", "gflops.png", "time_split.png"} <= set(images)
    for image in images:
        file = os.path.join(out, image)
        assert os.path.getsize(file) > 1000, image
        with open(file, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", image


def test_report_has_a_row_per_present_contender(report):
    _, text = report
    present, absent = _expected_contenders()
    for title in ("Training throughput", "Achieved GFLOP/s"):
        rows = _table_rows(_section(text, title))
        for name in present:
            assert name in rows, (title, name)
        for name in absent:
            assert name not in rows, (title, name)
    if importlib.util.find_spec("sklearn") is not None:  # the accuracy data set comes with scikit-learn
        rows = _table_rows(_section(text, "Held-out accuracy"))
        for name in present:
            assert name in rows, ("accuracy", name)
    time_rows = _table_rows(_section(text, "Time split"))
    assert bench.GPUNN_NUMPY in time_rows
    contenders = _section(text, "Contenders")
    absent_line = next(line for line in contenders.splitlines() if line.startswith("Absent:"))
    for name in absent:
        assert name in absent_line


def test_report_header_records_the_machine(report):
    _, text = report
    header = _section(text, "Machine")
    for label in ("CPU", "BLAS", "BLAS threads", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "GPU"):
        assert f"| {label} |" in header
    assert "GFLOP/s" in _section(text, "Achieved GFLOP/s")
    assert "ratio" in _section(text, "Training throughput") or len(_expected_contenders()[0]) == 1


def test_bench_leaves_the_backend_choice_alone(report):
    assert gpunn.get_backend() == "numpy"


def test_flop_counts_of_the_reference_mlp():
    fwd = 2 * (784 * 256 + 256 * 256 + 256 * 10)
    assert bench.forward_flops_per_sample() == fwd
    assert bench.train_flops_per_sample() == fwd + fwd + 2 * (256 * 256 + 256 * 10)


def test_time_split_runs_the_real_step_and_restores_the_backend():
    """Timing the phases trains exactly as train_on_batch does, and puts the backend back."""
    x, y = bench.synthetic_data(64)
    a = bench.GpunnTrainer("numpy", (784, 32, 16, 10), "adam", 0.01)
    b = bench.GpunnTrainer("numpy", (784, 32, 16, 10), "adam", 0.01, weights=a.weights())
    backend, opt_backend = b.model.backend, b.model.optimizer._backend
    times = bench.phase_times(b, x, y, 64, 1)
    assert set(times) == set(bench.PHASES) and all(t > 0 for t in times.values())
    assert b.model.backend is backend and b.model.optimizer._backend is opt_backend
    # one step on a batch of all 64 rows in some order: same update as train_on_batch up to summation order
    perm = np.random.default_rng(1).integers(0, 64, 64)
    a.model.train_on_batch(x[perm], y[perm])
    for wa, wb in zip(a.weights(), b.weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_torch_loop_matches_gpunn_from_the_same_start():
    """Same initial weights and batches: the PyTorch contender computes the same SGD steps."""
    x, y = bench.synthetic_data(256)
    gpunn.set_seed(3)
    g = bench.GpunnTrainer("numpy", (784, 32, 16, 10), "sgd", 0.05)
    from gpunn.random import generator

    state = generator().bit_generator.state
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    t = bench.TorchTrainer("cpu", (784, 32, 16, 10), "sgd", 0.05, weights=g.weights(), orders=replay)
    g.epoch(x, y, 32)
    t.epoch(x, y, 32)
    for wa, wb in zip(g.weights(), t.weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


def test_gpu_check_without_a_gpu_exits_with_a_clear_message():
    status = cuda_status()
    if status.usable and not status.simulator:
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no usable GPU" in proc.stdout + proc.stderr


# -- benchmarks/gpu_check.py: its CPU-computable parts ------------------------


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_peak_formula():
    gc = _gpu_check()
    # H200: sm_90, 132 SMs x 128 FP32 cores x 2 x 1.98 GHz = 66.9 TFLOP/s
    assert gc.cores_per_sm(9, 0) == 128
    assert gc.fp32_peak_gflops(132, 9, 0, 1_980_000) == pytest.approx(66908.16)
    assert gc.cores_per_sm(8, 0) == 64 and gc.cores_per_sm(8, 6) == 128
    assert gc.fp32_peak_gflops(132, 9, 0, None) is None


@pytest.mark.parametrize("act", [0, 1, 2, 3, 4, 5])
def test_gpu_check_references_match_numpy_ops(act):
    from gpunn.backend import numpy_ops

    gc = _gpu_check()
    rng = np.random.default_rng(act)
    z = rng.standard_normal((50, 7)) * 3
    y = numpy_ops.apply_activation(z.copy(), act, 0.2, np.empty_like(z))
    np.testing.assert_allclose(gc.ref_act(np, z, act, 0.2), y, rtol=1e-12, atol=1e-15)
    g = rng.standard_normal(z.shape)
    expected = numpy_ops.multiply_activation_grad(g.copy(), y, z, act, 0.2)
    np.testing.assert_allclose(g * gc.ref_dact(np, y, z, act, 0.2), expected, rtol=1e-12, atol=1e-15)


def test_gpu_check_violation_flags_wrong_and_missing_values():
    gc = _gpu_check()
    ref = np.ones(10)
    tol = np.full(10, 1e-6)
    assert gc.violation(np, ref + 5e-7, ref, tol)[0] <= 1
    bad = ref.copy()
    bad[3] += 1e-3
    assert gc.violation(np, bad, ref, tol)[0] > 1
    bad[3] = np.nan  # an element the kernel never wrote (buffers start as NaN)
    assert gc.violation(np, bad, ref, tol)[0] == np.inf


@pytest.mark.simulator
def test_gpu_check_paths_on_the_simulator(capsys):
    """The checks and timings of gpu_check run (tiny shapes) and pass on the simulator."""
    if not cuda_status().simulator:
        pytest.skip("runs on Numba's CUDA simulator only")
    from gpunn import codes

    gc = _gpu_check()
    env, rep = gc.Env(True), gc.Report(1e9)
    rep.device = gc.describe_device(env)
    gc.check_linear(env, rep, np.float32, codes.ACT_GELU, [(37, 19, 11)])
    gc.check_activation(env, rep, np.float32, codes.ACT_TANH, (7, 5))
    gc.check_loss(env, rep, np.float32, codes.LOSS_SOFTMAX_SPARSE_CCE, 45)
    gc.check_optimizer(env, rep, np.float32, "adam", (0.01,), 1003)
    assert rep.checks and all(ok for _, ok, _ in rep.checks), [c for c in rep.checks if not c[1]]
    gc.run_ops(env, rep, True, None)
    assert len(rep.ops) == 3
    assert gc.summary(rep) == 0
    assert "gpu_check summary" in capsys.readouterr().out
