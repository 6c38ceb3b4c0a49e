"""Keras's model-level functions around ``Sequential``: the functional API (``gpunn.Model(inputs,
outputs)`` for a chain of layers), ``clone_model`` and ``save_model``; ``gpunn.models`` exports them."""

from __future__ import annotations

from gpunn import checks, saving
from gpunn.layer_base import SymbolicTensor
from gpunn.layers import Input
from gpunn.model_layers import LayerStack


def _check_model(model):
    if not isinstance(model, LayerStack):
        raise TypeError(f"model: expected a gpunn model, got {type(model).__name__}")


class _ModelType(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, LayerStack)

    def __subclasscheck__(cls, sub):
        return isinstance(sub, type) and (issubclass(sub, LayerStack) or type.__subclasscheck__(cls, sub))


class Model(metaclass=_ModelType):
    """Keras's functional API for a chain of layers::

        inputs = gpunn.Input(shape=(64,))
        x = gpunn.layers.Dense(64, activation="relu")(inputs)
        outputs = gpunn.layers.Dense(10, activation="softmax")(x)
        model = gpunn.Model(inputs=inputs, outputs=outputs)

    makes (and returns) the equivalent :class:`Sequential`, built since its input is declared;
    every gpunn model counts as a ``Model`` (``isinstance(model, gpunn.Model)``).  gpunn models are
    chains: one input, one output, each layer applied once (branches that do not lead to
    ``outputs`` are left out, as in Keras).  Subclassing ``Model`` with a ``call`` method needs
    automatic differentiation, which gpunn does not have: it is refused when instantiated.
    """

    def __new__(cls, inputs=None, outputs=None, name=None, trainable=True, **kwargs):
        if cls is not Model:
            raise TypeError(
                f"{cls.__name__}: gpunn does not support subclassing Model (a custom call() needs automatic "
                "differentiation); build the network with gpunn.Sequential([...]) or the functional API, "
                "gpunn.Model(inputs, outputs)"
            )
        if kwargs:
            raise TypeError(f"Model: unexpected arguments {sorted(kwargs)}; expected inputs, outputs, name, trainable")
        inputs, outputs = _single(inputs, "inputs"), _single(outputs, "outputs")
        if not isinstance(inputs, Input):
            raise TypeError(f"inputs: expected the gpunn.Input(shape=...) the layers were called on, got {checks.describe(inputs)}")
        if not isinstance(outputs, SymbolicTensor):
            raise TypeError(f"outputs: expected the output of a layer called on inputs, e.g. Dense(1)(x), got {checks.describe(outputs)}")
        origin, chain = outputs.chain()
        if origin is not inputs:
            raise ValueError("outputs: not computed from inputs: the layers leading to outputs start at another gpunn.Input")
        return saving.default_model_class([inputs, *chain], name=name or "functional", trainable=trainable)


def _single(tensors, argument):
    """The one tensor in ``tensors`` (a tensor, or a list/tuple/dict of one)."""
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    if isinstance(tensors, (list, tuple)):
        if len(tensors) != 1:
            raise ValueError(f"{argument}: gpunn models have one input and one output, got {len(tensors)} {argument}")
        tensors = tensors[0]
    return tensors


def clone_model(model, input_tensors=None, clone_function=None, call_function=None, recursive=False, **kwargs):
    """A new model with ``model``'s architecture and freshly initialised weights, as Keras's
    ``clone_model``: each layer is rebuilt by ``clone_function(layer)`` (default: from its config)."""
    _check_model(model)
    if input_tensors is not None or call_function is not None or kwargs:
        raise ValueError("clone_model: input_tensors and call_function are not supported: gpunn models have one declared input")
    if clone_function is None:
        return type(model).from_config(model.get_config())
    if not callable(clone_function):
        raise TypeError(f"clone_function: expected a function layer -> layer, got {type(clone_function).__name__}")
    head = [] if model.sample_shape is None else [Input(shape=model.sample_shape)]
    return type(model)(head + [clone_function(layer) for layer in model.layers], name=model.name, dtype=model.dtype)


def save_model(model, filepath, overwrite=True, **kwargs):
    """``model.save(filepath)`` (Keras's ``keras.models.save_model``)."""
    _check_model(model)
    if overwrite is not True:
        raise ValueError("overwrite: gpunn always replaces the file atomically; only overwrite=True is supported")
    if kwargs:
        raise TypeError(f"save_model: unexpected arguments {sorted(kwargs)}")
    model.save(filepath)
