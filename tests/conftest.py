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
