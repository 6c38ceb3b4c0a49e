"""Activation functions by name, as Keras spells them.

Every member of :class:`gpunn.codes.Act` is an activation, named by its
lower-case member name (``Act.HARD_SIGMOID`` is ``"hard_sigmoid"``); the
fused kernels apply it in the matrix-product epilogue with the math of
:mod:`gpunn.opmath`.  ``softmax`` is a row-wise operation applied after the
product (and, before a cross-entropy loss, fused with the loss instead).
"""

from __future__ import annotations

import dataclasses
import math

from gpunn.checks import lookup
from gpunn.codes import Act

#: Keras's default negative slope for leaky_relu
LEAKY_RELU_ALPHA = Act.LEAKY_RELU.default_alpha


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    #: kernel epilogue code; softmax runs as Act.LINEAR followed by a row softmax
    code: int
    #: the activation's one parameter (leaky_relu's negative slope, elu's alpha)
    alpha: float = 0.0

    @property
    def is_softmax(self) -> bool:
        return self.name == "softmax"

    def get_config(self):
        if self.alpha == _default_alpha(self.name):
            return self.name
        return {"name": self.name, "alpha": self.alpha}


#: Spellings Keras also accepts, mapped to gpunn's names.
_ALIASES = {"none": "linear", "identity": "linear", "leakyrelu": "leaky_relu", "silu": "swish"}


def _codes() -> dict[str, int]:
    table = {act.math_name: act for act in Act}
    table["softmax"] = Act.LINEAR
    return table


def _default_alpha(name):
    table = _codes()
    return table[name].default_alpha if name in table and name != "softmax" else 0.0


def names() -> list[str]:
    return sorted(_codes())


def get(identifier, argument: str = "activation") -> Activation:
    """Resolve ``None``, a name, a ``{"name", "alpha"}`` dict, an Activation or one of this
    module's activation functions (``gpunn.activations.relu``)."""
    if identifier is None:
        return Activation("linear", Act.LINEAR)
    if isinstance(identifier, Activation):
        return identifier
    if callable(identifier) and getattr(identifier, "__module__", None) == __name__ and identifier.__name__ in _codes():
        return get(identifier.__name__, argument)
    if isinstance(identifier, dict):
        base = get(identifier.get("name"), argument)
        parameter = identifier.get("alpha", identifier.get("negative_slope"))
        if base.name in _PARAMETRISED and parameter is not None:
            return _PARAMETRISED[base.name](parameter)
        return base
    table = _codes()
    table.update({alias: table[name] for alias, name in _ALIASES.items()})
    code = lookup(argument, "activation", identifier, table)
    key = identifier.strip().lower()
    name = _ALIASES.get(key, key)
    return Activation(name, code, _default_alpha(name))


def _checked_alpha(alpha, argument, positive):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) and not hasattr(alpha, "__float__"):
        raise TypeError(f"{argument}: expected a number, got {type(alpha).__name__} {alpha!r}")
    value = float(alpha)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{argument}: expected a {'positive' if positive else 'non-negative'} finite number, got {alpha!r}")
    return value


def leaky_relu(negative_slope: float = LEAKY_RELU_ALPHA) -> Activation:
    """Leaky ReLU with ``negative_slope`` >= 0 (Keras's default 0.2): ``z`` for z > 0, else ``slope z``."""
    return Activation("leaky_relu", Act.LEAKY_RELU, _checked_alpha(negative_slope, "negative_slope", positive=False))


def elu(alpha: float = Act.ELU.default_alpha) -> Activation:
    """ELU with ``alpha`` > 0 (Keras's default 1.0): ``z`` for z > 0, else ``alpha (e^z - 1)``."""
    return Activation("elu", Act.ELU, _checked_alpha(alpha, "alpha", positive=True))


_PARAMETRISED = {"leaky_relu": leaky_relu, "elu": elu}


def _named(name):
    def activation():
        return get(name)

    activation.__name__ = activation.__qualname__ = name
    activation.__doc__ = f"The {name!r} activation (pass it, or its name, as ``activation=``)."
    return activation


# gpunn.activations.relu etc.: Keras's activation functions as objects that
# Dense(activation=...) accepts (the parametrised ones take their parameter).
for _name in names():
    if _name not in _PARAMETRISED:
        globals()[_name] = _named(_name)
silu = globals()["swish"]

__all__ = ["Activation", "get", "names", *names(), "silu"]
del _name
