"""Optimizers (Keras 3 update rules) updating one flat parameter buffer.

All of a model's parameters live in one contiguous buffer (each layer's
kernel and bias are views into it), and so do their gradients and the
optimizer's state (one row per slot), so each update is a single fused
backend call: ``backend.optimizer_update(code, params, grads, state, h)``
runs the optimizer's element update from :mod:`gpunn.opmath` over every
parameter, with the step's scalars ``h`` computed here on the host.

Every optimizer takes Keras's ``learning_rate`` (a number or a schedule from
:mod:`gpunn.optimizers.schedules`), ``weight_decay`` (decoupled, applied
before the update as Keras 3 does), and gradient clipping: ``clipvalue``
clips elementwise, ``clipnorm`` clips each variable's gradient to that L2
norm, ``global_clipnorm`` clips all gradients together to that norm.
"""

from __future__ import annotations

import math

from gpunn import checks, opmath
from gpunn.checks import fraction, lookup, positive_number
from gpunn.codes import Opt
from gpunn.optimizers import schedules
from gpunn.optimizers.schedules import LearningRateSchedule


class Optimizer:
    """Base class.  Subclasses set ``name`` and ``code`` and compute the step's scalars in ``_scalars``."""

    name = ""
    code: Opt = Opt.SGD
    #: initial value of each state row by slot name (0 when absent)
    _initial_values: dict[str, float] = {}

    def __init__(self, learning_rate=0.001, weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, name=None):  # fmt: skip
        # Keras's further options, accepted at the values that leave the update as it is, so that a
        # Keras script or a saved Keras config (get_config() lists them all) runs unchanged
        if use_ema is not False:
            raise ValueError(f"use_ema: gpunn keeps no moving average of the weights (Keras's EMA); expected False, got {use_ema!r}")
        if loss_scale_factor is not None:
            raise ValueError(f"loss_scale_factor: gpunn computes in float32/float64 and scales no loss; expected None, got {loss_scale_factor!r}")
        if gradient_accumulation_steps is not None:
            raise ValueError(
                f"gradient_accumulation_steps: gpunn updates after every batch; expected None, got {gradient_accumulation_steps!r} "
                "(a larger batch_size averages the gradient over more samples instead)"
            )
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name: expected a string (Keras's label of the optimizer), got {name!r}")
        del ema_momentum, ema_overwrite_frequency  # read by Keras only with use_ema=True
        self._learning_rate = None
        self.learning_rate = learning_rate
        self.weight_decay = None if weight_decay is None else positive_number(weight_decay, "weight_decay", allow_zero=True)
        self.clipnorm = None if clipnorm is None else positive_number(clipnorm, "clipnorm")
        self.clipvalue = None if clipvalue is None else positive_number(clipvalue, "clipvalue")
        self.global_clipnorm = None if global_clipnorm is None else positive_number(global_clipnorm, "global_clipnorm")
        chosen = [k for k in ("clipnorm", "clipvalue", "global_clipnorm") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"{', '.join(chosen)}: set at most one of clipnorm, clipvalue and global_clipnorm (as Keras), got {len(chosen)}")
        self.iterations = 0
        self.slots: dict[str, object] = {}
        self.state = None
        self._backend = None

    # -- learning rate --------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The learning rate of the next step (a schedule is evaluated at ``iterations``)."""
        if isinstance(self._learning_rate, LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        # validated on every assignment (ReduceLROnPlateau and LearningRateScheduler set it)
        if isinstance(value, LearningRateSchedule):
            self._learning_rate = value
            return
        # 0 is a rate as Keras takes it (a schedule callback decaying to zero, a frozen phase)
        rate = positive_number(value, "learning_rate", allow_zero=True)
        if isinstance(self._learning_rate, LearningRateSchedule):
            if rate == self.learning_rate:  # restoring the value the schedule gives now
                return
            raise TypeError(
                "learning_rate: this optimizer follows a LearningRateSchedule, so its learning rate cannot be "
                f"set to a number ({value!r}); pass a new schedule or a number to the constructor instead"
            )
        self._learning_rate = rate

    @property
    def learning_rate_schedule(self) -> LearningRateSchedule | None:
        return self._learning_rate if isinstance(self._learning_rate, LearningRateSchedule) else None

    # -- state ------------------------------------------------------------------
    def active_slots(self) -> tuple[str, ...]:
        """The state rows this configuration reads and writes (a prefix-closed subset of ``code.slots``)."""
        return self.code.slots

    def build(self, backend, size: int, dtype) -> None:
        """Allocate the state for ``size`` parameters (a fresh start: step count 0).

        ``state`` is one (rows, size) buffer with a row per slot up to the
        last active one; ``slots`` maps each active slot's name to its row.
        """
        self._backend = backend
        self.iterations = 0
        active = self.active_slots()
        rows = 1 + max((self.code.slots.index(name) for name in active), default=0)
        self.state = backend.zeros((rows, size), dtype)
        self.slots = {name: self.state[self.code.slots.index(name)] for name in active}
        for name, value in self._initial_values.items():
            if name in self.slots and value:
                self.slots[name][...] = value

    @property
    def built(self) -> bool:
        return self._backend is not None

    # -- the update -------------------------------------------------------------------
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

    def step_scalars(self) -> tuple:
        """The scalars h of the next step (``opmath.OPTIMIZER_SCALARS`` floats): the weight-decay
        factor ``1 - lr * weight_decay``, then the optimizer's own (see its ``opmath`` step)."""
        lr = self.learning_rate
        decay = 1.0 - lr * (self.weight_decay or 0.0)
        h = (decay, *self._scalars(lr, self.iterations + 1))
        return h + (0.0,) * (opmath.OPTIMIZER_SCALARS - len(h))

    def _scalars(self, lr: float, t: int) -> tuple:
        raise NotImplementedError

    def apply(self, params, grads, segments, backend=None, hyper=None) -> None:
        """One update of the flat ``params`` (P,) from ``grads`` (P,).

        segments: (start, stop) of each variable in the flat buffers, used
        by per-variable clipping.  backend: the object making the numeric
        calls (by default the one the optimizer was built on; a stand-in
        such as a timing proxy may be passed).  hyper: None, or a backend
        array already holding this step's :meth:`step_scalars` (the training
        step's device-resident record), which the update then reads.
        """
        backend = backend or self._backend
        if self.clipvalue is not None or self.clipnorm is not None or self.global_clipnorm is not None:
            self._clip(grads, segments, backend)
        h = self.step_scalars() if hyper is None else hyper
        backend.optimizer_update(self.code, params, grads, self.state, h)
        self.iterations += 1

    # -- config -------------------------------------------------------------------
    def get_config(self) -> dict:
        schedule = self.learning_rate_schedule
        return {
            "name": self.name,
            "learning_rate": schedules.serialize(schedule) if schedule is not None else self._learning_rate,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
            "global_clipnorm": self.global_clipnorm,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config.pop("name", None)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum."""

    name = "sgd"

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.momentum = fraction(momentum, "momentum")
        self.nesterov = checks.boolean(nesterov, "nesterov")

    @property
    def code(self):
        return Opt.SGD_NESTEROV if self.nesterov and self.momentum > 0 else Opt.SGD

    def active_slots(self):
        return ("velocity",) if self.momentum > 0 else ()

    def _scalars(self, lr, t):
        return lr, self.momentum, 1.0 if self.momentum > 0 else 0.0

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class _Moments(Optimizer):
    """Shared arguments of the optimizers with Adam's moment estimates (beta_1, beta_2, epsilon)."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = fraction(beta_1, "beta_1")
        self.beta_2 = fraction(beta_2, "beta_2")
        self.epsilon = positive_number(epsilon, "epsilon")

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


class Adam(_Moments):
    name = "adam"
    code = Opt.ADAM

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, weight_decay=None, **kwargs):
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay=weight_decay, **kwargs)
        self.amsgrad = checks.boolean(amsgrad, "amsgrad")

    def active_slots(self):
        return ("m", "v", "v_hat") if self.amsgrad else ("m", "v")

    def _scalars(self, lr, t):
        lr_t = lr * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)
        return lr_t, 1 - self.beta_1, 1 - self.beta_2, self.epsilon, 1.0 if self.amsgrad else 0.0

    def get_config(self):
        return {**super().get_config(), "amsgrad": self.amsgrad}


