"""Layers, as Keras names them: ``Dense`` (a fused linear + activation), ``Input``,
and -- from :mod:`gpunn.layers_basic` and :mod:`gpunn.layers_norm` --
``Activation``, ``LeakyReLU``, ``Flatten``, ``Dropout``, ``GaussianNoise``,
``BatchNormalization``, ``LayerNormalization`` and ``Normalization``.

As in Keras, ``__init__`` validates and stores, ``build`` makes the weights
(as views into the model's flat parameter buffer, see
:mod:`gpunn.layer_base`), ``call`` and ``backward`` sit side by side, and
``get_config`` returns every constructor argument.
"""

from __future__ import annotations

import numpy as np

from gpunn import activations, checks, codes, initializers, regularizers
from gpunn.layer_base import Layer, SymbolicTensor, WeightSpec
from gpunn.layers_basic import ELU, Activation, Dropout, Flatten, GaussianNoise, Identity, LeakyReLU, ReLU, Rescaling, Softmax
from gpunn.layers_norm import BatchNormalization, LayerNormalization, Normalization


class Input(SymbolicTensor):
    """Declares the model's input: ``gpunn.Input(shape=(n_features,))``, first in a
    ``Sequential`` or the start of a functional chain (``gpunn.layers.Dense(8)(inputs)``).

    An n-D ``shape`` (e.g. ``(8, 8)`` images) must be followed by ``Flatten``.
    ``shape`` is the shape of one sample, as given.
    """

    def __init__(self, shape=None, name=None, batch_size=None, dtype=None, batch_shape=None, input_shape=None, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"Input: unexpected arguments {sorted(kwargs)}; expected shape (or batch_shape), name, batch_size, dtype")
        # Keras 3's batch_shape=(None, n) and Keras 2's InputLayer(input_shape=(n,)) name the same thing
        given = [(k, v) for k, v in (("shape", shape), ("batch_shape", batch_shape), ("input_shape", input_shape)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"shape: expected exactly one of shape=, batch_shape=, input_shape=, got {dict(given) or 'none'}")
        if batch_shape is not None:
            if not isinstance(batch_shape, (tuple, list)) or len(batch_shape) < 2:
                raise ValueError(f"batch_shape: expected (batch, n_features, ...) such as (None, 4), got {batch_shape!r}")
            shape = tuple(batch_shape[1:])
        elif input_shape is not None:
            shape = input_shape
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)) or not shape:
            raise ValueError(f"shape: expected a tuple such as (n_features,), got {shape!r}")
        self.shape = tuple(checks.positive_int(d, "shape") for d in shape)
        self.name = name
        self.dtype = checks.input_dtype(dtype)

    shape = None  # set per instance (SymbolicTensor's derived shape does not apply to the input)

    @property
    def features(self) -> int:
        return int(np.prod(self.shape))

    def get_config(self):
        return {"shape": list(self.shape), "name": self.name}

    def __repr__(self):
        return f"Input(shape={self.shape})"


InputLayer = Input


