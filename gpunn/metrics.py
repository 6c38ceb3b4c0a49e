"""Metrics tracked during fit/evaluate, accumulated on the backend's device.

Each metric keeps a 2-element state (numerator, denominator) in a backend
array, updated with a few array operations per batch and read back to the
host only when a progress line or the epoch's logs need it.  As in Keras 3,
``compile(metrics=...)`` ignore sample and class weights and
``compile(weighted_metrics=...)`` weigh each row by them.

``"accuracy"`` is resolved as Keras does: binary accuracy for a
binary-cross-entropy loss or a single output, sparse categorical accuracy
for integer labels, categorical accuracy otherwise.  Where the loss already
counts that accuracy in its fused pass, no extra work is done per batch.
"""

from __future__ import annotations

from gpunn.checks import lookup, unknown_name_error


class Metric:
    """A running ratio sum(num)/sum(den) over the batches seen so far."""

    name = ""

    def __init__(self, name=None):
        if name is not None:
            self.name = name

    def update(self, xp, pred, target, weight, state) -> None:
        raise NotImplementedError

    def result(self, state) -> float:
        num, den = float(state[0]), float(state[1])
        return num / den if den else 0.0

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


def _weighted_rows(xp, rows, weight, state):
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


class BinaryAccuracy(Metric):
    name = "binary_accuracy"

    def __init__(self, name=None, threshold=0.5):
        super().__init__(name)
        self.threshold = threshold

    def update(self, xp, pred, target, weight, state):
        rows = ((pred > self.threshold) == (_dense_targets(xp, pred, target) > 0.5)).mean(axis=1)
        _weighted_rows(xp, rows, weight, state)


class CategoricalAccuracy(Metric):
    name = "categorical_accuracy"

    def update(self, xp, pred, target, weight, state):
        _weighted_rows(xp, pred.argmax(axis=1) == _class_labels(pred, target), weight, state)


class SparseCategoricalAccuracy(CategoricalAccuracy):
    """The same comparison as categorical accuracy; the labels may come one-hot or as indices."""

    name = "sparse_categorical_accuracy"


def _class_labels(pred, target):
    """Class index per row from integer labels (M,) or (M, 1), or from one-hot rows (M, N)."""
    if target.ndim == 2 and target.shape[1] == pred.shape[1] and pred.shape[1] > 1:
        return target.argmax(axis=1)
    return target.reshape(-1).astype(pred.dtype)


class MeanSquaredError(Metric):
    name = "mean_squared_error"

    def update(self, xp, pred, target, weight, state):
        diff = pred - _dense_targets(xp, pred, target)
        _weighted_rows(xp, (diff * diff).mean(axis=1), weight, state)


class MeanAbsoluteError(Metric):
    name = "mean_absolute_error"

    def update(self, xp, pred, target, weight, state):
        _weighted_rows(xp, xp.abs(pred - _dense_targets(xp, pred, target)).mean(axis=1), weight, state)


def _binary_outcomes(xp, pred, target, threshold):
    """(predicted positive, actually positive) elementwise; integer labels are one-hot encoded."""
    if target.ndim == 1 and pred.shape[1] > 1:
        classes = xp.arange(pred.shape[1], dtype=pred.dtype)
        actual = target[:, None] == classes[None, :]
        predicted = pred.argmax(axis=1)[:, None] == classes[None, :]
    else:
        actual = _dense_targets(xp, pred, target) > 0.5
        predicted = pred > threshold
    return predicted, actual


class Precision(Metric):
    """tp / (tp + fp), elementwise over outputs with a 0.5 threshold."""

    name = "precision"

    def __init__(self, name=None, threshold=0.5):
        super().__init__(name)
        self.threshold = threshold

    def update(self, xp, pred, target, weight, state):
        predicted, actual = _binary_outcomes(xp, pred, target, self.threshold)
        w = 1 if weight is None else weight[:, None]
        state[0] += ((predicted & actual) * w).sum()
        state[1] += (predicted * w).sum()


class Recall(Precision):
    """tp / (tp + fn), elementwise over outputs with a 0.5 threshold."""

    name = "recall"

    def update(self, xp, pred, target, weight, state):
        predicted, actual = _binary_outcomes(xp, pred, target, self.threshold)
        w = 1 if weight is None else weight[:, None]
        state[0] += ((predicted & actual) * w).sum()
        state[1] += (actual * w).sum()


_CLASSES = {
    "binary_accuracy": BinaryAccuracy,
    "categorical_accuracy": CategoricalAccuracy,
    "sparse_categorical_accuracy": SparseCategoricalAccuracy,
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "mean_absolute_error": MeanAbsoluteError,
    "precision": Precision,
    "recall": Recall,
}
ACCURACY_NAMES = ("accuracy", "acc")


def names() -> list[str]:
    return sorted(list(_CLASSES) + list(ACCURACY_NAMES))


def resolve_accuracy(loss, n_outputs: int, sparse_targets: bool) -> type[Metric]:
    """Keras's choice of accuracy for a loss and output/label shapes."""
    if loss.name == "binary_crossentropy" or n_outputs == 1:
        return BinaryAccuracy
    if sparse_targets or loss.sparse:
        return SparseCategoricalAccuracy
    return CategoricalAccuracy


def get(identifier, loss=None, n_outputs=None, sparse_targets=False) -> Metric:
    """Resolve a metric name or instance; "accuracy"/"acc" need loss and shapes."""
    if isinstance(identifier, Metric):
        return identifier
    if isinstance(identifier, str) and identifier.strip().lower() in ACCURACY_NAMES:
        return resolve_accuracy(loss, n_outputs, sparse_targets)(name=identifier.strip().lower())
    cls = lookup("metrics", "metric", identifier, _CLASSES)
    return cls(name=identifier.strip().lower())


def validate(identifier, argument: str = "metrics") -> None:
    """Raise early (at compile time) unless ``identifier`` is a metric name (``"accuracy"``
    included) or a Metric instance; the error names ``argument`` and lists the names."""
    if isinstance(identifier, Metric):
        return
    if not isinstance(identifier, str):
        raise TypeError(
            f"{argument}: expected metric names (str) or gpunn.metrics.Metric instances, "
            f"got {type(identifier).__name__} {identifier!r}"[:300]
        )
    if identifier.strip().lower() not in names():
        raise unknown_name_error(argument, "metric", identifier, names())


def check_list(given, argument: str = "metrics") -> list:
    """``given`` (None, or a list of metric names / Metric instances) as a list, each validated."""
    given = [] if given is None else given
    if isinstance(given, str) or not isinstance(given, (list, tuple)):
        raise TypeError(f"{argument}: expected a list of metric names, got {given!r}")
    for m in given:
        validate(m, argument)
    return list(given)
