"""Weight initializers with Keras 3's names, classes, defaults and formulas.

An initializer is an object called as ``init(shape, dtype=None)`` (a NumPy
array), e.g. ``HeNormal()``, ``GlorotUniform(seed=3)``, ``Constant(0.1)``,
or its name (``"he_normal"``, ``"truncated_normal"``, ``"HeNormal"``...).
Values are drawn on the host in float64 and cast, so the same seed gives the
same weights on every backend.  An unseeded initializer draws from gpunn's
generator (reproducible under ``gpunn.set_seed``); a seeded one draws from its
own seed and returns the same values at every call, as Keras 3's do.

Fans of a shape: (n,) -> fan_in = fan_out = n; (in, out) -> in, out; larger
shapes multiply by the receptive field ``prod(shape[:-2])``.

A plain function is accepted too: Keras's ``f(shape, dtype=None)`` (called
with dtype "float64"), or ``f(shape, rng)`` with ``rng`` gpunn's NumPy Generator.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from gpunn import checks
from gpunn import random as grandom
from gpunn.checks import lookup

#: std of a standard normal truncated to [-2, 2]: dividing by it keeps the requested variance
TRUNCATED_NORMAL_STD = 0.87962566103423978


def compute_fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of ``shape``, as Keras computes them."""
    shape = tuple(shape)
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _truncated_normal(rng, shape, mean, stddev):
    """Normal(mean, stddev) with values beyond 2 stddev redrawn."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2
    return mean + out * stddev


def _seed(seed):
    if seed is None:
        return None
    return checks.positive_int(seed, "seed", minimum=0)


class Initializer:
    """Base class: ``sample(shape, rng)`` draws float64 values; calling the object draws with its seed."""

    seeded = False

    def sample(self, shape, rng):
        raise NotImplementedError

    def generator(self):
        seed = getattr(self, "seed", None)
        return grandom.generator() if seed is None else np.random.default_rng(seed)

    def __call__(self, shape, dtype=None):
        values = np.asarray(self.sample(tuple(shape), self.generator()), dtype=np.float64)
        return values.astype(dtype or "float32")

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Zeros(Initializer):
    def sample(self, shape, rng):
        return np.zeros(shape)


class Ones(Initializer):
    def sample(self, shape, rng):
        return np.ones(shape)


class Constant(Initializer):
    """Every value equal to ``value``."""

    def __init__(self, value=0.0):
        self.value = checks.number(value, "value")

    def sample(self, shape, rng):
        return np.full(shape, self.value)

    def get_config(self):
        return {"value": self.value}


class RandomNormal(Initializer):
    """Normal(mean, stddev)."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean = checks.number(mean, "mean")
        self.stddev = checks.number(stddev, "stddev", minimum=0)
        self.seed = _seed(seed)

    def sample(self, shape, rng):
        return rng.normal(self.mean, self.stddev, shape)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


class TruncatedNormal(RandomNormal):
    """Normal(mean, stddev) with values more than 2 stddev from the mean redrawn."""

    def sample(self, shape, rng):
        return _truncated_normal(rng, shape, self.mean, self.stddev)


class RandomUniform(Initializer):
    """Uniform on [minval, maxval)."""

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval = checks.number(minval, "minval")
        self.maxval = checks.number(maxval, "maxval")
        if self.maxval < self.minval:
            raise ValueError(f"maxval: expected maxval >= minval ({self.minval}), got {self.maxval}")
        self.seed = _seed(seed)

    def sample(self, shape, rng):
        return rng.uniform(self.minval, self.maxval, shape)

    def get_config(self):
        return {"minval": self.minval, "maxval": self.maxval, "seed": self.seed}


