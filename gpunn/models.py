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

import time

import json

import numpy as np

from gpunn import arrays, checks, data_adapter, device_memory, fit_loop, losses, onnx_export, optimizers, saving, training
from gpunn import backend as backends
from gpunn import callbacks as callbacks_mod
from gpunn import metrics as metrics_mod
from gpunn.functional import Model, clone_model, save_model  # noqa: F401  (Keras's gpunn.models names)
from gpunn.layer_base import SymbolicTensor
from gpunn.model_layers import LayerStack
from gpunn.progress import summary_line
from gpunn.training import Objective, Trainer, TrainStep

DeviceMemoryError = device_memory.DeviceMemoryError
NonFiniteLossError = fit_loop.NonFiniteLossError


def _drop_buffers(model):
    model._drop_trainer()


_guard_memory = device_memory.guard(_drop_buffers)


class Sequential(LayerStack):
    """A linear stack of layers: ``Sequential([Dense(64, activation="relu"), Dense(1, activation="sigmoid")])``.

    The layer stack, weights and configuration come from
    :class:`gpunn.model_layers.LayerStack`; this class adds compile, fit,
    evaluate, predict and saving.
    """

    def __init__(self, layers=None, name=None, dtype=None, trainable=True):
        self.optimizer = self.loss = None
        self._metric_specs, self._weighted_metric_specs = [], []
        self._objective = None
        self.compiled = False
        self.stop_training = False
        self.history = None
        self._trainer = None
        self._training = fit_loop.OneAtATime()  # held by fit / train_on_batch
        self.feature_names = None  # the column names of the DataFrame fit was given (see gpunn.arrays)
        self._init_stack(layers, name, dtype)
        if not trainable:
            self.trainable = False

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
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, weighted_metrics=None, loss_weights=None,
                run_eagerly=False, steps_per_execution=1, jit_compile="auto", auto_scale_loss=True):  # fmt: skip
        """Configure training: optimizer (name or instance), loss, metrics (names).

        As in Keras 3, ``metrics`` ignore sample and class weights, while
        ``weighted_metrics`` are weighted by them.  Keras's execution settings
        (``run_eagerly``, ``jit_compile``, ``steps_per_execution``, ``auto_scale_loss``)
        are checked and otherwise change nothing: gpunn always runs its own
        compiled steps, one batch per step.  ``loss_weights`` weigh the outputs of
        multi-output models; a gpunn model has one output, so only 1 (or None) is taken.
        """
        checks.compile_execution_settings(loss_weights, run_eagerly, steps_per_execution, jit_compile, auto_scale_loss)
        if not self.layers:
            raise ValueError("compile: the model has no layers")
        # resolve everything first: a failed compile leaves the model as it was
        new_optimizer, new_loss = optimizers.get(optimizer), losses.get(loss)
        specs = [metrics_mod.check_list(metrics, "metrics"), metrics_mod.check_list(weighted_metrics, "weighted_metrics")]
        objective = self._make_objective(new_loss, *specs)
        with self._lock:
            self.optimizer, self.loss, self._objective = new_optimizer, new_loss, objective
            self._metric_specs, self._weighted_metric_specs = specs
            self.compiled = True
            self._drop_trainer()
            if self.built:
                self.optimizer.build(self.backend, self.count_params(), self.dtype)

    def _make_objective(self, loss, metric_specs, weighted_metric_specs, warn=True):
        if self.output_dim is None:
            raise ValueError(
                "compile: the model's output size is unknown (no layer sets it and the input size is not "
                "declared); end the model with a Dense layer or declare gpunn.Input(shape=...)"
            )
        if isinstance(loss, losses.Crossentropy):  # "crossentropy"/"ce": chosen from the shapes (Keras 3)
            loss = loss.choose(self.output_dim)
        return Objective(loss, self.layers, metric_specs, weighted_metric_specs, warn, self.output_dim)

    def _choose_loss(self, y):
        """With ``loss="crossentropy"``, the first targets given decide which one (as in Keras 3)."""
        if not isinstance(self.loss, losses.Crossentropy) or self.loss.target_shape is not None or y is None:
            return
        try:
            shape = np.shape(y)
        except ValueError:  # ragged: the target checks that follow say what is wrong
            return
        self.loss.target_shape = tuple(shape) or (1,)
        objective = self._make_objective(self.loss, self._metric_specs, self._weighted_metric_specs, warn=False)
        if type(objective.loss) is not type(self._objective.loss):
            with self._lock:
                self._objective = objective
                self._drop_trainer()

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

    def make_train_step(self, batch_size, backend=None, graph=False) -> TrainStep:
        """A reusable training step for exactly ``batch_size`` rows (builds the model if needed).

        ``backend``, when given, stands in for the model's backend for every
        numeric call the step makes (gather, forward, loss, backward,
        regularization, optimizer), e.g. a timing proxy; its buffers still
        live on the model's backend.  ``graph``: capture the whole step as a
        CUDA graph and replay it (True; "auto": only where available).  See
        :class:`gpunn.training.TrainStep`.
        """
        self._require_compiled("make_train_step")
        batch_size = checks.positive_int(batch_size, "batch_size")
        self.build()
        return TrainStep(self._get_trainer(), batch_size, self._standardize, backend, graph)

    # ------------------------------------------------------------------- data
    def _standardize(self, x, y, sample_weight, class_weight=None, argument="x"):
        """Validated host arrays (x, targets, weights or None); builds the model if needed."""
        self._require_compiled("fit" if argument == "x" else argument)
        self._choose_loss(y)
        x, t, w = data_adapter.standardize(self._objective, self.input_dim, self.dtype, self.rows(x), y, sample_weight, class_weight,
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
            # class weights are folded in after the validation split: they weight training only, as in Keras
            names = arrays.column_names(x)
            standardized = self._standardize(x, y, sample_weight)
            self.feature_names = self.feature_names or names  # once the data has passed the checks
            data, val_data = data_adapter.fit_data(self.backend, self._standardize, standardized, validation_data, validation_split,
                                                   lambda t, w: data_adapter.with_class_weights(self._objective, class_weight, t, w))  # fmt: skip
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
    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None, callbacks=None,
                 return_dict=False):  # fmt: skip
        """Loss (and metrics) on ``x, y``: a scalar, a list ``[loss, *metrics]``, or a dict.

        ``callbacks`` get Keras's ``on_test_*`` hooks; ``steps`` (Keras: the number of batches
        to draw from a dataset) must be None for arrays, which are evaluated whole.
        """
        batch_size = checks.positive_int(batch_size, "batch_size", allow_none_default=32)
        verbose = checks.verbose(verbose)
        checks.arrays_take_no_steps(steps, "evaluate")
        self._require_compiled("evaluate")
        x, t, w = self._standardize(x, y, sample_weight, argument="x")
        batches = -(-x.shape[0] // batch_size)
        cbs = callbacks_mod.callback_list(callbacks, self, {"epochs": 1, "steps": batches, "verbose": verbose})
        started = time.perf_counter()
        logs = self._get_trainer().evaluate(data_adapter.place(self.backend, x, t, w), batch_size, callbacks=cbs)
        if verbose:
            summary_line(batches, time.perf_counter() - started, logs)
        return training.format_result(logs, return_dict)

    @_guard_memory
    def test_on_batch(self, x, y=None, sample_weight=None, return_dict=False):
        """Loss (and metrics) of one batch, without updating the weights."""
        self._require_compiled("test_on_batch")
        x, t, w = self._standardize(x, y, sample_weight, argument="x")
        logs = self._get_trainer().evaluate(data_adapter.place(self.backend, x, t, w), x.shape[0])
        return training.format_result(logs, return_dict)

    @_guard_memory
    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None, return_device_array=False):
        """Outputs (M, outputs) in batches: a NumPy array, or with ``return_device_array`` the backend's own array.

        ``callbacks`` get Keras's ``on_predict_*`` hooks (with batch hooks, ``on_predict_batch_end``
        gets ``{"outputs": that batch's outputs}`` and the batches run one after another);
        ``steps`` must be None for arrays.
        """
        batch_size = checks.positive_int(batch_size, "batch_size", allow_none_default=32)
        verbose = checks.verbose(verbose)
        checks.arrays_take_no_steps(steps, "predict")
        if not self.layers:
            raise ValueError("predict: the model has no layers")
        started = time.perf_counter()
        x = checks.feature_rows(self.rows(x), self.input_dim, "x", self.feature_names, (self.backend or backends.current()).xp, self.dtype)
        self._ensure_built(x.shape[1])
        batches = -(-x.shape[0] // batch_size)
        cbs = callbacks_mod.callback_list(callbacks, self, {"epochs": 1, "steps": batches, "verbose": verbose})
        trainer = self._get_trainer()
        if cbs is None:
            result = data_adapter.predict(trainer, self.backend, x, self.dtype, batch_size, return_device_array)
        else:
            cbs.on_predict_begin()
            if cbs.overrides("on_predict_batch_begin") or cbs.overrides("on_predict_batch_end"):
                parts = []
                for batch, lo in enumerate(range(0, x.shape[0], batch_size)):
                    cbs.on_predict_batch_begin(batch)
                    parts.append(data_adapter.predict(trainer, self.backend, x[lo : lo + batch_size], self.dtype, batch_size, return_device_array))
                    cbs.on_predict_batch_end(batch, {"outputs": parts[-1]})
                result = (self.backend.xp if return_device_array else np).concatenate(parts)
            else:
                result = data_adapter.predict(trainer, self.backend, x, self.dtype, batch_size, return_device_array)
            cbs.on_predict_end()
        if verbose:
            summary_line(batches, time.perf_counter() - started, {})
        return result

    def __call__(self, x, training=None, mask=None):
        """``model(x)``: the outputs for ``x`` in one batch, as NumPy (Keras runs the model's call).

        ``training=True`` (training-mode Dropout/BatchNormalization outside fit) is refused;
        ``training=False`` / None is inference, as predict.
        """
        if isinstance(x, SymbolicTensor):
            raise TypeError("x: a gpunn model cannot be called on a functional-API tensor; add its layers to the chain instead")
        if training is not None and checks.boolean(training, "training"):
            raise ValueError("training: gpunn runs a model in training mode only inside fit / train_on_batch; use training=False or leave it out")
        if mask is not None:
            raise ValueError("mask: gpunn models take no mask")
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    def predict_on_batch(self, x):
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    # ------------------------------------------------------------- save/load
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


saving.default_model_class = Sequential


def load_model(filepath, compile=True, custom_objects=None, safe_mode=True) -> Sequential:
    """Rebuild a saved model (on the active backend) with its weights and, by default, its training state."""
    return saving.load_model(filepath, custom_objects, compile, safe_mode, model_class=Sequential)


def model_from_json(json_string, custom_objects=None) -> Sequential:
    """A model (freshly initialised) from the architecture written by ``Sequential.to_json``."""
    if not isinstance(json_string, (str, bytes)):
        raise TypeError(f"json_string: expected a JSON string from model.to_json(), got {type(json_string).__name__}")
    try:
        spec = json.loads(json_string)
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_string: not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("class_name") != "Sequential" or not isinstance(spec.get("config"), dict):
        raise ValueError("json_string: expected {'class_name': 'Sequential', 'config': {...}} as written by model.to_json()")
    return Sequential.from_config(spec["config"])
