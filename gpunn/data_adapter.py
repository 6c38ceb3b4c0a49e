"""Data going into a model: checked and standardised on the host, then placed.

:func:`standardize` turns user input into host arrays the steps expect --
features (M, K), targets as the loss expects them (checked by the loss,
:meth:`gpunn.losses.Loss.prepare_targets`), per-sample weights (M,) with any
class weights folded in.  :func:`place` then decides where the data lives
for the call: on the backend's device, copied once (:class:`DeviceData`), or
-- when it would take more than half of the device's free memory -- on the
host, each batch gathered there and copied over (:class:`StreamedData`).
Both offer the same two operations to the training loop: a sample order as
an index on the right side, and a gather of one batch into a workspace.
"""

from __future__ import annotations

import math

import numpy as np

from gpunn import checks


def standardize(objective, input_dim, dtype, x, y, sample_weight, class_weight=None, argument="x", feature_names=None, xp=np):
    """Validated arrays ``(x (M, K), targets, weights (M,) or None)`` in ``dtype``, on the host
    (``x`` stays on the device when it is already there and ``xp`` is the GPU's array module).

    objective: the compiled :class:`gpunn.training.Objective` (its loss
    checks the targets); input_dim: the model's input size, or None while
    unknown; argument: how errors name ``x`` (its targets are named ``y``,
    or ``"<argument> targets"``); feature_names: the column names a DataFrame
    ``x`` is matched to (see :mod:`gpunn.arrays`).
    """
    x = checks.features(x, dtype, input_dim, argument, feature_names=feature_names, xp=xp)
    if y is None:
        raise ValueError(f"y: expected targets for the {x.shape[0]} samples of {argument}, got None")
    t = prepare_targets(objective, y, x.shape[0], dtype, _companion_name(argument, "y"))
    w = checks.sample_weights(sample_weight, x.shape[0], dtype, _companion_name(argument, "sample_weight"))
    t = t.astype(dtype, copy=False)
    return x, t, with_class_weights(objective, class_weight, t, w)


def _companion_name(argument, what):
    """How errors name the ``what`` (``y``, ``sample_weight``) that goes with ``argument``:
    ``y``, ``validation_data y``, ``validation_data sample_weight``, ..."""
    if argument == "x":
        return what
    return f"{argument[:-2]} {what}" if argument.endswith(" x") else f"{argument} {'targets' if what == 'y' else what}"


def with_class_weights(objective, class_weight, t, w):
    """The per-sample weights ``w`` (M,) or None, times each sample's class weight (if any)."""
    cw = class_weights(class_weight, t, objective.sparse_targets, objective.output_dim)
    if cw is None:
        return w
    return (cw if w is None else w * cw).astype(t.dtype)


def prepare_targets(objective, y, n, dtype, argument="y"):
    """Targets as the steps expect them: (n, outputs) floats, or (n,) class indices."""
    arr = checks.as_float_array(y, argument, dtype)
    if arr.ndim == 0:
        raise ValueError(f"{argument}: expected one target per sample, got a scalar")
    if arr.shape[0] != n:
        raise ValueError(f"{argument}: expected {n} targets (one per sample of x), got {arr.shape[0]}")
    checks.finite(arr, argument)
    return objective.loss.prepare_targets(arr, n, objective.output_dim, argument)


