"""Activation functions by name, as Keras spells them.

The fused kernels apply ``linear``, ``relu``, ``leaky_relu``, ``sigmoid``,
``tanh`` and ``gelu`` in the matrix-product epilogue; ``softmax`` is a
row-wise operation applied after the product (and, before a cross-entropy
loss, fused with the loss instead).
"""

from __future__ import annotations

import dataclasses

from gpunn import codes
from gpunn._names import lookup


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    #: kernel epilogue code; softmax runs as ACT_LINEAR followed by a row softmax
    code: int
    alpha: float = 0.0

    @property
    def is_softmax(self) -> bool:
        return self.name == "softmax"

    def get_config(self):
        return self.name if self.name != "leaky_relu" or self.alpha == 0.2 else {"name": self.name, "alpha": self.alpha}


_CODES = {
    "linear": codes.ACT_LINEAR,
    "relu": codes.ACT_RELU,
    "leaky_relu": codes.ACT_LEAKY_RELU,
    "sigmoid": codes.ACT_SIGMOID,
    "tanh": codes.ACT_TANH,
    "gelu": codes.ACT_GELU,
    "softmax": codes.ACT_LINEAR,
}
_ALIASES = {"none": "linear", "identity": "linear", "leakyrelu": "leaky_relu"}

#: Keras's default negative slope for leaky_relu
LEAKY_RELU_ALPHA = 0.2


def names() -> list[str]:
    return sorted(_CODES)


def get(identifier, argument: str = "activation") -> Activation:
    """Resolve ``None``, a name, a ``{"name", "alpha"}`` dict or an Activation."""
    if identifier is None:
        return Activation("linear", codes.ACT_LINEAR)
    if isinstance(identifier, Activation):
        return identifier
    if isinstance(identifier, dict):
        name = identifier.get("name")
        alpha = identifier.get("alpha", LEAKY_RELU_ALPHA)
        base = get(name, argument)
        if base.name != "leaky_relu":
            return base
        return leaky_relu(alpha)
    table = dict(_CODES)
    table.update({k: _CODES[v] for k, v in _ALIASES.items()})
    code = lookup(argument, "activation", identifier, table)
    name = _ALIASES.get(identifier.strip().lower(), identifier.strip().lower())
    return Activation(name, code, LEAKY_RELU_ALPHA if name == "leaky_relu" else 0.0)


def leaky_relu(alpha: float = LEAKY_RELU_ALPHA) -> Activation:
    """Leaky ReLU with negative slope ``alpha`` (``max(z, alpha z)`` for 0 <= alpha <= 1)."""
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"alpha: expected a non-negative slope, got {alpha!r}")
    return Activation("leaky_relu", codes.ACT_LEAKY_RELU, alpha)
