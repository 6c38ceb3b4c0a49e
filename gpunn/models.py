"""``Sequential``: a stack of Dense layers trained with backpropagation.

Every number a model holds lives in its backend's arrays (NumPy or CuPy):
one flat parameter buffer and one flat gradient buffer (each layer's kernel
and bias are views into them), the optimizer's state, the training data
(copied once per ``fit``, or streamed batch by batch when it would not fit
on the device) and per-batch-size workspaces reused by every step.  A training step is a fixed sequence of backend calls -- fused linear
forward per layer, a fused loss+gradient, fused linear backward per layer,
one optimizer update -- and reads nothing back to the host; losses and
metrics are read once per progress refresh or epoch.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from gpunn import activations, codes, config, losses, metrics as metrics_mod, optimizers
from gpunn import _validation as check
from gpunn import backend as backends
from gpunn.callbacks import CallbackList, History, TerminateOnNaN
from gpunn.layers import Dense, Input
from gpunn.progress import EpochProgress, summary_line
from gpunn.random import generator


DeviceMemoryError = check.DeviceMemoryError


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the model keeps its last finite weights."""


class _Streamed(np.ndarray):
    """Host data too large for the device: batches are gathered on the host and copied over."""


class _Workspace:
    """Buffers for one batch size: per-layer outputs (and GELU pre-activations) for the
    activations ``acts``; with ``training`` also inputs, targets, weights, gradients."""

    def __init__(self, model, batch, acts, training):
        b, dt = model.backend, model.dtype
        self.batch = batch
        self.y = [b.empty((batch, layer.units), dt) for layer in model.layers]
        self.z = [
            b.empty((batch, layer.units), dt) if act.code in codes.ACT_NEEDS_PREACTIVATION else None
            for layer, act in zip(model.layers, acts)
        ]
        if training:
            self.x = b.empty((batch, model.input_dim), dt)
            self.t = b.empty((batch,) if model._sparse_targets else (batch, model.output_dim), dt)
            self.w = b.empty((batch,), dt)
            self.g = [b.empty((batch, layer.units), dt) for layer in model.layers]
            self.probs = b.empty((batch, model.output_dim), dt)


_BACKEND_CALLS = ("take_rows", "linear_forward", "linear_backward", "loss_grad", "xp")


class TrainStep:
    """A reusable training step for exactly ``batch_size`` rows (see ``Sequential.make_train_step``).

    ``load``/``load_rows`` fill the step's own buffers, ``run`` does forward,
    loss, backward and one optimizer update without reading anything back to
    the host, and ``logs`` reads the loss and metrics accumulated by every
    ``run`` since the step was made.
    """

    def __init__(self, model, batch_size, backend=None):
        self.model = model
        self.batch_size = batch_size
        self.backend = model.backend if backend is None else backend
        self._params, self._acts = model.params, model._train_acts
        self._ws = _Workspace(model, batch_size, self._acts, training=True)
        self._sums, self._states = model._new_accumulators()
        self._weighted = False
        self._seen = 0

    def _check_rows(self, argument, rows):
        if rows != self.batch_size:
            raise ValueError(f"{argument}: this step trains on exactly {self.batch_size} rows, got {rows}")

    def load(self, x, y, sample_weight=None):
        """Copy one batch into the step: ``x`` (batch, features), ``y`` targets, optional weights.

        Host (NumPy) data is checked as ``fit`` checks it; arrays already on
        the backend's device are only shape-checked (reading their values
        would synchronise).
        """
        model, b, ws = self.model, self.model.backend, self._ws
        if isinstance(x, np.ndarray) or not hasattr(x, "shape"):
            x, t, w = model._standardize(x, y, sample_weight, argument="x")
            self._check_rows("x", x.shape[0])
        else:
            self._check_rows("x", x.shape[0])
            if tuple(x.shape) != tuple(ws.x.shape):
                raise ValueError(f"x: expected shape {tuple(ws.x.shape)}, got {tuple(x.shape)}")
            t, w = y, sample_weight
            if getattr(t, "size", None) != ws.t.size or t.shape[0] != self.batch_size:
                raise ValueError(f"y: expected targets of shape {tuple(ws.t.shape)}, got {tuple(getattr(t, 'shape', ()))}")
            t = t.reshape(ws.t.shape)
        ws.x[...] = b.asarray(x, dtype=model.dtype)
        ws.t[...] = b.asarray(t, dtype=model.dtype)
        self._weighted = w is not None
        if w is not None:
            ws.w[...] = b.asarray(w, dtype=model.dtype).reshape(ws.w.shape)

    def load_rows(self, X, Y, index, sample_weight=None):
        """Gather rows ``index`` (batch_size integers) of backend-resident ``X``, ``Y``
        (and per-row ``sample_weight``) into the step's buffers, on the device."""
        ws = self._ws
        self._check_rows("index", index.shape[0])
        if X.ndim != 2 or X.shape[1] != ws.x.shape[1]:
            raise ValueError(f"X: expected shape (rows, {ws.x.shape[1]}), got {tuple(X.shape)}")
        if tuple(Y.shape[1:]) != tuple(ws.t.shape[1:]):
            raise ValueError(f"Y: expected shape (rows, *{tuple(ws.t.shape[1:])}), got {tuple(Y.shape)}")
        index = self.model.backend.asarray(index)
        self.backend.take_rows(X, index, ws.x)
        self.backend.take_rows(Y, index, ws.t)
        self._weighted = sample_weight is not None
        if sample_weight is not None:
            self.backend.take_rows(sample_weight, index, ws.w)

    def run(self):
        """Forward, loss, backward and one optimizer update on the loaded batch (no host sync)."""
        model = self.model
        if model.params is not self._params or model._train_acts is not self._acts:
            raise RuntimeError("TrainStep.run: the model was rebuilt or recompiled since this step was made; make a new step")
        model._has_weights = self._weighted
        model._train_step(self._ws, self._sums, self._states, self.backend)
        self._seen += self.batch_size

    def logs(self) -> dict:
        """Mean loss and metrics over every ``run`` since the step was made (Keras names)."""
        return self.model._read_logs(self._sums, self._states, self._seen)


