"""Metrics tracked during fit/evaluate, accumulated on the backend's device.

Each metric keeps its running state in one backend array (float64; shape
from :meth:`Metric.state_shape`), updated with a few array operations per
batch and read back to the host only when a progress line or the epoch's
logs need it.  As in Keras 3, ``compile(metrics=...)`` ignore sample and
class weights and ``compile(weighted_metrics=...)`` weigh each row by them.

Shapes: ``pred`` is the model's output (M, N) -- probabilities when the
output activation is folded into the loss -- and ``target`` is (M, N), or
(M,) integer class labels next to a sparse categorical loss; ``weight`` is
(M,) or None.

``"accuracy"`` (or ``"acc"``) is resolved as Keras 3 does, from the shapes of
the targets and the output, never from the loss: binary accuracy when the
output has one unit, sparse categorical accuracy when the targets are class
indices (one dimension less than the output, or one column next to several
outputs), categorical accuracy otherwise -- so sigmoid outputs with
binary cross-entropy over several units get categorical accuracy, as in Keras 3.  Where the loss already
counts that accuracy in its fused pass, no extra work is done per batch.

Every metric also works on its own, as in Keras:
``m = AUC(); m.update_state(y_true, y_pred); m.result(); m.reset_state()``
(host NumPy arrays; ``Mean`` takes ``update_state(values, sample_weight)``).
"""

from __future__ import annotations

import math
import types

import numpy as np

from gpunn import checks
from gpunn.checks import lookup, unknown_name_error

#: Keras's backend.epsilon(): the clip bound of the cross-entropies, AUC's threshold margin, F1's guard
EPSILON = 1e-7


class Metric:
    """A metric: its state layout, the per-batch update on the device, and the result on the host.

    Subclasses define ``update(xp, pred, target, weight, state)`` (in-place,
    no host reads) and ``compute(state)`` (host NumPy state to a float, or a
    NumPy array for a per-class / per-threshold result).  The default state is
    (sum, count): the result is their ratio.
    """

    name = ""

    def __init__(self, name=None, dtype=None):
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"name: expected a non-empty metric name (str), got {name!r}")
            self.name = name
        self.dtype = dtype
        self._state = None

    # -- inside fit / evaluate ---------------------------------------------------
    def constant(self, xp, key, values, dtype):
        """``values`` as a ``dtype`` array on the backend's device, copied there once per
        (backend, dtype): a per-batch host-to-device copy would stall a GPU's queue."""
        cache = self.__dict__.setdefault("_constants", {})
        slot = (key, id(xp), np.dtype(dtype).str)
        if slot not in cache:
            cache[slot] = xp.asarray(values, dtype=dtype)
        return cache[slot]

    def state_shape(self, n_outputs: int) -> tuple:
        """Shape of the float64 state array for a model with ``n_outputs`` outputs."""
        return (2,)

    def update(self, xp, pred, target, weight, state) -> None:
        raise NotImplementedError

    def compute(self, state):
        num, den = float(state[0]), float(state[1])
        return num / den if den else 0.0

    def result(self, state=None):
        """The metric's value from a host copy of ``state`` (default: this metric's own, see update_state)."""
        if state is None:
            if self._state is None:  # nothing seen yet: the value of empty counts
                try:
                    return self.compute(np.zeros(self.state_shape(1)))
                except ValueError:  # e.g. a class_id that needs more outputs
                    return 0.0
            state = self._state
        return self.compute(np.asarray(state, dtype=np.float64))

    # -- standalone, as Keras's metric objects --------------------------------------
    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate one batch given as host arrays: y_pred (M,) or (M, N), y_true alike or (M,) labels."""
        pred = checks.as_float_array(y_pred, "y_pred", np.float64)
        pred = pred.reshape(-1, 1) if pred.ndim <= 1 else pred.reshape(pred.shape[0], -1)
        target = checks.as_float_array(y_true, "y_true", np.float64)
        if target.size == pred.size:
            target = target.reshape(pred.shape)
        elif target.size == pred.shape[0]:
            target = target.reshape(-1)
        else:
            raise ValueError(f"y_true: expected {pred.shape[0]} labels or shape {pred.shape} like y_pred, got shape {target.shape}")
        weight = None
        if sample_weight is not None:
            weight = checks.as_float_array(sample_weight, "sample_weight", np.float64).reshape(-1)
            if weight.shape[0] == 1:  # one weight for every sample
                weight = np.repeat(weight, pred.shape[0])
            if weight.shape[0] != pred.shape[0]:
                raise ValueError(f"sample_weight: expected {pred.shape[0]} weights (one per sample), got {weight.shape[0]}")
        if self._state is None:
            self._state = np.zeros(self.state_shape(pred.shape[1]))
        self.update(np, pred, target, weight, self._state)

    def reset_state(self):
        self._state = None

    # -- configuration ----------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


def _weighted_rows(xp, rows, weight, state):
    """state += (sum of per-sample values, number of samples), each sample weighted when ``weight``."""
    rows = rows.astype(state.dtype, copy=False)
    if weight is None:
        state[0] += rows.sum()
        state[1] += rows.shape[0]
    else:
        state[0] += (rows * weight).sum()
        state[1] += weight.sum()


def _dense_targets(xp, pred, target):
    """Targets shaped like ``pred``; integer class labels (M,) become one-hot rows.

    That makes elementwise metrics (binary accuracy, mse, mae) well defined
    next to a sparse categorical loss: mse is then the Brier score.
    """
    if target.ndim == 1 and pred.shape[1] > 1:
        classes = xp.arange(pred.shape[1], dtype=pred.dtype)
        return (target[:, None] == classes[None, :]).astype(pred.dtype)
    return target.reshape(pred.shape)


def _class_labels(pred, target):
    """Class index per row from integer labels (M,) or (M, 1), or from one-hot rows (M, N)."""
    if target.ndim == 2 and target.shape[1] == pred.shape[1] and pred.shape[1] > 1:
        return target.argmax(axis=1)
    return target.reshape(-1).astype(pred.dtype)


def _label_values(xp, pred, target):
    """pred[i, label_i] for every row: the predicted score of each row's true class."""
    labels = _class_labels(pred, target).astype(np.int64)
    labels = xp.clip(labels, 0, pred.shape[1] - 1)
    return xp.take_along_axis(pred, labels[:, None], axis=1)


