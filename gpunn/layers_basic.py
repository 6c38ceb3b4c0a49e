"""Layers without weights: ``Activation`` (and ``ReLU``, ``LeakyReLU``, ``ELU``, ``Softmax``),
``Flatten``, ``Identity``, ``Rescaling``, ``Dropout`` and ``GaussianNoise`` (Keras 3 definitions).

Each is the forward (``call``) and its backward side by side; arrays are
(batch, features).  A layer that leaves its input unchanged returns the
input itself (no copy).
"""

from __future__ import annotations

import numpy as np

from gpunn import activations, checks, layers_ops
from gpunn.layer_base import Layer
from gpunn.random import DropoutSpec


def _copy_into(backend, src, dst):
    if dst is not None:
        dst[...] = src
    return dst


class Activation(Layer):
    """``y = activation(x)`` elementwise (softmax: per row).

    Accepted wherever Keras accepts an activation layer, including
    ``Dense(..., activation=layers.Activation("relu"))``.
    """

    rows_independent = True

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = activations.get(activation)

    @property
    def fused_activation(self):
        """The activation a Dense layer fuses when given this layer as ``activation=``."""
        return self.activation

    def call(self, backend, x, y, buffers, activation=None, training=False):
        act = self.activation if activation is None else activation
        if act.is_softmax:
            return backend.softmax(x, y)
        return backend.apply_activation(x, act.code, act.alpha, y)

    def backward(self, backend, x, dy, y, buffers, dx, activation=None):
        if dx is None:
            return
        act = self.activation if activation is None else activation
        if act.is_softmax:
            dx[...] = dy
            backend.softmax_backward(dx, y)
        elif act.name == "linear":
            dx[...] = dy
        else:
            layers_ops.activation_backward(backend, dy, y, x, act.code, act.alpha, dx)

    def get_config(self):
        return {**super().get_config(), "activation": self.activation.get_config()}


class LeakyReLU(Activation):
    """``x`` for x > 0, else ``negative_slope * x`` (Keras 3's layer default slope: 0.3)."""

    def __init__(self, negative_slope=0.3, **kwargs):
        kwargs.pop("activation", None)
        if "alpha" in kwargs:  # Keras 2's name for the slope, still accepted by Keras 3
            negative_slope = kwargs.pop("alpha")
        super().__init__(activations.leaky_relu(negative_slope), **kwargs)
        self.negative_slope = self.activation.alpha

    def get_config(self):
        config = super().get_config()
        config.pop("activation")
        return {**config, "negative_slope": self.negative_slope}


class ReLU(Activation):
    """``max(x, 0)``; ``max_value=6`` gives relu6 (other ReLU options are not supported)."""

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, **kwargs):
        kwargs.pop("activation", None)
        if threshold != 0.0:
            raise ValueError(f"threshold: gpunn's ReLU supports threshold=0.0 only, got {threshold!r}")
        if max_value is not None and negative_slope:
            raise ValueError("max_value, negative_slope: gpunn's ReLU supports one of them at a time")
        if max_value is not None and max_value != 6:
            raise ValueError(f"max_value: gpunn's ReLU supports max_value=None or 6 (relu6), got {max_value!r}")
        if max_value is not None:
            act = "relu6"
        else:
            act = activations.leaky_relu(negative_slope) if negative_slope else "relu"
        super().__init__(act, **kwargs)
        self.max_value, self.negative_slope = max_value, float(negative_slope)

    def get_config(self):
        config = super().get_config()
        config.pop("activation")
        return {**config, "max_value": self.max_value, "negative_slope": self.negative_slope}


class ELU(Activation):
    """``x`` for x > 0, else ``alpha * (exp(x) - 1)`` (Keras 3's ELU layer; alpha 1.0)."""

    def __init__(self, alpha=1.0, **kwargs):
        kwargs.pop("activation", None)
        super().__init__(activations.elu(alpha), **kwargs)
        self.alpha = self.activation.alpha

    def get_config(self):
        config = super().get_config()
        config.pop("activation")
        return {**config, "alpha": self.alpha}


class Softmax(Activation):
    """Row-wise softmax (``axis=-1``, the feature axis)."""

    def __init__(self, axis=-1, **kwargs):
        kwargs.pop("activation", None)
        if axis not in (-1, 1):
            raise ValueError(f"axis: gpunn's Softmax normalises the feature axis (-1), got {axis!r}")
        super().__init__("softmax", **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("activation")
        return {**config, "axis": -1}


class Flatten(Layer):
    """Flattens each sample to one feature vector (an n-D model input, declared with
    ``Input(shape=(h, w))`` or ``input_shape=``, is flattened as it enters the model)."""

    rows_independent = True

    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)

    def call(self, backend, x, y, buffers, activation=None, training=False):
        return x

    def backward(self, backend, x, dy, y, buffers, dx, activation=None):
        _copy_into(backend, dy, dx)


