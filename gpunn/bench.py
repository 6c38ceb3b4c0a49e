"""``gpunn bench``: a benchmark report (``report.md`` plus PNG plots).

The report compares every gpunn backend usable here with every peer that is
installed -- PyTorch (CPU, and CUDA where present) and scikit-learn's
``MLPClassifier`` -- on the reference MLP 784-256-256-10 (ReLU, softmax
cross-entropy), and says which peers were absent.  It shows

* training throughput (samples/s) against the batch size, with ratios
  against the peers measured in the same run;
* the GFLOP/s this achieves against the machine's float32 matrix-product
  ceiling, measured in the same run;
* where gpunn's training step spends its time: forward (fused linear layers
  and the loss), backward (fused linear backward per layer) and the
  optimizer update (plus the batch gather);
* the held-out accuracy each contender reaches on the same data after the
  same epochs, so that speed is never bought with wrong math.

Measurement practice: the machines are shared and noisy, so contenders run
interleaved (A, B, C, A, B, C, ...) and each figure is the fastest of several
windows.  No number is ever asserted; the report states ratios.

``main(quick, out)`` is what ``gpunn bench [--quick] [--out DIR]`` calls.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

#: The reference MLP: input, hidden, hidden, classes.
REFERENCE_DIMS = (784, 256, 256, 10)

#: Row labels of the report (the CI test looks for a row per present contender).
GPUNN_NUMPY = "gpunn (numpy)"
GPUNN_CUDA = "gpunn (cuda)"
TORCH_CPU = "PyTorch CPU"
TORCH_CUDA = "PyTorch CUDA"
SKLEARN = "scikit-learn MLPClassifier"

DEFAULT_OUT = "gpunn-bench"


@dataclass
class Settings:
    """What a run measures; ``quick`` and the test-only ``tiny`` shrink it."""

    batches: tuple
    samples: int  # synthetic MNIST-shaped training samples per throughput epoch
    windows: int  # timed windows per (contender, batch); the fastest counts
    ceiling_n: int  # side of the square float32 matmul measuring the ceiling
    ceiling_repeats: int
    split_steps: int  # steps timed phase by phase for the time split
    accuracy_epochs: int
    accuracy_batch: int = 32
    lr_sgd: float = 0.01
    lr_adam: float = 1e-3
    mode: str = "full"
    window_s: float = 1.0  # target length of one timed throughput window

    @classmethod
    def for_mode(cls, quick: bool, tiny: bool = False) -> "Settings":
        if tiny:
            return cls((32, 256), 512, 1, 256, 2, 3, 1, mode="tiny", window_s=0.02)
        if quick:
            return cls((32, 256, 4096), 8192, 3, 1024, 5, 10, 3, mode="quick", window_s=0.25)
        return cls(tuple(2**k for k in range(5, 13)), 32768, 5, 2048, 5, 30, 20, mode="full", window_s=1.0)


# --------------------------------------------------------------------------
# Arithmetic of the reference MLP
# --------------------------------------------------------------------------


def layer_shapes(dims=REFERENCE_DIMS):
    """(fan_in, fan_out) of each Dense layer."""
    return list(zip(dims[:-1], dims[1:]))


def forward_flops_per_sample(dims=REFERENCE_DIMS) -> int:
    """Multiply-adds of the linear layers, counted as 2 FLOPs each."""
    return sum(2 * k * n for k, n in layer_shapes(dims))


def train_flops_per_sample(dims=REFERENCE_DIMS) -> int:
    """Forward + weight gradient (every layer) + data gradient (all but the first layer)."""
    shapes = layer_shapes(dims)
    weight_grad = sum(2 * k * n for k, n in shapes)
    data_grad = sum(2 * k * n for k, n in shapes[1:])
    return forward_flops_per_sample(dims) + weight_grad + data_grad


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_info() -> list[dict]:
    """threadpoolctl's view of the BLAS/OpenMP libraries loaded in this process."""
    try:
        from threadpoolctl import threadpool_info

        return threadpool_info()
    except Exception:  # pragma: no cover - threadpoolctl is a dependency
        return []