class Dense(Layer):
    """``y = activation(x @ kernel + bias)``; kernel (in, units), bias (units,).

    Input size is inferred at first use, or given by ``input_dim`` (or Keras
    2's ``input_shape=(n,)``).  ``activation`` is a name, a function from
    :mod:`gpunn.activations`, or an activation layer (``layers.LeakyReLU()``).
    """

    rows_independent = True

    changes_width = True

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        input_dim=None,
        input_shape=None,
        name=None,
        trainable=True,
        dtype=None,
    ):
        if input_shape is not None and (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 1):
            raise ValueError(f"input_shape: expected (n_features,), got {input_shape!r}")
        super().__init__(name, trainable, input_shape, input_dim, dtype)
        self.units = checks.positive_int(units, "units")
        self.activation = activations.get(getattr(activation, "fused_activation", activation))
        self.use_bias = checks.boolean(use_bias, "use_bias")
        initializers.get(kernel_initializer, "kernel_initializer")
        initializers.get(bias_initializer, "bias_initializer")
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self.bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")

    # -- weights --------------------------------------------------------------
    def weight_specs(self, input_dim):
        specs = [WeightSpec("kernel", (input_dim, self.units), self.kernel_initializer)]
        if self.use_bias:
            specs.append(WeightSpec("bias", (self.units,), self.bias_initializer))
        return specs

    def param_shapes(self, input_dim):
        return [(spec.attr, spec.shape) for spec in self.weight_specs(input_dim)]

    def compute_output_dim(self, input_dim):
        return self.units

    kernel = property(lambda self: self.weight("kernel"))
    bias = property(lambda self: self.weight("bias"))
    kernel_grad = property(lambda self: self.gradient("kernel"))
    bias_grad = property(lambda self: self.gradient("bias"))

    def regularized_weights(self):
        if not self.trainable:
            return []
        pairs = ((self.kernel_regularizer, "kernel"), (self.bias_regularizer, "bias"))
        return [(reg, self.weight(attr), self.gradient(attr)) for reg, attr in pairs if reg is not None and self.weight(attr) is not None]

    # -- computation ------------------------------------------------------------
    @staticmethod
    def needs_preactivation(activation) -> bool:
        """Whether running ``activation`` keeps a ``z`` buffer for the backward pass (``Act.keeps_z``)."""
        return activation.code in codes.ACT_KEEPS_Z

    def absorb(self, activation, following, following_activation):
        """A linear Dense followed by an activation layer (Activation, ReLU, LeakyReLU, Softmax) runs
        that activation in its own fused kernel: the same math, one launch instead of two."""
        if activation.name == "linear" and isinstance(following, Activation):
            return following_activation
        return None

    def make_buffers(self, backend, batch, dtype, activation, training):
        """The backend-private ``z`` (B, units) where the activation keeps one."""
        return backend.empty((batch, self.units), dtype) if self.needs_preactivation(activation) else None

    def folds(self, layer, activation) -> bool:
        """A Dropout right after this layer is applied inside its fused training call: the mask
        is made in the forward epilogue and reused by backward (not under a softmax, which
        runs after the fused call)."""
        return isinstance(layer, Dropout) and layer.rate > 0 and not activation.is_softmax

    def call(self, backend, x, y, z, activation=None, training=False, folded=None):
        """Forward: ``y = act(x @ kernel + bias)`` into preallocated ``y`` (B, units).

        x: (B, in).  z: (B, units), the backend-private buffer its
        ``linear_backward`` reads, where :meth:`needs_preactivation` or a
        Dropout is folded in, else None.  ``activation`` overrides the layer's
        own (a fused output layer runs "linear" in training: the loss applies
        the activation).  Softmax normalises each row of ``y``.  ``folded``:
        the Dropout layer after this one whose mask this call applies
        (training only, see :meth:`folds`).
        """
        act = self.activation if activation is None else activation
        # dropout= only when folded: a backend written before it existed still runs the rest
        extra = {} if folded is None else {"dropout": folded.dropout_spec(backend, training)}
        backend.linear_forward(x, self.kernel, self.bias if self.use_bias else None, act.code, act.alpha, y, z, **extra)
        if act.is_softmax:
            backend.softmax(y, y)
        return y

    def backward(self, backend, x, dy, y, z, dx, activation=None, folded=None, training=False):
        """Backward through :meth:`call`: gradients into ``kernel_grad``, ``bias_grad`` and ``dx``.

        dy: (B, units), dL/dy.  x, y, z: the forward's input, output and
        backend-private buffer.  dx: (B, in) receives dL/dx, or None for the
        first layer.  ``folded``/``training``: as given to :meth:`call` (the
        folded Dropout's mask is the one the forward applied).  For softmax the Jacobian is applied to ``dy`` in place first
        (``dz = y * (dy - sum(dy * y))`` per row) and the rest is a linear
        layer's backward; otherwise ``dy`` is left unchanged (the backend's
        ``linear_backward`` contract).
        """
        act = self.activation if activation is None else activation
        code = act.code
        if act.is_softmax:
            backend.softmax_backward(dy, y)
            code = codes.ACT_LINEAR
        extra = {} if folded is None else {"dropout": folded.dropout_spec(backend, training)}
        backend.linear_backward(
            x, self.kernel, dy, y, z, code, act.alpha, dx, self.kernel_grad, self.bias_grad if self.use_bias else None,
            **extra,
        )  # fmt: skip

    def get_config(self):
        base = super().get_config()
        base.pop("input_shape", None)  # input_dim carries it
        return {
            **base,
            "units": self.units,
            "activation": self.activation.get_config(),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer) or "glorot_uniform",
            "bias_initializer": initializers.serialize(self.bias_initializer) or "zeros",
            "kernel_regularizer": None if self.kernel_regularizer is None else self.kernel_regularizer.get_config(),
            "bias_regularizer": None if self.bias_regularizer is None else self.bias_regularizer.get_config(),
            # only a declared input size (input_dim= / input_shape=), as Keras's config: a layer made from
            # this config fits wherever its input comes from (the model's config carries the model's input)
            "input_dim": self.input_dim if self.batch_input_shape is not None else None,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("class_name", None)
        config.pop("input_shape", None)  # input_dim carries it
        return cls(**config)

    def __repr__(self):
        return f"Dense({self.units}, activation={self.activation.name!r}, name={self.name!r})"


#: every layer class a model file or config may name
LAYER_CLASSES = {
    cls.__name__: cls
    for cls in (
        Dense,
        Activation,
        LeakyReLU,
        ReLU,
        ELU,
        Softmax,
        Flatten,
        Identity,
        Rescaling,
        Dropout,
        GaussianNoise,
        BatchNormalization,
        LayerNormalization,
        Normalization,
    )
}


def from_config(config):
    """A layer from its ``get_config()`` (the ``class_name`` key picks the class)."""
    if not isinstance(config, dict):
        raise ValueError(f"layer config: expected a mapping, got {type(config).__name__}")
    name = config.get("class_name")
    cls = LAYER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"layer config: unknown layer class {name!r}; expected one of {sorted(LAYER_CLASSES)}")
    return cls.from_config(config)


__all__ = ["Input", "InputLayer", "Layer", *LAYER_CLASSES]