class MeanMetricWrapper(Metric):
    """The mean over samples of ``fn(y_true, y_pred)`` (Keras's wrapper for metric functions).

    ``fn`` gets the targets (M, N) -- (M,) integer labels next to a sparse
    loss -- and the outputs (M, N) as backend arrays, and returns per-sample
    values (M,) or (M, ...) (averaged over the trailing axes, then over the
    samples, weighted by sample weights for weighted_metrics) or one scalar
    per batch, which Keras counts once per batch: the result is then the
    mean of the batch values.  Extra keyword arguments are passed to ``fn``.
    """

    def __init__(self, fn, name=None, dtype=None, **kwargs):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable fn(y_true, y_pred), got {checks.describe(fn)}")
        super().__init__(name or getattr(fn, "__name__", type(fn).__name__), dtype)
        self.fn, self.fn_kwargs = fn, kwargs

    def values(self, xp, pred, target):
        return self.fn(target, pred, **self.fn_kwargs)

    def update(self, xp, pred, target, weight, state):
        values = xp.asarray(self.values(xp, pred, target))
        if values.ndim == 0:
            state[0] += values.astype(state.dtype)
            state[1] += 1
            return
        if values.shape[0] != pred.shape[0]:
            raise ValueError(
                f"metric {self.name!r}: expected per-sample values of shape ({pred.shape[0]}, ...) or a scalar, got shape {tuple(values.shape)}"
            )
        if values.ndim > 1:
            values = values.reshape(values.shape[0], -1).mean(axis=1)
        _weighted_rows(xp, values, weight, state)

    def get_config(self):
        """The function's name only: a model file holds data, never code (see :func:`get`)."""
        return {"name": self.name, "fn": getattr(self.fn, "__qualname__", self.name)}


class _BuiltinMean(MeanMetricWrapper):
    """A built-in per-sample metric: ``values(xp, pred, target)`` gives one value per row."""

    def __init__(self, name=None, dtype=None):
        Metric.__init__(self, name, dtype)

    def get_config(self):
        return {"name": self.name}


class BinaryAccuracy(_BuiltinMean):
    """Fraction of outputs on the right side of ``threshold``: mean over outputs of [pred > t] == [y > 0.5]."""

    name = "binary_accuracy"

    def __init__(self, name=None, dtype=None, threshold=0.5):
        super().__init__(name, dtype)
        self.threshold = checks.number(threshold, "threshold")

    def values(self, xp, pred, target):
        return ((pred > self.threshold) == (_dense_targets(xp, pred, target) > 0.5)).mean(axis=1)

    def get_config(self):
        return {"name": self.name, "threshold": self.threshold}


class Accuracy(_BuiltinMean):
    """How often predictions equal the labels exactly: mean over outputs of [pred == y]."""

    name = "accuracy"

    def values(self, xp, pred, target):
        return (pred == _dense_targets(xp, pred, target)).mean(axis=1)


class CategoricalAccuracy(_BuiltinMean):
    name = "categorical_accuracy"

    def values(self, xp, pred, target):
        return pred.argmax(axis=1) == _class_labels(pred, target)


class SparseCategoricalAccuracy(CategoricalAccuracy):
    """The same comparison as categorical accuracy; the labels may come one-hot or as indices."""

    name = "sparse_categorical_accuracy"


class TopKCategoricalAccuracy(_BuiltinMean):
    """1 where the true class is among the ``k`` highest scores: fewer than k classes score strictly
    higher than it (Keras's in_top_k: a tie with the k-th score counts as in)."""

    name = "top_k_categorical_accuracy"

    def __init__(self, k=5, name=None, dtype=None):
        super().__init__(name, dtype)
        self.k = checks.positive_int(k, "k")

    def values(self, xp, pred, target):
        return (pred > _label_values(xp, pred, target)).sum(axis=1) < self.k

    def get_config(self):
        return {"name": self.name, "k": self.k}


class SparseTopKCategoricalAccuracy(TopKCategoricalAccuracy):
    name = "sparse_top_k_categorical_accuracy"


class MeanSquaredError(_BuiltinMean):
    name = "mean_squared_error"

    def values(self, xp, pred, target):
        diff = pred - _dense_targets(xp, pred, target)
        return (diff * diff).mean(axis=1)


class RootMeanSquaredError(MeanSquaredError):
    """sqrt(mean over samples of the per-sample mean squared error)."""

    name = "root_mean_squared_error"

    def compute(self, state):
        return math.sqrt(super().compute(state))


class MeanAbsoluteError(_BuiltinMean):
    name = "mean_absolute_error"

    def values(self, xp, pred, target):
        return xp.abs(pred - _dense_targets(xp, pred, target)).mean(axis=1)


class MeanAbsolutePercentageError(_BuiltinMean):
    """100 * mean |(y - pred) / max(|y|, 1e-7)| per sample."""

    name = "mean_absolute_percentage_error"

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        return 100.0 * (xp.abs(t - pred) / xp.maximum(xp.abs(t), EPSILON)).mean(axis=1)


class MeanSquaredLogarithmicError(_BuiltinMean):
    """mean (log(max(pred, 1e-7) + 1) - log(max(y, 1e-7) + 1))^2 per sample."""

    name = "mean_squared_logarithmic_error"

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        diff = xp.log(xp.maximum(pred, EPSILON) + 1.0) - xp.log(xp.maximum(t, EPSILON) + 1.0)
        return (diff * diff).mean(axis=1)


