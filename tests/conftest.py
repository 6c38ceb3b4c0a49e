"""Test-session setup.

Numba reads ``NUMBA_ENABLE_CUDASIM`` when ``numba.cuda`` is first imported,
so it is decided here, before any test module imports gpunn: on a machine
with no NVIDIA device the CUDA kernels run in Numba's simulator, which is
how CI (no GPU) exercises every kernel.  On a GPU machine the real device is
used unless the variable is set explicitly.
"""

import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

# The default backend in tests is the CPU one; tests that want CUDA ask for it.
os.environ.setdefault("GPUNN_BACKEND", "numpy")

# kernels/ is installed as gpunn.kernels, so the tests run against the installed
# package.  `python -m pytest` from the source tree would put the checkout's
# gpunn/ (which has no kernels/ inside) first on sys.path instead.
import importlib.util  # noqa: E402

try:
    _kernels_found = importlib.util.find_spec("gpunn.kernels") is not None
except ImportError:
    _kernels_found = False
if not _kernels_found:
    raise ImportError(
        "gpunn.kernels cannot be imported: run the tests against the installed package "
        "(pip install '.[test]' or pip install -e '.[test]', then `.venv/bin/pytest`), "
        "not with `python -m pytest` over a non-editable install"
    )