def numpy_blas() -> dict:
    """The BLAS that NumPy itself uses (its library path sits under numpy's)."""
    infos = [i for i in blas_info() if i.get("user_api") == "blas"]
    np_dir = os.path.dirname(np.__file__)
    for info in infos:
        path = info.get("filepath", "")
        if "numpy" in path or path.startswith(np_dir):
            return info
    return infos[0] if infos else {}


def blas_threads() -> int:
    return int(numpy_blas().get("num_threads") or usable_cores())


def gpu_description() -> tuple[str, bool]:
    """(description, gpunn's CUDA backend usable on a real GPU)."""
    try:
        from gpunn._cuda import cuda_status

        status = cuda_status()
    except Exception as exc:  # pragma: no cover - defensive
        return f"none ({exc})", False
    if status.usable and not status.simulator:
        return f"{status.device_name} (CuPy {status.cupy_version})", True
    if status.simulator:
        return "none used (Numba CUDA simulator active: gpunn's CUDA backend is not benchmarked)", False
    return f"none ({status.reason})", False


def machine_header(settings: Settings) -> list[tuple[str, str]]:
    blas = numpy_blas()
    blas_text = "unknown"
    if blas:
        blas_text = (
            f"{blas.get('internal_api', '?')} {blas.get('version') or ''} "
            f"(kernel: {blas.get('architecture') or 'n/a'}, threading: {blas.get('threading_layer', '?')})"
        ).replace("  ", " ")
    rows = [
        ("CPU", _cpu_name()),
        ("Usable cores", str(usable_cores())),
        ("BLAS", blas_text),
        ("BLAS threads", str(blas.get("num_threads", "?"))),
        ("OPENBLAS_CORETYPE", os.environ.get("OPENBLAS_CORETYPE", "unset")),
        ("OPENBLAS_L2_SIZE", os.environ.get("OPENBLAS_L2_SIZE", "unset")),
        ("GPU", gpu_description()[0]),
        ("Python", platform.python_version()),
        ("NumPy", np.__version__),
    ]
    for label, module in (("PyTorch", "torch"), ("scikit-learn", "sklearn")):
        rows.append((label, _version(module) or "not installed"))
    rows.append(("Mode", settings.mode))
    return rows


def _version(module: str):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as exc:  # installed but broken
        return f"import failed: {exc}"


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def matmul_ceiling(n: int, repeats: int) -> float:
    """Best GFLOP/s of an ``n x n`` float32 ``np.matmul`` (the CPU's BLAS ceiling)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def cupy_matmul_ceiling(n: int = 4096, repeats: int = 10):
    """Best GFLOP/s of an ``n x n`` float32 ``cupy.matmul`` (cuBLAS SGEMM), or None."""
    try:
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
    except Exception:
        return None


def synthetic_data(n: int, dims=REFERENCE_DIMS, seed: int = 0):
    """MNIST-shaped data: pixels in [0, 1], labels from a fixed random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, dims[0]), dtype=np.float32)
    teacher = rng.standard_normal((dims[0], dims[-1])).astype(np.float32)
    y = np.argmax((x - 0.5) @ teacher, axis=1).astype(np.int64)
    return x, y


