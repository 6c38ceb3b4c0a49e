"""The layer stack of a ``Sequential`` model: adding and removing layers, building
the flat weight buffers, weights and their trainability, shapes and configs.

``Sequential`` derives from :class:`LayerStack`; this module holds everything
about *what* the model is, :mod:`gpunn.models` what it *does* (compile, fit,
evaluate, predict, save).

As in Keras, a model whose input size is known -- ``gpunn.Input(shape=...)``
first, or ``input_shape=`` / ``input_dim=`` on the first layer -- is built as
soon as it has layers: its weights exist (``count_params``, ``get_weights``,
``set_weights`` work) before any data is seen.  Adding or popping a layer
later rebuilds the buffers, keeping the other layers' weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import warnings

import numpy as np

from gpunn import backend as backends
from gpunn import checks, config
from gpunn.layer_base import Layer, stack_output_dim, unsupported_subclass
from gpunn.layers import Flatten, Input
from gpunn.layers import from_config as layer_from_config
from gpunn.progress import model_summary


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_outside_gpunn() -> int:
    """The ``warnings.warn`` stacklevel, seen from this function's caller, of the nearest frame
    outside gpunn: a model is built from several entry points (the constructor, add, fit, ...),
    and the warning should point at the user's line (not at contextlib, which runs _deferring's exit)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


