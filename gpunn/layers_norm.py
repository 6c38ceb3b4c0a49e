"""Normalization layers: ``BatchNormalization``, ``LayerNormalization`` and
``Normalization`` (with ``adapt``), with Keras 3's definitions and defaults.

All act on (batch, features) arrays with whole-array operations of the
backend's array module (NumPy or CuPy).  Their statistics that are not
trained (BatchNormalization's moving mean and variance, Normalization's
mean, variance and count) are non-trainable weights in the model's flat
buffer: saved with the model, never touched by the optimizer.
"""

from __future__ import annotations

import numpy as np

from gpunn import checks, initializers, regularizers
from gpunn.layer_base import Layer, WeightSpec


class _Scratch:
    """What a normalization's backward needs from its forward: the normalised inputs
    ``xhat`` (B, N) and the inverse standard deviation ``inv``."""

    def __init__(self, backend, batch, features, dtype, per_row):
        self.xhat = backend.empty((batch, features), dtype)
        self.inv = backend.empty((batch, 1) if per_row else (features,), dtype)
        self.batch_stats = False

    def rows(self, lo, hi):
        """Rows [lo, hi) of per-row scratch (views)."""
        view = object.__new__(_Scratch)
        view.xhat, view.inv, view.batch_stats = self.xhat[lo:hi], self.inv[lo:hi], self.batch_stats
        return view


def _axis(axis):
    if axis not in (-1, 1):
        raise ValueError(f"axis: gpunn's layers normalise the feature axis (-1), got {axis!r}")
    return -1


class _AffineNormalization(Layer):
    """Shared parts of Batch- and LayerNormalization: optional ``gamma`` (scale) and ``beta`` (center)."""

    def __init__(self, axis, epsilon, center, scale, beta_initializer, gamma_initializer,
                 beta_regularizer, gamma_regularizer, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.axis = _axis(axis)
        self.epsilon = checks.positive_number(epsilon, "epsilon")
        self.center = checks.boolean(center, "center")
        self.scale = checks.boolean(scale, "scale")
        initializers.get(beta_initializer, "beta_initializer")
        initializers.get(gamma_initializer, "gamma_initializer")
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.beta_regularizer = regularizers.get(beta_regularizer, "beta_regularizer")
        self.gamma_regularizer = regularizers.get(gamma_regularizer, "gamma_regularizer")

    def affine_specs(self, n):
        specs = []
        if self.scale:
            specs.append(WeightSpec("gamma", (n,), self.gamma_initializer))
        if self.center:
            specs.append(WeightSpec("beta", (n,), self.beta_initializer))
        return specs

    def regularized_weights(self):
        if not self.trainable:
            return []
        pairs = ((self.gamma_regularizer, "gamma"), (self.beta_regularizer, "beta"))
        return [(reg, self.weight(attr), self.gradient(attr)) for reg, attr in pairs if reg is not None and self.weight(attr) is not None]

    def affine(self, xp, xhat, y):
        """``y = gamma * xhat + beta``."""
        gamma, beta = self.weight("gamma"), self.weight("beta")
        if gamma is not None:
            xp.multiply(xhat, gamma, out=y)
        elif y is not xhat:
            y[...] = xhat
        if beta is not None:
            y += beta
        return y

    def affine_gradients(self, xp, dy, xhat):
        """dL/dgamma = sum over the batch of dy * xhat; dL/dbeta = sum of dy."""
        if self.scale:
            xp.sum(dy * xhat, axis=0, out=self.gradient("gamma"))
        if self.center:
            xp.sum(dy, axis=0, out=self.gradient("beta"))

    def scaled_dy(self, dy):
        gamma = self.weight("gamma")
        return dy if gamma is None else dy * gamma

    def input_gradient(self, dy, scratch, dx, axis):
        """``dx = inv * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = gamma * dy``, the means
        taken over ``axis`` (0: the batch, for batch statistics; 1: each row's features)."""
        g, xhat = self.scaled_dy(dy), scratch.xhat
        dx[...] = scratch.inv * (g - g.mean(axis=axis, keepdims=True) - xhat * (g * xhat).mean(axis=axis, keepdims=True))

    def get_config(self):
        reg = {k: None if getattr(self, k) is None else getattr(self, k).get_config() for k in ("beta_regularizer", "gamma_regularizer")}
        # a callable initializer is not data: the config names the default instead (as Dense does)
        names = {k: v if isinstance(v, str) else d for k, v, d in (("beta_initializer", self.beta_initializer, "zeros"),
                                                                  ("gamma_initializer", self.gamma_initializer, "ones"))}  # fmt: skip
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon, "center": self.center, "scale": self.scale, **names, **reg}


