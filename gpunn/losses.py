"""Losses, as Keras names them; each resolves to one fused backend loss kind.

The loss of a batch is ``sum_i w_i l_i / M`` (Keras's sum-over-batch-size
reduction; ``w_i`` are sample weights, 1 by default).  A sigmoid output with
binary cross-entropy, or a softmax output with a categorical cross-entropy,
is computed from the logits in one numerically stable step: the output layer
then produces logits and the activation is folded into the loss.

Every built-in loss runs as one fused backend pass whose math is in
:mod:`gpunn.opmath`.  A user-defined loss subclasses :class:`Loss` and
supplies ``call(y_true, y_pred)`` (the per-sample values, shape (M,)) and
``gradient(y_true, y_pred)`` (their derivative with respect to ``y_pred``,
(M, N)), both written with the array module ``self.xp`` (NumPy or CuPy)::

    class Quartic(gpunn.losses.Loss):
        name = "quartic"
        def call(self, y_true, y_pred):
            return ((y_pred - y_true) ** 4).mean(axis=1)
        def gradient(self, y_true, y_pred):
            return 4 * (y_pred - y_true) ** 3 / y_pred.shape[1]
"""

from __future__ import annotations

import functools
import inspect
import types

import numpy as np

from gpunn import checks, codes
from gpunn import metrics as metrics_mod
from gpunn.checks import lookup
from gpunn.metrics import is_binary_or_sparse_categorical

# Keras's function forms, ``fn(y_true, y_pred)`` -> per-sample values (M,); passed as ``loss=``
# each stands for the built-in loss of its name (and is saved by that name)
from gpunn.metrics import (  # noqa: F401
    binary_crossentropy,
    categorical_crossentropy,
    categorical_hinge,
    hinge,
    kl_divergence,
    kld,
    log_cosh,
    logcosh,
    mae,
    mape,
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    mean_squared_logarithmic_error,
    mse,
    msle,
    poisson,
    sparse_categorical_crossentropy,
    squared_hinge,
)


#: Keras's names for the reduction gpunn's losses apply: sum_i w_i l_i / M
_BATCH_MEAN_REDUCTIONS = ("sum_over_batch_size", "auto")


def _taking_keras_options(init):
    """``init`` also taking the options every Keras loss class takes: ``name`` and ``dtype``
    (accepted; gpunn logs the loss as ``loss`` and computes in the model's dtype), ``reduction``
    (only the batch mean gpunn computes), ``axis`` (-1) and ``ignore_class`` (None)."""

    @functools.wraps(init)
    def wrapped(self, *args, reduction="sum_over_batch_size", name=None, dtype=None, axis=-1, ignore_class=None, **kwargs):
        if reduction not in _BATCH_MEAN_REDUCTIONS:
            raise ValueError(
                f"reduction: gpunn's losses average over the batch (sum_i w_i l_i / M, Keras's 'sum_over_batch_size'); "
                f"got {reduction!r}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: expected a string, got {type(name).__name__}")
        if dtype is not None:
            checks.float_dtype(dtype)
        if axis not in (-1, 1):
            raise ValueError(f"axis: gpunn's losses reduce over the feature axis (-1), got {axis!r}")
        if ignore_class is not None:
            raise ValueError(f"ignore_class: not supported by gpunn (give those samples sample_weight 0 instead), got {ignore_class!r}")
        init(self, *args, **kwargs)

    return wrapped


def _dense_targets(arr, n, outputs, argument, hint=""):
    """``arr`` as (n, outputs): a 1-D array is one target per sample for a single output."""
    if arr.ndim == 1:
        if outputs != 1:
            raise ValueError(f"{argument}: the model has {outputs} outputs, so expected shape ({n}, {outputs}), got ({n},){hint}")
        arr = arr.reshape(n, 1)
    if arr.ndim != 2 or arr.shape[1] != outputs:
        raise ValueError(f"{argument}: expected shape ({n}, {outputs}) to match the model's {outputs} outputs, got {arr.shape}")
    return arr