def _hinge_labels(xp, t):
    """Keras's hinge targets: labels that are all 0 or 1 (in this batch) become -1 / +1."""
    binary = xp.all((t == 0) | (t == 1))
    return xp.where(binary, 2.0 * t - 1.0, t)


class Hinge(_BuiltinMean):
    """mean over outputs of max(1 - y pred, 0), 0/1 labels mapped to -1/+1."""

    name = "hinge"

    def values(self, xp, pred, target):
        t = _hinge_labels(xp, _dense_targets(xp, pred, target))
        return xp.maximum(1.0 - t * pred, 0.0).mean(axis=1)


class SquaredHinge(_BuiltinMean):
    """mean over outputs of max(1 - y pred, 0)^2, 0/1 labels mapped to -1/+1."""

    name = "squared_hinge"

    def values(self, xp, pred, target):
        t = _hinge_labels(xp, _dense_targets(xp, pred, target))
        margin = xp.maximum(1.0 - t * pred, 0.0)
        return (margin * margin).mean(axis=1)


class CategoricalHinge(_BuiltinMean):
    """max(max_j (1 - y_j) pred_j - sum_j y_j pred_j + 1, 0) per sample (one-hot y)."""

    name = "categorical_hinge"

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        positive = (t * pred).sum(axis=1)
        negative = ((1.0 - t) * pred).max(axis=1)
        return xp.maximum(negative - positive + 1.0, 0.0)


class KLDivergence(_BuiltinMean):
    """sum_j y_j log(y_j / pred_j) per sample, both clipped to [1e-7, 1]."""

    name = "kl_divergence"

    def values(self, xp, pred, target):
        t = xp.clip(_dense_targets(xp, pred, target), EPSILON, 1.0)
        p = xp.clip(pred, EPSILON, 1.0)
        return (t * xp.log(t / p)).sum(axis=1)


class Poisson(_BuiltinMean):
    """mean over outputs of pred - y log(pred + 1e-7)."""

    name = "poisson"

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        return (pred - t * xp.log(pred + EPSILON)).mean(axis=1)


class LogCoshError(_BuiltinMean):
    """mean over outputs of log(cosh(pred - y)), computed as x + softplus(-2x) - log 2."""

    name = "logcosh"

    def values(self, xp, pred, target):
        x = pred - _dense_targets(xp, pred, target)
        softplus = xp.maximum(-2.0 * x, 0.0) + xp.log1p(xp.exp(-xp.abs(2.0 * x)))
        return (x + softplus - math.log(2.0)).mean(axis=1)


class CosineSimilarity(_BuiltinMean):
    """sum_j y_j pred_j / (|y| |pred|) per sample (each norm at least sqrt(1e-12), as Keras's l2_normalize)."""

    name = "cosine_similarity"

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        t_norm = xp.sqrt(xp.maximum((t * t).sum(axis=1), 1e-12))
        p_norm = xp.sqrt(xp.maximum((pred * pred).sum(axis=1), 1e-12))
        return (t * pred).sum(axis=1) / (t_norm * p_norm)


def _log_probabilities(xp, pred, from_logits):
    """Row-wise log-probabilities: log_softmax of logits, or log(clip(p / sum p, eps, 1 - eps))."""
    if from_logits:
        shifted = pred - pred.max(axis=1, keepdims=True)
        return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    probs = pred / pred.sum(axis=1, keepdims=True)
    return xp.log(xp.clip(probs, EPSILON, 1.0 - EPSILON))


class BinaryCrossentropy(_BuiltinMean):
    """mean over outputs of -(y log p + (1 - y) log(1 - p)), p clipped to [1e-7, 1 - 1e-7]; with
    ``from_logits`` computed stably from the logits z as max(z, 0) - z y + log(1 + exp(-|z|)).
    ``label_smoothing`` s replaces y by y (1 - s) + s / 2."""

    name = "binary_crossentropy"

    def __init__(self, name=None, dtype=None, from_logits=False, label_smoothing=0.0):
        super().__init__(name, dtype)
        self.from_logits = checks.boolean(from_logits, "from_logits")
        self.label_smoothing = checks.number(label_smoothing, "label_smoothing", minimum=0, below=1)

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        if self.label_smoothing:
            t = t * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.from_logits:
            elementwise = xp.maximum(pred, 0) - pred * t + xp.log1p(xp.exp(-xp.abs(pred)))
        else:
            p = xp.clip(pred, EPSILON, 1.0 - EPSILON)
            elementwise = -(t * xp.log(p) + (1.0 - t) * xp.log(1.0 - p))
        return elementwise.mean(axis=1)

    def get_config(self):
        return {"name": self.name, "from_logits": self.from_logits, "label_smoothing": self.label_smoothing}


class CategoricalCrossentropy(BinaryCrossentropy):
    """-sum_j y_j log p_j per sample, p = pred / sum(pred) clipped to [1e-7, 1 - 1e-7] (log_softmax
    of the logits with ``from_logits``); ``label_smoothing`` s: y (1 - s) + s / classes."""

    name = "categorical_crossentropy"

    def values(self, xp, pred, target):
        t = _dense_targets(xp, pred, target)
        if self.label_smoothing:
            t = t * (1.0 - self.label_smoothing) + self.label_smoothing / pred.shape[1]
        return -(t * _log_probabilities(xp, pred, self.from_logits)).sum(axis=1)


class SparseCategoricalCrossentropy(_BuiltinMean):
    """-log p[label] per sample, from integer labels (or one-hot rows); p as in categorical_crossentropy."""

    name = "sparse_categorical_crossentropy"

    def __init__(self, name=None, dtype=None, from_logits=False):
        super().__init__(name, dtype)
        self.from_logits = checks.boolean(from_logits, "from_logits")

    def values(self, xp, pred, target):
        return -_label_values(xp, _log_probabilities(xp, pred, self.from_logits), target)[:, 0]

    def get_config(self):
        return {"name": self.name, "from_logits": self.from_logits}


