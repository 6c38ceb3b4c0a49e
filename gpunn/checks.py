"""Argument checks at the API boundary, used by every module: bad input fails early.

Every error names the argument, what was expected and what was received.
Numbers are accepted as any ``numbers.Real`` / ``numbers.Integral`` (so
``np.float32(0.1)`` and ``0.1`` are treated alike) but never ``bool``;
booleans must be real booleans (``"false"`` is not silently ``True``).
"""

from __future__ import annotations

import collections.abc
import difflib
import math
import numbers

import numpy as np

from gpunn import arrays


def describe(value) -> str:
    """A short account of ``value`` for an error message (arrays and sequences of them by shape)."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)) and any(hasattr(v, "shape") for v in value):
        parts = [f"shape {tuple(v.shape)}" if hasattr(v, "shape") else type(v).__name__ for v in value[:4]]
        return f"{type(value).__name__} of {len(value)} ({', '.join(parts)}{', ...' if len(value) > 4 else ''})"
    return f"{type(value).__name__} {value!r}"[:200]


def _refuse_containers(value, argument):
    """Keras inputs gpunn does not take (a dict of named inputs, a generator or dataset), refused by name."""
    if isinstance(value, dict):
        raise TypeError(
            f"{argument}: got a dict (keys {sorted(map(str, value))[:5]}); a gpunn model has one input: pass its array itself"
        )
    if isinstance(value, collections.abc.Iterator) or type(value).__name__ in ("PyDataset", "Sequence", "DataLoader") or (
        hasattr(value, "element_spec")  # tf.data.Dataset
    ):
        raise TypeError(
            f"{argument}: got {type(value).__name__}; gpunn trains on in-memory arrays (NumPy, lists, pandas, DLPack "
            "tensors), not generators or datasets: collect the batches first, e.g. np.concatenate(list_of_batches)"
        )


def as_float_array(value, argument: str, dtype, row_offset: int = 0) -> np.ndarray:
    """A numeric NumPy array (cast to ``dtype``), or TypeError naming ``argument``.

    ``row_offset`` is added to the row named in messages (for a chunk of a larger array).
    """
    if value is None:
        raise TypeError(f"{argument}: expected array-like numeric data, got None")
    if hasattr(value, "toarray") and hasattr(value, "nnz"):
        raise TypeError(f"{argument}: sparse matrices are not supported; pass a dense array (e.g. {argument}.toarray())")
    _refuse_containers(value, argument)
    value = arrays.as_array(value, argument, target=True)  # Series, DataFrames, DLPack tensors
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and friends
        raise TypeError(f"{argument}: expected a rectangular array of numbers, got {describe(value)} ({exc})") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{argument}: expected numeric data, got non-numeric values (dtype object)") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"{argument}: expected numeric data, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{argument}: expected real numbers, got complex dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype, copy=False)
    # a value too large for dtype became inf; when every value came out finite there is none
    # (one fast pass instead of building the overflow mask of the whole array)
    if out is not arr and np.issubdtype(arr.dtype, np.floating) and arr.size and not _all_finite(out):
        overflow = np.isinf(out) & np.isfinite(arr)
        if overflow.any():
            at = np.argwhere(overflow)[0]
            shown = (at[0] + row_offset, *at[1:]) if at.size else at
            where = ", ".join(f"{axis} {i}" for axis, i in zip(("row", "column", "index 2", "index 3"), shown))
            raise ValueError(
                f"{argument}: expected values representable in {np.dtype(dtype).name} "
                f"(|x| <= {np.finfo(dtype).max:.3g}), got {float(arr[tuple(at)]):.6g} at {where}; rescale the data"
            )
    return out


#: Arrays of at least this many values are checked for finiteness in row blocks on every core
#: (a memory-bound pass: on a 2-core AMD EPYC, 12.8M float32 took 2.1 ms on one thread, 1.3 ms on two).
_PARALLEL_FINITE_VALUES = 1 << 22


def _all_finite(arr: np.ndarray) -> bool:
    if arr.size < _PARALLEL_FINITE_VALUES or arr.ndim == 0:
        return bool(np.isfinite(arr).all())
    from gpunn.backend.numpy_backend import run_on_cores

    blocks = np.array_split(arr, 8)
    ok = [True] * len(blocks)

    def check(i):
        ok[i] = bool(np.isfinite(blocks[i]).all())

    run_on_cores(check, len(blocks))
    return all(ok)


def finite(arr: np.ndarray, argument: str, row_offset: int = 0) -> None:
    if not _all_finite(arr):
        bad = np.argwhere(~np.isfinite(arr))[0]
        kind = "NaN" if np.isnan(arr[tuple(bad)]) else "infinity"
        where = f"row {bad[0] + row_offset}" + (f", column {bad[1]}" if arr.ndim > 1 else "")
        raise ValueError(f"{argument}: expected finite values, found {kind} at {where}")


#: predict validates and converts its input this many elements at a time (whole batches)
CONVERT_CHUNK_ELEMENTS = 1 << 18


def feature_rows(x, n_features=None, argument: str = "x", feature_names=None, xp=np, dtype=None):
    """``x`` as a 2-D numeric NumPy array (M >= 1, K == n_features when given), dtype not yet converted.

    For callers that then convert it in chunks with :func:`features`; lists
    and object arrays are converted here (they have no dtype to keep).  Takes
    what :func:`gpunn.arrays.as_array` takes (a DataFrame is matched to
    ``feature_names``); GPU data, with ``xp`` the GPU's array module, stays
    there and comes back fully checked and converted to ``dtype``.
    """
    x = arrays.as_array(x, argument, feature_names, xp)
    if xp is not np and isinstance(x, xp.ndarray):
        return _device_features(x, dtype, n_features, argument, xp)
    if isinstance(x, np.ndarray) and (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        arr = x
    else:
        arr = as_float_array(x, argument, np.float64)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{argument}: expected real numbers, got complex dtype {arr.dtype}")
    return _feature_shape(arr, n_features, argument)


def features(x, dtype, n_features=None, argument: str = "x", row_offset: int = 0, feature_names=None, xp=np):
    """2-D finite float features (M, K) with M >= 1 (and K == n_features when given).

    ``row_offset`` is added to the row named in messages (for a chunk of a larger array).
    Takes what :func:`gpunn.arrays.as_array` takes: a DataFrame is matched to
    ``feature_names`` by column name.  With ``xp`` a GPU array module (the
    model's backend's), GPU data is checked and returned on the device
    without a copy; everything else becomes a host NumPy array.
    """
    x = arrays.as_array(x, argument, feature_names, xp)
    if xp is not np and isinstance(x, xp.ndarray):
        return _device_features(x, dtype, n_features, argument, xp)
    arr = as_float_array(x, argument, dtype, row_offset)
    arr = _feature_shape(arr, n_features, argument)
    finite(arr, argument, row_offset)
    return np.ascontiguousarray(arr)


def _feature_shape(arr, n_features, argument):
    """``arr`` checked as (samples, features); a 1-D array is one feature per sample when the model
    takes exactly one (Keras 3 adds that axis too), else refused."""
    if arr.ndim == 1 and n_features == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(
            f"{argument}: expected a 2-D array (samples, features), got {arr.ndim}-D with shape {arr.shape}"
            + ("; reshape a single feature with x.reshape(-1, 1)" if arr.ndim == 1 else "")
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{argument}: expected at least one sample, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{argument}: expected at least one feature column, got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{argument}: the model expects {n_features} features per sample, got {arr.shape[1]} (shape {arr.shape})")
    return arr


def _device_features(x, dtype, n_features, argument, xp):
    """The checks of :func:`features` made on the device; only a failure reads values back."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"{argument}: expected real numeric data, got dtype {x.dtype}")
    x = _feature_shape(x, n_features, argument)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing cast is reported below
        arr = x.astype(dtype, copy=False)
    bad = xp.flatnonzero(~xp.isfinite(arr).ravel())
    if bad.size:
        row, column = divmod(int(bad[0]), arr.shape[1])
        original = float(x[row, column])
        if np.isfinite(original):
            raise ValueError(
                f"{argument}: expected values representable in {np.dtype(dtype).name}, got {original:.6g} "
                f"at row {row}, column {column}; rescale the data"
            )
        kind = "NaN" if np.isnan(original) else "infinity"
        raise ValueError(f"{argument}: expected finite values, found {kind} at row {row}, column {column}")
    return xp.ascontiguousarray(arr)