class AdamW(Adam):
    """Adam with decoupled weight decay (Keras default 0.004)."""

    name = "adamw"
    code = Opt.ADAMW

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, **kwargs):
        if weight_decay is None:
            raise ValueError("weight_decay: AdamW expects a non-negative number, got None")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay=weight_decay, **kwargs)


class RMSprop(Optimizer):
    name = "rmsprop"
    code = Opt.RMSPROP

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

    def _scalars(self, lr, t):
        centered, use_momentum = float(self.centered), float(self.momentum > 0)
        return lr, self.rho, 1 - self.rho, self.momentum, self.epsilon, centered, use_momentum

    def get_config(self):
        return {
            **super().get_config(),
            "rho": self.rho,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "centered": self.centered,
        }


class Nadam(_Moments):
    """Adam with Nesterov momentum and Keras's momentum schedule ``u_t = b1 (1 - 0.96^t / 2)``."""

    name = "nadam"
    code = Opt.NADAM

    def _u(self, t):
        return self.beta_1 * (1.0 - 0.5 * 0.96**t)

    def _scalars(self, lr, t):
        # the running product U_t = u_1 ... u_t, from the step count so that a
        # restored optimizer (iterations loaded from a file) continues exactly
        u_product = math.prod(self._u(s) for s in range(1, t + 1))
        u_t, u_next = self._u(t), self._u(t + 1)
        momentum_weight = u_next / (1 - u_product * u_next)
        gradient_weight = (1 - u_t) / (1 - u_product)
        return lr, 1 - self.beta_1, 1 - self.beta_2, self.epsilon, momentum_weight, gradient_weight, 1 - self.beta_2**t