class Mean(Metric):
    """The (weighted) mean of the values given to ``update_state(values, sample_weight=None)``.

    As Keras's ``Mean``: values (M, ...) are averaged over their trailing axes
    first, so each of the M samples counts once (with its weight); a scalar
    counts once.  A standalone tracker (e.g. of a loss in a custom loop): to
    average a function of (y_true, y_pred) in compile, pass the function itself.
    """

    name = "mean"

    def update_state(self, values, sample_weight=None):
        values = checks.as_float_array(values, "values", np.float64)
        if self._state is None:
            self._state = np.zeros(2)
        if sample_weight is None:
            rows = values.reshape(values.shape[0], -1).mean(axis=1) if values.ndim else values.reshape(1)
            self._state += (rows.sum(), rows.shape[0])
            return
        weight = checks.as_float_array(sample_weight, "sample_weight", np.float64)
        if values.ndim > weight.ndim:
            values = values.mean(axis=tuple(range(weight.ndim, values.ndim)))
        weight = np.broadcast_to(weight, values.shape)
        self._state += ((values * weight).sum(), weight.sum())


class Sum(Mean):
    """The (weighted) sum of the values given to ``update_state(values, sample_weight=None)``."""

    name = "sum"

    def compute(self, state):
        return float(state[0])


def _thresholds(values, argument="thresholds") -> list:
    values = [values] if isinstance(values, (int, float, np.number)) and not isinstance(values, bool) else values
    if not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"{argument}: expected a number in [0, 1] or a non-empty list of them, got {values!r}")
    values = [checks.number(v, argument, minimum=0) for v in values]
    if max(values) > 1:
        raise ValueError(f"{argument}: expected thresholds in [0, 1], got {max(values)!r}")
    return values


def _confusion_outcomes(xp, pred, target, thresholds, top_k, class_id):
    """(predicted positive (M, N', K) for the K ``thresholds`` (a device array), actually positive
    (M, N', 1)); integer
    labels next to several outputs are one-hot encoded, as Keras's one-hot targets."""
    actual = _dense_targets(xp, pred, target) > 0.5
    scores = pred
    if top_k is not None:
        # exactly k entries per row count (top_k's order: ties go to the lower index); the rest never do
        n = pred.shape[1]
        earlier = xp.arange(n)[None, :] < xp.arange(n)[:, None]  # [j, i]: i comes before j
        rank = ((pred[:, None, :] > pred[:, :, None]) | ((pred[:, None, :] == pred[:, :, None]) & earlier[None])).sum(axis=2)
        scores = xp.where(rank < top_k, pred, -xp.inf)
    predicted = scores[:, :, None] > thresholds[None, None, :]
    if class_id is not None:
        actual, predicted = actual[:, class_id : class_id + 1], predicted[:, class_id : class_id + 1]
    return predicted, actual[:, :, None]


class Precision(Metric):
    """tp / (tp + fp), elementwise over the outputs: an output is predicted positive when its score
    exceeds the threshold (default 0.5; with ``top_k`` only the row's k highest scores count, with
    ``class_id`` only that output).  A list of ``thresholds`` gives one value per threshold."""

    name = "precision"

    def __init__(self, thresholds=None, top_k=None, class_id=None, name=None, dtype=None):
        super().__init__(name, dtype)
        default = 0.5 if top_k is None else -np.inf
        self.init_thresholds = thresholds
        self.thresholds = [default] if thresholds is None else _thresholds(thresholds)
        self.top_k = None if top_k is None else checks.positive_int(top_k, "top_k")
        self.class_id = None if class_id is None else checks.positive_int(class_id, "class_id", minimum=0)

    def state_shape(self, n_outputs):
        if self.class_id is not None and self.class_id >= n_outputs:
            raise ValueError(f"class_id: the model has {n_outputs} outputs, got class_id={self.class_id}")
        return (2, len(self.thresholds))

    def _counts(self, xp, pred, target, weight):
        thresholds = self.constant(xp, "thresholds", self.thresholds, pred.dtype)
        predicted, actual = _confusion_outcomes(xp, pred, target, thresholds, self.top_k, self.class_id)
        w = 1 if weight is None else weight[:, None, None]
        return ((predicted & actual) * w).sum(axis=(0, 1)), predicted, actual, w

    def update(self, xp, pred, target, weight, state):
        tp, predicted, _, w = self._counts(xp, pred, target, weight)
        state[0] += tp
        state[1] += (predicted * w).sum(axis=(0, 1))

    def compute(self, state):
        num, den = state[0], state[1]
        values = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
        return float(values[0]) if values.shape[0] == 1 else values

    def get_config(self):
        return {"name": self.name, "thresholds": self.init_thresholds, "top_k": self.top_k, "class_id": self.class_id}


class Recall(Precision):
    """tp / (tp + fn), with Precision's thresholds, top_k and class_id."""

    name = "recall"

    def update(self, xp, pred, target, weight, state):
        tp, _, actual, w = self._counts(xp, pred, target, weight)
        state[0] += tp
        state[1] += (actual * w).sum(axis=(0, 1))


class _ConfusionCount(Metric):
    """A weighted count of one cell of the confusion matrix, per threshold (default 0.5):
    an output is predicted positive when its score exceeds the threshold."""

    def __init__(self, thresholds=None, name=None, dtype=None):
        super().__init__(name, dtype)
        self.init_thresholds = thresholds
        self.thresholds = [0.5] if thresholds is None else _thresholds(thresholds)

    def state_shape(self, n_outputs):
        return (len(self.thresholds),)

    def cell(self, predicted, actual):
        raise NotImplementedError

    def update(self, xp, pred, target, weight, state):
        thresholds = self.constant(xp, "thresholds", self.thresholds, pred.dtype)
        predicted, actual = _confusion_outcomes(xp, pred, target, thresholds, None, None)
        w = 1 if weight is None else weight[:, None, None]
        state += (self.cell(predicted, actual) * w).sum(axis=(0, 1))

    def compute(self, state):
        return float(state[0]) if state.shape[0] == 1 else state

    def get_config(self):
        return {"name": self.name, "thresholds": self.init_thresholds}


