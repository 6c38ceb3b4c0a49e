"""Learning-rate schedules (``keras.optimizers.schedules``), evaluated on the host once per step.

A schedule is a callable of the optimizer's step count (its ``iterations``
before the update, as in Keras) returning the learning rate for that step;
pass one as ``learning_rate=`` to any optimizer.  Each ``get_config``
returns every constructor argument, so schedules are saved with the model and
a resumed training continues from the saved step count.
"""

from __future__ import annotations

import math

from gpunn import checks


class LearningRateSchedule:
    """Base class: ``__call__(step) -> learning rate``; subclasses define ``value``."""

    def __call__(self, step):
        step = checks.positive_int(step, "step", minimum=0)
        return float(self.value(step))

    def value(self, step: int) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _rate(value, argument):
    return checks.positive_number(value, argument)


def _steps(value, argument):
    return checks.positive_int(value, argument)


class _StepDecay(LearningRateSchedule):
    """Shared arguments of the decays of ``p = step / decay_steps`` (floored with ``staircase``)."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name=None):
        self.initial_learning_rate = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.decay_rate = checks.positive_number(decay_rate, "decay_rate", allow_zero=True)
        self.staircase = checks.boolean(staircase, "staircase")
        self.name = name or type(self).__name__

    def _progress(self, step):
        p = step / self.decay_steps
        return math.floor(p) if self.staircase else p

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class ExponentialDecay(_StepDecay):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (the exponent floored with ``staircase``)."""

    def value(self, step):
        return self.initial_learning_rate * self.decay_rate ** self._progress(step)


class InverseTimeDecay(_StepDecay):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (floored with ``staircase``)."""

    def value(self, step):
        return self.initial_learning_rate / (1 + self.decay_rate * self._progress(step))


class PolynomialDecay(LearningRateSchedule):
    """From ``initial_learning_rate`` to ``end_learning_rate`` over ``decay_steps`` along
    ``(1 - step / decay_steps) ** power``; then constant, or with ``cycle`` restarting with
    ``decay_steps`` stretched to the next multiple past ``step``."""

    def __init__(
        self,
        initial_learning_rate,
        decay_steps,
        end_learning_rate=0.0001,
        power=1.0,
        cycle=False,
        name="PolynomialDecay",
    ):
        self.initial_learning_rate = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.end_learning_rate = checks.positive_number(end_learning_rate, "end_learning_rate", allow_zero=True)
        self.power = checks.positive_number(power, "power")
        self.cycle = checks.boolean(cycle, "cycle")
        self.name = name

    def value(self, step):
        decay_steps = self.decay_steps
        if self.cycle:
            decay_steps = decay_steps * max(1, math.ceil(step / decay_steps))
        else:
            step = min(step, decay_steps)
        fraction = 1 - step / decay_steps
        return (self.initial_learning_rate - self.end_learning_rate) * fraction**self.power + self.end_learning_rate

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
            "name": self.name,
        }


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` for step <= boundaries[0], ``values[i]`` for boundaries[i-1] < step <= boundaries[i],
    ``values[-1]`` past the last boundary; ``len(values) == len(boundaries) + 1``."""

    def __init__(self, boundaries, values, name="PiecewiseConstantDecay"):
        if not isinstance(boundaries, (list, tuple)) or not boundaries:
            raise ValueError(f"boundaries: expected a non-empty list of step counts, got {boundaries!r}")
        if not isinstance(values, (list, tuple)) or len(values) != len(boundaries) + 1:
            raise ValueError(
                f"values: expected {len(boundaries) + 1} learning rates (one more than boundaries), got {values!r}"
            )
        self.boundaries = [checks.positive_int(b, "boundaries", minimum=0) for b in boundaries]
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"boundaries: expected strictly increasing step counts, got {boundaries!r}")
        self.values = [checks.positive_number(v, "values", allow_zero=True) for v in values]
        self.name = name

    def value(self, step):
        for boundary, rate in zip(self.boundaries, self.values):
            if step <= boundary:
                return rate
        return self.values[-1]

    def get_config(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values), "name": self.name}


class CosineDecay(LearningRateSchedule):
    """Cosine decay (Loshchilov & Hutter) to ``alpha * rate`` over ``decay_steps``, optionally after
    a linear warm-up from ``initial_learning_rate`` to ``warmup_target`` over ``warmup_steps``."""

    def __init__(
        self,
        initial_learning_rate,
        decay_steps,
        alpha=0.0,
        name="CosineDecay",
        warmup_target=None,
        warmup_steps=0,
    ):
        self.initial_learning_rate = checks.positive_number(initial_learning_rate, "initial_learning_rate", allow_zero=True)
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.alpha = checks.number(alpha, "alpha", minimum=0)
        self.name = name
        self.warmup_target = None if warmup_target is None else _rate(warmup_target, "warmup_target")
        self.warmup_steps = checks.positive_int(warmup_steps, "warmup_steps", minimum=0)

    def value(self, step):
        if self.warmup_target is None:
            top, decay_step = self.initial_learning_rate, step
        elif step < self.warmup_steps:
            fraction = step / self.warmup_steps
            return self.initial_learning_rate + (self.warmup_target - self.initial_learning_rate) * fraction
        else:
            top, decay_step = self.warmup_target, step - self.warmup_steps
        fraction = min(decay_step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1 + math.cos(math.pi * fraction))
        return top * ((1 - self.alpha) * cosine + self.alpha)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


_CLASSES = {
    cls.__name__: cls
    for cls in (ExponentialDecay, InverseTimeDecay, PolynomialDecay, PiecewiseConstantDecay, CosineDecay)
}


def serialize(schedule: LearningRateSchedule) -> dict:
    """``{"class_name", "config"}``, as Keras stores a schedule."""
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config) -> LearningRateSchedule:
    """Inverse of :func:`serialize`; ValueError naming ``learning_rate`` for an unknown class."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise ValueError(f"learning_rate: expected a schedule config {{'class_name', 'config'}}, got {config!r}")
    cls = checks.lookup("learning_rate", "learning-rate schedule", config.get("class_name"), {k.lower(): v for k, v in _CLASSES.items()})
    return cls.from_config(config["config"])