class VarianceScaling(Initializer):
    """Values of variance ``scale / n``, n = fan_in, fan_out or their mean (``mode``):
    "truncated_normal" (alias "normal"): truncated at 2 stddev, stddev sqrt(scale / n) / 0.8796...;
    "untruncated_normal": stddev sqrt(scale / n); "uniform": on [-sqrt(3 scale / n), sqrt(3 scale / n)]."""

    _MODES = ("fan_in", "fan_out", "fan_avg")
    _DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None):
        self.scale = checks.number(scale, "scale", minimum=0, allow_minimum=False)
        if mode not in self._MODES:
            raise ValueError(f"mode: expected one of {', '.join(self._MODES)}, got {mode!r}")
        distribution = distribution.lower() if isinstance(distribution, str) else distribution
        distribution = "truncated_normal" if distribution == "normal" else distribution
        if distribution not in self._DISTRIBUTIONS:
            raise ValueError(f"distribution: expected one of {', '.join(self._DISTRIBUTIONS)} (or 'normal'), got {distribution!r}")
        self.mode, self.distribution, self.seed = mode, distribution, _seed(seed)

    def sample(self, shape, rng):
        fan_in, fan_out = compute_fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        fan = max(1.0, fan)
        # one rounding per formula, so that e.g. glorot_uniform's limit is exactly sqrt(6 / (fan_in + fan_out))
        if self.distribution == "truncated_normal":
            return _truncated_normal(rng, shape, 0.0, math.sqrt(self.scale / fan) / TRUNCATED_NORMAL_STD)
        if self.distribution == "untruncated_normal":
            return rng.normal(0.0, math.sqrt(self.scale / fan), shape)
        limit = math.sqrt(3.0 * self.scale / fan)
        return rng.uniform(-limit, limit, shape)

    def get_config(self):
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution, "seed": self.seed}


class _Preset(VarianceScaling):
    """A VarianceScaling with fixed (scale, mode, distribution); its config is the seed alone."""

    preset = (1.0, "fan_in", "truncated_normal")

    def __init__(self, seed=None):
        super().__init__(*self.preset, seed=seed)

    def get_config(self):
        return {"seed": self.seed}


class GlorotUniform(_Preset):
    """Uniform on +-sqrt(6 / (fan_in + fan_out))."""

    preset = (1.0, "fan_avg", "uniform")


class GlorotNormal(_Preset):
    """Truncated normal, stddev sqrt(2 / (fan_in + fan_out)) / 0.8796..."""

    preset = (1.0, "fan_avg", "truncated_normal")


class HeNormal(_Preset):
    """Truncated normal, stddev sqrt(2 / fan_in) / 0.8796..."""

    preset = (2.0, "fan_in", "truncated_normal")


class HeUniform(_Preset):
    """Uniform on +-sqrt(6 / fan_in)."""

    preset = (2.0, "fan_in", "uniform")


class LecunNormal(_Preset):
    """Truncated normal, stddev sqrt(1 / fan_in) / 0.8796..."""

    preset = (1.0, "fan_in", "truncated_normal")


class LecunUniform(_Preset):
    """Uniform on +-sqrt(3 / fan_in)."""

    preset = (1.0, "fan_in", "uniform")


class Orthogonal(Initializer):
    """``gain`` times an orthogonal matrix: Q of the QR factorisation of a normal (rows, cols) matrix
    (rows = prod(shape[:-1])), signs fixed by diag(R); 2-D or larger shapes only."""

    def __init__(self, gain=1.0, seed=None):
        self.gain = checks.number(gain, "gain")
        self.seed = _seed(seed)

    def sample(self, shape, rng):
        if len(shape) < 2:
            raise ValueError(f"Orthogonal: expected a shape of 2 or more dimensions (e.g. a kernel), got {shape}")
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return self.gain * q.reshape(shape)

    def get_config(self):
        return {"gain": self.gain, "seed": self.seed}


class Identity(Initializer):
    """``gain`` times the (rectangular) identity matrix; 2-D shapes only."""

    def __init__(self, gain=1.0):
        self.gain = checks.number(gain, "gain")

    def sample(self, shape, rng):
        if len(shape) != 2:
            raise ValueError(f"Identity: expected a 2-D shape (rows, cols), got {shape}")
        return self.gain * np.eye(*shape)

    def get_config(self):
        return {"gain": self.gain}