class Sequential:
    """A linear stack of layers: ``Sequential([Dense(64, activation="relu"), Dense(1, activation="sigmoid")])``."""

    def __init__(self, layers=None, name=None, dtype=None):
        self.name = name or "sequential"
        self.layers: list[Dense] = []
        self._declared_input_dim = None
        self._dtype_request = None if dtype is None else config.check_dtype(dtype)
        self.backend = None
        self.dtype = None
        self.params = self.grads = None
        self.optimizer = None
        self.loss = None
        self._metric_specs: list = []
        self._weighted_metric_specs: list = []
        self.compiled = False
        self.stop_training = False
        self.history = None
        self._workspaces: dict[int, _Workspace] = {}
        self._sparse_targets = False
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
        self.layers.append(layer)
        if self.compiled:
            self._resolve_loss()

    @property
    def _working_dtype(self) -> np.dtype:
        """The model's float dtype: fixed when built, else the requested one or floatx()."""
        if self.dtype is not None:
            return self.dtype
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

    def build(self, input_shape=None):
        """Create the weights for ``input_shape`` = (batch, features) or (features,)."""
        if not self.layers:
            raise ValueError("build: the model has no layers; add gpunn.layers.Dense layers first")
        if input_shape is not None:
            shape = tuple(input_shape)
            n = shape[-1]
            if self.input_dim is not None and n != self.input_dim:
                raise ValueError(f"input_shape: the model was declared with {self.input_dim} inputs, got {n}")
            self._declared_input_dim = check.positive_int(n, "input_shape")
        if self.input_dim is None:
            raise ValueError(
                "build: the input size is unknown; call fit/predict with data, or declare it with "
                "gpunn.Input(shape=(n,)) or Dense(..., input_dim=n)"
            )
        if self.built:
            return
        self._allocate(initialize=True)

    def _weight_shapes(self):
        """Shape of every weight array, in get_weights order, from the architecture alone."""
        shapes, dim = [], self.input_dim
        for layer in self.layers:
            shapes.extend(tuple(s) for _, s in layer.param_shapes(dim))
            dim = layer.units
        return shapes

    def _allocate(self, initialize):
        self.backend = backends.current()
        self.dtype = np.dtype(self._dtype_request or config.floatx())
        sizes = [int(np.prod(shape)) for shape in self._weight_shapes()]
        total = sum(sizes)
        self.params = self.backend.zeros((total,), self.dtype)
        self.grads = self.backend.zeros((total,), self.dtype)
        offset, dim = 0, self.input_dim
        for layer in self.layers:
            offset = layer.build(self.backend, dim, self.params, self.grads, offset, self.dtype, initialize)
            dim = layer.units
        bounds = np.cumsum([0] + sizes)
        self._segments = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        self._workspaces = {}
        if self.compiled:
            self.optimizer.build(self.backend, total, self.dtype)

    def _ensure_built(self, n_features):
        if not self.built:
            if self.input_dim is not None and self.input_dim != n_features:
                raise ValueError(f"x: the model expects {self.input_dim} features per sample, got {n_features}")
            self._declared_input_dim = n_features
            self.build()

    def make_train_step(self, batch_size, backend=None) -> TrainStep:
        """A reusable training step for exactly ``batch_size`` rows (builds the model if needed).

        ``backend``, when given, stands in for the model's backend for every
        numeric call the step makes (gather, forward, loss, backward,
        regularization, optimizer), e.g. a timing proxy; its buffers still
        live on the model's backend.
        """
        self._require_compiled("make_train_step")
        batch_size = check.positive_int(batch_size, "batch_size")
        if backend is not None and not all(hasattr(backend, name) for name in _BACKEND_CALLS):
            raise TypeError(f"backend: expected an object with the Backend methods {', '.join(_BACKEND_CALLS)}, got {type(backend).__name__}")
        if not self.built:
            self.build()
        return TrainStep(self, batch_size, backend)

    def count_params(self) -> int:
        if not self.built:
            raise ValueError("count_params: the model is not built yet")
        return int(self.params.shape[0])

    # ---------------------------------------------------------------- compile
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, weighted_metrics=None):
        """Configure training: optimizer (name or instance), loss, metrics (names).

        As in Keras 3, ``metrics`` ignore sample and class weights, while
        ``weighted_metrics`` are weighted by them.
        """
        if not self.layers:
            raise ValueError("compile: the model has no layers")
        # resolve everything first: a failed compile leaves the model as it was
        new_optimizer = optimizers.get(optimizer)
        new_loss = losses.get(loss)
        specs = []
        for argument, given in (("metrics", metrics), ("weighted_metrics", weighted_metrics)):
            if given is None:
                given = []
            if isinstance(given, str) or not isinstance(given, (list, tuple)):
                raise TypeError(f"{argument}: expected a list of metric names, got {given!r}")
            for m in given:
                check.metric(m, argument)
            specs.append(list(given))
        self.optimizer, self.loss = new_optimizer, new_loss
        self._metric_specs, self._weighted_metric_specs = specs
        self._resolve_loss()
        self.compiled = True
        self._workspaces = {}
        if self.built:
            self.optimizer.build(self.backend, self.count_params(), self.dtype)

    def _resolve_loss(self):
        self._loss_kind, self._fused_output = self.loss.resolve(self.layers[-1].activation.name)
        self._probability_hint = ""
        if self._loss_kind in (codes.LOSS_BCE, codes.LOSS_CCE, codes.LOSS_SPARSE_CCE):
            output = self.layers[-1].activation.name
            if output not in ("sigmoid", "softmax"):
                self._probability_hint = (
                    f" The output activation {output!r} does not produce probabilities, which "
                    f"{self.loss.name}(from_logits=False) expects: use from_logits=True, or a "
                    "sigmoid/softmax output."
                )
                warnings.warn(f"compile:{self._probability_hint}", UserWarning, stacklevel=3)
        self._sparse_targets = self._loss_kind in codes.SPARSE_LOSSES
        # each layer's activation as run in training: a fused output layer produces logits
        self._train_acts = [layer.activation for layer in self.layers]
        if self._fused_output:
            self._train_acts[-1] = activations.get("linear")
        self._metrics = None  # resolved lazily: "accuracy" depends on the output size
        self._workspaces = {}

    def _require_compiled(self, what):
        if not self.compiled:
            raise RuntimeError(f"{what}: the model must be compiled first: model.compile(optimizer=..., loss=...)")

    @property
    def metrics_names(self) -> list[str]:
        return ["loss"] + [name for name, _, _ in self._resolve_metrics()]

    def _resolve_metrics(self):
        """(name, Metric or None, weighted) triples, in log order.

        A None metric means "read the unweighted accuracy count of the fused
        loss pass" (no extra work per batch).
        """
        if self._metrics is None:
            resolved = []
            natural = {
                codes.LOSS_SIGMOID_BCE: metrics_mod.BinaryAccuracy,
                codes.LOSS_BCE: metrics_mod.BinaryAccuracy,
                codes.LOSS_SOFTMAX_CCE: metrics_mod.CategoricalAccuracy,
                codes.LOSS_CCE: metrics_mod.CategoricalAccuracy,
                codes.LOSS_SOFTMAX_SPARSE_CCE: metrics_mod.SparseCategoricalAccuracy,
                codes.LOSS_SPARSE_CCE: metrics_mod.SparseCategoricalAccuracy,
            }.get(self._loss_kind)
            names = set()
            for weighted, specs in ((False, self._metric_specs), (True, self._weighted_metric_specs)):
                for spec in specs:
                    metric = metrics_mod.get(spec, self.loss, self.output_dim, self._sparse_targets)
                    name = metric.name
                    if name in names:  # the same metric asked for weighted and unweighted
                        name = "weighted_" + name
                    names.add(name)
                    from_loss = (
                        not weighted
                        and natural is not None
                        and type(metric) is natural
                        and getattr(metric, "threshold", 0.5) == 0.5
                    )
                    resolved.append((name, None if from_loss else metric, weighted))
            self._metrics = resolved
            self._computed_metrics = [(m, weighted) for _, m, weighted in resolved if m is not None]
        return self._metrics

    # ------------------------------------------------------------------- data
    def _prepare_targets(self, y, n, argument="y"):
        """Targets as the backend expects them: (M, outputs) floats, or (M,) class indices."""
        arr = check.as_float_array(y, argument, self._working_dtype)
        if arr.ndim == 0:
            raise ValueError(f"{argument}: expected one target per sample, got a scalar")
        if arr.shape[0] != n:
            raise ValueError(f"{argument}: expected {n} targets (one per sample of x), got {arr.shape[0]}")
        check.check_finite(arr, argument)
        out = self.output_dim
        if self._sparse_targets:
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise ValueError(
                    f"{argument}: {self.loss.name} expects integer class labels of shape ({n},), got shape {arr.shape}; "
                    "for one-hot labels use categorical_crossentropy"
                )
            if (arr != np.round(arr)).any() or (arr < 0).any() or (arr >= out).any():
                bad = arr[(arr != np.round(arr)) | (arr < 0) | (arr >= out)][0]
                raise ValueError(f"{argument}: expected integer class labels in [0, {out}), found {float(bad)!r}")
            return np.ascontiguousarray(arr)
        if arr.ndim == 1:
            if out != 1:
                hint = (
                    "; for integer class labels use loss='sparse_categorical_crossentropy'"
                    if self.loss.name == "categorical_crossentropy"
                    else ""
                )
                raise ValueError(f"{argument}: the model has {out} outputs, so expected shape ({n}, {out}), got ({n},){hint}")
            arr = arr.reshape(n, 1)
        if arr.ndim != 2 or arr.shape[1] != out:
            raise ValueError(f"{argument}: expected shape ({n}, {out}) to match the model's {out} outputs, got {arr.shape}")
        if self._loss_kind in (codes.LOSS_SIGMOID_BCE, codes.LOSS_BCE) and ((arr < 0) | (arr > 1)).any():
            bad = arr[(arr < 0) | (arr > 1)][0]
            raise ValueError(f"{argument}: binary_crossentropy expects labels in [0, 1], found {float(bad)!r}")
        if self._loss_kind in (codes.LOSS_SOFTMAX_CCE, codes.LOSS_CCE) and (arr < 0).any():
            raise ValueError(f"{argument}: categorical_crossentropy expects non-negative (one-hot) labels, found {float(arr.min())!r}")
        return np.ascontiguousarray(arr)

    def _class_weights(self, class_weight, t):
        if class_weight is None:
            return None
        if not isinstance(class_weight, dict):
            raise TypeError(f"class_weight: expected a dict {{class index: weight}}, got {type(class_weight).__name__}")
        if self._sparse_targets:
            classes = t.astype(np.int64)
        elif t.shape[1] == 1:
            classes = (t[:, 0] > 0.5).astype(np.int64)
        else:
            classes = t.argmax(axis=1)
        table = np.ones(max(self.output_dim, 2), dtype=np.float64)
        for k, v in class_weight.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(table):
                raise ValueError(f"class_weight: expected class indices in [0, {len(table)}), got key {k!r}")
            if not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"class_weight: expected non-negative finite weights, got {v!r} for class {k}")
            table[int(k)] = v
        return table[classes]

    def _standardize(self, x, y, sample_weight, class_weight=None, argument="x"):
        """Validated host arrays (x, targets, weights or None); builds the model if needed."""
        self._require_compiled("fit" if argument == "x" else argument)
        dtype = self._working_dtype
        x = check.features(x, dtype, self.input_dim, argument)
        if y is None:
            raise ValueError(f"y: expected targets for the {x.shape[0]} samples of {argument}, got None")
        t = self._prepare_targets(y, x.shape[0], "y" if argument == "x" else f"{argument} targets")
        w = check.sample_weights(sample_weight, x.shape[0], dtype)
        cw = self._class_weights(class_weight, t)
        if cw is not None:
            w = (cw if w is None else w * cw).astype(dtype)
        self._ensure_built(x.shape[1])
        return x, t.astype(self.dtype, copy=False), w

    def _to_device(self, x, t, w):
        """The data on the backend's device, copied once -- or, when it would take more
        than half the device's free memory, left on the host (as ``_Streamed`` arrays)
        and copied over one batch at a time."""
        b = self.backend
        capacity = b.free_device_bytes()
        nbytes = x.nbytes + t.nbytes + (0 if w is None else w.nbytes)
        if capacity is not None and nbytes > capacity // 2:
            return x.view(_Streamed), t.view(_Streamed), (None if w is None else w.view(_Streamed))
        return b.asarray(x), b.asarray(t), (None if w is None else b.asarray(w))

    def _batch_order(self, order, X):
        """Sample order as an index array on the side where ``X`` lives."""
        order = np.asarray(order, dtype=np.int64)
        return order if isinstance(X, _Streamed) else self.backend.asarray(order)

    def _workspace(self, batch, training=True) -> _Workspace:
        """The reused buffers for a batch size (training, or prediction with the full activations)."""
        key = (training, batch)
        ws = self._workspaces.get(key)
        if ws is None:
            if len(self._workspaces) > 4:
                self._workspaces.clear()
            acts = self._train_acts if training else [layer.activation for layer in self.layers]
            ws = self._workspaces[key] = _Workspace(self, batch, acts, training)
        return ws

    # ------------------------------------------------------------ one step
    def _forward(self, x, ws, acts, backend=None):
        backend = backend or self.backend
        a = x
        for layer, act, y, z in zip(self.layers, acts, ws.y, ws.z):
            layer.call(backend, a, y, z, act_override=act)
            a = y
        return a

    def _regularization(self, sums, batch, gradients, backend=None):
        """Add each regularizer's penalty (times the batch size) to the loss sum, and with
        ``gradients`` its gradient to the weights' gradients."""
        xp = (backend or self.backend).xp
        for layer in self.layers:
            for reg, w, g in (
                (layer.kernel_regularizer, layer.kernel, layer.kernel_grad),
                (layer.bias_regularizer, layer.bias, layer.bias_grad),
            ):
                if reg is not None and w is not None:
                    if gradients:
                        reg.add_gradient(xp, w, g)
                    sums[0] += reg.penalty(xp, w) * batch

    def _update_metrics(self, out, ws, states, backend=None):
        """Update the metrics the loss pass does not count, on the model's outputs (probabilities
        when the output activation is folded into the loss)."""
        backend = backend or self.backend
        computed = self._computed_metrics
        if not computed:
            return
        pred = out
        if self._fused_output:
            pred = ws.probs
            act = self.layers[-1].activation
            if act.is_softmax:
                backend.softmax(out, pred)
            else:
                backend.apply_activation(out, act.code, act.alpha, pred)
        w = ws.w if self._has_weights else None
        for (metric, weighted), state in zip(computed, states):
            metric.update(backend.xp, pred, ws.t, w if weighted else None, state)

    def _train_step(self, ws, sums, states, backend=None):
        """Forward, loss, backward and update on the batch held in ``ws`` (on ``backend``,
        by default the model's)."""
        b = backend or self.backend
        acts = self._train_acts
        out = self._forward(ws.x, ws, acts, b)
        b.loss_grad(self._loss_kind, out, ws.t, ws.w if self._has_weights else None, ws.g[-1], sums)
        self._update_metrics(out, ws, states, b)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, act, g = self.layers[i], acts[i], ws.g[i]
            code = act.code
            if act.is_softmax:
                b.softmax_backward(g, ws.y[i])
                code = codes.ACT_LINEAR
            b.linear_backward(
                ws.x if i == 0 else ws.y[i - 1],
                layer.kernel,
                g,
                ws.y[i],
                ws.z[i],
                code,
                act.alpha,
                ws.g[i - 1] if i > 0 else None,
                layer.kernel_grad,
                layer.bias_grad if layer.use_bias else None,
            )
        self._regularization(sums, ws.batch, gradients=True, backend=b)
        self.optimizer.apply(self.params, self.grads, self._segments, backend=b)

    def _test_step(self, ws, sums, states):
        out = self._forward(ws.x, ws, self._train_acts)
        self.backend.loss_grad(self._loss_kind, out, ws.t, ws.w if self._has_weights else None, None, sums)
        self._update_metrics(out, ws, states)
        self._regularization(sums, ws.batch, gradients=False)

    def _load_batch(self, ws, X, T, W, index):
        b = self.backend
        if isinstance(X, _Streamed):  # gather on the host, one copy to the device per array
            ws.x[...] = b.asarray(np.take(X.view(np.ndarray), index, axis=0))
            ws.t[...] = b.asarray(np.take(T.view(np.ndarray), index, axis=0))
            if W is not None:
                ws.w[...] = b.asarray(np.take(W.view(np.ndarray), index, axis=0))
            return
        b.take_rows(X, index, ws.x)
        b.take_rows(T, index, ws.t)
        if W is not None:
            b.take_rows(W, index, ws.w)

    def _new_accumulators(self):
        b = self.backend
        sums = b.zeros((2,), self.dtype)
        self._resolve_metrics()  # also sets _computed_metrics, which the steps update
        states = [b.zeros((2,), np.float64) for _ in self._computed_metrics]
        return sums, states

    def _read_logs(self, sums, states, seen, prefix=""):
        """Host-side logs from the device accumulators (one small transfer)."""
        b = self.backend
        host_sums = b.to_numpy(sums)
        logs = {prefix + "loss": float(host_sums[0]) / max(seen, 1)}
        host_states = iter([b.to_numpy(s) for s in states])
        for name, metric, _ in self._resolve_metrics():
            if metric is None:
                logs[prefix + name] = float(host_sums[1]) / seen if seen else 0.0
            else:
                logs[prefix + name] = metric.result(next(host_states))
        return logs

    # -------------------------------------------------------------------- fit
    @check.guard_device_memory
    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        validation_batch_size=None,
        validation_freq=1,
    ):
        """Train for ``epochs`` epochs; returns a History (``history.history["loss"]``...)."""
        self._require_compiled("fit")
        batch_size = check.positive_int(batch_size, "batch_size", allow_none_default=32)
        epochs = check.positive_int(epochs, "epochs", minimum=0)
        initial_epoch = check.positive_int(initial_epoch, "initial_epoch", minimum=0)
        validation_freq = check.positive_int(validation_freq, "validation_freq")
        check.verbose(verbose)
        validation_batch_size = check.positive_int(validation_batch_size, "validation_batch_size", allow_none_default=batch_size)
        if not isinstance(validation_split, (int, float)) or isinstance(validation_split, bool) or not 0 <= validation_split < 1:
            raise ValueError(f"validation_split: expected a fraction in [0, 1), got {validation_split!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle: expected a bool, got {shuffle!r}")
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"callbacks: expected a list of callbacks, got {type(callbacks).__name__}")
        x, t, w = self._standardize(x, y, sample_weight, class_weight)

        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise ValueError(
                    "validation_data: expected a tuple (x_val, y_val) or (x_val, y_val, sample_weight_val), "
                    f"got {check._describe(validation_data)}"
                )
            vx, vy, vw = (*validation_data, None)[:3]
            val = self._standardize(vx, vy, vw, argument="validation_data x")
        elif validation_split:
            n_val = int(math.floor(x.shape[0] * validation_split))
            if n_val == 0 or n_val == x.shape[0]:
                raise ValueError(
                    f"validation_split: {validation_split} of {x.shape[0]} samples leaves "
                    f"{'no validation' if n_val == 0 else 'no training'} samples"
                )
            cut = x.shape[0] - n_val
            val = (x[cut:], t[cut:], None if w is None else w[cut:])
            x, t, w = x[:cut], t[:cut], None if w is None else w[:cut]
        val_dev = None if val is None else self._to_device(*val)
        X, T, W = self._to_device(x, t, w)
        n = x.shape[0]
        steps = math.ceil(n / batch_size)

        self.history = History()
        user_callbacks = list(callbacks or [])
        # History last, as in Keras: it records what other callbacks add to the logs (e.g. learning_rate)
        cbs = CallbackList(user_callbacks + [self.history], self, {"epochs": epochs, "steps": steps, "verbose": verbose})
        raise_on_nonfinite = not any(isinstance(cb, TerminateOnNaN) for cb in user_callbacks)
        progress = EpochProgress(verbose, epochs, steps)
        self.stop_training = False
        cbs.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            if self.stop_training:
                break
            cbs.on_epoch_begin(epoch)
            progress.epoch_begin(epoch)
            order = generator().permutation(n) if shuffle else np.arange(n)
            logs, done = self._run_epoch(epoch, X, T, W, order, batch_size, cbs, progress, raise_on_nonfinite)
            if val_dev is not None and (epoch + 1 - initial_epoch) % validation_freq == 0:
                logs.update(self._evaluate_device(*val_dev, validation_batch_size, prefix="val_"))
            cbs.on_epoch_end(epoch, logs)
            progress.epoch_end(epoch, done, logs)
        cbs.on_train_end()
        return self.history

    def _snapshot(self):
        xp = self.backend.xp
        return (
            xp.copy(self.params),
            {k: xp.copy(v) for k, v in self.optimizer.slots.items()},
            self.optimizer.iterations,
        )

    def _restore(self, snap):
        params, slots, iterations = snap
        self.params[...] = params
        for k, v in slots.items():
            self.optimizer.slots[k][...] = v
        self.optimizer.iterations = iterations

    def _run_epoch(self, epoch, X, T, W, order, batch_size, cbs, progress, raise_on_nonfinite):
        b = self.backend
        n = order.shape[0]
        steps = math.ceil(n / batch_size)
        self._has_weights = W is not None
        snapshot = self._snapshot() if raise_on_nonfinite else None
        order_dev = self._batch_order(order, X)
        sums, states = self._new_accumulators()
        # running loss after each batch: finds the first non-finite batch without a per-batch sync
        record = b.zeros((steps,), self.dtype) if raise_on_nonfinite and b.name != "numpy" else None
        seen = 0
        done = 0
        for step in range(steps):
            start, stop = step * batch_size, min(n, (step + 1) * batch_size)
            ws = self._workspace(stop - start)
            cbs.on_train_batch_begin(step)
            self._load_batch(ws, X, T, W, order_dev[start:stop])
            self._train_step(ws, sums, states)
            seen = stop
            done = step + 1
            if record is not None:
                record[step] = sums[0]
            elif raise_on_nonfinite and not math.isfinite(sums[0]):
                self._recover_nonfinite(epoch, step, snapshot, X, T, W, order_dev, batch_size, float(sums[0]))
            if cbs.wants_batch_logs:
                cbs.on_train_batch_end(step, self._read_logs(sums, states, seen))
            elif progress.due():
                progress.update(done, self._read_logs(sums, states, seen))
            if self.stop_training:
                break
        logs = self._read_logs(sums, states, seen)
        if record is not None and not math.isfinite(logs["loss"]):
            host_record = b.to_numpy(record[:done])
            bad = int(np.flatnonzero(~np.isfinite(host_record))[0])
            self._recover_nonfinite(epoch, bad, snapshot, X, T, W, order_dev, batch_size, float(host_record[bad]))
        if raise_on_nonfinite and not bool(b.xp.isfinite(self.params).all()):
            # every loss was finite but an update overflowed (e.g. the epoch's last): roll back to before it
            self._recover_nonfinite(epoch, done, snapshot, X, T, W, order_dev, batch_size, None)
        return logs, done

    def _recover_nonfinite(self, epoch, bad_step, snapshot, X, T, W, order_dev, batch_size, value):
        """Roll back to the last finite weights before ``bad_step`` and raise NonFiniteLossError.

        The epoch is replayed from its start snapshot (same batches, same
        order), stopping before the batch whose loss was not finite, or
        earlier if an update had already made a weight non-finite.  ``value``
        None means no loss was non-finite, only the weights after ``bad_step`` updates.
        """
        xp = self.backend.xp
        self._restore(snapshot)
        sums, states = self._new_accumulators()
        n = order_dev.shape[0]
        bad_update = bad_step - 1
        for step in range(bad_step):
            previous = self._snapshot()
            start, stop = step * batch_size, min(n, (step + 1) * batch_size)
            ws = self._workspace(stop - start)
            self._load_batch(ws, X, T, W, order_dev[start:stop])
            self._train_step(ws, sums, states)
            if not bool(xp.isfinite(self.params).all()):
                self._restore(previous)
                bad_update = step
                break
        if value is None:
            what = f"the update of epoch {epoch + 1}, batch {bad_update + 1} made the weights non-finite"
        else:
            what = f"the loss became {'NaN' if math.isnan(value) else 'infinite'} at epoch {epoch + 1}, batch {bad_step + 1}"
        raise NonFiniteLossError(
            f"fit: {what}; training stopped and the model "
            f"keeps its last finite weights. Try a lower learning rate (currently {self.optimizer.learning_rate:g}), "
            "gradient clipping (e.g. clipnorm=1.0), or check the data for extreme values." + self._probability_hint
        )

    # -------------------------------------------------------- evaluate/predict
    def _evaluate_device(self, X, T, W, batch_size, prefix=""):
        n = X.shape[0]
        self._has_weights = W is not None
        sums, states = self._new_accumulators()
        index = self._batch_order(np.arange(n), X)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            ws = self._workspace(stop - start)
            self._load_batch(ws, X, T, W, index[start:stop])
            self._test_step(ws, sums, states)
        return self._read_logs(sums, states, n, prefix)

    def _format_result(self, logs, return_dict):
        if return_dict:
            return logs
        values = list(logs.values())
        return values[0] if len(values) == 1 else values

    @check.guard_device_memory
    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, return_dict=False):
        """Loss (and metrics) on ``x, y``: a scalar, a list ``[loss, *metrics]``, or a dict."""
        batch_size = check.positive_int(batch_size, "batch_size", allow_none_default=32)
        verbose = check.verbose(verbose)
        self._require_compiled("evaluate")
        x, t, w = self._standardize(x, y, sample_weight, argument="x")
        started = time.perf_counter()
        logs = self._evaluate_device(*self._to_device(x, t, w), batch_size)
        if verbose:
            summary_line(math.ceil(x.shape[0] / batch_size), time.perf_counter() - started, logs)
        return self._format_result(logs, return_dict)

    @check.guard_device_memory
    def predict(self, x, batch_size=None, verbose="auto"):
        """Model outputs (M, outputs) as a NumPy array, computed in batches."""
        batch_size = check.positive_int(batch_size, "batch_size", allow_none_default=32)
        verbose = check.verbose(verbose)
        if not self.layers:
            raise ValueError("predict: the model has no layers")
        started = time.perf_counter()
        dtype = self._working_dtype
        x = check.features(x, dtype, self.input_dim, "x")
        self._ensure_built(x.shape[1])
        b = self.backend
        X = b.asarray(x.astype(self.dtype, copy=False))
        out = b.empty((x.shape[0], self.output_dim), self.dtype)
        acts = [layer.activation for layer in self.layers]
        for start in range(0, x.shape[0], batch_size):
            stop = min(x.shape[0], start + batch_size)
            out[start:stop] = self._forward(X[start:stop], self._workspace(stop - start, training=False), acts)
        result = b.to_numpy(out)
        if verbose:
            summary_line(math.ceil(x.shape[0] / batch_size), time.perf_counter() - started, {})
        return result

    def __call__(self, x):
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    def predict_on_batch(self, x):
        return self.predict(x, batch_size=max(1, len(x)), verbose=0)

    @check.guard_device_memory
    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None, return_dict=False):
        """One gradient step on the whole of ``x, y``; returns that batch's loss (and metrics)."""
        self._require_compiled("train_on_batch")
        x, t, w = self._standardize(x, y, sample_weight, class_weight)
        b = self.backend
        X, T, W = b.asarray(x), b.asarray(t), (None if w is None else b.asarray(w))
        self._has_weights = W is not None
        ws = self._workspace(x.shape[0])
        ws.x[...] = X
        ws.t[...] = T
        if W is not None:
            ws.w[...] = W
        sums, states = self._new_accumulators()
        self._train_step(ws, sums, states)
        logs = self._read_logs(sums, states, x.shape[0])
        return self._format_result(logs, return_dict)

    @check.guard_device_memory
    def test_on_batch(self, x, y=None, sample_weight=None, return_dict=False):
        """Loss (and metrics) of one batch, without updating the weights."""
        self._require_compiled("test_on_batch")
        x, t, w = self._standardize(x, y, sample_weight, argument="x")
        logs = self._evaluate_device(*self._to_device(x, t, w), x.shape[0])
        return self._format_result(logs, return_dict)

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
        i = 0
        for layer in self.layers:
            k = len(layer.weights)
            layer.set_weights(list(weights[i : i + k]))
            i += k

    @property
    def weights(self):
        return [w for layer in self.layers for w in layer.weights] if self.built else []

    # ---------------------------------------------------------------- summary
    def summary(self, print_fn=None):
        """Print a table of layers, output shapes and parameter counts."""
        print_fn = print_fn or print
        rows = [("Layer (type)", "Output Shape", "Param #", "Activation")]
        total = 0
        dim = self.input_dim
        for layer in self.layers:
            count = None if dim is None else sum(int(np.prod(s)) for _, s in layer.param_shapes(dim))
            total += count or 0
            rows.append((f"{layer.name} (Dense)", f"(None, {layer.units})", "?" if count is None else f"{count:,}", layer.activation.name))
            dim = layer.units
        widths = [max(len(r[i]) for r in rows) + 2 for i in range(4)]
        line = "-" * sum(widths)
        print_fn(f'Model: "{self.name}"')
        print_fn(line)
        print_fn("".join(c.ljust(w) for c, w in zip(rows[0], widths)))
        print_fn("=" * sum(widths))
        for r in rows[1:]:
            print_fn("".join(c.ljust(w) for c, w in zip(r, widths)))
        print_fn("=" * sum(widths))
        size = self._working_dtype.itemsize
        print_fn(f"Total params: {total:,} ({total * size / 1024:.2f} KB)" if self.input_dim else "Total params: unknown (model not built)")
        print_fn(f"Input features: {self.input_dim}   Backend: {self.backend.name if self.backend else backends.get_backend()}   dtype: {self._working_dtype}")
        print_fn(line)

    # ------------------------------------------------------------- save/load
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "input_dim": self.input_dim,
            "dtype": str(self._working_dtype),
            "layers": [layer.get_config() for layer in self.layers],
        }

    def save(self, filepath):
        """Save architecture, weights, compile settings and optimizer state to one file (atomically)."""
        from gpunn.saving import save_model

        save_model(self, filepath)

    def save_weights(self, filepath):
        from gpunn.saving import save_model

        save_model(self, filepath, weights_only=True)

    def load_weights(self, filepath):
        from gpunn.saving import load_weights

        load_weights(self, filepath)

    def __repr__(self):
        return f"<Sequential {self.name!r}: {len(self.layers)} layers, built={self.built}>"
