"""gpunn's benchmark harness: ``gpunn bench`` and the GPU timings of ``benchmarks/gpu_check.py``.

An optional part of gpunn: its plotting and BLAS inspection need the
``bench`` extra (``pip install 'gpunn[bench]'``), which the core package does
not pull.  Importing this package needs nothing extra; ``missing_requirements()``
names what is absent, and ``main()`` refuses to start without it.

Modules: ``report`` (measurements and ``report.md``), ``plots`` (its PNGs),
``timing`` (interleaved windows, spread, retries, the reliability verdict),
``machine`` (CPU, BLAS, GPU, load), ``contenders`` (gpunn, PyTorch,
scikit-learn trainers of the reference MLP) and ``gpu`` (device-time
measurements of gpunn's CUDA kernels against CuPy and PyTorch).
"""

from __future__ import annotations

import importlib.util

#: Import names of the ``bench`` extra's requirements (see pyproject.toml).
REQUIREMENTS = ("matplotlib", "threadpoolctl")

#: How to get them.
INSTALL_HINT = "pip install 'gpunn[bench]'  (from a source checkout: pip install '.[bench]')"


def missing_requirements() -> list[str]:
    """The requirements of the ``bench`` extra that cannot be imported here."""
    missing = []
    for name in REQUIREMENTS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a None placeholder in sys.modules, a broken parent
            found = False
        if not found:
            missing.append(name)
    return missing


class MissingExtraError(ImportError):
    """The ``bench`` extra is not installed."""


def check_requirements() -> None:
    missing = missing_requirements()
    if missing:
        raise MissingExtraError(
            f"gpunn's benchmarks need the 'bench' extra; missing: {', '.join(missing)}. Install it with: {INSTALL_HINT}"
        )


def main(quick: bool = False, out: str | None = None) -> str:
    """Entry point of ``gpunn bench [--quick] [--out DIR]``; returns the path of report.md."""
    check_requirements()
    from gpunn.bench import report

    return report.main(quick=quick, out=out)