def sample_weights(sample_weight, n: int, dtype, argument: str = "sample_weight"):
    if sample_weight is None:
        return None
    w = as_float_array(sample_weight, argument, dtype)
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.ndim != 1:
        raise ValueError(f"{argument}: expected a 1-D array of one weight per sample, got shape {w.shape}")
    if w.shape[0] != n:
        raise ValueError(f"{argument}: expected {n} weights (one per sample of x), got {w.shape[0]}")
    finite(w, argument)
    if (w < 0).any():
        raise ValueError(f"{argument}: expected non-negative weights, found {w.min()!r}")
    return np.ascontiguousarray(w)


def positive_int(value, argument: str, allow_none_default=None, minimum: int = 1) -> int:
    if value is None and allow_none_default is not None:
        return allow_none_default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{argument}: expected a {kind} integer, got {value!r}")
    return int(value)


def verbose(value, argument: str = "verbose") -> int:
    """Keras's verbose: 'auto', 0 (silent), 1 (progress bar) or 2 (one line per epoch)."""
    if value == "auto" and isinstance(value, str):
        return 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in (0, 1, 2):
        raise ValueError(f"{argument}: expected 'auto', 0, 1 or 2, got {value!r}")
    return int(value)


FLOAT_TYPES = ("float32", "float64")