def digits_data(seed: int = 0):
    """The embedded digits data set, split 70/30 (stratified) and standardised on the training part."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from gpunn import datasets

    digits = datasets.load("digits")
    x_tr, x_te, y_tr, y_te = train_test_split(digits.X, digits.y, test_size=0.3, random_state=seed, stratify=digits.y)
    scaler = StandardScaler().fit(x_tr)
    return scaler.transform(x_tr).astype(np.float32), y_tr, scaler.transform(x_te).astype(np.float32), y_te


# --------------------------------------------------------------------------
# Contenders: each builds a trainer for given dims/optimizer/initial weights
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _using_backend(name):
    """Build gpunn models on backend ``name`` without leaving the global choice changed."""
    from gpunn import backend as backends

    saved = (backends._requested, backends._resolved)
    backends.set_backend(name)
    try:
        yield
    finally:
        backends._requested, backends._resolved = saved


class GpunnTrainer:
    def __init__(self, backend_name, dims, optimizer, lr, weights=None):
        import gpunn

        self.backend_name = backend_name
        with _using_backend(backend_name):
            layers = [gpunn.layers.Dense(n, activation="relu") for n in dims[1:-1]]
            layers.append(gpunn.layers.Dense(dims[-1], activation="softmax"))
            self.model = gpunn.Sequential([gpunn.Input(shape=(dims[0],)), *layers], dtype="float32")
            opt = gpunn.optimizers.SGD(learning_rate=lr) if optimizer == "sgd" else gpunn.optimizers.Adam(learning_rate=lr)
            self.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
            self.model.build()
        if weights is not None:
            self.model.set_weights(weights)

    def epoch(self, x, y, batch):
        self.model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
        self.model.backend.synchronize()

    def predict(self, x):
        return np.argmax(self.model.predict(x, batch_size=1024, verbose=0), axis=1)

    def weights(self):
        return self.model.get_weights()


class TorchTrainer:
    """An idiomatic PyTorch loop: nn.Sequential, CrossEntropyLoss, torch.optim, index-gathered batches.

    ``orders``: an optional np.random.Generator replaying gpunn's shuffles, so
    both see the very same batches; else ``torch.randperm``.
    """

    def __init__(self, device, dims, optimizer, lr, weights=None, orders=None):
        import torch
        from torch import nn

        self.torch, self.device = torch, torch.device(device)
        mods = []
        for i, (k, n) in enumerate(layer_shapes(dims)):
            mods.append(nn.Linear(k, n))
            if i < len(dims) - 2:
                mods.append(nn.ReLU())
        self.model = nn.Sequential(*mods).to(self.device)
        if weights is not None:
            linears = [m for m in self.model if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for lin, (kernel, bias) in zip(linears, zip(weights[::2], weights[1::2])):
                    lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
                    lin.bias.copy_(torch.from_numpy(bias))
        params = self.model.parameters()
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr)
        else:
            self.opt = torch.optim.Adam(params, lr=lr, eps=1e-7)
        self.loss_fn = nn.CrossEntropyLoss()
        self.orders = orders
        self._data = None

    def _tensors(self, x, y):
        if self._data is None or self._data[0] is not x:
            t = self.torch
            self._data = (x, t.from_numpy(x).to(self.device), t.from_numpy(y).to(self.device))
        return self._data[1], self._data[2]

    def epoch(self, x, y, batch):
        torch = self.torch
        X, Y = self._tensors(x, y)
        n = X.shape[0]
        if self.orders is not None:
            perm = torch.from_numpy(self.orders.permutation(n)).to(self.device)
        else:
            perm = torch.randperm(n, device=self.device)
        self.model.train()
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(X[idx]), Y[idx])
            loss.backward()
            self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def predict(self, x):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.from_numpy(x).to(self.device))
        return out.argmax(dim=1).cpu().numpy()

    def weights(self):
        out = []
        for m in self.model:
            if hasattr(m, "weight"):
                out += [m.weight.detach().cpu().numpy().T, m.bias.detach().cpu().numpy()]
        return out


class SklearnTrainer:
    """``MLPClassifier``; one ``partial_fit`` is one epoch (its own initial weights)."""

    def __init__(self, dims, optimizer, lr, batch=32, seed=0):
        from sklearn.neural_network import MLPClassifier

        self.dims = dims
        self.clf = MLPClassifier(
            hidden_layer_sizes=tuple(dims[1:-1]),
            activation="relu",
            solver=optimizer,
            alpha=0.0,
            batch_size=batch,
            learning_rate_init=lr,
            momentum=0.0,
            epsilon=1e-7,
            shuffle=True,
            random_state=seed,
        )
        self.classes = np.arange(dims[-1])

    def epoch(self, x, y, batch):
        self.clf.batch_size = batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.clf.partial_fit(x, y, classes=self.classes)

    def predict(self, x):
        return self.clf.predict(x)


@dataclass
class Contender:
    name: str
    make: object  # (dims, optimizer, lr, weights, orders) -> trainer
    device_ceiling: str = "cpu"  # which ceiling its GFLOP/s is compared with


def contenders(include_cuda=True):
    """(present contenders, {absent name: reason})."""
    present, absent = [], {}
    present.append(Contender(GPUNN_NUMPY, lambda d, o, lr, w, r: GpunnTrainer("numpy", d, o, lr, w)))
    desc, cuda_ok = gpu_description()
    if cuda_ok and include_cuda:
        present.append(Contender(GPUNN_CUDA, lambda d, o, lr, w, r: GpunnTrainer("cuda", d, o, lr, w), "gpu"))
    else:
        reason = desc[len("none (") : -1] if desc.startswith("none (") and desc.endswith(")") else desc
        absent[GPUNN_CUDA] = reason if not cuda_ok else "skipped"
    torch_version = _version("torch")
    if torch_version and not torch_version.startswith("import failed"):
        present.append(Contender(TORCH_CPU, lambda d, o, lr, w, r: TorchTrainer("cpu", d, o, lr, w, r)))
        import torch

        if torch.cuda.is_available() and include_cuda:
            present.append(Contender(TORCH_CUDA, lambda d, o, lr, w, r: TorchTrainer("cuda", d, o, lr, w, r), "gpu"))
        else:
            absent[TORCH_CUDA] = "torch.cuda.is_available() is False"
    else:
        reason = torch_version or "not installed"
        absent[TORCH_CPU] = reason
        absent[TORCH_CUDA] = reason
    sk_version = _version("sklearn")
    if sk_version and not sk_version.startswith("import failed"):
        present.append(Contender(SKLEARN, lambda d, o, lr, w, r: SklearnTrainer(d, o, lr)))
    else:
        absent[SKLEARN] = sk_version or "not installed"
    return present, absent


@contextlib.contextmanager
def torch_threads(n):
    """Give PyTorch the same intra-op thread count as NumPy's BLAS, restored afterwards."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Results:
    settings: Settings
    header: list
    present: list
    absent: dict
    ceiling: float = 0.0
    gpu_ceiling: float | None = None
    throughput: dict = field(default_factory=dict)  # (name, batch) -> samples/s
    epoch_samples: dict = field(default_factory=dict)  # batch -> samples per timed epoch
    split: dict = field(default_factory=dict)  # (backend, batch) -> {phase: seconds}
    accuracy: dict = field(default_factory=dict)  # name -> (accuracy, seconds)
    agreement: float | None = None
    accuracy_note: str = ""
    seconds: float = 0.0


