"""The machine a benchmark runs on: CPU, BLAS, GPU, and how busy it is.

Every figure of a report names the CPU (``cpu_name()``), so numbers from
different hosts are never mixed up.  ``LoadMeter`` measures how much of the
machine other processes took while a figure was being timed: the load
average, the share of all CPUs busy with other processes and the share the
hypervisor stole (``/proc/stat``; Linux only, else ``None``).
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass

import numpy as np


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
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


def cpu_label() -> str:
    """``"<CPU model>, <n> usable cores"``: what every CPU figure is labelled with."""
    return f"{cpu_name()}, {usable_cores()} usable cores"


def blas_info() -> list[dict]:
    """threadpoolctl's view of the BLAS/OpenMP libraries loaded in this process."""
    from threadpoolctl import threadpool_info

    return threadpool_info()


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
    from gpunn._cuda import cuda_status

    status = cuda_status()
    if status.usable and not status.simulator:
        return f"{status.device_name} (CuPy {status.cupy_version})", True
    if status.simulator:
        return "none used (Numba CUDA simulator active: gpunn's CUDA backend is not benchmarked)", False
    return f"none ({status.reason})", False


def version_of(module: str):
    """The installed version of ``module``, None when absent, or why importing it failed."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as exc:  # installed but broken
        return f"import failed: {exc}"


def blas_text(blas: dict) -> str:
    if not blas:
        return "unknown"
    return (
        f"{blas.get('internal_api', '?')} {blas.get('version') or ''} "
        f"(kernel: {blas.get('architecture') or 'n/a'}, threading: {blas.get('threading_layer', '?')})"
    ).replace("  ", " ")


def machine_rows(mode: str) -> list[tuple[str, str]]:
    """(label, value) rows describing this machine and the software measured."""
    blas = numpy_blas()
    rows = [
        ("CPU", cpu_name()),
        ("Usable cores", str(usable_cores())),
        ("BLAS", blas_text(blas)),
        ("BLAS threads", str(blas.get("num_threads", "?"))),
        ("OPENBLAS_CORETYPE", os.environ.get("OPENBLAS_CORETYPE", "unset")),
        ("OPENBLAS_L2_SIZE", os.environ.get("OPENBLAS_L2_SIZE", "unset")),
        ("GPU", gpu_description()[0]),
        ("Python", platform.python_version()),
        ("NumPy", np.__version__),
    ]
    for label, module in (("PyTorch", "torch"), ("scikit-learn", "sklearn")):
        rows.append((label, version_of(module) or "not installed"))
    rows.append(("Mode", mode))
    return rows


# --------------------------------------------------------------------------
# Load: how much of the machine other processes took
# --------------------------------------------------------------------------


def _affinity():
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _proc_stat_cpu():
    """(busy, steal, total) jiffies of the CPUs this process may run on (``cpu_jiffies``), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            return cpu_jiffies(fh.read(), _affinity())
    except OSError:
        return None


def cpu_jiffies(proc_stat: str, cpus=None):
    """(busy, steal, total) jiffies summed over ``cpus`` from the text of /proc/stat.

    Only the ``cpuN`` lines of the CPUs in ``cpus`` count (a container's
    cpuset sees the host's other CPUs too; None: all of them); the summary
    ``cpu`` line where there are no per-CPU lines.  None when there is no cpu line.
    """
    lines = [line.split() for line in proc_stat.splitlines() if line.startswith("cpu")]
    rows = [f for f in lines if f[0][3:].isdigit() and (cpus is None or int(f[0][3:]) in cpus)]
    if not rows:
        rows = [f for f in lines if f[0] == "cpu"]
    if not rows:
        return None
    busy = steal = total = 0
    for fields in rows:
        values = [int(v) for v in fields[1:9]]
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, stolen = values
        # guest time is already counted in user/nice; steal is time the hypervisor gave to others
        cpu_busy = user + nice + system + irq + softirq
        busy += cpu_busy
        steal += stolen
        total += cpu_busy + idle + iowait + stolen
    return busy, steal, total


@dataclass(frozen=True)
class Load:
    """What other processes took of the machine over an interval.

    ``others``: share of the usable CPUs' time spent busy in processes other
    than this one (0..1); ``steal``: share stolen by the hypervisor; both None
    where /proc/stat is unreadable.  ``loadavg``: the 1-minute load average
    at the end (None where the OS lacks it).
    """

    others: float | None
    steal: float | None
    loadavg: float | None

    def text(self) -> str:
        parts = []
        if self.others is not None:
            parts.append(f"other processes {self.others:.0%} of the CPUs")
        if self.steal is not None and self.steal > 0:
            parts.append(f"steal {self.steal:.0%}")
        if self.loadavg is not None:
            parts.append(f"load average {self.loadavg:.2f}")
        return ", ".join(parts) or "unknown"


def load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Measures the machine's load between ``start()`` and ``stop()``."""

    def __init__(self):
        self._start = None

    def start(self) -> "LoadMeter":
        self._start = (_proc_stat_cpu(), own_cpu_seconds())
        return self

    def stop(self) -> Load:
        stat0, own0 = self._start
        stat1, own1 = _proc_stat_cpu(), own_cpu_seconds()
        return load_between(stat0, stat1, own1 - own0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def load_between(stat0, stat1, own_seconds: float, clock_ticks: int) -> Load:
    """The ``Load`` between two ``/proc/stat`` samples, given this process's CPU seconds in between."""
    loadavg = load_average()
    if stat0 is None or stat1 is None:
        return Load(None, None, loadavg)
    busy = stat1[0] - stat0[0]
    steal = stat1[1] - stat0[1]
    total = stat1[2] - stat0[2]
    if total <= 0:
        return Load(None, None, loadavg)
    others = max(0.0, busy - own_seconds * clock_ticks) / total
    return Load(min(others, 1.0), steal / total, loadavg)
