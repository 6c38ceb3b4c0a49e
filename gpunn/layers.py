"""Layers: ``Dense`` (a fused linear + activation) and ``Input``.

As in Keras, ``__init__`` validates and stores, ``build`` makes the weights
(as views into the model's flat parameter buffer), ``call`` is a few lines,
and ``get_config`` returns every constructor argument.
"""

from __future__ import annotations

import weakref

import numpy as np

from gpunn import activations, checks, codes, initializers, regularizers


class Input:
    """Declares the model's input: ``gpunn.Input(shape=(n_features,))``."""

    def __init__(self, shape, name=None):
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)) or len(shape) != 1:
            raise ValueError(f"shape: expected a 1-tuple (n_features,) for an MLP input, got {shape!r}")
        self.shape = (checks.positive_int(shape[0], "shape"),)
        self.name = name

    def get_config(self):
        return {"shape": list(self.shape), "name": self.name}

    def __repr__(self):
        return f"Input(shape={self.shape})"


class Layer:
    """Base class for layers with weights held in a model's flat buffers."""

    _counter: dict[str, int] = {}

    def __init__(self, name=None):
        if name is None:
            base = type(self).__name__.lower()
            n = Layer._counter.get(base, 0)
            Layer._counter[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
        elif not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        self.name = name
        self.built = False
        self._owner = None  # weak reference to the model holding this layer

    def attach(self, model):
        """Record that ``model`` holds this layer.

        A layer's weights are views into its model's flat buffers, so a layer
        belongs to one model; adding it to a second raises ValueError (while
        the first model is alive).
        """
        owner = None if self._owner is None else self._owner()
        if owner is not None and owner is not model:
            raise ValueError(
                f"layers: layer {self.name!r} already belongs to model {owner.name!r}; gpunn layers cannot be "
                "shared between models (their weights live in one model's buffers). Use a new layer, e.g. "
                "Dense.from_config(layer.get_config()), and copy weights with set_weights(get_weights())"
            )
        self._owner = weakref.ref(model)


class Dense(Layer):
    """``y = activation(x @ kernel + bias)``; kernel (in, units), bias (units,).

    Input size is inferred at first use, or given by ``input_dim`` (or Keras
    2's ``input_shape=(n,)``).
    """

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
    ):
        super().__init__(name)
        self.units = checks.positive_int(units, "units")
        self.activation = activations.get(activation)
        self.use_bias = checks.boolean(use_bias, "use_bias")
        initializers.get(kernel_initializer, "kernel_initializer")
        initializers.get(bias_initializer, "bias_initializer")
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self.bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")
        if input_shape is not None:
            if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 1:
                raise ValueError(f"input_shape: expected (n_features,), got {input_shape!r}")
            input_dim = input_shape[0]
        self.input_dim = None if input_dim is None else checks.positive_int(input_dim, "input_dim")
        self.kernel = self.bias = None
        self.kernel_grad = self.bias_grad = None
        self._backend = None  # set by build: the backend holding the weights

    # -- weights --------------------------------------------------------------
    def param_shapes(self, input_dim):
        shapes = [("kernel", (input_dim, self.units))]
        if self.use_bias:
            shapes.append(("bias", (self.units,)))
        return shapes

    def build(self, backend, input_dim, params, grads, offset, dtype, initialize=True):
        """Take views of the flat ``params``/``grads`` from ``offset``; return the new offset.

        With ``initialize`` the views are filled by the initializers.
        """
        if self.input_dim is not None and self.input_dim != input_dim:
            raise ValueError(
                f"input_dim: layer {self.name!r} was declared with {self.input_dim} inputs "
                f"but receives {input_dim}"
            )
        self.input_dim = input_dim
        self._backend = backend
        for attr, shape in self.param_shapes(input_dim):
            size = int(np.prod(shape))
            setattr(self, attr, params[offset : offset + size].reshape(shape))
            setattr(self, attr + "_grad", grads[offset : offset + size].reshape(shape))
            if initialize:
                init = self.kernel_initializer if attr == "kernel" else self.bias_initializer
                values = initializers.initialize(init, shape, dtype, f"{attr}_initializer")
                getattr(self, attr)[...] = backend.asarray(values)
            offset += size
        self.built = True
        return offset

    def count_params(self):
        if self.input_dim is None:
            return None
        return sum(int(np.prod(s)) for _, s in self.param_shapes(self.input_dim))

    @property
    def weights(self):
        return [self.kernel] + ([self.bias] if self.use_bias else [])

    def get_weights(self):
        """[kernel (in, units), bias (units,)] as NumPy arrays (Keras order)."""
        if not self.built:
            return []
        return [self._backend.to_numpy(w).copy() for w in self.weights]

    def set_weights(self, weights):
        if not self.built:
            raise ValueError(f"layer {self.name!r} is not built yet; build the model before set_weights")
        expected = self.weights
        if len(weights) != len(expected):
            raise ValueError(
                f"weights: layer {self.name!r} expects {len(expected)} arrays (kernel{', bias' if self.use_bias else ''}), "
                f"got {len(weights)}"
            )
        for target, value, (attr, shape) in zip(expected, weights, self.param_shapes(self.input_dim)):
            value = np.asarray(value)
            if value.shape != shape:
                raise ValueError(f"weights: layer {self.name!r} {attr} expects shape {shape}, got {value.shape}")
            if not np.issubdtype(value.dtype, np.number):
                raise TypeError(f"weights: layer {self.name!r} {attr} must be numeric, got dtype {value.dtype}")
            # as_float_array refuses finite values that would become inf in the model's dtype
            value = checks.as_float_array(value, f"weights: layer {self.name!r} {attr}", target.dtype)
            target[...] = self._backend.asarray(value)

    # -- computation ------------------------------------------------------------
    @staticmethod
    def needs_preactivation(activation) -> bool:
        """Whether running ``activation`` keeps the pre-activation ``z`` for the backward pass."""
        return activation.code in codes.ACT_NEEDS_PREACTIVATION

    def call(self, backend, x, y, z, activation=None):
        """Forward: ``y = act(x @ kernel + bias)`` into preallocated ``y`` (B, units).

        x: (B, in).  z: (B, units) receives ``x @ kernel + bias`` when
        :meth:`needs_preactivation`, else None.  ``activation`` overrides the
        layer's own (a fused output layer runs "linear" in training: the loss
        applies the activation).  Softmax normalises each row of ``y``.
        """
        act = self.activation if activation is None else activation
        backend.linear_forward(x, self.kernel, self.bias if self.use_bias else None, act.code, act.alpha, y, z)
        if act.is_softmax:
            backend.softmax(y, y)
        return y

    def backward(self, backend, x, dy, y, z, dx, activation=None):
        """Backward through :meth:`call`: gradients into ``kernel_grad``, ``bias_grad`` and ``dx``.

        dy: (B, units), dL/dy.  x, y, z: the forward's input, output and
        pre-activation.  dx: (B, in) receives dL/dx, or None for the first
        layer.  For softmax the Jacobian is applied to ``dy`` in place first
        (``dz = y * (dy - sum(dy * y))`` per row) and the rest is a linear
        layer's backward; otherwise ``dy`` is left unchanged (the backend's
        ``linear_backward`` contract).
        """
        act = self.activation if activation is None else activation
        code = act.code
        if act.is_softmax:
            backend.softmax_backward(dy, y)
            code = codes.ACT_LINEAR
        backend.linear_backward(
            x, self.kernel, dy, y, z, code, act.alpha, dx, self.kernel_grad, self.bias_grad if self.use_bias else None
        )

    def activate(self, backend, z, out):
        """``out = activation(z)`` for this layer's own activation (e.g. logits to probabilities)."""
        act = self.activation
        if act.is_softmax:
            backend.softmax(z, out)
        else:
            backend.apply_activation(z, act.code, act.alpha, out)
        return out

    def get_config(self):
        return {
            "class_name": "Dense",
            "name": self.name,
            "units": self.units,
            "activation": self.activation.get_config(),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer) or "glorot_uniform",
            "bias_initializer": initializers.serialize(self.bias_initializer) or "zeros",
            "kernel_regularizer": None if self.kernel_regularizer is None else self.kernel_regularizer.get_config(),
            "bias_regularizer": None if self.bias_regularizer is None else self.bias_regularizer.get_config(),
            "input_dim": self.input_dim,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("class_name", None)
        return cls(**config)

    def __repr__(self):
        return f"Dense({self.units}, activation={self.activation.name!r}, name={self.name!r})"


def from_config(config):
    name = config.get("class_name")
    if name != "Dense":
        raise ValueError(f"layer config: unknown layer class {name!r}; expected 'Dense'")
    return Dense.from_config(config)