class Loss:
    """Base class: a named loss with ``from_logits`` where meaningful.

    Built-in losses implement ``resolve``; user losses implement ``call`` and
    ``gradient`` instead (see the module docstring).
    """

    name = ""
    sparse = False
    #: the fused kind's parameter (Huber's delta); 0 for kinds without one
    param = 0.0
    #: the array module (numpy or cupy) a user loss computes with; set before each call
    xp = np

    @_taking_keras_options  # a user loss may call super().__init__(name=..., reduction=...) as in Keras
    def __init__(self, from_logits: bool = False):
        self.from_logits = checks.boolean(from_logits, "from_logits")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and cls.__module__ == __name__:  # gpunn's own losses (a user's keeps its signature)
            cls.__init__ = _taking_keras_options(init)

    def resolve(self, output_activation: str):
        """(backend loss kind, whether the output activation is folded into it); a user
        loss (one that defines ``call``) resolves to (None, False) and runs ``compute``."""
        if type(self).call is Loss.call:
            raise NotImplementedError(f"{type(self).__name__}: a Loss subclass must define call() and gradient()")
        return None, False

    def call(self, y_true, y_pred):
        """Per-sample loss values (M,) of a user loss."""
        raise NotImplementedError

    def gradient(self, y_true, y_pred):
        """d call(y_true, y_pred)[i] / d y_pred[i, j], shape (M, N), of a user loss."""
        raise NotImplementedError(f"{type(self).__name__}: a user loss must define gradient(y_true, y_pred)")

    def compute(self, xp, pred, target, weight, grad, sums):
        """A user loss's contribution, with the fused kinds' contract (see ``Backend.loss_grad``)."""
        self.xp = xp
        m = pred.shape[0]
        values = xp.asarray(self.call(target, pred), dtype=pred.dtype).reshape(-1)
        if values.shape[0] != m:
            raise ValueError(f"{type(self).__name__}.call: expected one loss value per sample ({m}), got shape {values.shape}")
        w = xp.ones(m, dtype=pred.dtype) if weight is None else weight
        sums[0] += (w * values).sum()
        if grad is not None:
            slope = xp.asarray(self.gradient(target, pred), dtype=pred.dtype)
            if slope.shape != pred.shape:
                raise ValueError(f"{type(self).__name__}.gradient: expected shape {pred.shape}, got {slope.shape}")
            grad[...] = slope * (w / pred.dtype.type(m))[:, None]
        return sums

    def prepare_targets(self, arr, n: int, outputs: int, argument: str = "y"):
        """Targets ``arr`` (finite floats, one row per sample) shaped and checked for this loss:
        (n, outputs), or (n,) class indices for a sparse loss.  ValueError naming ``argument``."""
        return np.ascontiguousarray(_dense_targets(arr, n, outputs, argument))

    def get_config(self):
        return {"name": self.name, "from_logits": self.from_logits}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class MeanSquaredError(Loss):
    name = "mean_squared_error"

    def resolve(self, output_activation):
        return codes.LOSS_MSE, False


class MeanAbsoluteError(Loss):
    name = "mean_absolute_error"

    def resolve(self, output_activation):
        return codes.LOSS_MAE, False


def _smoothing(value):
    return checks.number(value, "label_smoothing", minimum=0)


class BinaryCrossentropy(Loss):
    """Binary cross-entropy; ``label_smoothing`` moves targets towards 0.5: ``t (1 - s) + s / 2``."""

    name = "binary_crossentropy"

    def __init__(self, from_logits=False, label_smoothing=0.0):
        super().__init__(from_logits)
        self.label_smoothing = _smoothing(label_smoothing)
        if self.label_smoothing > 1:
            raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")

    def prepare_targets(self, arr, n, outputs, argument="y"):
        arr = super().prepare_targets(arr, n, outputs, argument)
        outside = (arr < 0) | (arr > 1)
        if outside.any():
            raise ValueError(f"{argument}: binary_crossentropy expects labels in [0, 1], found {float(arr[outside][0])!r}")
        if self.label_smoothing:
            arr = arr * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return arr

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}

    def resolve(self, output_activation):
        if self.from_logits:
            return codes.LOSS_SIGMOID_BCE, False
        if output_activation == "sigmoid":
            return codes.LOSS_SIGMOID_BCE, True
        return codes.LOSS_BCE, False


