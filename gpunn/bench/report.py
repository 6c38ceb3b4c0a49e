"""``gpunn bench``: a benchmark report (``report.md`` plus PNG plots).

The report compares every gpunn backend usable here with every peer that is
installed -- PyTorch (CPU, and CUDA where present) and scikit-learn's
``MLPClassifier`` -- on the reference MLP 784-256-256-10 (ReLU, softmax
cross-entropy), and says which peers were absent.  It shows

* training throughput (samples/s) against the batch size, with ratios
  against the peers measured in the same run;
* the GFLOP/s this achieves against the machine's float32 matrix-product
  ceiling, measured in the same run;
* where gpunn's training step spends its time: gather, forward (fused linear
  layers and the loss), backward (fused linear backward per layer) and the
  optimizer update;
* the held-out accuracy each contender reaches on the same data after the
  same epochs, so that speed is never bought with wrong math;
* how far each figure can be trusted: the spread of its timing windows and
  the machine's load while it was measured (``gpunn.bench.timing``).

Measurement practice: the machines are shared and noisy, so contenders run
interleaved (A, B, C, C, B, A, ...) and each figure is the fastest of several
windows; a figure whose fastest windows disagree is retried and, failing
that, marked unreliable (and the report says so at the top).  No number is
ever asserted; the report states ratios and names the CPU (and GPU) of every
figure.

``main(quick, out)`` is what ``gpunn bench [--quick] [--out DIR]`` calls.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from gpunn.bench import timing
from gpunn.bench.contenders import (
    GPUNN_NUMPY,
    REFERENCE_DIMS,
    SKLEARN,
    TORCH_CPU,
    GpunnTrainer,
    contenders,
    digits_data,
    synthetic_data,
    torch_threads,
    train_flops_per_sample,
)
from gpunn.bench.machine import Load, LoadMeter, blas_threads, cpu_label, gpu_description, machine_rows

DEFAULT_OUT = "gpunn-bench"

#: Mark of a figure whose windows disagree by more than the policy's margin.
UNRELIABLE = "†"


@dataclass
class Settings:
    """What a run measures; ``quick`` shrinks it."""

    batches: tuple
    samples: int  # cap on the synthetic samples of one throughput window
    policy: timing.Policy  # windows per figure, agreement, retries
    ceiling_n: int  # side of the square float32 matmul measuring the ceiling
    split_steps: int  # steps timed phase by phase for the time split
    accuracy_epochs: int
    accuracy_batch: int = 32
    lr_sgd: float = 0.01
    lr_adam: float = 1e-3
    mode: str = "full"
    window_s: float = 1.0  # target length of one timed throughput window

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            # five short windows are stable to a few percent on a quiet 2-core machine;
            # a noisy one gets up to two rounds of three more before a figure is marked
            policy = timing.Policy(windows=5, quorum=3, margin=0.10, retry_windows=3, retries=2)
            return cls((32, 256, 4096), 16384, policy, 1024, 10, 3, mode="quick", window_s=0.2)
        policy = timing.Policy(windows=7, quorum=3, margin=0.05, retry_windows=4, retries=3)
        return cls(tuple(2**k for k in range(5, 13)), 32768, policy, 2048, 30, 20, mode="full", window_s=1.0)


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def matmul_ceiling(n: int, policy: timing.Policy, window_s: float = 0.05) -> tuple[float, timing.Timing]:
    """(GFLOP/s, its timing) of the fastest ``n x n`` float32 ``np.matmul`` (the CPU's BLAS ceiling).

    A window repeats the product for about ``window_s`` seconds; the timing is per product.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)  # warm-up
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    reps = max(1, int(window_s / max(time.perf_counter() - t0, 1e-6)))

    def window():
        t0 = time.perf_counter()
        for _ in range(reps):
            np.matmul(a, b, out=c)
        return (time.perf_counter() - t0) / reps

    t = timing.measure({"matmul": window}, policy)["matmul"]
    return 2.0 * n**3 / t.best / 1e9, t


def cupy_matmul_ceiling(n: int = 4096, repeats: int = 10):
    """Best GFLOP/s of an ``n x n`` float32 ``cupy.matmul`` (cuBLAS SGEMM), or None."""
    from gpunn.bench.gpu import sgemm_ceiling

    try:
        return sgemm_ceiling(n, repeats)
    except Exception:
        return None


