"""Weight regularizers (Keras's L1, L2, L1L2 and l1, l2, l1_l2): a penalty added to the loss.

penalty(W) = l1 * sum|W| + l2 * sum W^2; gradient l1 * sign(W) + 2 l2 W.
"""

from __future__ import annotations

import numpy as np

from gpunn import checks
from gpunn.checks import lookup


class Regularizer:
    """A weight penalty l1 * sum|W| + l2 * sum W^2 (base of L1, L2 and L1L2)."""

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
        return f"{type(self).__name__}(l1={self.l1}, l2={self.l2})"

    def __call__(self, x) -> float:
        """The penalty of a weight array ``x`` (host NumPy), as Keras's ``regularizer(x)``."""
        x = np.asarray(x, dtype=np.float64)
        return float(self.penalty(np, x))

    @classmethod
    def from_config(cls, config):
        """Inverse of get_config ({"l1": ..., "l2": ...}) for this class and its subclasses."""
        unknown = set(config) - {"l1", "l2"}
        if unknown:
            raise ValueError(f"config: expected a regularizer config with keys 'l1' and 'l2', got keys {sorted(unknown)}")
        regularizer = cls.__new__(cls)
        Regularizer.__init__(regularizer, config.get("l1", 0.0), config.get("l2", 0.0))
        return regularizer


class L1(Regularizer):
    """penalty = l1 * sum|W|."""

    def __init__(self, l1: float = 0.01):
        super().__init__(l1=l1)


class L2(Regularizer):
    """penalty = l2 * sum W^2."""

    def __init__(self, l2: float = 0.01):
        super().__init__(l2=l2)


class L1L2(Regularizer):
    """penalty = l1 * sum|W| + l2 * sum W^2 (Keras's class defaults: both 0)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        super().__init__(l1=l1, l2=l2)


def l1(l1: float = 0.01) -> L1:  # noqa: E741 - Keras's name
    """An L1 regularizer, l1 * sum|W| (Keras's default 0.01)."""
    return L1(l1)


def l2(l2: float = 0.01) -> L2:
    """An L2 regularizer, l2 * sum W^2 (Keras's default 0.01)."""
    return L2(l2)


def l1_l2(l1: float = 0.01, l2: float = 0.01) -> L1L2:  # noqa: E741
    """Both penalties, l1 * sum|W| + l2 * sum W^2 (Keras's defaults 0.01 each)."""
    return L1L2(l1, l2)


_TABLE = {"l1": l1, "l2": l2, "l1_l2": l1_l2, "l1l2": l1_l2}
_BY_CLASS_NAME = {cls.__name__: cls for cls in (Regularizer, L1, L2, L1L2)}


def get(identifier, argument: str = "kernel_regularizer"):
    """A regularizer from None, an instance, a name ("l1", "l2", "l1_l2": factors 0.01), a
    config {"l1": ..., "l2": ...} or {"class_name": "L2", "config": {"l2": ...}}."""
    if identifier is None or isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, dict):
        if "class_name" in identifier:
            cls = _BY_CLASS_NAME.get(identifier["class_name"])
            if cls is None or not isinstance(identifier.get("config", {}), dict):
                raise ValueError(f"{argument}: expected a regularizer config with class_name L1, L2 or L1L2, got {identifier!r}"[:300])
            return cls.from_config(identifier.get("config", {}))
        unknown = set(identifier) - {"l1", "l2"}
        if unknown:
            raise ValueError(f"{argument}: expected a regularizer config with keys 'l1' and 'l2', got keys {sorted(unknown)}")
        return Regularizer(identifier.get("l1", 0.0), identifier.get("l2", 0.0))
    if isinstance(identifier, type) and issubclass(identifier, Regularizer):
        return identifier()
    return lookup(argument, "regularizer", identifier, _TABLE)()


def serialize(regularizer):
    """A regularizer as plain data ({"class_name": "L2", "config": {"l1": ..., "l2": ...}}; None for None)."""
    if regularizer is None:
        return None
    regularizer = get(regularizer)
    return {"class_name": type(regularizer).__name__, "config": regularizer.get_config()}


def deserialize(config):
    """The regularizer :func:`serialize` described."""
    return get(config)