class TruePositives(_ConfusionCount):
    name = "true_positives"

    def cell(self, predicted, actual):
        return predicted & actual


class FalsePositives(_ConfusionCount):
    name = "false_positives"

    def cell(self, predicted, actual):
        return predicted & ~actual


class TrueNegatives(_ConfusionCount):
    name = "true_negatives"

    def cell(self, predicted, actual):
        return ~predicted & ~actual


class FalseNegatives(_ConfusionCount):
    name = "false_negatives"

    def cell(self, predicted, actual):
        return ~predicted & actual


def _divide_no_nan(num, den):
    return np.where(den != 0, num / np.where(den != 0, den, 1), 0.0)


class AUC(Metric):
    """Area under the ROC or precision-recall curve, as Keras computes it.

    Predictions are compared with ``num_thresholds`` thresholds: -1e-7,
    i / (num_thresholds - 1) for i = 1 .. num_thresholds - 2, and 1 + 1e-7
    (or -1e-7, the sorted ``thresholds``, 1 + 1e-7); at each one an output
    with score > threshold is a predicted positive, and true/false positive
    counts accumulate (labels weigh 1 - y as negatives, so soft labels count
    fractionally).  The curve through the points is summed by the trapezoid
    rule ("interpolation"; for PR the Davis-Goadrich interpolation) or by the
    lower ("minoring") or upper ("majoring") Riemann sum.  Outputs are pooled
    into one binary problem unless ``multi_label``, which averages one AUC per
    output (weighted by ``label_weights``).  ``from_logits`` applies a sigmoid.
    """

    name = "auc"

    def __init__(self, num_thresholds=200, curve="ROC", summation_method="interpolation", name=None, dtype=None,
                 thresholds=None, multi_label=False, num_labels=None, label_weights=None, from_logits=False):  # fmt: skip
        super().__init__(name, dtype)
        if not isinstance(curve, str) or curve.upper() not in ("ROC", "PR"):
            raise ValueError(f"curve: expected 'ROC' or 'PR', got {curve!r}")
        if not isinstance(summation_method, str) or summation_method.lower() not in ("interpolation", "minoring", "majoring"):
            raise ValueError(f"summation_method: expected 'interpolation', 'minoring' or 'majoring', got {summation_method!r}")
        self.curve, self.summation_method = curve.upper(), summation_method.lower()
        if thresholds is not None:
            inner = sorted(_thresholds(thresholds))
            if inner[0] < 0 or inner[-1] > 1:
                raise ValueError(f"thresholds: expected values in [0, 1], got {thresholds!r}")
            self.num_thresholds = len(inner) + 2
        else:
            self.num_thresholds = checks.positive_int(num_thresholds, "num_thresholds", minimum=2)
            inner = [(i + 1) / (self.num_thresholds - 1) for i in range(self.num_thresholds - 2)]
        self.init_thresholds = None if thresholds is None else list(inner)
        self.thresholds = np.array([-EPSILON, *inner, 1.0 + EPSILON])
        self.multi_label = checks.boolean(multi_label, "multi_label")
        self.num_labels = None if num_labels is None else checks.positive_int(num_labels, "num_labels")
        self.label_weights = None if label_weights is None else checks.as_float_array(label_weights, "label_weights", np.float64).reshape(-1)
        self.from_logits = checks.boolean(from_logits, "from_logits")

    def state_shape(self, n_outputs):
        for what, given in (("num_labels", self.num_labels), ("label_weights", None if self.label_weights is None else self.label_weights.shape[0])):
            if given is not None and given != n_outputs:
                raise ValueError(f"{what}: the model has {n_outputs} outputs, got {given}")
        return (2, n_outputs if self.multi_label else 1, self.num_thresholds)

    def update(self, xp, pred, target, weight, state):
        t = _dense_targets(xp, pred, target)
        p = 1.0 / (1.0 + xp.exp(-pred)) if self.from_logits else pred
        w = xp.ones_like(p) if weight is None else xp.broadcast_to(weight[:, None], p.shape).astype(p.dtype)
        if self.label_weights is not None:
            w = w * self.constant(xp, "label_weights", self.label_weights, p.dtype)[None, :]
        n_thr = self.num_thresholds
        # thresholds[j] < p for j < k (k = searchsorted): a score is a positive at thresholds 0 .. k-1
        thresholds = self.constant(xp, "thresholds", self.thresholds, p.dtype)
        # scores are clipped to [0, 1] (Keras's bucketing); a NaN score counts as the lowest, 0
        scores = xp.clip(xp.where(xp.isnan(p), 0.0, p), 0.0, 1.0)
        above = xp.searchsorted(thresholds, scores.ravel(), side="left")
        bucket = xp.clip(above - 1, 0, n_thr - 1).reshape(p.shape)
        if self.multi_label:
            bucket = bucket + n_thr * xp.arange(p.shape[1])[None, :]
        labels = state.shape[1]
        for row, label_weight in ((0, t * w), (1, (1.0 - t) * w)):
            counts = xp.bincount(bucket.ravel(), weights=label_weight.ravel(), minlength=labels * n_thr)
            counts = counts.reshape(labels, n_thr)
            state[row] += xp.cumsum(counts[:, ::-1], axis=1)[:, ::-1]

    def compute(self, state):
        tp, fp = state[0], state[1]  # (labels, thresholds); at threshold 0 every score is a positive
        fn, tn = tp[:, :1] - tp, fp[:, :1] - fp
        if self.curve == "PR" and self.summation_method == "interpolation":
            per_label = self._interpolated_pr(tp, fp, fn)
        else:
            recall = _divide_no_nan(tp, tp + fn)
            if self.curve == "ROC":
                x, y = _divide_no_nan(fp, fp + tn), recall
            else:
                x, y = recall, _divide_no_nan(tp, tp + fp)
            if self.summation_method == "interpolation":
                heights = (y[:, :-1] + y[:, 1:]) / 2.0
            elif self.summation_method == "minoring":
                heights = np.minimum(y[:, :-1], y[:, 1:])
            else:
                heights = np.maximum(y[:, :-1], y[:, 1:])
            per_label = ((x[:, :-1] - x[:, 1:]) * heights).sum(axis=1)
        if not self.multi_label or self.label_weights is None:
            return float(per_label.mean())
        return float(_divide_no_nan((per_label * self.label_weights).sum(), self.label_weights.sum()))

    @staticmethod
    def _interpolated_pr(tp, fp, fn):
        """Davis & Goadrich (2006): precision interpolated linearly in the number of positives."""
        dtp = tp[:, :-1] - tp[:, 1:]
        p = tp + fp
        dp = p[:, :-1] - p[:, 1:]
        slope = _divide_no_nan(dtp, np.maximum(dp, 0))
        intercept = tp[:, 1:] - slope * p[:, 1:]
        both = (p[:, :-1] > 0) & (p[:, 1:] > 0)
        ratio = np.where(both, _divide_no_nan(p[:, :-1], np.maximum(p[:, 1:], 0)), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.log(np.where(ratio > 0, ratio, 1.0))
        increments = _divide_no_nan(slope * (dtp + intercept * log_ratio), np.maximum(tp[:, 1:] + fn[:, 1:], 0))
        return increments.sum(axis=1)

    def get_config(self):
        return {
            "name": self.name, "num_thresholds": self.num_thresholds, "curve": self.curve,
            "summation_method": self.summation_method, "thresholds": self.init_thresholds,
            "multi_label": self.multi_label, "num_labels": self.num_labels,
            "label_weights": None if self.label_weights is None else self.label_weights.tolist(),
            "from_logits": self.from_logits,
        }  # fmt: skip


class FBetaScore(Metric):
    """F-beta per class: (1 + b^2) P R / (b^2 P + R), P = tp / (tp + fp + 1e-7), R = tp / (tp + fn + 1e-7).

    A score is a predicted positive when it exceeds ``threshold``, or, with
    threshold None, when it is its row's maximum.  ``average``: None (one
    value per class), "micro" (counts pooled over classes), "macro" (mean of
    the classes), "weighted" (classes weighted by their true-label support).
    """

    name = "fbeta_score"
    _AVERAGES = (None, "micro", "macro", "weighted")

    def __init__(self, average=None, beta=1.0, threshold=None, name=None, dtype=None):
        super().__init__(name, dtype)
        if average not in self._AVERAGES:
            raise ValueError(f"average: expected None, 'micro', 'macro' or 'weighted', got {average!r}")
        self.average = average
        self.beta = checks.number(beta, "beta", minimum=0, allow_minimum=False)
        if threshold is not None:
            threshold = checks.number(threshold, "threshold", minimum=0, allow_minimum=False)
            if threshold > 1:
                raise ValueError(f"threshold: expected a number in (0, 1], got {threshold!r}")
        self.threshold = threshold

    def state_shape(self, n_outputs):
        return (4, 1 if self.average == "micro" else n_outputs)

    def update(self, xp, pred, target, weight, state):
        t = _dense_targets(xp, pred, target)
        if self.threshold is None:
            predicted = (pred >= pred.max(axis=1, keepdims=True)).astype(pred.dtype)
        else:
            predicted = (pred > self.threshold).astype(pred.dtype)
        w = 1.0 if weight is None else weight[:, None]
        axis = None if self.average == "micro" else 0
        for row, value in enumerate((predicted * t, predicted * (1.0 - t), (1.0 - predicted) * t, t)):
            state[row] += (value * w).sum(axis=axis)

    def compute(self, state):
        tp, fp, fn, support = state
        precision = tp / (tp + fp + EPSILON)
        recall = tp / (tp + fn + EPSILON)
        b2 = self.beta * self.beta
        score = (1.0 + b2) * precision * recall / (b2 * precision + recall + EPSILON)
        if self.average == "weighted":
            return float((score * support / (support.sum() + EPSILON)).sum())
        if self.average is not None:
            return float(score.mean())
        return score

    def get_config(self):
        return {"name": self.name, "average": self.average, "beta": self.beta, "threshold": self.threshold}


class F1Score(FBetaScore):
    """FBetaScore with beta = 1."""

    name = "f1_score"

    def __init__(self, average=None, threshold=None, name=None, dtype=None):
        super().__init__(average, 1.0, threshold, name, dtype)

    def get_config(self):
        return {"name": self.name, "average": self.average, "threshold": self.threshold}


class R2Score(Metric):
    """Coefficient of determination per output, 1 - sum w (y - pred)^2 / sum w (y - mean_w y)^2
    (an output with constant targets scores 0), combined by ``class_aggregation``:
    "uniform_average", "variance_weighted_average" or None (one value per output).
    ``num_regressors`` p > 0 gives the adjusted score 1 - (1 - R2)(n - 1)/(n - p - 1)."""

    name = "r2_score"

    def __init__(self, class_aggregation="uniform_average", num_regressors=0, name=None, dtype=None):
        super().__init__(name, dtype)
        if class_aggregation not in (None, "uniform_average", "variance_weighted_average"):
            raise ValueError(
                f"class_aggregation: expected None, 'uniform_average' or 'variance_weighted_average', got {class_aggregation!r}"
            )
        self.class_aggregation = class_aggregation
        self.num_regressors = checks.positive_int(num_regressors, "num_regressors", minimum=0)

    def state_shape(self, n_outputs):
        return (5, n_outputs)  # sum w y, sum w y^2, sum w (y - pred)^2, sum w, samples

    def update(self, xp, pred, target, weight, state):
        t = _dense_targets(xp, pred, target)
        w = xp.ones_like(t) if weight is None else xp.broadcast_to(weight[:, None], t.shape)
        diff = t - pred
        state[0] += (w * t).sum(axis=0)
        state[1] += (w * t * t).sum(axis=0)
        state[2] += (w * diff * diff).sum(axis=0)
        state[3] += w.sum(axis=0)
        state[4] += t.shape[0]

    def compute(self, state):
        total_y, total_y2, residual, count, samples = state
        with np.errstate(divide="ignore", invalid="ignore"):
            total = total_y2 - total_y * (total_y / count)
            raw = 1.0 - residual / total
        raw = np.where(np.isinf(raw), 0.0, raw)
        if self.class_aggregation == "uniform_average":
            score = raw.mean()
        elif self.class_aggregation == "variance_weighted_average":
            score = (total * raw).sum() / total.sum()
        else:
            score = raw
        n, p = float(samples[0]), self.num_regressors
        if p and n - p - 1 > 0:
            score = 1.0 - (1.0 - score) * (n - 1) / (n - p - 1)
        return float(score) if np.ndim(score) == 0 else score

    def get_config(self):
        return {"name": self.name, "class_aggregation": self.class_aggregation, "num_regressors": self.num_regressors}


_CLASSES = {
    "binary_accuracy": BinaryAccuracy,
    "categorical_accuracy": CategoricalAccuracy,
    "sparse_categorical_accuracy": SparseCategoricalAccuracy,
    "top_k_categorical_accuracy": TopKCategoricalAccuracy,
    "sparse_top_k_categorical_accuracy": SparseTopKCategoricalAccuracy,
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
    "root_mean_squared_error": RootMeanSquaredError,
    "mae": MeanAbsoluteError,
    "mean_absolute_error": MeanAbsoluteError,
    "mape": MeanAbsolutePercentageError,
    "mean_absolute_percentage_error": MeanAbsolutePercentageError,
    "msle": MeanSquaredLogarithmicError,
    "mean_squared_logarithmic_error": MeanSquaredLogarithmicError,
    "binary_crossentropy": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "precision": Precision,
    "recall": Recall,
    "auc": AUC,
    "f1_score": F1Score,
    "fbeta_score": FBetaScore,
    "r2_score": R2Score,
    "hinge": Hinge,
    "squared_hinge": SquaredHinge,
    "categorical_hinge": CategoricalHinge,
    "kl_divergence": KLDivergence,
    "kld": KLDivergence,
    "poisson": Poisson,
    "logcosh": LogCoshError,
    "log_cosh": LogCoshError,
    "log_cosh_error": LogCoshError,
    "cosine_similarity": CosineSimilarity,
    "true_positives": TruePositives,
    "false_positives": FalsePositives,
    "true_negatives": TrueNegatives,
    "false_negatives": FalseNegatives,
}


def _metric_function(cls, name, doc):
    """Keras's function form of a per-sample metric: ``fn(y_true, y_pred)`` on host arrays returns
    one value per sample; passed to compile it stands for the built-in metric (saved by name)."""

    def fn(y_true, y_pred):
        pred = checks.as_float_array(y_pred, "y_pred", np.float64)
        pred = pred.reshape(-1, 1) if pred.ndim <= 1 else pred
        target = checks.as_float_array(y_true, "y_true", np.float64)
        target = target.reshape(pred.shape) if target.size == pred.size else target.reshape(-1)
        return np.asarray(cls().values(np, pred, target), dtype=np.float64)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"Per-sample {doc} of (y_true, y_pred): shape (M,)."
    _FUNCTIONS[fn] = name
    return fn


_FUNCTIONS: dict = {}
mean_squared_error = mse = _metric_function(MeanSquaredError, "mean_squared_error", "mean squared error")
mean_absolute_error = mae = _metric_function(MeanAbsoluteError, "mean_absolute_error", "mean absolute error")
mean_absolute_percentage_error = mape = _metric_function(
    MeanAbsolutePercentageError, "mean_absolute_percentage_error", "mean absolute percentage error"
)
mean_squared_logarithmic_error = msle = _metric_function(
    MeanSquaredLogarithmicError, "mean_squared_logarithmic_error", "mean squared logarithmic error"
)
binary_crossentropy = _metric_function(BinaryCrossentropy, "binary_crossentropy", "binary cross-entropy")
categorical_crossentropy = _metric_function(CategoricalCrossentropy, "categorical_crossentropy", "categorical cross-entropy")
sparse_categorical_crossentropy = _metric_function(
    SparseCategoricalCrossentropy, "sparse_categorical_crossentropy", "sparse categorical cross-entropy"
)
binary_accuracy = _metric_function(BinaryAccuracy, "binary_accuracy", "binary accuracy")
categorical_accuracy = _metric_function(CategoricalAccuracy, "categorical_accuracy", "categorical accuracy")
sparse_categorical_accuracy = _metric_function(SparseCategoricalAccuracy, "sparse_categorical_accuracy", "sparse categorical accuracy")
top_k_categorical_accuracy = _metric_function(TopKCategoricalAccuracy, "top_k_categorical_accuracy", "top-5 accuracy")
sparse_top_k_categorical_accuracy = _metric_function(
    SparseTopKCategoricalAccuracy, "sparse_top_k_categorical_accuracy", "top-5 accuracy"
)
hinge = _metric_function(Hinge, "hinge", "hinge loss")
squared_hinge = _metric_function(SquaredHinge, "squared_hinge", "squared hinge loss")
categorical_hinge = _metric_function(CategoricalHinge, "categorical_hinge", "categorical hinge loss")
kl_divergence = kld = _metric_function(KLDivergence, "kl_divergence", "Kullback-Leibler divergence")
poisson = _metric_function(Poisson, "poisson", "Poisson loss")
log_cosh = logcosh = _metric_function(LogCoshError, "log_cosh", "log-cosh error")

#: every metric class, by its class name: the key of a saved metric's config
_BY_CLASS_NAME = {cls.__name__: cls for cls in set(_CLASSES.values()) | {Accuracy}}
# Keras also resolves the class names ("AUC", "RootMeanSquaredError"); lookups are case-insensitive
_CLASSES.update({name.lower(): cls for name, cls in _BY_CLASS_NAME.items()})
ACCURACY_NAMES = ("accuracy", "acc")


def names() -> list[str]:
    return sorted(list(_CLASSES) + list(ACCURACY_NAMES))


def is_binary_or_sparse_categorical(target_shape, output_shape) -> tuple[bool, bool]:
    """Keras 3's test on a batch's target and output shapes (``compile_utils``):
    binary when the output's last dimension is 1; sparse categorical when the targets
    have fewer dimensions than the output, or one column next to several outputs."""
    is_binary = output_shape[-1] == 1
    is_sparse = len(target_shape) < len(output_shape) or (target_shape[-1] == 1 and output_shape[-1] > 1)
    return is_binary, is_sparse


def resolve_accuracy(target_shape, output_shape) -> type[Metric]:
    """The accuracy Keras 3 picks for ``"accuracy"``/``"acc"`` from the target and output shapes
    (the loss plays no part: several sigmoid units with binary cross-entropy get categorical accuracy)."""
    is_binary, is_sparse = is_binary_or_sparse_categorical(target_shape, output_shape)
    if is_binary:
        return BinaryAccuracy
    if is_sparse:
        return SparseCategoricalAccuracy
    return CategoricalAccuracy


def _from_config(identifier, argument="metrics") -> Metric:
    """A metric from ``serialize`` output: {"class_name": ..., "config": {...}}."""
    cls = _BY_CLASS_NAME.get(identifier.get("class_name"))
    config = identifier.get("config")
    if identifier.get("class_name") == "MeanMetricWrapper" and isinstance(config, dict):
        raise ValueError(
            f"{argument}: the metric {config.get('name')!r} was the user function {config.get('fn')!r}, which a "
            "model file cannot hold (files are data, never code); load with compile=False and compile "
            "again passing the function"
        )
    if cls is None or not isinstance(config, dict):
        raise ValueError(
            f"{argument}: expected a metric config {{'class_name': one of {', '.join(sorted(_BY_CLASS_NAME))}, "
            f"'config': {{...}}}}, got {identifier!r}"[:400]
        )
    return cls.from_config(config)


def get(identifier, target_shape=None, output_shape=None) -> Metric:
    """Resolve a metric name, instance, config dict or function ``fn(y_true, y_pred)``;
    "accuracy"/"acc" need the shapes of a batch of targets and of outputs (see
    :func:`resolve_accuracy`).  A name keeps its spelling as the log key (Keras 3)."""
    if isinstance(identifier, Metric):
        return identifier
    if isinstance(identifier, dict):
        return _from_config(identifier)
    if callable(identifier) and not isinstance(identifier, type):
        if isinstance(identifier, types.FunctionType) and identifier in _FUNCTIONS:  # a built-in's function form: the device metric of that name
            return _CLASSES[_FUNCTIONS[identifier]](name=_FUNCTIONS[identifier])
        return MeanMetricWrapper(identifier)
    if isinstance(identifier, str) and identifier.strip().lower() in ACCURACY_NAMES:
        if target_shape is None or output_shape is None:
            raise ValueError(
                f"metrics: {identifier!r} is resolved from the shapes of the targets and outputs "
                "(binary, sparse categorical or categorical accuracy); compile the model with it instead"
            )
        return resolve_accuracy(target_shape, output_shape)(name=identifier.strip())
    cls = lookup("metrics", "metric", identifier, _CLASSES)
    return cls(name=identifier.strip())


def serialize(identifier):
    """A compile metric as plain data for a model file: names stay names, objects become
    {"class_name", "config"}; a user function is stored by name only (files hold no code), so a
    model saved with one loads with compile=False."""
    if isinstance(identifier, (str, dict)):
        return identifier
    if isinstance(identifier, types.FunctionType) and identifier in _FUNCTIONS:
        return _FUNCTIONS[identifier]
    metric = get(identifier)
    return {"class_name": type(metric).__name__, "config": metric.get_config()}


def deserialize(config) -> Metric:
    """The metric :func:`serialize` described (a name or a {"class_name", "config"} mapping)."""
    return get(config)


def validate(identifier, argument: str = "metrics") -> None:
    """Raise early (at compile time) unless ``identifier`` is a metric name (``"accuracy"``
    included), a Metric instance, a metric config or a function; errors name ``argument``."""
    if isinstance(identifier, Mean):
        raise TypeError(
            f"{argument}: {type(identifier).__name__} reduces the values given to its update_state(values) "
            "and stands alone; to track the mean of a function of (y_true, y_pred) in compile, pass the function itself"
        )
    if isinstance(identifier, Metric):
        return
    if isinstance(identifier, dict):
        _from_config(identifier, argument)
        return
    if callable(identifier) and not isinstance(identifier, type):
        return
    if not isinstance(identifier, str):
        raise TypeError(
            f"{argument}: expected metric names (str), gpunn.metrics.Metric instances or functions "
            f"fn(y_true, y_pred), got {type(identifier).__name__} {identifier!r}"[:300]
        )
    if identifier.strip().lower() not in names():
        raise unknown_name_error(argument, "metric", identifier, names())


def check_list(given, argument: str = "metrics") -> list:
    """``given`` (None, or a list of metric names / Metric instances / functions) as a list, each validated."""
    given = [] if given is None else given
    if isinstance(given, str) or not isinstance(given, (list, tuple)):
        raise TypeError(f"{argument}: expected a list of metric names, got {given!r}")
    for m in given:
        validate(m, argument)
    return list(given)
