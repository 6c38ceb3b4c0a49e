"""Losses, as Keras names them; each resolves to one fused backend loss kind.

The loss of a batch is ``sum_i w_i l_i / M`` (Keras's sum-over-batch-size
reduction; ``w_i`` are sample weights, 1 by default).  A sigmoid output with
binary cross-entropy, or a softmax output with a categorical cross-entropy,
is computed from the logits in one numerically stable step: the output layer
then produces logits and the activation is folded into the loss.
"""

from __future__ import annotations

from gpunn import codes
from gpunn._names import lookup


class Loss:
    """Base class: a named loss with ``from_logits`` where meaningful."""

    name = ""
    sparse = False

    def __init__(self, from_logits: bool = False):
        if not isinstance(from_logits, bool):
            raise TypeError(f"from_logits: expected a bool, got {from_logits!r}")
        self.from_logits = from_logits

    def resolve(self, output_activation: str) -> tuple[int, bool]:
        """(backend loss kind, whether the output activation is folded into it)."""
        raise NotImplementedError

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

    def resolve(self, output_activation):
        if self.from_logits:
            return codes.LOSS_SIGMOID_BCE, False
        if output_activation == "sigmoid":
            return codes.LOSS_SIGMOID_BCE, True
        return codes.LOSS_BCE, False


class CategoricalCrossentropy(Loss):
    name = "categorical_crossentropy"

    def resolve(self, output_activation):
        if self.from_logits:
            return codes.LOSS_SOFTMAX_CCE, False
        if output_activation == "softmax":
            return codes.LOSS_SOFTMAX_CCE, True
        return codes.LOSS_CCE, False


class SparseCategoricalCrossentropy(Loss):
    name = "sparse_categorical_crossentropy"
    sparse = True

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
        return cls(from_logits=bool(identifier.get("from_logits", False)))
    if identifier is None:
        raise ValueError(f"loss: expected a loss name or Loss instance, got None; valid names: {', '.join(names())}")
    return lookup("loss", "loss", identifier, _CLASSES)()
