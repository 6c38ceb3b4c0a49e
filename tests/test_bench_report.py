"""`gpunn bench`: the report, its plots, its reliability verdicts, and the `bench` extra.

No number is asserted: the machines are shared and noisy.  The report comes
from the real command line, ``gpunn bench --quick`` (seconds on a quiet
2-core machine), as users and CI run it.  The logic that judges timing
windows is tested with fake timings (``gpunn.bench.timing`` never reads a
clock itself).
"""

import importlib.util
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gpunn
from gpunn.bench import contenders as C
from gpunn.bench import machine, report, timing
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
        C.GPUNN_NUMPY: True,
        C.GPUNN_CUDA: cuda,
        C.TORCH_CPU: torch,
        C.TORCH_CUDA: torch_cuda,
        C.SKLEARN: sklearn,
    }
    return [k for k, v in rows.items() if v], [k for k, v in rows.items() if not v]


def _section(text, title):
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start : nxt if nxt != -1 else len(text)]


def _table_rows(section):
    return {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")}


def _table(section, first_column):
    """{first cell: [cells]} of the table whose header starts with ``first_column``."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.split("|")[1].strip() == first_column)
    rows = {}
    for line in lines[start + 2 :]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_column:
            break
        rows.setdefault(cells[0], []).append(cells[1:])
    return rows


@pytest.fixture(scope="module")
def report_md(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "gpunn", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=str(out),  # cwd: import the installed gpunn; retries make it slow on a busy machine
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path = os.path.join(str(out), "report.md")
    with open(path, encoding="utf-8") as fh:
        return path, fh.read()


def test_report_and_plots_exist(report_md):
    path, text = report_md
    assert os.path.basename(path) == "report.md"
    out = os.path.dirname(path)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"throughput.png", "gflops.png", "time_split.png"} <= set(images)
    for image in images:
        file = os.path.join(out, image)
        assert os.path.getsize(file) > 1000, image
        with open(file, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", image


def test_report_has_a_row_per_present_contender(report_md):
    _, text = report_md
    present, absent = _expected_contenders()
    for title in ("Training throughput", "Achieved GFLOP/s"):
        rows = _table_rows(_section(text, title))
        for name in present:
            assert name in rows, (title, name)
        for name in absent:
            assert name not in rows, (title, name)
    rows = _table_rows(_section(text, "Held-out accuracy"))
    for name in present:
        assert name in rows, ("accuracy", name)
    time_rows = _table_rows(_section(text, "Time split"))
    assert C.GPUNN_NUMPY in time_rows
    contenders = _section(text, "Contenders")
    absent_line = next(line for line in contenders.splitlines() if line.startswith("Absent:"))
    for name in absent:
        assert name in absent_line


def test_report_header_records_the_machine(report_md):
    _, text = report_md
    header = _section(text, "Machine")
    for label in ("CPU", "BLAS", "BLAS threads", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "GPU"):
        assert f"| {label} |" in header
    assert "GFLOP/s" in _section(text, "Achieved GFLOP/s")
    assert "ratio" in _section(text, "Training throughput") or len(_expected_contenders()[0]) == 1


def test_every_figure_names_the_cpu(report_md):
    _, text = report_md
    cpu = machine.cpu_name()
    for title in ("Training throughput", "Achieved GFLOP/s", "Time split", "Held-out accuracy"):
        assert cpu in _section(text, title), title


def test_report_says_at_the_top_how_far_its_figures_can_be_trusted(report_md):
    """The verdict of every timed figure is in Timing windows, its mark in the tables, and the count at the top."""
    _, text = report_md
    windows = _table(_section(text, "Timing windows"), "figure")
    present, _ = _expected_contenders()
    throughput = _table(_section(text, "Training throughput"), "contender")
    batches = [int(b.split()[-1]) for b in _section(text, "Training throughput").split("| contender |")[1].split("\n")[0].split("|") if b.strip()]
    unreliable = 0
    for name in present:
        verdicts = {int(row[0]): row[-1] for row in windows[name]}
        assert set(verdicts) == set(batches), name
        for batch, cell in zip(batches, throughput[name][0]):
            marked = cell.endswith(report.UNRELIABLE)
            assert marked == verdicts[batch].startswith("unreliable"), (name, batch, cell, verdicts[batch])
            unreliable += marked
    top = text.split("## Machine")[0]
    assert "load average" in top or "other processes" in top
    # the count at the top covers every judged figure (the matmul ceiling's too), not only the
    # throughput cells checked above
    judged = [row[-1] for rows in windows.values() for row in rows]
    total_unreliable = sum(verdict.startswith("unreliable") for verdict in judged)
    assert unreliable <= total_unreliable
    # (the time split's figures count at the top too, so it may name more)
    warning = re.search(r"Warning: (\d+) of \d+ figures are unreliable", top)
    if warning:
        assert int(warning.group(1)) >= total_unreliable
    else:
        assert total_unreliable == 0 and "timed figures are reliable" in top


def test_bench_leaves_the_backend_choice_alone(report_md):
    assert gpunn.get_backend() == "numpy"


def test_flop_counts_of_the_reference_mlp():
    fwd = 2 * (784 * 256 + 256 * 256 + 256 * 10)
    assert C.forward_flops_per_sample() == fwd
    assert C.train_flops_per_sample() == fwd + fwd + 2 * (256 * 256 + 256 * 10)


def test_time_split_runs_the_real_step_and_leaves_the_model_alone():
    """Timing the phases trains exactly as train_on_batch does, through the public make_train_step."""
    x, y = C.synthetic_data(64)
    a = C.GpunnTrainer("numpy", (784, 32, 16, 10), "adam", 0.01)
    b = C.GpunnTrainer("numpy", (784, 32, 16, 10), "adam", 0.01, weights=a.weights())
    backend = b.model.backend
    times = report.phase_times(b, x, y, 64, 1)
    assert set(times) == set(report.PHASES) and all(len(t) == 1 and t[0] > 0 for t in times.values())
    assert b.model.backend is backend
    # one step on a batch of all 64 rows in some order: same update as train_on_batch up to summation order
    perm = np.random.default_rng(1).integers(0, 64, 64)
    a.model.train_on_batch(x[perm], y[perm])
    for wa, wb in zip(a.weights(), b.weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_torch_loop_matches_gpunn_from_the_same_start():
    """Same initial weights and batches: the PyTorch contender computes the same SGD steps."""
    x, y = C.synthetic_data(256)
    gpunn.set_seed(3)
    g = C.GpunnTrainer("numpy", (784, 32, 16, 10), "sgd", 0.05)
    from gpunn.random import generator

    state = generator().bit_generator.state
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    t = C.TorchTrainer("cpu", (784, 32, 16, 10), "sgd", 0.05, weights=g.weights(), orders=replay)
    g.epoch(x, y, 32)
    t.epoch(x, y, 32)
    for wa, wb in zip(g.weights(), t.weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


# -- the reliability verdict, with fake timings ---------------------------------

POLICY = timing.Policy(windows=5, quorum=3, margin=0.10, retry_windows=3, retries=2)


def _fake(seconds, calls=None, name=None):
    """A runner returning the given window times in turn (recording its name in ``calls``)."""
    it = iter(seconds)

    def run():
        if calls is not None:
            calls.append(name)
        return next(it)

    return run


def test_spread_is_the_gap_between_the_fastest_windows():
    assert timing.spread([1.0, 5.0, 1.05, 1.1, 9.0], 3) == pytest.approx(0.10)
    assert timing.spread([2.0], 1) == 0.0
    assert timing.spread([1.0, 1.0], 3) == float("inf")  # fewer windows than the quorum
    assert timing.judge([1.0, 1.02, 1.04, 3.0, 3.0], POLICY).reliable
    verdict = timing.judge([1.0, 1.3, 1.4, 1.5, 1.6], POLICY)
    assert not verdict.reliable and verdict.best == 1.0 and verdict.spread == pytest.approx(0.4)


def test_quiet_machine_needs_no_retry():
    calls = []
    got = timing.measure({"a": _fake([1.0, 1.01, 1.02, 1.0, 1.03], calls, "a"), "b": _fake([2.0] * 5, calls, "b")}, POLICY)
    assert got["a"].reliable and got["b"].reliable
    assert got["a"].windows == got["b"].windows == 5 and got["a"].retries == 0
    assert got["a"].best == 1.0 and got["b"].best == 2.0
    # interleaved, the order reversed every window
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]


def test_a_noisy_figure_is_retried_with_every_contender_until_it_agrees():
    retried = []
    noisy_then_quiet = [1.0, 2.0, 3.0, 2.5, 1.9, 1.04, 1.05, 3.0]
    got = timing.measure(
        {"a": _fake(noisy_then_quiet), "b": _fake(itertools.repeat(2.0))}, POLICY, lambda k, names: retried.append((k, names))
    )
    assert retried == [(1, ["a"])]
    assert got["a"].reliable and got["a"].windows == 8 and got["a"].retries == 1
    assert got["b"].windows == 8  # the steady contender ran the retry too: ratios stay interleaved
    assert got["a"].spread == pytest.approx(0.05)


def test_a_figure_that_never_agrees_is_given_up_and_marked():
    rng = np.random.default_rng(0)
    wild = list(1.0 + 2.0 * rng.random(20))
    wild[0] = 0.5  # one lucky window far below the rest
    got = timing.measure({"a": _fake(wild), "b": _fake(itertools.repeat(1.0))}, POLICY)
    assert not got["a"].reliable and got["a"].retries == POLICY.retries
    assert got["a"].windows == POLICY.windows + POLICY.retries * POLICY.retry_windows
    assert got["b"].reliable
    assert not timing.ratio_reliable(got["a"], got["b"]) and timing.ratio_reliable(got["b"], got["b"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(windows=2, quorum=3, margin=0.1, retry_windows=1, retries=1), "quorum"),
        (dict(windows=3, quorum=3, margin=0.0, retry_windows=1, retries=1), "margin"),
        (dict(windows=3, quorum=3, margin=0.1, retry_windows=0, retries=2), "retry_windows"),
    ],
)
def test_policy_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timing.Policy(**kwargs)


def _fake_results(a_windows):
    settings = report.Settings.for_mode(quick=True)
    settings.batches = (32,)
    present = [C.Contender(C.GPUNN_NUMPY, None), C.Contender(C.SKLEARN, None)]
    res = report.Results(settings, [("CPU", "Test CPU 9000")], present, {}, cpu="Test CPU 9000, 2 usable cores", gpu="none")
    res.timings = {(C.GPUNN_NUMPY, 32): timing.judge(a_windows, settings.policy), (C.SKLEARN, 32): timing.judge([2.0] * 5, settings.policy)}
    res.window_samples = {k: 1000 for k in res.timings}
    res.throughput = {k: 1000 / t.best for k, t in res.timings.items()}
    res.ceiling, res.ceiling_timing = 100.0, timing.judge([1.0] * 5, settings.policy)
    res.load = {32: machine.Load(0.5, 0.0, 3.0)}
    res.run_load = machine.Load(0.5, 0.02, 3.0)
    return res


FILES = {"throughput": "t.png", "gflops": "g.png", "split": "s.png", "accuracy": "a.png"}


def test_unreliable_figures_are_marked_and_announced_at_the_top():
    text = report.render(_fake_results([1.0, 1.5, 1.6, 1.7, 1.8]), FILES)
    top = text.split("## Machine")[0]
    assert "Warning: 1 of 3 figures are unreliable" in top
    assert f"{C.GPUNN_NUMPY} at batch 32" in top and "other processes 50% of the CPUs" in top and "steal 2%" in top
    gpunn_row = _table(_section(text, "Training throughput"), "contender")[C.GPUNN_NUMPY][0]
    assert gpunn_row == [f"1,000 {report.UNRELIABLE}"]
    assert _table(_section(text, "Training throughput"), "ratio")[f"{C.GPUNN_NUMPY} / {C.SKLEARN}"][0][0].endswith(report.UNRELIABLE)
    assert _table(_section(text, "Training throughput"), "contender")[C.SKLEARN][0] == ["500"]
    assert "Test CPU 9000" in _section(text, "Training throughput")


def test_reliable_figures_carry_no_mark():
    res = _fake_results([1.0, 1.01, 1.02, 1.5, 1.6])
    res.run_load = machine.Load(0.05, 0.0, 0.3)
    text = report.render(res, FILES)
    assert "Warning" not in text and report.UNRELIABLE not in text
    assert text.split("## Machine")[0].count("All 3 timed figures are reliable") == 1


def test_a_steadily_busy_machine_is_announced_even_when_windows_agree():
    res = _fake_results([1.0, 1.01, 1.02, 1.5, 1.6])  # other processes took 50% of the CPUs
    top = report.render(res, FILES).split("## Machine")[0]
    assert "All 3 timed figures are reliable" in top and "Warning: the machine was busy" in top
    assert report.busy(machine.Load(0.2, 0.1, None)) and not report.busy(machine.Load(0.2, 0.0, 50.0))
    assert report.busy(machine.Load(None, None, 1e6)) and not report.busy(None)


def test_window_length_follows_the_contender_in_whole_batches():
    settings = report.Settings.for_mode(quick=True)  # 0.2 s windows, at most 16384 samples
    assert report.window_samples(1e-4, 32, settings) == 2000 // 32 * 32  # 0.2 s at 10k samples/s
    assert report.window_samples(1e-3, 32, settings) == 8 * 32  # slow: still 8 steps
    assert report.window_samples(1e-7, 256, settings) == 16384  # fast: capped
    assert report.window_samples(1e-7, 32768, settings) == 32768  # one batch above the cap: one batch


def test_cpu_time_counts_only_the_cpus_this_process_may_use():
    stat = (
        "cpu  60 0 30 300 10 0 0 5 0 0\n"
        "cpu0 10 0 5 100 0 0 0 1 0 0\n"
        "cpu1 20 0 10 100 5 0 0 2 0 0\n"
        "cpu2 30 0 15 100 5 0 0 2 0 0\n"
        "intr 12345\n"
    )
    assert machine.cpu_jiffies(stat, {0, 2}) == (60, 3, 60 + 200 + 5 + 3)
    assert machine.cpu_jiffies(stat, None) == (90, 5, 90 + 300 + 10 + 5)
    assert machine.cpu_jiffies("cpu  1 2 3 4 5 6 7 8\n", {0}) == (1 + 2 + 3 + 6 + 7, 8, 1 + 2 + 3 + 6 + 7 + 4 + 5 + 8)
    assert machine.cpu_jiffies("intr 1\n", None) is None


def test_load_counts_only_other_processes():
    # 4 CPUs x 100 ticks of wall time = 400 ticks: 250 busy, of which this process used 1 s = 100 ticks
    before, after = (1000, 10, 5000), (1250, 30, 5400)
    load = machine.load_between(before, after, own_seconds=1.0, clock_ticks=100)
    assert load.others == pytest.approx(150 / 400) and load.steal == pytest.approx(20 / 400)
    assert machine.load_between(None, after, 1.0, 100).others is None


# -- the bench extra --------------------------------------------------------


def test_core_install_does_not_pull_the_bench_extra():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    core = " ".join(project["dependencies"])
    for name in ("matplotlib", "threadpoolctl"):
        assert name not in core
        assert any(req.startswith(name) for req in project["optional-dependencies"]["bench"])
    assert "gpunn[bench]" in project["optional-dependencies"]["test"]


def test_gpunn_bench_without_the_extra_says_how_to_install_it(monkeypatch):
    from click.testing import CliRunner

    from gpunn.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    result = CliRunner().invoke(main, ["bench", "--quick"])
    assert result.exit_code == 2, result.output
    assert "matplotlib" in result.output and "pip install 'gpunn[bench]'" in result.output
    assert "Traceback" not in result.output
    from gpunn import bench

    with pytest.raises(bench.MissingExtraError, match=r"gpunn\[bench\]"):
        bench.main(quick=True)


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


# -- benchmarks/gpu_check.py and gpunn.bench.gpu: the parts a CPU can run ------------------


def test_gpu_check_peak_formula():
    from gpunn.bench import gpu

    # H200: sm_90, 132 SMs x 128 FP32 cores x 2 x 1.98 GHz = 66.9 TFLOP/s
    assert gpu.cores_per_sm(9, 0) == 128
    assert gpu.fp32_peak_gflops(132, 9, 0, 1_980_000) == pytest.approx(66908.16)
    assert gpu.cores_per_sm(8, 0) == 64 and gpu.cores_per_sm(8, 6) == 128
    assert gpu.fp32_peak_gflops(132, 9, 0, None) is None


def test_gpu_check_rejects_unknown_sections():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--only", "speed"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown section(s) speed" in proc.stderr


@pytest.mark.simulator
def test_gpu_timings_run_on_the_simulator():
    """The GPU timing paths run (tiny shapes) on the simulator: ops against CuPy's stand-in, a device epoch."""
    if not cuda_status().simulator:
        pytest.skip("runs on Numba's CUDA simulator only")
    from gpunn.bench import gpu

    device = gpu.Device()
    dev = gpu.describe_device(device)
    once = timing.Policy(windows=1, quorum=1, margin=1.0, retry_windows=1, retries=0)
    ops, targets, notes = gpu.time_ops(device, True, None, policy=once)
    assert [r["op"] for r in ops] == ["fwd relu 64x16->16", "fwd linear 32x8->8 (GEMM)", "bwd relu 64x16->16"]
    assert all(r["fused_ms"] > 0 and r["ref_ms"] > 0 for r in ops) and len(targets) == 2 and not notes
    x, y = C.synthetic_data(8, (20, 16, 16, 3))
    trainer = C.GpunnTrainer("cuda", (20, 16, 16, 3), "sgd", 0.1)
    before = trainer.weights()
    epoch, steps = gpu.device_epoch(trainer, x, y, 8)
    epoch()
    assert steps == 1 and trainer.model.backend.name == "cuda"
    assert all(not np.array_equal(a, b) for a, b in zip(before, trainer.weights()))
    train = ("20-16-16-3", [{"opt": "sgd", "batch": 8, "steps": 2, "gpunn_step_ms": 1.0, "fit_epoch_ms": 2.0, "gpunn_acc": 0.5, "reliable": False}])
    lines = "\n".join(gpu.summary_lines(dev, "passed", ops, train, targets, notes, machine.cpu_label(), once))
    assert "gpu_check summary" in lines and "Numba CUDA simulator" in lines and machine.cpu_name() in lines
    assert "UNRELIABLE" in lines and "fwd relu 64x16->16" in lines


@pytest.mark.simulator
def test_gpu_graph_and_first_step_timings_run_on_the_simulator():
    """gpu_check's "graphs" and "cache" rows: their code paths on the simulator (no graph can be
    captured there and nothing is compiled to a cubin, and the rows say so)."""
    if not cuda_status().simulator:
        pytest.skip("runs on Numba's CUDA simulator only")
    from gpunn.bench import gpu

    once = timing.Policy(windows=1, quorum=1, margin=1.0, retry_windows=1, retries=0)
    dims, rows, targets, notes = gpu.time_graphs(True, policy=once)
    assert dims == "20-16-16-3" and [r["batch"] for r in rows] == [8]
    assert rows[0]["captured"] is False and rows[0]["eager_step_ms"] > 0 and rows[0]["graph_step_ms"] > 0
    assert targets == []  # no target is judged on a step that was not captured
    assert notes[-1] == "graphs: batch 8: no graph was captured (eager in both columns)"
    first = gpu.time_first_step(True, timeout_s=300)
    assert set(first) == {"cold", "warm"} and all(first[k]["seconds"] > 0 for k in first)
    assert all(first[k]["stats"]["compiled"] == 0 for k in first)  # the simulator compiles no cubins
    dev = gpu.describe_device(gpu.Device())
    lines = "\n".join(gpu.summary_lines(dev, "passed", [], None, [], notes, machine.cpu_label(), once, (dims, rows), first))
    assert "(not captured: eager)" in lines and "cold kernel cache:" in lines and "warm kernel cache:" in lines
