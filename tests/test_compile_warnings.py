"""A user's first fit (empty Numba cache) compiles gpunn's passes and kernels without Numba warnings.

Numba's pedantic IR checks (``NumbaIRAssumptionWarning``: "please report to
numba") fire on patterns in the code being compiled; they once printed a
dozen times on a plain fit, because ``opmath.target_at`` had a conditional
expression inside a branch that the compile-time ``sparse`` flag prunes.
Each check runs in a child process with a fresh cache directory, so the
compilation really happens (a cached function would hide the warning).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

#: One small fit per loss family: categorical cross-entropy with dense and with sparse
#: targets (the two branches of the target read), binary, and regression (elementwise kinds).
#: Kept to float32: the warning did not depend on the dtype (every kind in both dtypes was
#: checked by hand when it was fixed), and each fit here pays a fresh compilation.
_FITS = r"""
import sys, warnings
import numpy as np
import gpunn

seen = []
warnings.simplefilter("always")
warnings.showwarning = lambda message, category, *rest: seen.append(f"{category.__name__}: {message}")

rng = np.random.default_rng(0)
x = rng.random((40, 5))
labels = rng.integers(0, 3, 40)
cases = [
    ("sparse_categorical_crossentropy", "softmax", 3, labels),
    ("categorical_crossentropy", "softmax", 3, np.eye(3)[labels]),
    ("binary_crossentropy", "sigmoid", 1, labels[:, None] % 2),
    ("mse", "linear", 2, rng.random((40, 2))),
]
for loss, activation, units, y in cases:
    model = gpunn.Sequential([gpunn.layers.Dense(4, activation="relu"), gpunn.layers.Dense(units, activation=activation)])
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
numba_warnings = [w for w in seen if "Numba" in w]
print("\n".join(numba_warnings))
sys.exit(1 if numba_warnings else 0)
"""


def test_first_fit_compiles_without_numba_warnings(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), GPUNN_BACKEND="numpy")
    run = subprocess.run([sys.executable, "-c", _FITS], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_cuda_row_loss_kernels_compile_without_numba_warnings(tmp_path):
    # the same opmath functions compiled for the CUDA target, offline (PTX for sm_90: no GPU or
    # driver needed); the ptx tool refuses the simulator, which conftest.py switches on here
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    select = r"^loss-f32-(softmax_cce|softmax_sparse_cce)-weighted-grad$"
    run = subprocess.run(
        [sys.executable, "-W", "always", "-m", "gpunn.kernels.ptx", "--cc", "9.0", "--select", select,
         "--out", str(tmp_path / "ptx")],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=tempfile.gettempdir(),  # not the checkout: its gpunn/ has no kernels/
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "wrote 2 PTX files" in run.stdout
    assert "Numba" not in run.stderr, run.stderr[-4000:]