class CategoricalCrossentropy(Loss):
    """Categorical cross-entropy; ``label_smoothing`` mixes in the uniform distribution: ``t (1 - s) + s / N``."""

    name = "categorical_crossentropy"

    def __init__(self, from_logits=False, label_smoothing=0.0):
        super().__init__(from_logits)
        self.label_smoothing = _smoothing(label_smoothing)
        if self.label_smoothing > 1:
            raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")

    def prepare_targets(self, arr, n, outputs, argument="y"):
        hint = "; for integer class labels use loss='sparse_categorical_crossentropy'"
        arr = np.ascontiguousarray(_dense_targets(arr, n, outputs, argument, hint))
        if (arr < 0).any():
            raise ValueError(f"{argument}: categorical_crossentropy expects non-negative (one-hot) labels, found {float(arr.min())!r}")
        if self.label_smoothing:
            arr = arr * (1 - self.label_smoothing) + self.label_smoothing / outputs
        return arr

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}

    def resolve(self, output_activation):
        if self.from_logits:
            return codes.LOSS_SOFTMAX_CCE, False
        if output_activation == "softmax":
            return codes.LOSS_SOFTMAX_CCE, True
        return codes.LOSS_CCE, False


class SparseCategoricalCrossentropy(Loss):
    name = "sparse_categorical_crossentropy"
    sparse = True

    def prepare_targets(self, arr, n, outputs, argument="y"):
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(
                f"{argument}: {self.name} expects integer class labels of shape ({n},), got shape {arr.shape}; "
                "for one-hot labels use categorical_crossentropy"
            )
        invalid = (arr != np.round(arr)) | (arr < 0) | (arr >= outputs)
        if invalid.any():
            raise ValueError(f"{argument}: expected integer class labels in [0, {outputs}), found {float(arr[invalid][0])!r}")
        return np.ascontiguousarray(arr)

    def resolve(self, output_activation):
        if self.from_logits:
            return codes.LOSS_SOFTMAX_SPARSE_CCE, False
        if output_activation == "softmax":
            return codes.LOSS_SOFTMAX_SPARSE_CCE, True
        return codes.LOSS_SPARSE_CCE, False


class Crossentropy(Loss):
    """``loss="crossentropy"`` (or ``"ce"``): as in Keras 3 (``compile_utils.get_loss``), the
    cross-entropy is chosen from the shapes of the targets and the outputs -- binary for one
    output unit, sparse categorical when the targets are class indices (one dimension less than
    the outputs, or one column next to several outputs), categorical otherwise.

    The model picks it when it first sees targets (``fit``, ``evaluate``, ``*_on_batch``) and
    keeps that choice; until then a model with several outputs assumes one-hot targets.
    """

    name = "crossentropy"

    def __init__(self):
        super().__init__(False)
        #: the shape of the first targets seen, or None
        self.target_shape = None

    def choose(self, output_dim) -> Loss:
        """The cross-entropy for ``output_dim`` outputs and the targets seen so far."""
        target_shape = self.target_shape or (1, output_dim)
        is_binary, is_sparse = is_binary_or_sparse_categorical(target_shape, (1, output_dim))
        if is_binary:
            return BinaryCrossentropy()
        return SparseCategoricalCrossentropy() if is_sparse else CategoricalCrossentropy()

    def resolve(self, output_activation):
        raise TypeError("crossentropy: the model chooses the cross-entropy from the shapes (Crossentropy.choose) before resolving it")

    def get_config(self):
        return {"name": self.name}


class _Regression(Loss):
    """A fused elementwise (or row) loss of the model's outputs; no activation is folded in."""

    kind = None

    def __init__(self):
        super().__init__(False)

    def resolve(self, output_activation):
        return self.kind, False

    def get_config(self):
        return {"name": self.name}


class Huber(_Regression):
    """``e^2 / 2`` for |e| <= delta, else ``delta (|e| - delta / 2)``, e = y_pred - y_true (Keras: delta=1.0)."""

    name = "huber"
    kind = codes.LossKind.HUBER

    def __init__(self, delta=1.0):
        super().__init__()
        self.delta = checks.positive_number(delta, "delta")
        self.param = self.delta

    def get_config(self):
        return {"name": self.name, "delta": self.delta}


class LogCosh(_Regression):
    """``log(cosh(y_pred - y_true))``, averaged over the outputs."""

    name = "log_cosh"
    kind = codes.LossKind.LOG_COSH


class Poisson(_Regression):
    """``y_pred - y_true log(y_pred + eps)``, averaged over the outputs."""

    name = "poisson"
    kind = codes.LossKind.POISSON


class MeanAbsolutePercentageError(_Regression):
    """``100 |y_true - y_pred| / max(|y_true|, eps)``, averaged over the outputs."""

    name = "mean_absolute_percentage_error"
    kind = codes.LossKind.MAPE


class MeanSquaredLogarithmicError(_Regression):
    """``(log(max(y_pred, eps) + 1) - log(max(y_true, eps) + 1))^2``, averaged over the outputs."""

    name = "mean_squared_logarithmic_error"
    kind = codes.LossKind.MSLE


