"""Host-side helpers shared by the kernel wrappers: argument checks and grid sizes.

The wrappers accept any array Numba accepts (NumPy arrays in the simulator,
CuPy or Numba device arrays on a GPU); only ``.shape``, ``.ndim`` and
``.dtype`` are looked at here, so nothing is copied or synchronised.
"""

from __future__ import annotations

import numpy as np

from gpunn import codes

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def float_dtype(name, a):
    """The dtype of ``a``, which must be float32 or float64."""
    dt = np.dtype(a.dtype)
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a float32 or float64 array, got dtype {dt}")
    return dt


def check(name, a, shape, dtype=None):
    """Raise ValueError naming ``name`` unless ``a`` has ``shape`` (and ``dtype``)."""
    if a is None:
        raise ValueError(f"{name}: expected an array of shape {tuple(shape)}, got None")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if dtype is not None and np.dtype(a.dtype) != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {np.dtype(a.dtype)}")


def matrix_shape(name, a):
    """(rows, cols) of a 2-D array, else ValueError."""
    if a is None or a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got {None if a is None else a.ndim}-D")
    return tuple(a.shape)


def check_act(act):
    """``act`` as a :class:`gpunn.codes.Act` member, or ValueError naming ``act``."""
    return codes.activation(act)


def variant(role, *params):
    """A kernel variant's cache name: its role and every compile-time parameter, e.g.
    ``linear.forward/float32/128x128/RELU/True`` (see ``gpunn._cuda.kernel_jit``)."""
    parts = [role]
    for p in params:
        if isinstance(p, np.dtype) or (isinstance(p, type) and issubclass(p, np.generic)):
            parts.append(np.dtype(p).name)
        elif hasattr(p, "name") and not isinstance(p, str):
            parts.append(str(p.name))
        else:
            parts.append(str(p))
    return "/".join(parts)
