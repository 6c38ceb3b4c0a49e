"""Optimizers (Keras 3 update rules) updating one flat parameter buffer.

All of a model's parameters live in one contiguous buffer (each layer's
kernel and bias are views into it), and so do their gradients and every
optimizer slot, so each update is a single fused backend call.

Gradient clipping as in Keras: ``clipvalue`` clips elementwise,
``clipnorm`` clips each variable's gradient to that L2 norm,
``global_clipnorm`` clips all gradients together to that norm.
"""

from __future__ import annotations

from gpunn import checks
from gpunn.checks import fraction, lookup, positive_number


class Optimizer:
    name = ""
    #: names of the per-parameter state buffers, in save order
    slot_names: tuple[str, ...] = ()

    def __init__(self, learning_rate=0.001, clipnorm=None, clipvalue=None, global_clipnorm=None):
        self.learning_rate = positive_number(learning_rate, "learning_rate")
        self.clipnorm = None if clipnorm is None else positive_number(clipnorm, "clipnorm")
        self.clipvalue = None if clipvalue is None else positive_number(clipvalue, "clipvalue")
        self.global_clipnorm = None if global_clipnorm is None else positive_number(global_clipnorm, "global_clipnorm")
        chosen = [k for k in ("clipnorm", "clipvalue", "global_clipnorm") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"{', '.join(chosen)}: set at most one of clipnorm, clipvalue and global_clipnorm (as Keras), got {len(chosen)}")
        self.iterations = 0
        self.slots: dict[str, object] = {}
        self._backend = None

    # learning_rate is validated on every assignment (ReduceLROnPlateau sets it)
    @property
    def learning_rate(self):
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._learning_rate = positive_number(value, "learning_rate")

    def build(self, backend, size: int, dtype) -> None:
        """Allocate zeroed state buffers for ``size`` parameters (a fresh start: step count 0)."""
        self._backend = backend
        self.iterations = 0
        self.slots = {name: backend.zeros((size,), dtype) for name in self.active_slots()}

    def active_slots(self) -> tuple[str, ...]:
        return self.slot_names

    @property
    def built(self) -> bool:
        return self._backend is not None

    def _clip(self, grads, segments, backend):
        xp = backend.xp
        if self.clipvalue is not None:
            xp.clip(grads, -self.clipvalue, self.clipvalue, out=grads)
        if self.clipnorm is not None:
            for start, stop in segments:
                g = grads[start:stop]
                norm = xp.sqrt((g * g).sum())
                g *= xp.minimum(1, self.clipnorm / xp.maximum(norm, 1e-12)).astype(grads.dtype)
        if self.global_clipnorm is not None:
            norm = xp.sqrt((grads * grads).sum())
            grads *= xp.minimum(1, self.global_clipnorm / xp.maximum(norm, 1e-12)).astype(grads.dtype)

    def apply(self, params, grads, segments, backend=None) -> None:
        """One update of the flat ``params`` (P,) from ``grads`` (P,).

        segments: (start, stop) of each variable in the flat buffers, used
        by per-variable clipping.  backend: the object making the numeric
        calls (by default the one the optimizer was built on; a stand-in
        such as a timing proxy may be passed).
        """
        backend = backend or self._backend
        if self.clipvalue is not None or self.clipnorm is not None or self.global_clipnorm is not None:
            self._clip(grads, segments, backend)
        self.iterations += 1
        self._update(params, grads, backend)

    def _update(self, params, grads, backend):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "learning_rate": self.learning_rate,
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
            "global_clipnorm": self.global_clipnorm,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config.pop("name", None)
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.momentum = fraction(momentum, "momentum")
        self.nesterov = checks.boolean(nesterov, "nesterov")

    def active_slots(self):
        return ("velocity",) if self.momentum > 0 else ()

    def _update(self, params, grads, backend):
        backend.sgd_update(
            params, grads, self.slots.get("velocity"), self.learning_rate, self.momentum, self.nesterov
        )

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    name = "adam"
    slot_names = ("m", "v")
    _default_weight_decay = 0.0

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = fraction(beta_1, "beta_1")
        self.beta_2 = fraction(beta_2, "beta_2")
        self.epsilon = positive_number(epsilon, "epsilon")
        wd = self._default_weight_decay if weight_decay is None else weight_decay
        self.weight_decay = positive_number(wd, "weight_decay", allow_zero=True)

    def _update(self, params, grads, backend):
        backend.adam_update(
            params,
            grads,
            self.slots["m"],
            self.slots["v"],
            self.learning_rate,
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.iterations,
            self.weight_decay,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "weight_decay": self.weight_decay,
        }


class AdamW(Adam):
    """Adam with decoupled weight decay (Keras default 0.004)."""

    name = "adamw"
    _default_weight_decay = 0.004


class RMSprop(Optimizer):
    name = "rmsprop"

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.rho = fraction(rho, "rho")
        self.momentum = fraction(momentum, "momentum")
        self.epsilon = positive_number(epsilon, "epsilon")
        self.centered = checks.boolean(centered, "centered")

    def active_slots(self):
        slots = ["velocity"]
        if self.centered:
            slots.append("average_gradient")
        if self.momentum > 0:
            slots.append("momentum")
        return tuple(slots)

    def _update(self, params, grads, backend):
        backend.rmsprop_update(
            params,
            grads,
            self.slots["velocity"],
            self.slots.get("average_gradient"),
            self.slots.get("momentum"),
            self.learning_rate,
            self.rho,
            self.momentum,
            self.epsilon,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "rho": self.rho,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "centered": self.centered,
        }


_CLASSES = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def names() -> list[str]:
    return sorted(_CLASSES)


def get(identifier) -> Optimizer:
    """Resolve a name (Keras defaults), a config dict, or an Optimizer instance."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        cls = lookup("optimizer", "optimizer", identifier.get("name"), _CLASSES)
        return cls.from_config(identifier)
    return lookup("optimizer", "optimizer", identifier, _CLASSES)()
