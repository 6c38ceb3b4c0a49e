"""The arrays users already have: pandas DataFrames and Series, and DLPack objects.

``fit``, ``evaluate`` and ``predict`` take, besides NumPy arrays and nested lists:

- **pandas DataFrames and Series.**  A DataFrame's string column names are
  remembered by ``fit`` (``model.feature_names``); later DataFrames are
  matched to them by name, in any column order, and a missing or unexpected
  column is an error naming it.  Columns must hold numbers (integer, float,
  bool, or pandas' nullable versions); a ``category``, string, object or
  date column is refused with an error naming the column -- encode it first
  (one-hot with ``pandas.get_dummies`` or scikit-learn's ``OneHotEncoder``;
  class labels with ``LabelEncoder``).  Missing values (NaN, NA) are refused
  with the column and row.
- **DLPack objects** (``__dlpack__``: PyTorch tensors, JAX arrays, CuPy
  arrays).  Host memory is taken without a copy on the NumPy backend, GPU
  memory without a copy on the CUDA backend; GPU memory on the NumPy backend
  is copied to the host.  A PyTorch tensor that requires grad is detached
  first (gpunn only reads it).

Nothing here imports pandas or a GPU library: objects are recognised by
their type's module and by the DLPack protocol.
"""

from __future__ import annotations

import numpy as np

#: DLPack device types whose memory NumPy can read in place (kDLCPU, kDLCUDAHost, kDLCUDAManaged)
HOST_DEVICE_TYPES = frozenset({1, 3, 13})
#: DLPack device type names for messages
DEVICE_TYPE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 10: "ROCm", 13: "CUDA managed"}


def _is_pandas(value, class_name: str) -> bool:
    cls = type(value)
    return cls.__module__.split(".")[0] == "pandas" and any(k.__name__ == class_name for k in cls.__mro__)


def is_dataframe(value) -> bool:
    return _is_pandas(value, "DataFrame")


def is_series(value) -> bool:
    return _is_pandas(value, "Series")


def column_names(value):
    """A DataFrame's column names as a list when they are all strings, else None (as scikit-learn)."""
    if not is_dataframe(value):
        return None
    names = list(value.columns)
    return names if names and all(isinstance(n, str) for n in names) else None


def _refuse_column(argument, name, dtype, target):
    if target:
        how = "encode class labels as integers first (e.g. sklearn's LabelEncoder, or Series.cat.codes)"
    else:
        how = (
            f"encode it as numbers first, e.g. one-hot with pandas.get_dummies(x, columns=[{name!r}]) or "
            "scikit-learn's OneHotEncoder in a ColumnTransformer (gpunn.sklearn's estimators fit in a Pipeline)"
        )
    return TypeError(f"{argument}: column {name!r} has dtype {dtype}; gpunn takes numeric columns only: {how}")


def _check_columns(frame, argument: str, target: bool) -> None:
    import pandas as pd

    for name, dtype in frame.dtypes.items():
        numeric = pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        if not numeric or isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_complex_dtype(dtype):
            raise _refuse_column(argument, name, dtype, target)
    missing = frame.isna().to_numpy()
    if missing.any():
        row, col = np.argwhere(missing)[0]
        raise ValueError(
            f"{argument}: column {frame.columns[col]!r} has a missing value (NaN/NA) at row {row} "
            f"(index {frame.index[row]!r}); fill or drop missing values first"
        )


def _frame_values(frame, argument: str, target: bool = False) -> np.ndarray:
    _check_columns(frame, argument, target)
    dtypes = set(frame.dtypes)
    if len(dtypes) == 1 and isinstance(next(iter(dtypes)), np.dtype) and next(iter(dtypes)).kind == "f":
        return frame.to_numpy(dtype=next(iter(dtypes)))  # float32 stays float32
    return frame.to_numpy(dtype=np.float64)


def align_columns(frame, expected, argument: str):
    """``frame`` with its columns in the order of ``expected`` (names remembered by fit)."""
    given = column_names(frame)
    if expected is None or given is None or given == list(expected):
        return frame
    missing = [n for n in expected if n not in set(given)]
    unexpected = [n for n in given if n not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing column(s) {missing}")
        if unexpected:
            parts.append(f"unexpected column(s) {unexpected}")
        raise ValueError(
            f"{argument}: the DataFrame's columns do not match those the model was fitted on "
            f"({' and '.join(parts)}); the model expects {list(expected)} (in any order)"
        )
    return frame[list(expected)]


def _detached(value):
    """A tensor that requires grad, detached (a view of the same memory); anything else as is."""
    if getattr(value, "requires_grad", False) is True and callable(getattr(value, "detach", None)):
        return value.detach()
    return value


def _from_dlpack(value, argument: str, xp):
    value = _detached(value)
    try:
        device_type = int(value.__dlpack_device__()[0])
    except Exception as exc:  # a broken producer: report it, naming the argument
        raise TypeError(f"{argument}: {type(value).__name__} has __dlpack__ but no usable __dlpack_device__ ({exc})") from None
    if device_type in HOST_DEVICE_TYPES:
        return np.from_dlpack(value)
    if xp is not np and device_type == 2:  # GPU memory on the GPU backend: a view, no copy
        return xp.from_dlpack(value)
    try:  # GPU memory wanted on the host: one copy, made by the producer
        return np.from_dlpack(value, device="cpu", copy=True)
    except Exception as exc:
        for method in ("get", "cpu"):  # producers without DLPack 1.0 copies: CuPy's and PyTorch's own
            if callable(getattr(value, method, None)):
                return np.asarray(getattr(value, method)())
        where = DEVICE_TYPE_NAMES.get(device_type, f"DLPack device type {device_type}")
        raise TypeError(
            f"{argument}: a {type(value).__name__} in {where} memory cannot be copied to the host here ({exc}); "
            "copy it to host memory first (e.g. tensor.cpu()) or use the cuda backend"
        ) from None


def as_array(value, argument: str, feature_names=None, xp=np, target: bool = False):
    """``value`` as a NumPy array (or, for GPU data with ``xp`` = CuPy, a CuPy array), without a
    copy where possible; other inputs (lists, NumPy arrays) are returned unchanged.

    DataFrames are first aligned to ``feature_names`` (see :func:`align_columns`).
    """
    if is_dataframe(value):
        return _frame_values(align_columns(value, feature_names, argument), argument, target)
    if is_series(value):
        return _frame_values(value.to_frame(), argument, target=True)[:, 0]
    if isinstance(value, np.ndarray) or not hasattr(value, "__dlpack__"):
        return value
    if xp is not np and isinstance(value, xp.ndarray):
        return value
    return _from_dlpack(value, argument, xp)