def class_weights(class_weight, t, sparse, outputs):
    """Per-sample weights (M,) from ``{class index: weight}``, or None."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, dict):
        raise TypeError(f"class_weight: expected a dict {{class index: weight}}, got {type(class_weight).__name__}")
    if sparse:
        classes = t.astype(np.int64)
    elif t.shape[1] == 1:
        classes = (t[:, 0] > 0.5).astype(np.int64)
    else:
        classes = t.argmax(axis=1)
    table = np.ones(max(outputs, 2), dtype=np.float64)
    for k, v in class_weight.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(table):
            raise ValueError(f"class_weight: expected class indices in [0, {len(table)}), got key {k!r}")
        if not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"class_weight: expected non-negative finite weights, got {v!r} for class {k}")
        table[int(k)] = v
    return table[classes]


def unpack_validation_data(validation_data):
    """``(x, y, sample_weight or None)`` from ``validation_data``."""
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
        raise ValueError(
            "validation_data: expected a tuple (x_val, y_val) or (x_val, y_val, sample_weight_val), "
            f"got {checks.describe(validation_data)}"
        )
    return (*validation_data, None)[:3]


def split_validation(x, t, w, fraction):
    """``((x, t, w) for training, (x, t, w) for validation)``: as in Keras, the first
    ``floor(n * (1 - fraction))`` rows train and the rest validate (taken before any shuffling)."""
    cut = int(math.floor(x.shape[0] * (1.0 - fraction)))
    if cut == 0 or cut == x.shape[0]:
        raise ValueError(
            f"validation_split: {fraction} of {x.shape[0]} samples leaves "
            f"{'no validation' if cut == x.shape[0] else 'no training'} samples"
        )
    head = (x[:cut], t[:cut], None if w is None else w[:cut])
    tail = (x[cut:], t[cut:], None if w is None else w[cut:])
    return head, tail


def fit_data(backend, standardize, arrays, validation_data, validation_split, weigh=None):
    """``(training data, validation data or None)`` for ``fit``, placed for ``backend``.

    arrays: the standardised ``(x, t, w)``; validation comes from
    ``validation_data`` (standardised with ``standardize``) or else the last
    rows (see :func:`split_validation`).  ``weigh(t, w) -> w`` then folds the
    class weights into the *training* part's sample weights only: as in
    Keras, validation losses are not class-weighted.
    """
    val = None
    if validation_data is not None:
        vx, vy, vw = unpack_validation_data(validation_data)
        val = standardize(vx, vy, vw, argument="validation_data x")
    elif validation_split:
        arrays, val = split_validation(*arrays, validation_split)
    if weigh is not None:
        x, t, w = arrays
        arrays = (x, t, weigh(t, w))
    return place(backend, *arrays), (None if val is None else place(backend, *val))


class DeviceData:
    """Data copied to the backend's device once; batches are gathered there."""

    def __init__(self, backend, x, t, w):
        self.x, self.t = backend.asarray(x), backend.asarray(t)
        self.w = None if w is None else backend.asarray(w)
        self.rows = x.shape[0]
        self.weighted = w is not None
        self._backend = backend

    def batch_index(self, order):
        """The sample order as an index array on the device."""
        return self._backend.asarray(np.asarray(order, dtype=np.int64))

    def gather(self, backend, index, ws):
        """Rows ``index`` of the data into the workspace's ``x``, ``t`` (and ``w``)."""
        backend.take_rows(self.x, index, ws.x)
        backend.take_rows(self.t, index, ws.t)
        if self.w is not None:
            backend.take_rows(self.w, index, ws.w)


class StreamedData:
    """Host data too large for the device: each batch is gathered on the host and copied over."""

    def __init__(self, backend, x, t, w):
        self.x, self.t, self.w = x, t, w
        self.rows = x.shape[0]
        self.weighted = w is not None

    def batch_index(self, order):
        return np.asarray(order, dtype=np.int64)

    def gather(self, backend, index, ws):
        ws.x[...] = backend.asarray(np.take(self.x, index, axis=0))
        ws.t[...] = backend.asarray(np.take(self.t, index, axis=0))
        if self.w is not None:
            ws.w[...] = backend.asarray(np.take(self.w, index, axis=0))


def place(backend, x, t, w):
    """The data for one call: on the device (:class:`DeviceData`), or streamed from the
    host (:class:`StreamedData`) when it would take more than half of the free device memory."""
    capacity = backend.free_device_bytes()
    nbytes = x.nbytes + t.nbytes + (0 if w is None else w.nbytes)
    if capacity is not None and nbytes > capacity // 2 and isinstance(x, np.ndarray):  # not if already there
        return StreamedData(backend, x, t, w)
    return DeviceData(backend, x, t, w)


def predict(trainer, backend, x, dtype, batch_size, return_device_array=False):
    """Outputs (M, units) for ``x`` from :func:`gpunn.checks.feature_rows`, in batches.

    Host data is checked and converted block by block (``Trainer.predict_host``)
    and the outputs gathered in one host array; GPU data (already checked there)
    is predicted on the device without a copy.  With ``return_device_array``
    the result is the backend's own array, else a NumPy array.
    """
    if not isinstance(x, np.ndarray):
        out = trainer.predict(x, batch_size)
        return out if return_device_array else backend.to_numpy(out)
    convert = lambda lo, hi: checks.features(x[lo:hi], dtype, x.shape[1], "x", row_offset=lo)  # noqa: E731
    result = trainer.predict_host(x, convert, batch_size)
    return backend.asarray(result) if return_device_array else result