class Adagrad(Optimizer):
    name = "adagrad"
    code = Opt.ADAGRAD

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.initial_accumulator_value = positive_number(initial_accumulator_value, "initial_accumulator_value", allow_zero=True)
        self.epsilon = positive_number(epsilon, "epsilon")
        self._initial_values = {"accumulator": self.initial_accumulator_value}

    def _scalars(self, lr, t):
        return lr, self.epsilon

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value, "epsilon": self.epsilon}


class Adadelta(Optimizer):
    name = "adadelta"
    code = Opt.ADADELTA

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.rho = fraction(rho, "rho")
        self.epsilon = positive_number(epsilon, "epsilon")

    def _scalars(self, lr, t):
        return lr, self.rho, 1 - self.rho, self.epsilon

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


class Adamax(_Moments):
    """Adam with the infinity norm."""

    name = "adamax"
    code = Opt.ADAMAX

    def _scalars(self, lr, t):
        return lr, 1 - self.beta_1, self.beta_2, self.epsilon, 1 - self.beta_1**t


class Lion(Optimizer):
    """EvoLved Sign Momentum (Chen et al. 2023): the update is the sign of an interpolated momentum."""

    name = "lion"
    code = Opt.LION

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = checks.number(beta_1, "beta_1", minimum=0, allow_minimum=False)
        if self.beta_1 > 1:
            raise ValueError(f"beta_1: expected a number in (0, 1], got {beta_1!r}")
        self.beta_2 = fraction(beta_2, "beta_2")

    def _scalars(self, lr, t):
        return lr, self.beta_1, 1 - self.beta_1, self.beta_2, 1 - self.beta_2

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2}


class Ftrl(Optimizer):
    """Follow-the-regularized-leader, as Keras 3 implements it."""

    name = "ftrl"
    code = Opt.FTRL

    def __init__(
        self,
        learning_rate=0.001,
        learning_rate_power=-0.5,
        initial_accumulator_value=0.1,
        l1_regularization_strength=0.0,
        l2_regularization_strength=0.0,
        l2_shrinkage_regularization_strength=0.0,
        beta=0.0,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.learning_rate_power = checks.number(learning_rate_power, "learning_rate_power")
        if self.learning_rate_power > 0:
            raise ValueError(f"learning_rate_power: expected a number <= 0, got {learning_rate_power!r}")
        self.initial_accumulator_value = positive_number(initial_accumulator_value, "initial_accumulator_value", allow_zero=True)
        self.l1_regularization_strength = positive_number(l1_regularization_strength, "l1_regularization_strength", allow_zero=True)
        self.l2_regularization_strength = positive_number(l2_regularization_strength, "l2_regularization_strength", allow_zero=True)
        self.l2_shrinkage_regularization_strength = positive_number(
            l2_shrinkage_regularization_strength, "l2_shrinkage_regularization_strength", allow_zero=True
        )
        self.beta = positive_number(beta, "beta", allow_zero=True)
        self._initial_values = {"accumulator": self.initial_accumulator_value}

    def _scalars(self, lr, t):
        return (
            lr,
            -self.learning_rate_power,
            self.l1_regularization_strength,
            2 * (self.l2_regularization_strength + self.beta / (2.0 * lr)),
            2 * self.l2_shrinkage_regularization_strength,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "learning_rate_power": self.learning_rate_power,
            "initial_accumulator_value": self.initial_accumulator_value,
            "l1_regularization_strength": self.l1_regularization_strength,
            "l2_regularization_strength": self.l2_regularization_strength,
            "l2_shrinkage_regularization_strength": self.l2_shrinkage_regularization_strength,
            "beta": self.beta,
        }


_CLASSES = {
    cls.name: cls for cls in (SGD, Adam, AdamW, RMSprop, Nadam, Adagrad, Adadelta, Adamax, Lion, Ftrl)
}


def names() -> list[str]:
    return sorted(_CLASSES)


def get(identifier) -> Optimizer:
    """Resolve a name (Keras defaults), a config dict, or an Optimizer instance."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        if "class_name" in identifier:  # Keras's serialized form: {"class_name": "Adam", "config": {...}, ...}
            config = identifier.get("config") or {}
            if not isinstance(config, dict):
                raise ValueError(f"optimizer: the 'config' of a serialized optimizer must be a dict, got {config!r}")
            cls = lookup("optimizer", "optimizer", identifier["class_name"], _CLASSES)
            return cls.from_config(config)
        cls = lookup("optimizer", "optimizer", identifier.get("name"), _CLASSES)
        return cls.from_config(identifier)
    return lookup("optimizer", "optimizer", identifier, _CLASSES)()


__all__ = ["Optimizer", "get", "names", "schedules", *(cls.__name__ for cls in _CLASSES.values())]