_CLASSES = (
    Zeros, Ones, Constant, RandomNormal, TruncatedNormal, RandomUniform, VarianceScaling,
    GlorotUniform, GlorotNormal, HeNormal, HeUniform, LecunNormal, LecunUniform, Orthogonal, Identity,
)  # fmt: skip
_BY_CLASS_NAME = {cls.__name__: cls for cls in _CLASSES}
_TABLE = {
    "zeros": Zeros,
    "ones": Ones,
    "constant": Constant,
    "random_normal": RandomNormal,
    "truncated_normal": TruncatedNormal,
    "random_uniform": RandomUniform,
    "uniform": RandomUniform,
    "normal": RandomNormal,
    "variance_scaling": VarianceScaling,
    "glorot_uniform": GlorotUniform,
    "glorot_normal": GlorotNormal,
    "he_normal": HeNormal,
    "he_uniform": HeUniform,
    "lecun_normal": LecunNormal,
    "lecun_uniform": LecunUniform,
    "orthogonal": Orthogonal,
    "identity": Identity,
}
_LOOKUP = {**_TABLE, **{name.lower(): cls for name, cls in _BY_CLASS_NAME.items()}}

# Keras's lower-case names of the classes
zeros, ones, constant = Zeros, Ones, Constant
random_normal, truncated_normal, random_uniform = RandomNormal, TruncatedNormal, RandomUniform
variance_scaling, orthogonal, identity = VarianceScaling, Orthogonal, Identity
glorot_uniform, glorot_normal, he_normal, he_uniform = GlorotUniform, GlorotNormal, HeNormal, HeUniform
lecun_normal, lecun_uniform = LecunNormal, LecunUniform


def names() -> list[str]:
    return sorted(_TABLE)


def get(identifier, argument: str = "kernel_initializer"):
    """An initializer from a name, a class (instantiated with defaults), a config
    {"class_name", "config"}, an Initializer, or a function ``f(shape, rng)``."""
    if isinstance(identifier, Initializer):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Initializer):
        return identifier()
    if isinstance(identifier, dict):
        cls = _BY_CLASS_NAME.get(identifier.get("class_name"))
        config = identifier.get("config", {})
        if cls is None or not isinstance(config, dict):
            raise ValueError(
                f"{argument}: expected an initializer config {{'class_name': one of {', '.join(sorted(_BY_CLASS_NAME))}, "
                f"'config': {{...}}}}, got {identifier!r}"[:400]
            )
        try:
            return cls.from_config(config)
        except TypeError as exc:
            raise ValueError(f"{argument}: invalid {cls.__name__} config {config!r} ({exc})"[:400]) from None
    if callable(identifier):
        return identifier
    return lookup(argument, "initializer", identifier, _LOOKUP)()


def serialize(identifier):
    """An initializer as plain data: names stay names, objects become {"class_name", "config"};
    None for a plain function (code, which a model file does not hold)."""
    if isinstance(identifier, (str, dict)):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Initializer):
        identifier = identifier()
    if isinstance(identifier, Initializer):
        return {"class_name": type(identifier).__name__, "config": identifier.get_config()}
    return None


def _takes_dtype(fn) -> bool:
    """Whether a user initializer has Keras's signature ``(shape, dtype=None)`` rather than ``(shape, rng)``."""
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return len(parameters) >= 2 and parameters[1] == "dtype"


def deserialize(config):
    """The initializer :func:`serialize` described."""
    return get(config)


def initialize(identifier, shape, dtype, argument: str = "kernel_initializer"):
    """Draw an initial array of ``shape`` (float64 on the host, cast to ``dtype``)."""
    init = get(identifier, argument)
    shape = tuple(shape)
    if isinstance(init, Initializer):
        values = np.asarray(init.sample(shape, init.generator()), dtype=np.float64)
    elif _takes_dtype(init):  # Keras's signature: init(shape, dtype=None)
        values = np.asarray(init(shape, dtype="float64"), dtype=np.float64)
    else:
        values = np.asarray(init(shape, grandom.generator()), dtype=np.float64)
    if values.shape != shape:
        raise ValueError(f"{argument}: initializer returned shape {values.shape}, expected {shape}")
    return values.astype(dtype)