class KLDivergence(_Regression):
    """``sum y_true log(y_true / y_pred)`` over the outputs, both clipped to [eps, 1]."""

    name = "kl_divergence"
    kind = codes.LossKind.KL_DIVERGENCE


class CosineSimilarity(_Regression):
    """``-sum normalize(y_true) normalize(y_pred)`` over the outputs (axis=-1 only, as an MLP's)."""

    name = "cosine_similarity"
    kind = codes.LossKind.COSINE_SIMILARITY

    def __init__(self, axis=-1):
        super().__init__()
        if axis not in (-1, 1):
            raise ValueError(f"axis: an MLP's outputs are reduced along axis -1 (or 1), got {axis!r}")
        self.axis = -1

    def get_config(self):
        return {"name": self.name, "axis": self.axis}


class _HingeTargets(_Regression):
    """Hinge losses take targets in {-1, 1}; 0/1 labels are converted (``2 t - 1``) as Keras does."""

    def prepare_targets(self, arr, n, outputs, argument="y"):
        arr = super().prepare_targets(arr, n, outputs, argument)
        if np.isin(arr, (0.0, 1.0)).all():
            arr = 2.0 * arr - 1.0
        return arr


class Hinge(_HingeTargets):
    """``max(1 - y_true y_pred, 0)``, averaged over the outputs."""

    name = "hinge"
    kind = codes.LossKind.HINGE


class SquaredHinge(_HingeTargets):
    """``max(1 - y_true y_pred, 0)^2``, averaged over the outputs."""

    name = "squared_hinge"
    kind = codes.LossKind.SQUARED_HINGE


class CategoricalHinge(_Regression):
    """``max(max_j (1 - t_j) p_j - sum_j t_j p_j + 1, 0)`` for one-hot targets."""

    name = "categorical_hinge"
    kind = codes.LossKind.CATEGORICAL_HINGE


_CLASSES = {
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "mean_absolute_error": MeanAbsoluteError,
    "binary_crossentropy": BinaryCrossentropy,
    "bce": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "crossentropy": Crossentropy,
    "ce": Crossentropy,
    "huber": Huber,
    "log_cosh": LogCosh,
    "logcosh": LogCosh,
    "poisson": Poisson,
    "kl_divergence": KLDivergence,
    "kld": KLDivergence,
    "kullback_leibler_divergence": KLDivergence,
    "hinge": Hinge,
    "squared_hinge": SquaredHinge,
    "categorical_hinge": CategoricalHinge,
    "mean_absolute_percentage_error": MeanAbsolutePercentageError,
    "mape": MeanAbsolutePercentageError,
    "mean_squared_logarithmic_error": MeanSquaredLogarithmicError,
    "msle": MeanSquaredLogarithmicError,
    "cosine_similarity": CosineSimilarity,
}


def names() -> list[str]:
    return sorted(_CLASSES)


def get(identifier) -> Loss:
    """Resolve a name, a ``{"name", "from_logits"}`` config or a Loss instance."""
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, dict):
        config = dict(identifier)
        cls = lookup("loss", "loss", config.pop("name", None), _CLASSES)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - accepted)
        if unknown:
            raise ValueError(f"loss: {cls.name} takes {sorted(accepted) or 'no settings'}, got unknown {unknown}")
        return cls(**config)
    if identifier is None:
        raise ValueError(f"loss: expected a loss name or Loss instance, got None; valid names: {', '.join(names())}")
    if callable(identifier) and not isinstance(identifier, (str, type)):
        return _from_function(identifier)
    return lookup("loss", "loss", identifier, _CLASSES)()


def _from_function(fn) -> Loss:
    """The built-in loss a Keras function form stands for (``gpunn.losses.mean_squared_error``);
    a user's own function is refused: training needs its gradient, which gpunn cannot derive."""
    name = metrics_mod.serialize(fn) if isinstance(fn, types.FunctionType) else None
    if isinstance(name, str) and name in _CLASSES:
        return _CLASSES[name]()
    label = getattr(fn, "__name__", type(fn).__name__)
    raise TypeError(
        f"loss: got the function {label!r}; gpunn has no automatic differentiation, so a loss must also supply "
        "its gradient: subclass gpunn.losses.Loss with call(y_true, y_pred) (per-sample values) and "
        f"gradient(y_true, y_pred), or use a built-in loss name ({', '.join(names())})"
    )