class LayerStack:
    """Layers, their flat parameter/gradient buffers, and the Keras model API over them."""

    def _init_stack(self, layers, name, dtype):
        self.name = name or "sequential"
        self.layers: list[Layer] = []
        self._input_shape = None  # the declared per-sample input shape, e.g. (30,) or (8, 8)
        self._dtype_request = None if dtype is None else checks.float_dtype(dtype)
        self._built_dtype = None
        self._deferred = 0  # > 0 while adding a batch of layers: build once at the end
        self._kept_weights = {}  # id(layer) -> its weights, across a rebuild of the buffers
        self.backend = None
        self.params = self.grads = None
        self._lock = threading.RLock()  # building and swapping the trainer
        if layers is not None:
            if isinstance(layers, (str, bytes, dict)) or not hasattr(layers, "__iter__"):
                raise TypeError(f"layers: expected a list of layers, got {type(layers).__name__}")
            layers = list(layers)  # any iterable, as Keras takes (a generator of layers, say)
            with self._deferring():
                for layer in layers:
                    self.add(layer)

    @contextlib.contextmanager
    def _deferring(self, build=True):
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if build and not self._deferred:
            self._build_if_known()

    # ------------------------------------------------------------------ layers
    def add(self, layer):
        """Append a layer (or declare the input with ``gpunn.Input``); builds the model when its
        input size is known."""
        if isinstance(layer, Input):
            if self.layers:
                raise ValueError("layers: gpunn.Input must come first, before any layer")
            self._input_shape = layer.shape
            return
        if not isinstance(layer, Layer):
            raise TypeError(f"layers: expected a gpunn layer (gpunn.layers.Dense, ...) or gpunn.Input, got {type(layer).__name__}")
        problem = unsupported_subclass(layer)
        if problem is not None:
            raise TypeError(
                f"layers: layer {layer.name!r} ({type(layer).__name__}) {problem}; gpunn has no automatic "
                "differentiation, so a custom layer gives weight_specs(input_dim), call(backend, x, y, buffers, "
                "activation, training) and backward(backend, x, dy, y, buffers, dx, activation) (see "
                "gpunn.layer_base.Layer); layers written with keras.ops are not supported"
            )
        if any(existing is layer for existing in self.layers):
            raise ValueError(f"layers: layer {layer.name!r} was added twice")
        if not self.layers and self._input_shape is not None and len(self._input_shape) > 1 and not isinstance(layer, Flatten):
            raise ValueError(
                f"layers: the input samples have shape {self._input_shape}; gpunn's layers act on feature vectors, "
                "so put layers.Flatten() first"
            )
        if any(existing.name == layer.name for existing in self.layers):
            raise ValueError(f"layers: the model already has a layer named {layer.name!r}; layer names must be unique")
        layer.attach(self)
        self.layers.append(layer)
        self._stack_changed()

    def pop(self, rebuild=True):
        """Remove and return the last layer (the other layers keep their weights)."""
        if not self.layers:
            raise TypeError("pop: there are no layers in the model")
        layer = self.layers.pop()
        layer.detach()
        self._stack_changed(rebuild)
        return layer

    def _stack_changed(self, rebuild=True):
        if self.compiled:
            self._objective = self._make_objective(self.loss, self._metric_specs, self._weighted_metric_specs)
        if self.built:
            self._release_buffers()
        if rebuild and not self._deferred:
            self._build_if_known()

    def _release_buffers(self):
        """Drop the buffers, keeping each built layer's weights to copy into the next ones."""
        self._kept_weights = {id(layer): layer.get_weights() for layer in self.layers if layer.built}
        self.params = self.grads = None
        self._drop_trainer()

    def _build_if_known(self):
        if self.layers and self.input_dim is not None and not self.built:
            self.build()

    def get_layer(self, name=None, index=None):
        """A layer by ``name`` or by position ``index``."""
        if (name is None) == (index is None):
            raise ValueError(f"get_layer: provide either a layer name or an index, got name={name!r}, index={index!r}")
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -len(self.layers) <= index < len(self.layers):
                raise ValueError(f"index: was asked for the layer at index {index!r} but the model has {len(self.layers)} layers")
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"name: no layer named {name!r}; the layers are {[layer.name for layer in self.layers]}")

    def layers_changed(self):
        """Called by a layer whose ``trainable`` changed: the next step updates what it now should."""
        trainer = self._trainer
        if trainer is not None:
            trainer.refresh_frozen()

    @property
    def trainable(self) -> bool:
        return any(layer.trainable for layer in self.layers) if self.layers else True

    @trainable.setter
    def trainable(self, value):
        value = checks.boolean(value, "trainable")
        for layer in self.layers:
            layer.trainable = value

    # ------------------------------------------------------------------ shapes
    @property
    def dtype(self) -> np.dtype:
        """The model's float dtype: fixed when built; before, the model's ``dtype=``, else the float
        dtype its layers asked for when they all agree (Keras computes such layers in it), else floatx()."""
        if self._built_dtype is not None:
            return self._built_dtype
        if self._dtype_request is not None:
            return np.dtype(self._dtype_request)
        asked = {layer.requested_dtype for layer in self.layers if layer.requested_dtype is not None}
        return np.dtype(asked.pop() if len(asked) == 1 else config.floatx())

    def _note_layer_dtypes(self, dtype):
        """Warn once per layer whose ``dtype=`` this model does not follow: all its layers compute
        in one dtype (one flat weight buffer, one kernel per dtype), and gpunn has no float16 /
        bfloat16 kernels, so a Keras mixed-precision policy is accepted and ignored."""
        policies, others = {}, {}
        for layer in self.layers:
            if layer.dtype_noted:
                continue
            if layer.ignored_dtype_policy is not None:
                policies.setdefault(layer.ignored_dtype_policy, []).append(layer.name)
            elif layer.requested_dtype not in (None, dtype.name):
                others.setdefault(layer.requested_dtype, []).append(layer.name)
            else:
                continue
            layer.dtype_noted = True
        how = "choose float32 or float64 with Sequential(dtype=...) or gpunn.set_floatx()"
        verdicts = (
            (policies, f"is ignored: gpunn has no float16/bfloat16 kernels and computes every layer of model {self.name!r} in the model's dtype,"),
            (others, f"is not followed: gpunn computes every layer of model {self.name!r} in one dtype, the model's"),
        )
        for requests, verdict in verdicts:
            for asked, names in requests.items():
                warnings.warn(
                    f"dtype={asked!r} (layers {', '.join(map(repr, names))}) {verdict} {dtype.name} ({how})",
                    UserWarning,
                    stacklevel=_caller_outside_gpunn(),
                )

    @property
    def built(self) -> bool:
        return self.params is not None

    @property
    def input_dim(self):
        """Features per sample entering the first layer (n-D inputs flattened), or None."""
        if self._input_shape is not None:
            return int(np.prod(self._input_shape))
        return self.layers[0].input_dim if self.layers else None

    @property
    def sample_shape(self):
        """The declared shape of one input sample, e.g. (30,) or (8, 8) before a Flatten."""
        if self._input_shape is not None:
            return self._input_shape
        if self.layers and self.layers[0].batch_input_shape is not None:
            return self.layers[0].batch_input_shape
        return None if self.input_dim is None else (self.input_dim,)

    @property
    def output_dim(self):
        return stack_output_dim(self.layers, self.input_dim) if self.layers else None

    @property
    def input_shape(self):
        """``(None, *sample shape)`` as Keras reports it."""
        if self.sample_shape is None:
            raise AttributeError("input_shape: the model's input size is not known yet; declare gpunn.Input(shape=...) or build it")
        return (None, *self.sample_shape)

    @property
    def output_shape(self):
        if self.output_dim is None:
            raise AttributeError("output_shape: the model's output size is not known yet; declare gpunn.Input(shape=...) or build it")
        return (None, self.output_dim)

    def rows(self, x):
        """n-D samples (M, h, w, ...) flattened to (M, features) when the model flattens its input."""
        arr = x
        if getattr(arr, "ndim", 2) > 2 and self.layers and isinstance(self.layers[0], Flatten):
            arr = np.reshape(np.asarray(arr), (arr.shape[0], -1))
        return arr

    # ------------------------------------------------------------------- build
    def build(self, input_shape=None, *, initialize=True):
        """Create the weights for ``input_shape`` = (batch, features) or (features,).

        ``initialize=False`` leaves new weights zero instead of running the
        initializers (and drawing random numbers): for callers that set every
        weight next, as loading a model file does.
        """
        if not self.layers:
            raise ValueError("build: the model has no layers; add layers (gpunn.layers.Dense, ...) first")
        if input_shape is not None:
            shape = tuple(input_shape)
            n = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            if self.input_dim is not None and n != self.input_dim:
                raise ValueError(f"input_shape: the model was declared with {self.input_dim} inputs, got {n}")
            self._input_shape = (checks.positive_int(n, "input_shape"),) if self._input_shape is None else self._input_shape
        if self.input_dim is None:
            raise ValueError(
                "build: the input size is unknown; call fit/predict with data, or declare it with "
                "gpunn.Input(shape=(n,)) or Dense(..., input_dim=n)"
            )
        with self._lock:
            if not self.built:
                self._allocate(initialize)

    def weight_shapes(self) -> list[tuple]:
        """Shape of every weight array, in get_weights order, from the architecture alone."""
        shapes, dim = [], self.input_dim
        for layer in self.layers:
            shapes.extend(tuple(spec.shape) for spec in layer.weight_specs(dim))
            dim = layer.compute_output_dim(dim)
        return shapes

    def _allocate(self, initialize):
        backend = self.backend or backends.current()
        dtype = self.dtype
        self._note_layer_dtypes(dtype)
        total = sum(int(np.prod(shape)) for shape in self.weight_shapes())
        params, grads = backend.zeros((total,), dtype), backend.zeros((total,), dtype)
        offset, dim = 0, self.input_dim
        for layer in self.layers:
            kept = self._kept_weights.pop(id(layer), None)
            offset = layer.build(backend, dim, params, grads, offset, dtype, initialize and kept is None)
            if kept is not None:
                layer.set_weights(kept)
            dim = layer.output_dim
        self.backend, self._built_dtype, self.params, self.grads = backend, dtype, params, grads
        self._drop_trainer()
        if self.compiled:
            self.optimizer.build(backend, total, dtype)

    def _ensure_built(self, n_features):
        if self.built:
            return
        with self._lock:
            if not self.built:
                if self.input_dim is not None and self.input_dim != n_features:
                    raise ValueError(f"x: the model expects {self.input_dim} features per sample, got {n_features}")
                if self._input_shape is None:
                    self._input_shape = (n_features,)
                self.build()

    def count_params(self) -> int:
        if not self.built:
            raise ValueError(
                "count_params: the model is not built yet (its input size is unknown); declare it with "
                "gpunn.Input(shape=(n,)) or input_shape=, or call build/fit/predict"
            )
        return int(self.params.shape[0])

    # ------------------------------------------------------------------ weights
    def get_weights(self) -> list[np.ndarray]:
        """Every layer's weights (Dense: kernel (in, units), bias (units,)), in order, as NumPy arrays."""
        if not self.built:
            return []
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        """Inverse of get_weights (same order and shapes)."""
        if not self.built:
            raise ValueError("set_weights: the model is not built yet; call build() or fit/predict first")
        if not isinstance(weights, (list, tuple)):
            raise TypeError(f"weights: expected a list of arrays, got {type(weights).__name__}")
        counts = [len(layer.weights) for layer in self.layers]
        if len(weights) != sum(counts):
            raise ValueError(f"weights: the model has {sum(counts)} weight arrays, got {len(weights)}")
        for layer, start, count in zip(self.layers, np.cumsum([0] + counts), counts):
            layer.set_weights(list(weights[start : start + count]))

    @property
    def weights(self):
        return [w for layer in self.layers for w in layer.weights] if self.built else []

    @property
    def trainable_weights(self):
        """The weights the optimizer updates (views into the model's parameters)."""
        return [w for layer in self.layers for w in layer.trainable_weights] if self.built else []

    @property
    def non_trainable_weights(self):
        """Frozen layers' weights and running statistics (BatchNormalization's moving mean/variance)."""
        return [w for layer in self.layers for w in layer.non_trainable_weights] if self.built else []

    # Keras 3's names for the same lists
    variables = weights
    trainable_variables = trainable_weights
    non_trainable_variables = non_trainable_weights

    def summary(self, print_fn=None, **kwargs):
        """Print a table of layers, output shapes and parameter counts (trainable and not)."""
        model_summary(self, self.backend.name if self.backend else backends.get_backend(), print_fn or print)

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        """The architecture as plain data; :meth:`from_config` rebuilds the model from it."""
        config = {
            "name": self.name,
            "input_dim": self.input_dim,
            "dtype": str(self.dtype),
            "layers": [layer.get_config() for layer in self.layers],
        }
        if self.sample_shape is not None and len(self.sample_shape) > 1:  # n-D samples before a Flatten
            config["input_shape"] = list(self.sample_shape)
        return config

    @classmethod
    def from_config(cls, config, build=True):
        """A model from :meth:`get_config` output (ValueError/TypeError if malformed); built
        (initialised) when the input size is known, unless ``build=False``."""
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a mapping, got {type(config).__name__}")
        layer_configs = config.get("layers")
        if not isinstance(layer_configs, list) or not layer_configs:
            raise ValueError(f"config: expected a non-empty list of layer configs under 'layers', got {layer_configs!r}"[:300])
        model = cls(name=config.get("name"), dtype=config.get("dtype"))
        with model._deferring(build=build):
            shape = config.get("input_shape") or ([config["input_dim"]] if config.get("input_dim") is not None else None)
            if shape is not None:
                model.add(Input(shape=tuple(shape)))
            for lc in layer_configs:
                if not isinstance(lc, dict):
                    raise ValueError(f"config: layer config {lc!r} is not a mapping"[:300])
                model.add(layer_from_config(lc))
        return model

    def to_json(self, **kwargs) -> str:
        """The architecture as a JSON string (``gpunn.models.model_from_json`` reads it back)."""
        return json.dumps({"class_name": type(self).__name__, "config": self.get_config()}, **kwargs)
