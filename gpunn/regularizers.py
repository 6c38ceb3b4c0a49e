"""Weight regularizers (Keras's L1, L2, L1L2): a penalty added to the loss.

penalty(W) = l1 * sum|W| + l2 * sum W^2; gradient l1 * sign(W) + 2 l2 W.
"""

from __future__ import annotations

from gpunn import checks
from gpunn.checks import lookup


class Regularizer:
    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        self.l1 = checks.positive_number(l1, "l1", allow_zero=True)
        self.l2 = checks.positive_number(l2, "l2", allow_zero=True)

    def penalty(self, xp, w):
        """The penalty as a 0-d backend array (no host synchronisation)."""
        total = xp.zeros((), dtype=w.dtype)
        if self.l1:
            total = total + self.l1 * xp.abs(w).sum()
        if self.l2:
            total = total + self.l2 * (w * w).sum()
        return total

    def add_gradient(self, xp, w, grad):
        """``grad += d penalty / dW`` in place."""
        if self.l1:
            grad += w.dtype.type(self.l1) * xp.sign(w)
        if self.l2:
            grad += w.dtype.type(2 * self.l2) * w

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}

    def __repr__(self):
        return f"L1L2(l1={self.l1}, l2={self.l2})"


def L1(l1: float = 0.01) -> Regularizer:  # noqa: N802 (Keras's spelling)
    return Regularizer(l1=l1)


def L2(l2: float = 0.01) -> Regularizer:  # noqa: N802
    return Regularizer(l2=l2)


def L1L2(l1: float = 0.0, l2: float = 0.0) -> Regularizer:  # noqa: N802
    return Regularizer(l1=l1, l2=l2)


_TABLE = {"l1": L1, "l2": L2, "l1_l2": lambda: L1L2(0.01, 0.01), "l1l2": lambda: L1L2(0.01, 0.01)}


def get(identifier, argument: str = "kernel_regularizer"):
    if identifier is None or isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, dict):
        return Regularizer(identifier.get("l1", 0.0), identifier.get("l2", 0.0))
    return lookup(argument, "regularizer", identifier, _TABLE)()