def float_dtype(dtype, argument: str = "dtype") -> str:
    """The name of a float dtype gpunn computes in: ``"float32"`` or ``"float64"``."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in FLOAT_TYPES:
        raise ValueError(f"{argument}: expected 'float32' or 'float64', got {dtype!r}")
    return name


def input_dtype(dtype, argument: str = "dtype") -> str | None:
    """``gpunn.Input(dtype=...)``: the name of a NumPy numeric dtype (or bool, or ``"bfloat16"``),
    or None.  Samples are converted to the model's float dtype whatever it is, as Keras's
    first layer casts its inputs to its compute dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype == "bfloat16":
        return dtype
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        parsed = None
    if parsed is None or parsed.kind not in "biuf":
        raise ValueError(f"{argument}: expected a numeric dtype such as 'float32' or 'int32', or None, got {dtype!r}")
    return parsed.name


#: Keras dtype-policy names and reduced-precision dtypes: gpunn has no float16 / bfloat16
#: kernels, so a layer given one of these computes in its model's dtype instead.
REDUCED_PRECISION = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def layer_dtype(dtype, argument: str = "dtype") -> tuple[str | None, str | None]:
    """A layer's ``dtype=`` as ``(float_dtype, ignored_policy)``.

    ``float_dtype`` is ``"float32"`` / ``"float64"`` when the layer asks for one (a
    name, a NumPy dtype or type, or a Keras ``DTypePolicy`` of that name), else None;
    ``ignored_policy`` is the name of a mixed- or reduced-precision policy
    (:data:`REDUCED_PRECISION`, e.g. ``"mixed_float16"``), which gpunn accepts so that
    Keras scripts run, and ignores.  Anything else raises ValueError.
    """
    if dtype is None:
        return None, None
    # a Keras DTypePolicy (and a NumPy dtype) carries its name; strings and NumPy types are read as dtypes
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if not isinstance(name, str):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name in REDUCED_PRECISION:
        return None, name
    try:
        name = np.dtype(name).name if name is not None else None
    except TypeError:
        name = None
    if name in FLOAT_TYPES:
        return name, None
    raise ValueError(
        f"{argument}: expected 'float32', 'float64', None, or a Keras mixed-precision policy (accepted and "
        f"ignored: {', '.join(repr(n) for n in REDUCED_PRECISION)}), got {dtype!r}"
    )


