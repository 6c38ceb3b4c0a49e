"""Losses, as Keras names them; each resolves to one fused backend loss kind.

The loss of a batch is ``sum_i w_i l_i / M`` (Keras's sum-over-batch-size
reduction; ``w_i`` are sample weights, 1 by default).  A sigmoid output with
binary cross-entropy, or a softmax output with a categorical cross-entropy,
is computed from the logits in one numerically stable step: the output layer
then produces logits and the activation is folded into the loss.
"""

from __future__ import annotations

import numpy as np

from gpunn import checks, codes
from gpunn.checks import lookup


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
    """Base class: a named loss with ``from_logits`` where meaningful."""

    name = ""
    sparse = False

    def __init__(self, from_logits: bool = False):
        self.from_logits = checks.boolean(from_logits, "from_logits")

    def resolve(self, output_activation: str) -> tuple[int, bool]:
        """(backend loss kind, whether the output activation is folded into it)."""
        raise NotImplementedError

    def prepare_targets(self, arr, n: int, outputs: int, argument: str = "y"):
        """Targets ``arr`` (finite floats, one row per sample) shaped and checked for this loss:
        (n, outputs), or (n,) class indices for a sparse loss.  ValueError naming ``argument``."""
        return np.ascontiguousarray(_dense_targets(arr, n, outputs, argument))

    def get_config(self):
        return {"name": self.name, "from_logits": self.from_logits}

    def __repr__(self):
        return f"{type(self).__name__}(from_logits={self.from_logits})"


class MeanSquaredError(Loss):
    name = "mean_squared_error"

    def resolve(self, output_activation):
        return codes.LOSS_MSE, False


class MeanAbsoluteError(Loss):
    name = "mean_absolute_error"

    def resolve(self, output_activation):
        return codes.LOSS_MAE, False


class BinaryCrossentropy(Loss):
    name = "binary_crossentropy"

    def prepare_targets(self, arr, n, outputs, argument="y"):
        arr = super().prepare_targets(arr, n, outputs, argument)
        outside = (arr < 0) | (arr > 1)
        if outside.any():
            raise ValueError(f"{argument}: binary_crossentropy expects labels in [0, 1], found {float(arr[outside][0])!r}")
        return arr

    def resolve(self, output_activation):
        if self.from_logits:
            return codes.LOSS_SIGMOID_BCE, False
        if output_activation == "sigmoid":
            return codes.LOSS_SIGMOID_BCE, True
        return codes.LOSS_BCE, False


class CategoricalCrossentropy(Loss):
    name = "categorical_crossentropy"

    def prepare_targets(self, arr, n, outputs, argument="y"):
        hint = "; for integer class labels use loss='sparse_categorical_crossentropy'"
        arr = np.ascontiguousarray(_dense_targets(arr, n, outputs, argument, hint))
        if (arr < 0).any():
            raise ValueError(f"{argument}: categorical_crossentropy expects non-negative (one-hot) labels, found {float(arr.min())!r}")
        return arr

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


_CLASSES = {
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "mean_absolute_error": MeanAbsoluteError,
    "binary_crossentropy": BinaryCrossentropy,
    "bce": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
}


def names() -> list[str]:
    return sorted(_CLASSES)


def get(identifier) -> Loss:
    """Resolve a name, a ``{"name", "from_logits"}`` config or a Loss instance."""
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, dict):
        cls = lookup("loss", "loss", identifier.get("name"), _CLASSES)
        return cls(from_logits=identifier.get("from_logits", False))
    if identifier is None:
        raise ValueError(f"loss: expected a loss name or Loss instance, got None; valid names: {', '.join(names())}")
    return lookup("loss", "loss", identifier, _CLASSES)()