class Identity(Layer):
    """Passes its input through unchanged (Keras 3's ``Identity``)."""

    rows_independent = True

    def call(self, backend, x, y, buffers, activation=None, training=False):
        return x

    def backward(self, backend, x, dy, y, buffers, dx, activation=None):
        _copy_into(backend, dy, dx)


class Rescaling(Layer):
    """``y = x * scale + offset`` (Keras 3's ``Rescaling``, e.g. ``Rescaling(1 / 255)`` for pixel
    values); ``scale`` and ``offset`` are numbers (Keras also takes per-channel lists: not gpunn)."""

    rows_independent = True

    def __init__(self, scale, offset=0.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = checks.number(scale, "scale")
        self.offset = checks.number(offset, "offset")

    def call(self, backend, x, y, buffers, activation=None, training=False):
        xp = backend.xp
        xp.multiply(x, x.dtype.type(self.scale), out=y)
        return xp.add(y, y.dtype.type(self.offset), out=y)

    def backward(self, backend, x, dy, y, buffers, dx, activation=None):
        if dx is not None:
            backend.xp.multiply(dy, dy.dtype.type(self.scale), out=dx)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


def _rate(rate):
    return checks.number(rate, "rate", minimum=0.0, below=1.0)


class Dropout(Layer):
    """Inverted dropout: in training each input is zeroed with probability ``rate`` and the
    rest scaled by ``1 / (1 - rate)``; at inference the layer is the identity.

    Element (r, c) of a batch is kept when ``opmath.dropout_keep`` -- a
    Philox4x32-10 draw keyed by (``seed``, training step, ``r * features +
    c``) -- says so; ``gpunn.set_seed`` (which fixes the default seed) makes
    runs repeat, on either backend and whether or not the Dense before it
    applies the mask in its own fused call (it does in training, see
    ``Dense.folds``).  On its own the layer keeps the mask for the backward
    pass (``dx = dy * mask``).
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _rate(rate)
        if noise_shape is not None:
            raise ValueError(f"noise_shape: gpunn's Dropout draws one mask value per feature; got {noise_shape!r}")
        self.seed = layers_ops.draw_seed() if seed is None else checks.positive_int(seed, "seed", minimum=0)

    #: the mask is a pure function of the device step (TrainingPhase.step_array): replays draw anew
    graph_safe = True
    #: ...and of the element's place in the whole batch (TrainingPhase.first_row for a row shard)
    rows_independent = True

    def make_buffers(self, backend, batch, dtype, activation, training):
        return backend.empty((batch, self.input_dim), dtype) if training and self.rate > 0 else None

    def dropout_spec(self, backend, training) -> DropoutSpec:
        """The mask of this training step: rate, seed and the step as a backend int64 (1,) array."""
        step = getattr(training, "step_array", None)
        if step is None:
            step = backend.asarray(np.array([int(training.step)], np.int64))
        return DropoutSpec(self.rate, self.seed, step, getattr(training, "first_row", 0))

    def call(self, backend, x, y, mask, activation=None, training=False):
        if not training or self.rate == 0:
            return x
        backend.dropout(x, y, mask, self.dropout_spec(backend, training))
        return y

    def backward(self, backend, x, dy, y, mask, dx, activation=None):
        if dx is None:
            return
        if mask is None or self.rate == 0:
            dx[...] = dy
        else:
            backend.xp.multiply(dy, mask, out=dx)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


class GaussianNoise(Layer):
    """In training adds zero-mean Gaussian noise of standard deviation ``stddev``; identity at inference."""

    #: the noise is drawn by a generator keyed on the host (see layers_ops.normal)
    graph_safe = False

    def __init__(self, stddev, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.stddev = checks.number(stddev, "stddev", minimum=0.0)
        self.seed = layers_ops.draw_seed() if seed is None else checks.positive_int(seed, "seed", minimum=0)

    def call(self, backend, x, y, buffers, activation=None, training=False):
        if not training or self.stddev == 0:
            return x
        layers_ops.normal(backend, self.seed, training.step, y)
        y *= y.dtype.type(self.stddev)
        y += x
        return y

    def backward(self, backend, x, dy, y, buffers, dx, activation=None):
        _copy_into(backend, dy, dx)

    def get_config(self):
        return {**super().get_config(), "stddev": self.stddev, "seed": self.seed}