def boolean(value, argument: str) -> bool:
    """``value`` as a bool; only ``True``/``False`` (and NumPy's bools) are accepted."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{argument}: expected a bool, got {value!r}")


def _range_text(minimum, allow_minimum, below) -> str:
    """How a range reads in an error: "a positive number", "a number in [0, 1)", ..."""
    if below is not None:
        low = "" if minimum is None else f"{'[' if allow_minimum else '('}{minimum:g}, "
        return f"a number in {low}{below:g})" if low else f"a number < {below:g}"
    if minimum == 0:
        return f"a {'non-negative' if allow_minimum else 'positive'} number"
    return f"a number {'>=' if allow_minimum else '>'} {minimum:g}"


def number(value, argument: str, minimum=None, allow_minimum=True, below=None) -> float:
    """A finite real number as a float, optionally ``>= minimum`` (``> minimum`` without
    ``allow_minimum``) and ``< below``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{argument}: expected a finite number, got {value!r}")
    value = float(value)
    too_low = minimum is not None and (value < minimum or (value == minimum and not allow_minimum))
    if too_low or (below is not None and value >= below):
        raise ValueError(f"{argument}: expected {_range_text(minimum, allow_minimum, below)}, got {value!r}")
    return value


def positive_number(value, argument: str, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``)."""
    return number(value, argument, minimum=0, allow_minimum=allow_zero)


def fraction(value, argument: str) -> float:
    """A finite number in [0, 1)."""
    return number(value, argument, minimum=0, below=1)


def unknown_name_error(argument: str, what: str, got, valid) -> ValueError:
    """A ValueError naming the argument, the valid names and the closest one."""
    valid = sorted(valid)
    msg = f"{argument}: unknown {what} {got!r}; expected one of: {', '.join(valid)}"
    if isinstance(got, str):
        close = difflib.get_close_matches(got.lower(), valid, n=1, cutoff=0.5)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    return ValueError(msg)


def lookup(argument: str, what: str, name, table: dict):
    """``table[name.lower()]`` or a ValueError listing the valid names."""
    if not isinstance(name, str):
        article = "an" if what[:1] in "aeiou" else "a"
        raise TypeError(f"{argument}: expected {article} {what} name (str), got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key not in table:
        raise unknown_name_error(argument, what, name, table.keys())
    return table[key]


def compile_execution_settings(loss_weights, run_eagerly, steps_per_execution, jit_compile, auto_scale_loss):
    """Check compile's Keras execution arguments (see ``Sequential.compile``)."""
    boolean(run_eagerly, "run_eagerly")
    boolean(auto_scale_loss, "auto_scale_loss")
    positive_int(steps_per_execution, "steps_per_execution")
    if jit_compile != "auto":
        boolean(jit_compile, "jit_compile")
    weights = loss_weights
    if isinstance(weights, dict):
        weights = list(weights.values())
    if isinstance(weights, (list, tuple)) and len(weights) == 1:
        weights = weights[0]
    if weights is not None and (isinstance(weights, bool) or not isinstance(weights, numbers.Real) or weights != 1):
        raise ValueError(
            f"loss_weights: a gpunn model has one output, so its loss weight is 1 (scale the loss with "
            f"sample_weight or the learning rate instead); got {loss_weights!r}"
        )


def arrays_take_no_steps(steps, method):
    """Refuse Keras's ``steps=`` (batches drawn from a dataset) for array input."""
    if steps is not None:
        raise ValueError(
            f"steps: {method} on arrays runs over all the rows given (steps is for datasets and generators, "
            f"which gpunn does not take); pass steps=None and slice x instead, got steps={steps!r}"
        )