@dataclass
class Results:
    settings: Settings
    header: list
    present: list
    absent: dict
    cpu: str = ""  # the CPU every CPU figure was measured on
    gpu: str = ""  # the GPU every GPU figure was measured on
    ceiling: float = 0.0
    ceiling_timing: timing.Timing | None = None
    gpu_ceiling: float | None = None
    throughput: dict = field(default_factory=dict)  # (name, batch) -> samples/s
    timings: dict = field(default_factory=dict)  # (name, batch) -> timing.Timing of its windows
    window_samples: dict = field(default_factory=dict)  # (name, batch) -> samples per timed window
    load: dict = field(default_factory=dict)  # batch -> Load while its windows ran
    run_load: Load | None = None  # over the whole run
    split: dict = field(default_factory=dict)  # (backend, batch) -> {phase: seconds}
    split_spread: dict = field(default_factory=dict)  # (backend, batch) -> relative spread of step times
    accuracy: dict = field(default_factory=dict)  # name -> (accuracy, seconds)
    agreement: float | None = None
    accuracy_note: str = ""
    seconds: float = 0.0

    def unreliable(self) -> list:
        """Labels of every timed figure whose windows disagree by more than the margin."""
        out = [f"{n} at batch {b}" for (n, b), t in self.timings.items() if not t.reliable]
        if self.ceiling_timing is not None and not self.ceiling_timing.reliable:
            out.append("the matrix-product ceiling")
        margin = self.settings.policy.margin
        out += [f"time split of {n} at batch {b}" for (n, b), s in self.split_spread.items() if s > margin]
        return out

    def figures(self) -> int:
        return len(self.timings) + (self.ceiling_timing is not None) + len(self.split_spread)