class BatchNormalization(_AffineNormalization):
    """Normalises each feature over the batch: ``gamma * (x - mean) / sqrt(var + epsilon) + beta``.

    In training (and while the layer is trainable) mean and var are the
    batch's (biased variance), and the moving statistics follow
    ``moving = moving * momentum + batch * (1 - momentum)``; at inference,
    and for a frozen layer (``trainable = False``, as in Keras 3), the moving
    statistics are used.  Weights: gamma, beta (trainable), moving_mean,
    moving_variance (non-trainable), in that order.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=0.001, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, **kwargs):  # fmt: skip
        super().__init__(axis, epsilon, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                         gamma_regularizer, **kwargs)  # fmt: skip
        self.momentum = checks.number(momentum, "momentum", minimum=0.0)
        if self.momentum > 1:
            raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
        initializers.get(moving_mean_initializer, "moving_mean_initializer")
        initializers.get(moving_variance_initializer, "moving_variance_initializer")
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer

    def weight_specs(self, input_dim):
        return self.affine_specs(input_dim) + [
            WeightSpec("moving_mean", (input_dim,), self.moving_mean_initializer, trainable=False),
            WeightSpec("moving_variance", (input_dim,), self.moving_variance_initializer, trainable=False),
        ]

    def make_buffers(self, backend, batch, dtype, activation, training):
        return _Scratch(backend, batch, self.input_dim, dtype, per_row=False) if training else None

    def call(self, backend, x, y, scratch, activation=None, training=False):
        xp = backend.xp
        if training and self.trainable:
            mean = x.mean(axis=0)
            var = x.var(axis=0)
            m = x.dtype.type(self.momentum)
            mm, mv = self.weight("moving_mean"), self.weight("moving_variance")
            mm[...] = mm * m + mean * (1 - m)
            mv[...] = mv * m + var * (1 - m)
        else:
            mean, var = self.weight("moving_mean"), self.weight("moving_variance")
        inv = 1 / xp.sqrt(var + x.dtype.type(self.epsilon))
        if scratch is None:
            return self.affine(xp, (x - mean) * inv, y)
        scratch.batch_stats = bool(training and self.trainable)
        scratch.inv[...] = inv
        xp.multiply(x - mean, inv, out=scratch.xhat)
        return self.affine(xp, scratch.xhat, y)

    def backward(self, backend, x, dy, y, scratch, dx, activation=None):
        xp = backend.xp
        self.affine_gradients(xp, dy, scratch.xhat)
        if dx is None:
            return
        if not scratch.batch_stats:
            xp.multiply(self.scaled_dy(dy), scratch.inv, out=dx)
            return
        self.input_gradient(dy, scratch, dx, axis=0)

    def get_config(self):
        names = {k: v if isinstance(v, str) else d for k, v, d in (("moving_mean_initializer", self.moving_mean_initializer, "zeros"),
                                                                  ("moving_variance_initializer", self.moving_variance_initializer, "ones"))}  # fmt: skip
        return {**super().get_config(), "momentum": self.momentum, **names}


class LayerNormalization(_AffineNormalization):
    """Normalises each sample over its features: ``gamma * (x - mean) / sqrt(var + epsilon) + beta``
    with the mean and (biased) variance of the row; the same in training and inference."""

    rows_independent = True

    def __init__(self, axis=-1, epsilon=0.001, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None, **kwargs):  # fmt: skip
        super().__init__(axis, epsilon, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                         gamma_regularizer, **kwargs)  # fmt: skip

    def weight_specs(self, input_dim):
        return self.affine_specs(input_dim)

    def make_buffers(self, backend, batch, dtype, activation, training):
        return _Scratch(backend, batch, self.input_dim, dtype, per_row=True) if training else None

    def buffer_rows(self, scratch, lo, hi):
        return None if scratch is None else scratch.rows(lo, hi)

    def call(self, backend, x, y, scratch, activation=None, training=False):
        xp = backend.xp
        mean = x.mean(axis=1, keepdims=True)
        inv = 1 / xp.sqrt(x.var(axis=1, keepdims=True) + x.dtype.type(self.epsilon))
        if scratch is None:
            return self.affine(xp, (x - mean) * inv, y)
        scratch.inv[...] = inv
        xp.multiply(x - mean, inv, out=scratch.xhat)
        return self.affine(xp, scratch.xhat, y)

    def backward(self, backend, x, dy, y, scratch, dx, activation=None):
        xp = backend.xp
        self.affine_gradients(xp, dy, scratch.xhat)
        if dx is None:
            return
        self.input_gradient(dy, scratch, dx, axis=1)


class Normalization(Layer):
    """Feature-wise standardisation with statistics learnt by ``adapt(data)``:
    ``(x - mean) / max(sqrt(variance), 1e-7)`` (``invert=True``: the inverse).

    ``mean`` and ``variance`` may also be given.  Weights (non-trainable):
    mean (N,), variance (N,), count () -- the number of samples adapted on.
    ``axis=None`` (Keras: one mean and variance over every value) adapts
    scalar statistics, held in every feature's entry.
    """

    EPSILON = 1e-7  # Keras's backend.epsilon()
    #: fixed statistics in training too (nothing over the batch, no weight gradients, no
    #: scratch): a Keras tabular model starting with it trains in row shards like the rest
    rows_independent = True

    def __init__(self, axis=-1, mean=None, variance=None, invert=False, **kwargs):
        super().__init__(**kwargs)
        self.axis = None if axis is None else _axis(axis)
        self.invert = checks.boolean(invert, "invert")
        if (mean is None) != (variance is None):
            raise ValueError("mean, variance: give both or neither")
        self._pending = None
        if mean is not None:
            mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
            variance = np.atleast_1d(np.asarray(variance, dtype=np.float64))
            checks.finite(mean, "mean")
            checks.finite(variance, "variance")
            if mean.ndim != 1 or variance.shape != mean.shape or (variance < 0).any():
                raise ValueError(f"mean, variance: expected two equal-length vectors (variance >= 0), got shapes {mean.shape} and {variance.shape}")
            self._pending = [mean, variance, np.zeros(())]
            if self.input_dim is None and mean.size > 1:
                self.input_dim = mean.size

    def weight_specs(self, input_dim):
        return [
            WeightSpec("mean", (input_dim,), "zeros", trainable=False),
            WeightSpec("variance", (input_dim,), "ones", trainable=False),
            WeightSpec("count", (), "zeros", trainable=False),
        ]

    def initial_value(self, spec, dtype):
        if self._pending is not None:
            index = {"mean": 0, "variance": 1, "count": 2}[spec.attr]
            return np.broadcast_to(self._pending[index], spec.shape).astype(dtype)
        return super().initial_value(spec, dtype)

    def adapt(self, data, batch_size=None, steps=None):
        """Learn the mean and variance of each feature from ``data`` (samples, features)."""
        arr = checks.as_float_array(data, "data", np.float64)
        if arr.ndim == 1:
            arr = arr.reshape(-1, 1)
        arr = arr.reshape(arr.shape[0], -1)
        if arr.shape[0] == 0:
            raise ValueError("data: expected at least one sample to adapt on, got 0")
        checks.finite(arr, "data")
        if self.input_dim is not None and arr.shape[1] != self.input_dim:
            raise ValueError(f"data: the layer has {self.input_dim} features, got {arr.shape[1]}")
        self.input_dim = arr.shape[1]
        over = 0 if self.axis is not None else None
        mean, variance = np.broadcast_to(arr.mean(axis=over), arr.shape[1:]), np.broadcast_to(arr.var(axis=over), arr.shape[1:])
        self._pending = [mean.copy(), variance.copy(), np.asarray(float(arr.shape[0]))]
        if self.built:
            self.set_weights(self._pending)

    # Keras's attributes: the statistics (from adapt or the constructor, before the model is built)
    @property
    def mean(self):
        return self.weight("mean") if self.built else None if self._pending is None else self._pending[0]

    @property
    def variance(self):
        return self.weight("variance") if self.built else None if self._pending is None else self._pending[1]

    def call(self, backend, x, y, buffers, activation=None, training=False):
        xp = backend.xp
        denom = xp.maximum(xp.sqrt(self.weight("variance")), x.dtype.type(self.EPSILON))
        if self.invert:
            return xp.add(self.weight("mean"), x * denom, out=y)
        return xp.divide(x - self.weight("mean"), denom, out=y)

    def backward(self, backend, x, dy, y, buffers, dx, activation=None):
        if dx is None:
            return
        xp = backend.xp
        denom = xp.maximum(xp.sqrt(self.weight("variance")), dy.dtype.type(self.EPSILON))
        (xp.multiply if self.invert else xp.divide)(dy, denom, out=dx)

    def get_config(self):
        # mean, variance and count are weights (saved with them); the model's config carries the input size
        return {**super().get_config(), "axis": self.axis, "invert": self.invert}