def measure_throughput(present, settings, log):
    """Samples/s per (contender, batch): contenders interleaved, the fastest of ``windows`` epochs.

    The epoch length adapts to the machine: a short calibration epoch of the
    slowest contender sets how many samples make a window of about
    ``settings.window_s`` seconds (at least one batch, at most
    ``settings.samples``), the same for every contender.  Returns
    ``({(name, batch): samples/s}, {batch: samples per epoch})``.
    """
    x_all, y_all = synthetic_data(max(settings.samples, max(settings.batches)))
    out, sizes = {}, {}
    for batch in settings.batches:
        trainers = []
        init = GpunnTrainer("numpy", REFERENCE_DIMS, "sgd", settings.lr_sgd).weights()
        n_cal = min(len(x_all), 2 * batch)
        x_cal, y_cal = x_all[:n_cal], y_all[:n_cal]
        per_sample = 0.0
        for c in present:
            t = c.make(REFERENCE_DIMS, "sgd", settings.lr_sgd, init if c.name != SKLEARN else None, None)
            t.epoch(x_cal, y_cal, batch)  # warm-up: workspaces, kernels, caches
            t0 = time.perf_counter()
            t.epoch(x_cal, y_cal, batch)
            per_sample = max(per_sample, (time.perf_counter() - t0) / n_cal)
            trainers.append((c.name, t))
        n = int(settings.window_s / max(per_sample, 1e-9)) // batch * batch
        cap = max(batch, settings.samples // batch * batch)
        n = min(cap, max(n, 8 * batch))  # at least 8 steps where the cap allows
        x, y = x_all[:n], y_all[:n]
        sizes[batch] = n
        best = {name: math.inf for name, _ in trainers}
        for window in range(settings.windows):
            order = trainers if window % 2 == 0 else trainers[::-1]
            for name, t in order:
                t0 = time.perf_counter()
                t.epoch(x, y, batch)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, seconds in best.items():
            out[(name, batch)] = n / seconds
        log(f"  batch {batch} ({n} samples): " + ", ".join(f"{k} {out[(k, batch)]:,.0f}/s" for k, _ in trainers))
    return out, sizes


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
    """Median seconds of gather / forward / backward / optimizer over ``steps`` training steps.

    Runs the model's own training step (``Sequential.make_train_step``) with its
    backend behind a :class:`PhaseTimer` that synchronises after every call,
    so each phase is the sum of its calls: gather = the batch's rows,
    forward = fused linear layers and the fused loss with its gradient,
    backward = fused linear backward per layer, optimizer = one update.
    """
    model = trainer.model
    b = model.backend
    X, Y = b.asarray(x), b.asarray(y.astype(model.dtype))
    rng = np.random.default_rng(1)
    times = {p: [] for p in PHASES}
    timer = PhaseTimer(b)
    step = model.make_train_step(batch, backend=timer)
    for _ in range(steps):
        index = b.asarray(rng.integers(0, x.shape[0], batch))
        timer.times = dict.fromkeys(PHASES, 0.0)
        step.load_rows(X, Y, index)
        step.run()
        for p in PHASES:
            times[p].append(timer.times[p])
    return {p: float(np.median(v)) for p, v in times.items()}


def measure_split(present, settings, log):
    x, y = synthetic_data(max(settings.batches))
    out = {}
    for c in present:
        if not c.name.startswith("gpunn"):
            continue
        trainer = c.make(REFERENCE_DIMS, "sgd", settings.lr_sgd, None, None)
        for batch in settings.batches:
            phase_times(trainer, x, y, batch, 2)  # warm-up
            out[(c.name, batch)] = phase_times(trainer, x, y, batch, settings.split_steps)
    if out:
        log("  time split measured for " + ", ".join(sorted({k[0] for k in out})))
    return out


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


def _fmt_rate(v):
    return f"{v:,.0f}"


def _save(plt, fig, out_dir, files, key, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    files[key] = name


def _plots(res: Results, out_dir):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    files = {}
    batches = res.settings.batches
    names = [c.name for c in res.present]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ax.plot(batches, [res.throughput[(name, b)] for b in batches], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("training samples / s")
    ax.set_title("Reference MLP 784-256-256-10, one epoch, SGD")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(plt, fig, out_dir, files, "throughput", "throughput.png")

    flops = train_flops_per_sample()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in res.present:
        ax.plot(batches, [res.throughput[(c.name, b)] * flops / 1e9 for b in batches], marker="o", label=c.name)
    ax.axhline(res.ceiling, color="k", linestyle="--", label=f"CPU float32 matmul ceiling ({res.ceiling:,.0f})")
    if res.gpu_ceiling:
        ax.axhline(res.gpu_ceiling, color="gray", linestyle=":", label=f"GPU SGEMM ceiling ({res.gpu_ceiling:,.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Achieved GFLOP/s against the matrix-product ceiling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out_dir, files, "gflops", "gflops.png")

    if res.split:
        keys = list(res.split)
        phases = PHASES
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(keys) + 2), 4.5))
        bottom = np.zeros(len(keys))
        for phase in phases:
            share = np.array([res.split[k][phase] / sum(res.split[k].values()) * 100 for k in keys])
            ax.bar(range(len(keys)), share, bottom=bottom, label=phase)
            bottom += share
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{n.split('(')[-1].rstrip(')')}\nb={b}" for n, b in keys], fontsize=8)
        ax.set_ylabel("% of a training step")
        ax.set_title("Where gpunn's training step spends its time")
        ax.legend(fontsize=8)
        _save(plt, fig, out_dir, files, "split", "time_split.png")

    if res.accuracy:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = list(res.accuracy)
        ax.barh(labels, [res.accuracy[k][0] * 100 for k in labels])
        ax.set_xlabel("held-out accuracy (%)")
        ax.set_xlim(0, 100)
        ax.set_title("Same data, same epochs")
        _save(plt, fig, out_dir, files, "accuracy", "accuracy.png")
    return files


def render(res: Results, files) -> str:
    s = res.settings
    flops = train_flops_per_sample()
    names = [c.name for c in res.present]
    md = [
        "# gpunn benchmark report",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `gpunn bench"
        f"{' --quick' if s.mode != 'full' else ''}` in {res.seconds:.1f} s. Contenders run interleaved and every "
        f"figure is the fastest of {s.windows} window(s); compare ratios, not absolute numbers, across machines.",
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
        "## Training throughput",
        "",
        "One epoch of synthetic MNIST-shaped samples (784 features, 10 classes; the epoch length per batch size, "
        "sized to a window of about "
        f"{s.window_s:g} s, is in the last row) through the reference "
        f"MLP {'-'.join(map(str, REFERENCE_DIMS))} (ReLU, softmax cross-entropy), SGD lr {s.lr_sgd:g}, shuffled "
        "batches; training samples per second (higher is better).",
        "",
        _table(
            ["contender", *[f"batch {b}" for b in s.batches]],
            [[n, *[_fmt_rate(res.throughput[(n, b)]) for b in s.batches]] for n in names]
            + [["(samples per epoch)", *[f"{res.epoch_samples.get(b, 0):,}" for b in s.batches]]],
        ),
        "",
    ]
    peers = [n for n in names if not n.startswith("gpunn")]
    ratio_rows = []
    for g in (n for n in names if n.startswith("gpunn")):
        for p in peers:
            ratio_rows.append([f"{g} / {p}", *[f"{res.throughput[(g, b)] / res.throughput[(p, b)]:.2f}x" for b in s.batches]])
    if ratio_rows:
        md += ["Throughput ratios (gpunn / peer; above 1 means gpunn is faster):", "", _table(["ratio", *[f"batch {b}" for b in s.batches]], ratio_rows), ""]
    md += [f"![training throughput]({files['throughput']})", ""]

    md += [
        "## Achieved GFLOP/s against the matrix-product ceiling",
        "",
        f"A training sample of the reference MLP costs {flops / 1e6:.3f} MFLOP (forward, weight gradients, and data "
        f"gradients of all but the first layer). The CPU ceiling is the best float32 `np.matmul` of "
        f"{s.ceiling_n}x{s.ceiling_n} in this run: **{res.ceiling:,.1f} GFLOP/s**"
        + (f"; the GPU ceiling is the best cuBLAS SGEMM 4096^3: **{res.gpu_ceiling:,.0f} GFLOP/s**" if res.gpu_ceiling else "")
        + ".",
        "",
    ]
    rows = []
    for c in res.present:
        ceiling = res.gpu_ceiling if c.device_ceiling == "gpu" else res.ceiling
        cells = [c.name]
        for b in s.batches:
            gf = res.throughput[(c.name, b)] * flops / 1e9
            cells.append(f"{gf:,.1f} ({gf / ceiling:.0%})" if ceiling else f"{gf:,.1f}")
        rows.append(cells)
    md += [
        "GFLOP/s (fraction of the ceiling of the contender's device):",
        "",
        _table(["contender", *[f"batch {b}" for b in s.batches]], rows),
        "",
        f"![achieved GFLOP/s]({files['gflops']})",
        "",
        "## Time split of a gpunn training step",
        "",
    ]
    if res.split:
        md += [
            "Median milliseconds per phase over "
            f"{s.split_steps} steps of the model's own training step, each backend call timed (with a synchronisation "
            "after it) and summed by phase: gather = batch "
            "rows taken from the training set; forward = fused linear layers + fused softmax cross-entropy and its "
            "gradient; backward = fused linear backward per layer; optimizer = one SGD update of the flat parameters.",
            "",
        ]
        rows = []
        for (name, b), t in res.split.items():
            total = sum(t.values())
            rows.append([name, b, *[f"{t[p] * 1e3:.3f} ({t[p] / total:.0%})" for p in PHASES], f"{total * 1e3:.3f}"])
        md += [_table(["backend", "batch", "gather ms", "forward ms", "backward ms", "optimizer ms", "step ms"], rows), "", f"![time split]({files['split']})", ""]
    md += ["## Held-out accuracy: same data, same epochs", ""]
    if res.accuracy:
        md += [res.accuracy_note, "", _table(["contender", "held-out accuracy", "training time (s)"], [[k, f"{a:.2%}", f"{t:.2f}"] for k, (a, t) in res.accuracy.items()]), ""]
        if res.agreement is not None:
            md += [
                f"Largest weight difference between {GPUNN_NUMPY} and {TORCH_CPU} after training (same start, same "
                f"batches): {res.agreement:.2e}. Adam's nearly sign-like steps amplify last-bit rounding differences on "
                "near-zero gradients, so this grows with the epochs; `benchmarks/cpu_vs_torch.py` checks one SGD epoch.",
                "",
            ]
        md += [f"![held-out accuracy]({files['accuracy']})", ""]
    else:
        md += [res.accuracy_note, ""]
    return "\n".join(md)


def run(settings: Settings, out_dir: str, log=None) -> str:
    """Measure everything ``settings`` asks for and write ``report.md`` and plots to ``out_dir``."""
    t_start = time.perf_counter()
    if log is None:

        def log(msg):
            print(f"[{time.perf_counter() - t_start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    present, absent = contenders()
    res = Results(settings, machine_header(settings), present, absent)
    log(f"gpunn bench ({settings.mode}): {', '.join(c.name for c in present)}; absent: {', '.join(absent) or 'none'}")
    with torch_threads(blas_threads()):
        res.ceiling = matmul_ceiling(settings.ceiling_n, settings.ceiling_repeats)
        log(f"  float32 matmul ceiling: {res.ceiling:,.1f} GFLOP/s")
        if any(c.device_ceiling == "gpu" for c in present):
            res.gpu_ceiling = cupy_matmul_ceiling()
        res.throughput, res.epoch_samples = measure_throughput(present, settings, log)
        res.split = measure_split(present, settings, log)
        res.accuracy, res.agreement, res.accuracy_note = measure_accuracy(present, settings, log)
        # the ceiling again at the end: the run's best counts
        res.ceiling = max(res.ceiling, matmul_ceiling(settings.ceiling_n, settings.ceiling_repeats))
    files = _plots(res, out_dir)
    res.seconds = time.perf_counter() - t_start
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render(res, files))
    log(f"report written to {path}")
    return path


def main(quick: bool = False, out: str | None = None, *, _tiny: bool = False) -> str:
    """Entry point of ``gpunn bench [--quick] [--out DIR]``; returns the path of report.md.

    ``_tiny`` shrinks the run further still (for the test suite only).
    """
    return run(Settings.for_mode(quick, _tiny), out or DEFAULT_OUT)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    print(main(ns.quick, ns.out))