def window_samples(seconds_per_sample: float, batch: int, settings: Settings) -> int:
    """Samples in one timed window: about ``window_s`` seconds, whole batches, 8 batches to ``samples``."""
    n = int(settings.window_s / max(seconds_per_sample, 1e-9)) // batch * batch
    cap = max(batch, settings.samples // batch * batch)
    return min(cap, max(n, 8 * batch))


def measure_throughput(present, settings, log):
    """Samples/s per (contender, batch): contenders interleaved, the fastest of the windows.

    Each contender's window length adapts to its speed: a short calibration
    epoch sets how many samples make a window of about ``settings.window_s``
    seconds (whole batches, at least 8, at most ``settings.samples``).
    Returns ``(samples/s, timings, samples per window, {batch: load})``, the
    first three keyed by ``(name, batch)``.
    """
    policy = settings.policy
    x_all, y_all = synthetic_data(max(settings.samples, 8 * max(settings.batches)))
    rates, timings, sizes, loads = {}, {}, {}, {}
    for batch in settings.batches:
        init = GpunnTrainer("numpy", REFERENCE_DIMS, "sgd", settings.lr_sgd).weights()
        n_cal = min(len(x_all), 2 * batch)
        runners = {}
        for c in present:
            t = c.make(REFERENCE_DIMS, "sgd", settings.lr_sgd, init if c.name != SKLEARN else None, None)
            t.epoch(x_all[:n_cal], y_all[:n_cal], batch)  # warm-up: workspaces, kernels, caches
            t0 = time.perf_counter()
            t.epoch(x_all[:n_cal], y_all[:n_cal], batch)
            n = window_samples((time.perf_counter() - t0) / n_cal, batch, settings)
            sizes[(c.name, batch)] = n
            runners[c.name] = timing.epoch_window(t, x_all[:n], y_all[:n], batch)
        meter = LoadMeter().start()
        got = timing.measure(runners, policy, lambda k, names, batch=batch: log(f"  batch {batch}: retry {k} for {', '.join(names)}"))
        loads[batch] = meter.stop()
        for name, t in got.items():
            timings[(name, batch)] = t
            rates[(name, batch)] = sizes[(name, batch)] / t.best
        log(
            f"  batch {batch}: "
            + ", ".join(f"{k} {rates[(k, batch)]:,.0f}/s (spread {t.spread:.0%})" for k, t in got.items())
            + f"; {loads[batch].text()}"
        )
    return rates, timings, sizes, loads


#: Which phase of a training step each backend method belongs to.
PHASE_OF = {
    "take_rows": "gather",
    "linear_forward": "forward",
    "apply_activation": "forward",
    "softmax": "forward",
    "loss_grad": "forward",
    "linear_backward": "backward",
    "softmax_backward": "backward",
    "optimizer_update": "optimizer",
}
PHASES = ("gather", "forward", "backward", "optimizer")


class PhaseTimer:
    """A stand-in for a Backend that times each numeric call, by phase, with a sync after it."""

    def __init__(self, backend):
        self._backend = backend
        self.times = dict.fromkeys(PHASES, 0.0)

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        phase = PHASE_OF.get(name)
        if phase is None:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            self._backend.synchronize()
            self.times[phase] += time.perf_counter() - t0
            return out

        return timed


def phase_times(trainer: GpunnTrainer, x, y, batch, steps):
    """Seconds of gather / forward / backward / optimizer of each of ``steps`` training steps.

    Runs the model's own training step (``model.make_train_step``) with its
    backend behind a :class:`PhaseTimer` that synchronises after every call,
    so each phase is the sum of its calls: gather = the batch's rows,
    forward = fused linear layers and the fused loss with its gradient,
    backward = fused linear backward per layer, optimizer = one update.
    Returns ``{phase: [seconds per step]}``.
    """
    model = trainer.model
    backend = model.backend
    # backend-resident data, as fit keeps it: features and targets in the model's dtype
    X, Y = backend.asarray(x, dtype=model.dtype), backend.asarray(y, dtype=model.dtype)
    timer = PhaseTimer(backend)
    step = model.make_train_step(batch, backend=timer)
    rng = np.random.default_rng(1)
    times = {p: [] for p in PHASES}
    for _ in range(steps):
        index = backend.asarray(rng.integers(0, x.shape[0], batch))
        timer.times = dict.fromkeys(PHASES, 0.0)
        step.load_rows(X, Y, index)
        step.run()
        for p in PHASES:
            times[p].append(timer.times[p])
    return times


def median_split(times: dict) -> tuple[dict, float]:
    """({phase: median seconds}, relative spread of the step totals: interquartile range / median)."""
    totals = np.sum([times[p] for p in PHASES], axis=0)
    q25, q50, q75 = np.percentile(totals, [25, 50, 75])
    return {p: float(np.median(v)) for p, v in times.items()}, float((q75 - q25) / q50) if q50 > 0 else float("inf")


def measure_split(present, settings, log):
    x, y = synthetic_data(max(settings.batches))
    split, spread = {}, {}
    for c in present:
        if not c.name.startswith("gpunn"):
            continue
        trainer = c.make(REFERENCE_DIMS, "sgd", settings.lr_sgd, None, None)
        for batch in settings.batches:
            phase_times(trainer, x, y, batch, 2)  # warm-up
            split[(c.name, batch)], spread[(c.name, batch)] = median_split(phase_times(trainer, x, y, batch, settings.split_steps))
    if split:
        log("  time split measured for " + ", ".join(sorted({k[0] for k in split})))
    return split, spread


def measure_accuracy(present, settings, log):
    """Held-out accuracy on scikit-learn's digits after the same epochs, batch and optimizer (Adam)."""
    x_tr, y_tr, x_te, y_te = digits_data()
    dims = (x_tr.shape[1], *REFERENCE_DIMS[1:-1], 10)
    import gpunn
    from gpunn.random import generator

    gpunn.set_seed(1234)
    init = GpunnTrainer("numpy", dims, "adam", settings.lr_adam).weights()
    results, final = {}, {}
    # gpunn's fit draws one permutation per epoch from its generator; starting
    # every contender from the same generator state, and giving PyTorch a
    # replica of it, makes gpunn and PyTorch see the same batches in order.
    state = generator().bit_generator.state
    for c in present:
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        trainer = c.make(dims, "adam", settings.lr_adam, None if c.name == SKLEARN else init, replay)
        generator().bit_generator.state = state  # building a gpunn model drew its (overwritten) init
        t0 = time.perf_counter()
        for _ in range(settings.accuracy_epochs):
            trainer.epoch(x_tr, y_tr, settings.accuracy_batch)
        seconds = time.perf_counter() - t0
        acc = float(np.mean(trainer.predict(x_te) == y_te))
        results[c.name] = (acc, seconds)
        if hasattr(trainer, "weights"):
            final[c.name] = trainer.weights()
    agreement = None
    if GPUNN_NUMPY in final and TORCH_CPU in final:
        agreement = max(float(np.max(np.abs(a - b))) for a, b in zip(final[GPUNN_NUMPY], final[TORCH_CPU]))
    log("  accuracy: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in results.items()))
    note = (
        f"scikit-learn digits (8x8 images, 64 features, 10 classes): {len(y_tr)} training and {len(y_te)} held-out "
        f"samples, standardised. Every contender trains a {'-'.join(map(str, dims))} ReLU MLP with softmax "
        f"cross-entropy, Adam (lr {settings.lr_adam:g}), batch {settings.accuracy_batch}, "
        f"{settings.accuracy_epochs} epochs. gpunn and PyTorch start from the same initial weights and see the same "
        "batches in the same order; scikit-learn uses its own initialisation and shuffling."
    )
    return results, agreement, note


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mark(text, reliable):
    return text if reliable else f"{text} {UNRELIABLE}"


def reliability_banner(res: Results) -> list[str]:
    """The lines at the top of the report: are the figures below to be trusted, and how busy was the machine."""
    p = res.settings.policy
    doubtful = res.unreliable()
    load = f" Machine load during the run: {res.run_load.text()}." if res.run_load else ""
    if doubtful:
        shown = "; ".join(doubtful[:8]) + (f" and {len(doubtful) - 8} more" if len(doubtful) > 8 else "")
        return [
            f"> **Warning: {len(doubtful)} of {res.figures()} figures are unreliable** (marked {UNRELIABLE}): their "
            f"{p.quorum} fastest timing windows still disagreed by more than {p.margin:.0%} after up to {p.retries} "
            f"retries. Unreliable: {shown}.{load} Rerun on a quiet machine before quoting them.",
        ]
    lines = [
        f"All {res.figures()} timed figures are reliable: the {p.quorum} fastest windows of each agree within "
        f"{p.margin:.0%}.{load}"
    ]
    if busy(res.run_load):
        lines += [
            "",
            f"> **Warning: the machine was busy** ({res.run_load.text()}). Windows can agree under a steady load, so "
            "the ratios hold but absolute throughputs may understate this machine; rerun on a quiet machine before "
            "quoting absolute numbers.",
        ]
    return lines


#: Other processes' share of the CPUs above which a run is called busy.
BUSY_SHARE = 0.25


def busy(load: Load | None) -> bool:
    """Did other processes take a noticeable share of the machine (CPU time, or a load average above the cores)?"""
    if load is None:
        return False
    from gpunn.bench.machine import usable_cores

    by_cpu = load.others is not None and load.others + (load.steal or 0.0) > BUSY_SHARE
    by_loadavg = load.others is None and load.loadavg is not None and load.loadavg > usable_cores()
    return by_cpu or by_loadavg


def _unreliable_note(res, timings):
    """The legend of the mark, under a table that holds a marked figure (else nothing)."""
    if all(t.reliable for t in timings):
        return []
    p = res.settings.policy
    return [f"{UNRELIABLE} unreliable: its {p.quorum} fastest windows disagree by more than {p.margin:.0%} (see Timing windows).", ""]


def _throughput_section(res, files):
    s = res.settings
    names = [c.name for c in res.present]
    cell = lambda n, b: _mark(f"{res.throughput[(n, b)]:,.0f}", res.timings[(n, b)].reliable)  # noqa: E731
    md = [
        "## Training throughput",
        "",
        f"Measured on {res.cpu}" + (f" (GPU contenders: {res.gpu})" if any(c.device == "gpu" for c in res.present) else "")
        + ". Synthetic MNIST-shaped samples (784 features, 10 classes) through the reference "
        f"MLP {'-'.join(map(str, REFERENCE_DIMS))} (ReLU, softmax cross-entropy), SGD lr {s.lr_sgd:g}, shuffled "
        f"batches, one window of about {s.window_s:g} s per contender (its length is in Timing windows); training "
        "samples per second (higher is better).",
        "",
        _table(["contender", *[f"batch {b}" for b in s.batches]], [[n, *[cell(n, b) for b in s.batches]] for n in names]),
        "",
    ]
    peers = [n for n in names if not n.startswith("gpunn")]
    ratio_rows = []
    for g in (n for n in names if n.startswith("gpunn")):
        for p in peers:
            cells = []
            for b in s.batches:
                ok = timing.ratio_reliable(res.timings[(g, b)], res.timings[(p, b)])
                cells.append(_mark(f"{res.throughput[(g, b)] / res.throughput[(p, b)]:.2f}x", ok))
            ratio_rows.append([f"{g} / {p}", *cells])
    if ratio_rows:
        md += [
            "Throughput ratios (gpunn / peer; above 1 means gpunn is faster; a ratio is unreliable when either figure is):",
            "",
            _table(["ratio", *[f"batch {b}" for b in s.batches]], ratio_rows),
            "",
        ]
    md += [*_unreliable_note(res, res.timings.values()), f"![training throughput]({files['throughput']})", ""]
    return md


def _gflops_section(res, files):
    s = res.settings
    flops = train_flops_per_sample()
    ceiling_text = _mark(f"**{res.ceiling:,.1f} GFLOP/s**", res.ceiling_timing is None or res.ceiling_timing.reliable)
    md = [
        "## Achieved GFLOP/s against the matrix-product ceiling",
        "",
        f"A training sample of the reference MLP costs {flops / 1e6:.3f} MFLOP (forward, weight gradients, and data "
        f"gradients of all but the first layer). The CPU ceiling is the fastest float32 `np.matmul` of "
        f"{s.ceiling_n}x{s.ceiling_n} in this run on {res.cpu}: {ceiling_text}"
        + (f"; the GPU ceiling is the best cuBLAS SGEMM 4096^3 on {res.gpu}: **{res.gpu_ceiling:,.0f} GFLOP/s**" if res.gpu_ceiling else "")
        + ".",
        "",
    ]
    rows = []
    for c in res.present:
        ceiling = res.gpu_ceiling if c.device == "gpu" else res.ceiling
        cells = [c.name]
        for b in s.batches:
            gf = res.throughput[(c.name, b)] * flops / 1e9
            text = f"{gf:,.1f} ({gf / ceiling:.0%})" if ceiling else f"{gf:,.1f}"
            cells.append(_mark(text, res.timings[(c.name, b)].reliable))
        rows.append(cells)
    md += [
        "GFLOP/s (fraction of the ceiling of the contender's device):",
        "",
        _table(["contender", *[f"batch {b}" for b in s.batches]], rows),
        "",
        *_unreliable_note(res, res.timings.values()),
        f"![achieved GFLOP/s]({files['gflops']})",
        "",
    ]
    return md


def _split_section(res, files):
    s = res.settings
    md = ["## Time split of a gpunn training step", ""]
    if not res.split:
        return md
    md += [
        f"Measured on {res.cpu}" + (f" (cuda: {res.gpu})" if any(n.endswith("(cuda)") for n, _ in res.split) else "")
        + f". Median milliseconds per phase over {s.split_steps} steps of the model's own training step "
        "(`model.make_train_step`), each backend call timed (with a synchronisation after it) and summed by phase: "
        "gather = batch rows taken from the training set; forward = fused linear layers + fused softmax "
        "cross-entropy and its gradient; backward = fused linear backward per layer; optimizer = one SGD update of "
        f"the flat parameters. Spread = interquartile range of the step times over their median; above "
        f"{s.policy.margin:.0%} the row is marked {UNRELIABLE}. The timed calls run one after another on "
        "the whole batch: on the CPU, `fit` splits a batch with at least 256 rows per core into row shards run side by "
        "side, one per core (see the throughput table), so there the split shows where the work is, not "
        "the wall time of fit's step.",
        "",
    ]
    rows = []
    for (name, b), t in res.split.items():
        total = sum(t.values())
        spread = res.split_spread[(name, b)]
        rows.append(
            [name, b, *[f"{t[p] * 1e3:.3f} ({t[p] / total:.0%})" for p in PHASES], f"{total * 1e3:.3f}", _mark(f"{spread:.0%}", spread <= s.policy.margin)]
        )
    header = ["backend", "batch", "gather ms", "forward ms", "backward ms", "optimizer ms", "step ms", "spread"]
    md += [_table(header, rows), "", f"![time split]({files['split']})", ""]
    return md


def _accuracy_section(res, files):
    md = ["## Held-out accuracy: same data, same epochs", ""]
    if not res.accuracy:
        return md + [res.accuracy_note, ""]
    rows = [[k, f"{a:.2%}", f"{t:.2f}"] for k, (a, t) in res.accuracy.items()]
    md += [
        res.accuracy_note,
        "",
        _table(["contender", "held-out accuracy", f"training time (s, one run, {res.cpu})"], rows),
        "",
    ]
    if res.agreement is not None:
        md += [
            f"Largest weight difference between {GPUNN_NUMPY} and {TORCH_CPU} after training (same start, same "
            f"batches): {res.agreement:.2e}. Adam's nearly sign-like steps amplify last-bit rounding differences on "
            "near-zero gradients, so this grows with the epochs; `benchmarks/cpu_vs_torch.py` checks one SGD epoch.",
            "",
        ]
    return md + [f"![held-out accuracy]({files['accuracy']})", ""]


def _windows_section(res):
    s = res.settings
    rows = []
    for (name, b), t in res.timings.items():
        verdict = "reliable" if t.reliable else f"unreliable {UNRELIABLE}"
        rows.append([name, b, f"{res.window_samples[(name, b)]:,}", t.windows, t.retries, f"{t.spread:.1%}", verdict])
    if res.ceiling_timing is not None:
        t = res.ceiling_timing
        verdict = "reliable" if t.reliable else f"unreliable {UNRELIABLE}"
        rows.append(["matmul ceiling", f"{s.ceiling_n}^2", "-", t.windows, t.retries, f"{t.spread:.1%}", verdict])
    loads = [[b, res.load[b].text()] for b in s.batches if b in res.load]
    return [
        "## Timing windows",
        "",
        f"Policy ({s.mode}): {s.policy.describe()}. Spread = how much slower the slowest of the {s.policy.quorum} fastest "
        "windows was than the fastest.",
        "",
        _table(["figure", "batch", "samples per window", "windows", "retries", "spread", "verdict"], rows),
        "",
        "Machine load while each batch size's windows ran (other processes' share of all CPUs and the "
        "hypervisor's steal from /proc/stat; the 1-minute load average at the end):",
        "",
        _table(["batch", "load"], loads),
        "",
    ]


def render(res: Results, files) -> str:
    s = res.settings
    names = [c.name for c in res.present]
    md = [
        "# gpunn benchmark report",
        "",
        *reliability_banner(res),
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `gpunn bench"
        f"{' --quick' if s.mode != 'full' else ''}` in {res.seconds:.1f} s on {res.cpu}. Contenders run "
        "interleaved and every figure is the fastest of its windows; compare ratios, not absolute numbers, across "
        "machines.",
        "",
        "## Machine",
        "",
        _table(["", ""], res.header),
        "",
        "## Contenders",
        "",
        "Present: " + ", ".join(names) + ".",
        "",
        "Absent: " + ("; ".join(f"{k} ({v})" for k, v in res.absent.items()) if res.absent else "none") + ".",
        "",
    ]
    md += _throughput_section(res, files)
    md += _gflops_section(res, files)
    md += _split_section(res, files)
    md += _accuracy_section(res, files)
    md += _windows_section(res)
    return "\n".join(md)


def run(settings: Settings, out_dir: str, log=None) -> str:
    """Measure everything ``settings`` asks for and write ``report.md`` and plots to ``out_dir``."""
    from gpunn.bench.plots import plot_all

    t_start = time.perf_counter()
    if log is None:

        def log(msg):
            print(f"[{time.perf_counter() - t_start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    present, absent = contenders()
    res = Results(settings, machine_rows(settings.mode), present, absent, cpu=cpu_label(), gpu=gpu_description()[0])
    log(f"gpunn bench ({settings.mode}) on {res.cpu}: {', '.join(c.name for c in present)}; absent: {', '.join(absent) or 'none'}")
    meter = LoadMeter().start()
    with torch_threads(blas_threads()):
        res.ceiling, res.ceiling_timing = matmul_ceiling(settings.ceiling_n, settings.policy)
        log(f"  float32 matmul ceiling: {res.ceiling:,.1f} GFLOP/s (spread {res.ceiling_timing.spread:.0%})")
        if any(c.device == "gpu" for c in present):
            res.gpu_ceiling = cupy_matmul_ceiling()
        res.throughput, res.timings, res.window_samples, res.load = measure_throughput(present, settings, log)
        res.split, res.split_spread = measure_split(present, settings, log)
        res.accuracy, res.agreement, res.accuracy_note = measure_accuracy(present, settings, log)
    res.run_load = meter.stop()
    files = plot_all(res, out_dir)
    res.seconds = time.perf_counter() - t_start
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render(res, files))
    doubtful = res.unreliable()
    log(f"report written to {path}" + (f"; {len(doubtful)} unreliable figure(s), see its top" if doubtful else ""))
    return path


def main(quick: bool = False, out: str | None = None) -> str:
    """Entry point of ``gpunn bench [--quick] [--out DIR]``; returns the path of report.md."""
    return run(Settings.for_mode(quick), out or DEFAULT_OUT)
