"""``Sequential``: a stack of Dense layers with Keras's compile / fit / evaluate / predict.

This is the public API.  As in Keras's trainer it composes :mod:`gpunn.data_adapter`
(input and target checks; data on the device or streamed), :mod:`gpunn.training`
(what compile resolved, the step with its workspaces and metric accumulators, and
``make_train_step``) and :mod:`gpunn.fit_loop` (epochs, callbacks, rollback on divergence).

Threads: ``predict``, ``__call__``, ``predict_on_batch``, ``evaluate`` and
``test_on_batch`` may run from many threads at once (each call has its own
buffers).  A second concurrent ``fit`` / ``train_on_batch`` on one model raises
RuntimeError; inference during training sees the weights at some step.
Building, compiling, ``set_weights`` and loading weights must not race other calls.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from gpunn import backend as backends
from gpunn import arrays, checks, config, data_adapter, device_memory, fit_loop, losses, onnx_export, optimizers, saving, training
from gpunn import metrics as metrics_mod
from gpunn.layers import Dense, Input
from gpunn.layers import from_config as layer_from_config
from gpunn.progress import model_summary, summary_line
from gpunn.training import Objective, Trainer, TrainStep

DeviceMemoryError = device_memory.DeviceMemoryError
NonFiniteLossError = fit_loop.NonFiniteLossError


def _drop_buffers(model):
    model._drop_trainer()


_guard_memory = device_memory.guard(_drop_buffers)


class Sequential:
    """A linear stack of layers: ``Sequential([Dense(64, activation="relu"), Dense(1, activation="sigmoid")])``."""

    def __init__(self, layers=None, name=None, dtype=None):
        self.name = name or "sequential"
        self.layers: list[Dense] = []
        self._declared_input_dim = None
        self._dtype_request = None if dtype is None else checks.float_dtype(dtype)
        self._built_dtype = None
        self.backend = None
        self.params = self.grads = None
        self.optimizer = self.loss = None
        self._metric_specs, self._weighted_metric_specs = [], []
        self._objective = None
        self.compiled = False
        self.stop_training = False
        self.history = None
        self._trainer = None
        self._lock = threading.RLock()  # building and swapping the trainer
        self._training = fit_loop.OneAtATime()  # held by fit / train_on_batch
        self.feature_names = None  # the column names of the DataFrame fit was given (see gpunn.arrays)
        if layers is not None:
            if not isinstance(layers, (list, tuple)):
                raise TypeError(f"layers: expected a list of layers, got {type(layers).__name__}")
            for layer in layers:
                self.add(layer)

    # ------------------------------------------------------------------ build
    def add(self, layer):
        """Append a Dense layer (or set the input size with ``gpunn.Input``)."""
        if isinstance(layer, Input):
            if self.layers:
                raise ValueError("layers: gpunn.Input must come first, before any layer")
            self._declared_input_dim = layer.shape[0]
            return
        if not isinstance(layer, Dense):
            raise TypeError(f"layers: expected gpunn.layers.Dense or gpunn.Input, got {type(layer).__name__}")
        if self.built:
            raise ValueError("add: the model is already built; add layers before the first fit/predict/build")
        if any(existing is layer for existing in self.layers):
            raise ValueError(f"layers: layer {layer.name!r} was added twice")
        layer.attach(self)
        self.layers.append(layer)
        if self.compiled:
            self._objective = Objective(self.loss, self.layers, self._metric_specs, self._weighted_metric_specs)

    @property
    def dtype(self) -> np.dtype:
        """The model's float dtype: fixed when built, else the requested one or floatx()."""
        if self._built_dtype is not None:
            return self._built_dtype
        return np.dtype(self._dtype_request or config.floatx())

    @property
    def built(self) -> bool:
        return self.params is not None

    @property
    def input_dim(self):
        if self._declared_input_dim is not None:
            return self._declared_input_dim
        return self.layers[0].input_dim if self.layers else None

    @property
    def output_dim(self):
        return self.layers[-1].units if self.layers else None

    def build(self, input_shape=None, *, initialize=True):
        """Create the weights for ``input_shape`` = (batch, features) or (features,).

        ``initialize=False`` leaves them zero instead of running the
        initializers (and drawing random numbers): for callers that set every
        weight next, as loading a model file does.
        """
        if not self.layers:
            raise ValueError("build: the model has no layers; add gpunn.layers.Dense layers first")
        if input_shape is not None:
            n = tuple(input_shape)[-1]
            if self.input_dim is not None and n != self.input_dim:
                raise ValueError(f"input_shape: the model was declared with {self.input_dim} inputs, got {n}")
            self._declared_input_dim = checks.positive_int(n, "input_shape")
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
            shapes.extend(tuple(s) for _, s in layer.param_shapes(dim))
            dim = layer.units
        return shapes

    def _allocate(self, initialize):
        backend, dtype = backends.current(), self.dtype
        total = sum(int(np.prod(shape)) for shape in self.weight_shapes())
        params, grads = backend.zeros((total,), dtype), backend.zeros((total,), dtype)
        offset, dim = 0, self.input_dim
        for layer in self.layers:
            offset = layer.build(backend, dim, params, grads, offset, dtype, initialize)
            dim = layer.units
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
                self._declared_input_dim = n_features
                self.build()

    def count_params(self) -> int:
        if not self.built:
            raise ValueError("count_params: the model is not built yet")
        return int(self.params.shape[0])

    def _get_trainer(self) -> Trainer:
        trainer = self._trainer
        if trainer is not None:
            return trainer
        with self._lock:
            if self._trainer is None:
                optimizer = self.optimizer if self.compiled else None
                self._trainer = Trainer(self.layers, self.params, self.grads, self.backend, self.dtype, self.input_dim, optimizer, self._objective)
            return self._trainer

    def _drop_trainer(self):
        with self._lock:
            if self._trainer is not None:
                self._trainer.active = False
            self._trainer = None

    # ---------------------------------------------------------------- compile
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, weighted_metrics=None):
        """Configure training: optimizer (name or instance), loss, metrics (names).

        As in Keras 3, ``metrics`` ignore sample and class weights, while
        ``weighted_metrics`` are weighted by them.
        """
        if not self.layers:
            raise ValueError("compile: the model has no layers")
        # resolve everything first: a failed compile leaves the model as it was
        new_optimizer, new_loss = optimizers.get(optimizer), losses.get(loss)
        specs = [metrics_mod.check_list(metrics, "metrics"), metrics_mod.check_list(weighted_metrics, "weighted_metrics")]
        objective = Objective(new_loss, self.layers, *specs)
        with self._lock:
            self.optimizer, self.loss, self._objective = new_optimizer, new_loss, objective
            self._metric_specs, self._weighted_metric_specs = specs
            self.compiled = True
            self._drop_trainer()
            if self.built:
                self.optimizer.build(self.backend, self.count_params(), self.dtype)

    def get_compile_config(self):
        """The ``compile`` arguments as plain data (None if not compiled); see :meth:`compile_from_config`."""
        if not self.compiled:
            return None
        return {
            "optimizer": self.optimizer.get_config(),
            "loss": self.loss.get_config(),
            "metrics": [metrics_mod.serialize(m) for m in self._metric_specs],
            "weighted_metrics": [metrics_mod.serialize(m) for m in self._weighted_metric_specs],
        }

    def compile_from_config(self, config):
        """``compile`` with the output of :meth:`get_compile_config`."""
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a compile config mapping, got {type(config).__name__}")
        self.compile(
            optimizer=dict(config["optimizer"]),
            loss=dict(config["loss"]),
            metrics=list(config.get("metrics") or []),
            weighted_metrics=list(config.get("weighted_metrics") or []),
        )

    def _require_compiled(self, what):
        if not self.compiled:
            raise RuntimeError(f"{what}: the model must be compiled first: model.compile(optimizer=..., loss=...)")

    @property
    def metrics_names(self) -> list[str]:
        return self._objective.metric_names if self.compiled else []

    def make_train_step(self, batch_size, backend=None) -> TrainStep:
        """A reusable training step for exactly ``batch_size`` rows (builds the model if needed).

        ``backend``, when given, stands in for the model's backend for every
        numeric call the step makes (gather, forward, loss, backward,
        regularization, optimizer), e.g. a timing proxy; its buffers still
        live on the model's backend.  See :class:`gpunn.training.TrainStep`.
        """
        self._require_compiled("make_train_step")
        batch_size = checks.positive_int(batch_size, "batch_size")
        self.build()
        return TrainStep(self._get_trainer(), batch_size, self._standardize, backend)

    # ------------------------------------------------------------------- data
    def _standardize(self, x, y, sample_weight, class_weight=None, argument="x"):
        """Validated host arrays (x, targets, weights or None); builds the model if needed."""
        self._require_compiled("fit" if argument == "x" else argument)
        x, t, w = data_adapter.standardize(self._objective, self.input_dim, self.dtype, x, y, sample_weight, class_weight,
                                           argument, self.feature_names, (self.backend or backends.current()).xp)  # fmt: skip
        self._ensure_built(x.shape[1])
        return x, t, w

    # -------------------------------------------------------------------- fit
    @_guard_memory
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, class_weight=None, sample_weight=None, initial_epoch=0,
            validation_batch_size=None, validation_freq=1):  # fmt: skip
        """Train for ``epochs`` epochs; returns a History (``history.history["loss"]``...)."""
        self._require_compiled("fit")
        settings = fit_loop.check_settings(batch_size, epochs, verbose, callbacks, validation_split, shuffle, initial_epoch,
                                 validation_batch_size, validation_freq)  # fmt: skip
        with self._training.hold("fit"):
            names = arrays.column_names(x)
            standardized = self._standardize(x, y, sample_weight, class_weight)
            self.feature_names = self.feature_names or names  # once the data has passed the checks
            data, val_data = data_adapter.fit_data(self.backend, self._standardize, standardized, validation_data, validation_split)
            return fit_loop.fit(self, self._get_trainer(), data, val_data, settings)

    @_guard_memory
    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None, return_dict=False):
        """One gradient step on the whole of ``x, y``; returns that batch's loss (and metrics)."""
        self._require_compiled("train_on_batch")
        with self._training.hold("train_on_batch"):
            x, t, w = self._standardize(x, y, sample_weight, class_weight)
            logs = self._get_trainer().train_on_batch(data_adapter.DeviceData(self.backend, x, t, w))
        return training.format_result(logs, return_dict)

    # -------------------------------------------------------- evaluate/predict
    @_guard_memory
    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, return_dict=False):
        """Loss (and metrics) on ``x, y``: a scalar, a list ``[loss, *metrics]``, or a dict."""
        batch_size = checks.positive_int(batch_size, "batch_size", allow_none_default=32)
        verbose = checks.verbose(verbose)
        self._require_compiled("evaluate")
        x, t, w = self._standardize(x, y, sample_weight, argument="x")
        started = time.perf_counter()
        logs = self._get_trainer().evaluate(data_adapter.place(self.backend, x, t, w), batch_size)
        if verbose:
            summary_line(-(-x.shape[0] // batch_size), time.perf_counter() - started, logs)
        return training.format_result(logs, return_dict)

    @_guard_memory
    def test_on_batch(self, x, y=None, sample_weight=None, return_dict=False):
        """Loss (and metrics) of one batch, without updating the weights."""
        self._require_compiled("test_on_batch")
        x, t, w = self._standardize(x, y, sample_weight, argument="x")
        logs = self._get_trainer().evaluate(data_adapter.place(self.backend, x, t, w), x.shape[0])
        return training.format_result(logs, return_dict)

    @_guard_memory
    def predict(self, x, batch_size=None, verbose="auto", return_device_array=False):
        """Outputs (M, outputs) in batches: a NumPy array, or with ``return_device_array`` the backend's own array."""
        batch_size = checks.positive_int(batch_size, "batch_size", allow_none_default=32)
        verbose = checks.verbose(verbose)
        if not self.layers:
            raise ValueError("predict: the model has no layers")
        started = time.perf_counter()
        x = checks.feature_rows(x, self.input_dim, "x", self.feature_names, (self.backend or backends.current()).xp, self.dtype)
        self._ensure_built(x.shape[1])
        result = data_adapter.predict(self._get_trainer(), self.backend, x, self.dtype, batch_size, return_device_array)
        if verbose:
            summary_line(-(-x.shape[0] // batch_size), time.perf_counter() - started, {})
        return result

    def __call__(self, x):
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    def predict_on_batch(self, x):
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    # ---------------------------------------------------------------- weights
    def get_weights(self) -> list[np.ndarray]:
        """Every layer's [kernel (in, units), bias (units,)], in order, as NumPy arrays."""
        if not self.built:
            return []
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        """Inverse of get_weights (same order and shapes)."""
        if not self.built:
            raise ValueError("set_weights: the model is not built yet; call build() or fit/predict first")
        if not isinstance(weights, (list, tuple)):
            raise TypeError(f"weights: expected a list of arrays, got {type(weights).__name__}")
        expected = sum(len(layer.weights) for layer in self.layers)
        if len(weights) != expected:
            raise ValueError(f"weights: the model has {expected} weight arrays, got {len(weights)}")
        for layer, start in zip(self.layers, np.cumsum([0] + [len(layer.weights) for layer in self.layers])):
            layer.set_weights(list(weights[start : start + len(layer.weights)]))

    @property
    def weights(self):
        return [w for layer in self.layers for w in layer.weights] if self.built else []

    def summary(self, print_fn=None):
        """Print a table of layers, output shapes and parameter counts."""
        model_summary(self, self.backend.name if self.backend else backends.get_backend(), print_fn or print)

    # ------------------------------------------------------------- save/load
    def get_config(self) -> dict:
        """The architecture as plain data; :meth:`from_config` rebuilds an unbuilt model from it."""
        return {
            "name": self.name,
            "input_dim": self.input_dim,
            "dtype": str(self.dtype),
            "layers": [layer.get_config() for layer in self.layers],
        }

    @classmethod
    def from_config(cls, config) -> Sequential:
        """An unbuilt model from :meth:`get_config` output (ValueError/TypeError if malformed)."""
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a mapping, got {type(config).__name__}")
        layer_configs = config.get("layers")
        if not isinstance(layer_configs, list) or not layer_configs:
            raise ValueError(f"config: expected a non-empty list of layer configs under 'layers', got {layer_configs!r}"[:300])
        model = cls(name=config.get("name"), dtype=config.get("dtype"))
        if config.get("input_dim") is not None:
            model.add(Input(shape=(config["input_dim"],)))
        for lc in layer_configs:
            if not isinstance(lc, dict):
                raise ValueError(f"config: layer config {lc!r} is not a mapping"[:300])
            model.add(layer_from_config(lc))
        return model

    def save(self, filepath):
        """Save architecture, weights, compile settings and optimizer state to one file (atomically)."""
        saving.save_model(self, filepath)

    def export(self, filepath, format="onnx", **kwargs):
        """Write the model for serving: ``format="onnx"`` writes an ONNX graph (see :func:`gpunn.onnx_export.export`)."""
        onnx_export.export(self, filepath, format, **kwargs)

    def save_weights(self, filepath):
        saving.save_model(self, filepath, weights_only=True)

    def load_weights(self, filepath):
        saving.load_weights(self, filepath)

    def __repr__(self):
        return f"<Sequential {self.name!r}: {len(self.layers)} layers, built={self.built}>"


def load_model(filepath, compile=True) -> Sequential:
    """Rebuild a saved model (on the active backend) with its weights and, by default, its training state."""
    return saving.load_model(filepath, Sequential, compile=compile)
