"""The training step: what ``compile`` resolved, the per-batch workspaces, the
metric accumulators, and the step itself.

A :class:`Trainer` holds a built (and usually compiled) model's numeric
machinery -- its layers, flat parameter and gradient buffers, optimizer and
:class:`Objective` -- and runs one step as a fixed sequence of backend calls:
a fused linear forward per layer (``Dense.call``), a fused loss + gradient, a
fused linear backward per layer (``Dense.backward``) and one optimizer
update, reading nothing back to the host.  Losses and metrics accumulate in
device arrays (:class:`Accumulators`) that are read once per progress
refresh or epoch.

Every call that runs steps takes its own buffers from a :class:`WorkspacePool`
and its own accumulators, so inference and evaluation may run from several
threads at once; nothing about one call (e.g. whether it had sample weights)
is left behind for the next.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from gpunn import activations, checks, codes, distributed, opmath
from gpunn import metrics as metrics_mod
from gpunn.layer_base import TrainingPhase, fused_steps, gradients_into, stack_output_dim

#: the loss kind whose fused pass already counts each "natural" accuracy
_NATURAL_ACCURACY = {
    codes.LOSS_SIGMOID_BCE: metrics_mod.BinaryAccuracy,
    codes.LOSS_BCE: metrics_mod.BinaryAccuracy,
    codes.LOSS_SOFTMAX_CCE: metrics_mod.CategoricalAccuracy,
    codes.LOSS_CCE: metrics_mod.CategoricalAccuracy,
    codes.LOSS_SOFTMAX_SPARSE_CCE: metrics_mod.SparseCategoricalAccuracy,
    codes.LOSS_SPARSE_CCE: metrics_mod.SparseCategoricalAccuracy,
}
_PROBABILITY_LOSSES = (codes.LOSS_BCE, codes.LOSS_CCE, codes.LOSS_SPARSE_CCE)


class Objective:
    """What ``compile`` resolves for a stack of layers, a loss and metric names.

    kind: the backend's fused loss kind; fused_output: whether the output
    layer's activation is folded into that loss (the layer then produces
    logits in training); train_activations: each layer's activation as run
    in training; metrics: ``(name, Metric or None, weighted)`` in log order,
    None meaning "the accuracy the fused loss pass already counts".
    """

    def __init__(self, loss, layers, metric_specs, weighted_metric_specs, warn=True, output_dim=None):
        self.loss = loss
        output = layers[-1].activation
        self.kind, self.fused_output = loss.resolve(output.name)
        self.sparse_targets = self.kind in codes.SPARSE_LOSSES
        self.output_dim = stack_output_dim(layers) if output_dim is None else output_dim
        self.probability_hint = ""
        if self.kind in _PROBABILITY_LOSSES and output.name not in ("sigmoid", "softmax"):
            self.probability_hint = (
                f" The output activation {output.name!r} does not produce probabilities, which "
                f"{loss.name}(from_logits=False) expects: use from_logits=True, or a sigmoid/softmax output."
            )
            if warn:
                warnings.warn(f"compile:{self.probability_hint}", UserWarning, stacklevel=3)
        self.train_activations = [layer.activation for layer in layers]
        if self.fused_output:
            self.train_activations[-1] = activations.get("linear")
        self.metrics = self._resolve_metrics(metric_specs, weighted_metric_specs)
        self.computed_metrics = [(m, weighted) for _, m, weighted in self.metrics if m is not None]

    def loss_grad(self, backend, pred, target, weight, grad, sums):
        """The batch's loss (+ gradient): the fused backend pass, or a user loss's ``compute``."""
        if self.kind is None:
            return self.loss.compute(backend.xp, pred, target, weight, grad, sums)
        return backend.loss_grad(self.kind, pred, target, weight, grad, sums, self.loss.param)

    def _resolve_metrics(self, metric_specs, weighted_metric_specs):
        natural = _NATURAL_ACCURACY.get(self.kind)
        resolved, names = [], set()
        for weighted, specs in ((False, metric_specs), (True, weighted_metric_specs)):
            for spec in specs:
                metric = metrics_mod.get(spec, self.target_shape(1), (1, self.output_dim))
                name = metric.name
                if name in names and weighted:  # the same metric asked for weighted and unweighted
                    name = "weighted_" + name
                base, suffix = name, 1
                while name in names:  # two metrics of one name (e.g. two AUCs): auc, auc_1, ...
                    name, suffix = f"{base}_{suffix}", suffix + 1
                names.add(name)
                from_loss = (
                    not weighted
                    and type(metric) is natural
                    and getattr(metric, "threshold", 0.5) == 0.5
                )
                resolved.append((name, None if from_loss else metric, weighted))
        return resolved

    @property
    def rows_additive(self) -> bool:
        """Whether the loss sum and every computed metric's state over a batch are the sums of
        theirs over any split of the batch's rows, so that row shards / row blocks may run apart.
        True for gpunn's own losses and metric classes; not for a user loss (its per-sample
        values may depend on the batch, e.g. be centred on its mean), a user metric function (it
        may return one value per batch, which Keras counts once per batch, so a split would count
        it once per part) nor a user Metric subclass (its state may be anything); user code then
        also never runs on several threads at once."""
        return self.kind is not None and all(
            type(metric).__module__ == metrics_mod.__name__ and type(metric) is not metrics_mod.MeanMetricWrapper
            for metric, _ in self.computed_metrics
        )

    @property
    def metric_names(self) -> list[str]:
        return ["loss"] + [name for name, _, _ in self.metrics]

    def target_shape(self, batch: int) -> tuple:
        """Shape of a batch of prepared targets: (batch,) class indices or (batch, outputs)."""
        return (batch,) if self.sparse_targets else (batch, self.output_dim)


#: Most bytes of extra gradient buffers row shards may keep (one per shard but the first):
#: a model with more parameters, or a machine with more cores, trains whole batches.
_SHARD_GRADIENT_BYTES = 256 << 20


class Workspace:
    """Buffers for one batch size: each layer's output buffer ``y`` and its own scratch
    ``aux`` (a Dense layer's pre-activation where its activation needs it, a dropout
    mask, ...), and ``out``, the array each layer's forward actually returned (its
    input itself for a layer that passes it through); for training (``target_shape``
    given) also the inputs ``x``, targets ``t``, weights ``w``, per-layer gradients
    ``g`` and the output probabilities ``probs`` metrics read when the activation is fused.

    The layers run as :class:`gpunn.layer_base.FusedStep` s (a linear Dense and the activation
    layer after it are one step): a step's scratch is made for its fused activation."""

    def __init__(self, backend, dtype, layers, batch, acts, input_dim=None, target_shape=None):
        self.batch = batch
        self._layers = layers
        self._row_views = {}
        training = target_shape is not None
        step_acts = list(acts)
        steps = fused_steps(layers, acts)
        for step in steps:
            step_acts[step.first] = step.activation
        self.y = [backend.empty((batch, layer.output_dim), dtype) for layer in layers]
        self.aux = [layer.make_buffers(backend, batch, dtype, act, training) for layer, act in zip(layers, step_acts)]
        for step in steps:
            if training and step.folded is not None:
                # the fused call with dropout writes its backend-private z; the folded layer keeps nothing
                first = layers[step.first]
                if self.aux[step.first] is None:
                    self.aux[step.first] = backend.empty((batch, first.output_dim), dtype)
                self.aux[step.last] = None
        self.out = list(self.y)
        if training:
            self.x = backend.empty((batch, input_dim), dtype)
            self.t = backend.empty(target_shape, dtype)
            self.w = backend.empty((batch,), dtype)
            self.g = [backend.empty((batch, layer.output_dim), dtype) for layer in layers]
            self.probs = backend.empty((batch, layers[-1].output_dim), dtype)

    def rows(self, lo, hi) -> Workspace:
        """Rows [lo, hi) of this training workspace: a workspace of ``hi - lo`` rows whose
        buffers are views of these (made once per range)."""
        view = self._row_views.get((lo, hi))
        if view is None:
            view = object.__new__(Workspace)
            view.batch, view._layers, view._row_views = hi - lo, self._layers, {}
            view.y = [y[lo:hi] for y in self.y]
            view.aux = [layer.buffer_rows(buffers, lo, hi) for layer, buffers in zip(self._layers, self.aux)]
            view.out = list(view.y)
            view.x, view.t, view.w, view.probs = self.x[lo:hi], self.t[lo:hi], self.w[lo:hi], self.probs[lo:hi]
            view.g = [g[lo:hi] for g in self.g]
            self._row_views[(lo, hi)] = view
        return view


class WorkspacePool:
    """Workspaces lent one caller at a time, kept for reuse (thread-safe).

    ``take`` hands out a free workspace for a key or makes one; ``give``
    returns it.  Two threads never hold the same workspace.  At most
    ``max_keys`` batch sizes and ``per_key`` spares per size are kept.
    """

    def __init__(self, make, max_keys=5, per_key=8):
        self._make = make
        self._free: dict = {}
        self._lock = threading.Lock()
        self._max_keys, self._per_key = max_keys, per_key

    def take(self, key):
        with self._lock:
            spares = self._free.get(key)
            if spares:
                return spares.pop()
        return self._make(*key)

    def give(self, key, ws):
        with self._lock:
            if key not in self._free and len(self._free) >= self._max_keys:
                self._free.clear()
            spares = self._free.setdefault(key, [])
            if len(spares) < self._per_key:
                spares.append(ws)


class Accumulators:
    """Device-side running sums for one call: ``sums`` = (weighted loss sum, accuracy count
    from the fused loss pass) and one state array per computed metric (``Metric.state_shape``).

    combine: None, or a function summing a host float64 vector across the
    processes of a distributed run (:mod:`gpunn.distributed`); :meth:`read`
    then reports the logs over every process's rows.
    """

    def __init__(self, backend, dtype, objective, combine=None):
        self.backend = backend
        self.objective = objective
        self.combine = combine
        self.sums = backend.zeros((2,), dtype)
        computed = [] if objective is None else objective.computed_metrics
        self.states = [backend.zeros(metric.state_shape(objective.output_dim), np.float64) for metric, _ in computed]

    def reset(self):
        """Every sum back to zero."""
        self.sums[...] = 0
        for state in self.states:
            state[...] = 0

    def add(self, other: Accumulators):
        """Add ``other``'s sums and metric states to these (every state is a sum over rows)."""
        self.sums += other.sums
        for mine, theirs in zip(self.states, other.states):
            mine += theirs

    def read(self, seen: int, prefix: str = "", local: bool = False) -> dict:
        """Host-side logs: mean loss over ``seen`` samples and each metric (one small transfer each).

        With ``combine`` (and not ``local``) the sums, states and ``seen`` are
        first summed over every process (one collective: call it on all).
        """
        b = self.backend
        host_sums = b.to_numpy(self.sums)
        host_states = [b.to_numpy(s) for s in self.states]
        if self.combine is not None and not local:
            # every metric state is a sum over rows, so summing over processes gives the global state
            total = self.combine(np.concatenate([[seen], host_sums, *[h.ravel() for h in host_states]]).astype(np.float64))
            seen, host_sums = total[0], total[1:3]
            bounds = np.cumsum([3] + [h.size for h in host_states])
            host_states = [total[lo:hi].reshape(h.shape) for lo, hi, h in zip(bounds[:-1], bounds[1:], host_states)]
        logs = {prefix + "loss": float(host_sums[0]) / max(seen, 1)}
        host_states = iter(host_states)
        for name, metric, _ in self.objective.metrics:
            if metric is None:
                logs[prefix + name] = float(host_sums[1]) / seen if seen else 0.0
            else:
                logs[prefix + name] = metric.result(next(host_states))
        return logs


class StepRecord:
    """The per-step scalars a training step reads on the device, in one small backend buffer that
    the host fills with a single copy per step (:meth:`fill`):

    - ``step``: int64 (1,), the optimizer's update count before the step (the number
      ``TrainingPhase.step`` carries; it keys random draws such as Dropout masks),
    - ``offset``: int64 (1,), the position in the bound row order where this step's batch starts
      (``TrainStep.run_rows``),
    - ``hyper``: (``opmath.OPTIMIZER_SCALARS``,) in the model's dtype, the optimizer's
      ``step_scalars()`` (learning rate -- schedules included -- and bias corrections).

    Kernels read these arrays instead of taking the values as launch arguments, so the launches
    of one step can be captured once as a CUDA graph and replayed with new values.
    """

    #: bytes of the two int64 counters at the start of the buffer
    COUNTERS = 16

    def __init__(self, backend, dtype):
        dtype = np.dtype(dtype)
        size = self.COUNTERS + opmath.OPTIMIZER_SCALARS * dtype.itemsize
        self.backend = backend
        self.host = np.zeros(size, np.uint8)
        self.buffer = backend.zeros((size,), np.uint8)
        self.step, self.offset, self.hyper = self._views(self.buffer, dtype)
        self._host_step, self._host_offset, self._host_hyper = self._views(self.host, dtype)

    @classmethod
    def _views(cls, buffer, dtype):
        return buffer[0:8].view(np.int64), buffer[8:16].view(np.int64), buffer[cls.COUNTERS :].view(dtype)

    def fill(self, step: int, hyper, offset: int = 0) -> None:
        """Write this step's values and queue their copy to the device (no synchronisation)."""
        self._host_step[0] = step
        self._host_offset[0] = offset
        self._host_hyper[...] = hyper
        self.backend.upload(self.host, self.buffer)


class Trainer:
    """The numeric machinery of one built model: forward, loss, backward and update.

    layers: the built Dense layers; params/grads: the flat buffers their
    weights view; optimizer and objective: from compile (None for a model
    that only predicts).  ``backend`` arguments default to the model's and
    may be a stand-in (e.g. a timing proxy) for every numeric call.
    """

    def __init__(self, layers, params, grads, backend, dtype, input_dim, optimizer=None, objective=None):
        self.layers, self.params, self.grads = layers, params, grads
        self.backend, self.dtype, self.input_dim = backend, dtype, input_dim
        self.optimizer, self.objective = optimizer, objective
        bounds = np.cumsum([0] + [int(np.prod(w.shape)) for layer in layers for w in layer.weights])
        self.segments = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        self.inference_activations = [layer.activation for layer in layers]
        self._steps = {}
        self.frozen = []
        self.refresh_frozen()
        self._pool = WorkspacePool(self._make_workspace)
        #: False once the model has replaced this trainer (recompiled or rebuilt)
        self.active = True
        #: None, or ``reduce(backend, grads, local_rows, global_rows)`` run between backward and
        #: the update: a distributed fit's all-reduce of the flat gradient (gpunn.distributed)
        self.gradient_reduction = None
        self._record = None
        self._parts = None  # per-shard buffers of _sharded_gradients

    @property
    def record(self) -> StepRecord:
        """The :class:`StepRecord` that ``fit``'s steps fill and read (a TrainStep has its own)."""
        if self._record is None:
            self._record = StepRecord(self.backend, self.dtype)
        return self._record

    # -- buffers ---------------------------------------------------------------
    def _make_workspace(self, batch, training):
        if not training:
            return Workspace(self.backend, self.dtype, self.layers, batch, self.inference_activations)
        target_shape = self.objective.target_shape(batch)
        acts = self.objective.train_activations
        return Workspace(self.backend, self.dtype, self.layers, batch, acts, self.input_dim, target_shape)

    def take_workspace(self, batch, training=True) -> Workspace:
        """A workspace for ``batch`` rows held by the caller alone until :meth:`give_workspace`."""
        return self._pool.take((batch, training))

    def give_workspace(self, ws, training=True):
        self._pool.give((ws.batch, training), ws)

    def new_workspace(self, batch) -> Workspace:
        """A training workspace owned by the caller (not pooled)."""
        return self._make_workspace(batch, True)

    def accumulators(self, backend=None, combine=None) -> Accumulators:
        return Accumulators(backend or self.backend, self.dtype, self.objective, combine)

    def refresh_frozen(self):
        """Recompute the ranges of the flat buffers the optimizer must leave alone: the weights of
        frozen layers (``trainable = False``) and non-trainable statistics, adjacent ones merged."""
        frozen = []
        # the backward pass stops at the first layer with weights to train: below it nothing needs a gradient
        self.first_trained = next((i for i, layer in enumerate(self.layers) if any(t for _, _, t in layer.weight_ranges())), len(self.layers))
        for layer in self.layers:
            for start, stop, trains in layer.weight_ranges():
                if trains:
                    continue
                if frozen and frozen[-1][1] == start:
                    frozen[-1] = (frozen[-1][0], stop)
                else:
                    frozen.append((start, stop))
        self.frozen = frozen

    # -- one step --------------------------------------------------------------
    def steps(self, acts):
        """The layers running ``acts`` as fused steps (worked out once per list of activations)."""
        cached = self._steps.get(id(acts))
        if cached is None or cached[0] is not acts:
            cached = self._steps[id(acts)] = (acts, fused_steps(self.layers, acts))
        return cached[1]

    def forward(self, backend, x, ws, acts, training=False):
        """Run every layer on ``x`` as fused steps (a linear Dense and the activation layer after it
        are one call); ``training`` is False or a :class:`TrainingPhase`."""
        a = x
        for step in self.steps(acts):
            # a folded layer (Dropout) is done by the step's first layer in training only
            fold = {"folded": step.folded} if training and step.folded is not None else {}
            layer = self.layers[step.first]
            a = ws.out[step.last] = layer.call(backend, a, ws.y[step.last], ws.aux[step.first], step.activation, training, **fold)
        return a

    def _regularization(self, backend, sums, batch, gradients):
        """Add each regularizer's penalty (times the batch size) to the loss sum, and with
        ``gradients`` its gradient to the weights' gradients (trainable weights only)."""
        xp = backend.xp
        for layer in self.layers:
            for reg, w, g in layer.regularized_weights():
                if gradients:
                    reg.add_gradient(xp, w, g)
                sums[0] += reg.penalty(xp, w) * batch

    def _apply_update(self, backend, hyper):
        """One optimizer update that leaves the frozen ranges -- parameters and optimizer state --
        exactly as they were (their gradients are zeroed first, so clipping norms ignore them).
        hyper: the step's scalars in the record (a backend array)."""
        if not self.frozen:
            self.optimizer.apply(self.params, self.grads, self.segments, backend=backend, hyper=hyper)
            return
        xp = backend.xp
        state = self.optimizer.state  # (slots, P): every optimizer slot, one row each
        kept = []
        for start, stop in self.frozen:
            self.grads[start:stop] = 0
            kept.append((xp.copy(self.params[start:stop]), None if state is None else xp.copy(state[:, start:stop])))
        self.optimizer.apply(self.params, self.grads, self.segments, backend=backend, hyper=hyper)
        for (start, stop), (params, slots) in zip(self.frozen, kept):
            self.params[start:stop] = params
            if slots is not None:
                state[:, start:stop] = slots

    def _update_metrics(self, backend, out, ws, acc, weighted):
        """Update the metrics the loss pass does not count, on the model's outputs (probabilities
        when the output activation is folded into the loss)."""
        computed = self.objective.computed_metrics
        if not computed:
            return
        pred = self.layers[-1].activate(backend, out, ws.probs) if self.objective.fused_output else out
        w = ws.w if weighted else None
        for (metric, weighted_metric), state in zip(computed, acc.states):
            metric.update(backend.xp, pred, ws.t, w if weighted_metric else None, state)

    def train_step(self, ws, acc, weighted, backend=None, global_rows=None, record=None, gather=None):
        """Forward, loss, backward and one optimizer update on the batch held in ``ws``.

        global_rows: the rows of the whole batch when ``ws`` holds this
        process's slice of it (a distributed fit); ``gradient_reduction``
        then combines the slices' gradients before the update.  A slice may
        be empty (its gradient is zero).  record: a :class:`StepRecord` the
        caller has already filled for this step; by default the trainer's
        own, filled here.  gather: None when ``ws`` holds the batch, else
        ``gather(view, lo, hi)`` fills rows [lo, hi) of the batch into the
        workspace ``view`` (``ws.rows(lo, hi)``, or ``ws`` itself for all of
        them), so that each row shard gathers its own rows on its own thread.
        """
        b = backend or self.backend
        if record is None:
            record = self.record
            record.fill(self.optimizer.iterations, self.optimizer.step_scalars())
        if ws.batch:
            self._gradients(b, ws, acc, weighted, record, gather)
        else:
            self.grads[...] = 0
        if self.gradient_reduction is not None:
            self.gradient_reduction(b, self.grads, ws.batch, ws.batch if global_rows is None else global_rows)
        self._apply_update(b, record.hyper)

    def _gradients(self, b, ws, acc, weighted, record, gather):
        shards = self._row_shards(b, ws.batch)
        if shards is None:
            if gather is not None:
                gather(ws, 0, ws.batch)
            self._batch_gradients(b, ws, acc, weighted, record)
        else:
            self._sharded_gradients(b, ws, acc, weighted, record, gather, shards)
        self._regularization(b, acc.sums, ws.batch, gradients=True)

    def _batch_gradients(self, b, ws, acc, weighted, record, share=None, first_row=0):
        """Forward, loss, metrics and backward on ``ws``; gradients into the layers' gradient
        views.  share: None, or the fraction of the batch these rows are (a row shard's
        loss gradient is scaled by it: backward is linear in dL/dy, so the shards'
        gradients then add up to the batch's); first_row: where these rows start in the batch."""
        acts = self.objective.train_activations
        phase = TrainingPhase(self.optimizer.iterations, record.step, first_row)
        out = self.forward(b, ws.x, ws, acts, phase)
        self.objective.loss_grad(b, out, ws.t, ws.w if weighted else None, ws.g[-1], acc.sums)
        if share is not None:
            ws.g[-1] *= ws.g[-1].dtype.type(share)
        self._update_metrics(b, out, ws, acc, weighted)
        for step in reversed(self.steps(acts)):
            i = step.first
            if step.last < self.first_trained:  # nothing below the first trained layer needs a gradient
                break
            x = ws.x if i == 0 else ws.out[i - 1]
            dx = ws.g[i - 1] if i > self.first_trained else None
            fold = {"folded": step.folded, "training": phase} if step.folded is not None else {}
            self.layers[i].backward(b, x, ws.g[step.last], ws.out[step.last], ws.aux[i], dx, step.activation, **fold)

    # -- row shards (CPU) --------------------------------------------------------
    def _row_shards(self, b, rows):
        """The backend's row shards for a batch of ``rows``, or None to train it whole: only the
        model's own backend shards (a stand-in such as a timing proxy sees whole batches), only
        with a built-in loss and metrics, whose sums add up over the shards
        (``Objective.rows_additive``), and only when every layer treats rows independently
        (``Layer.rows_independent``)."""
        shard = getattr(b, "row_shards", None)
        if shard is None or b is not self.backend:
            return None
        # each shard but the first keeps a gradient buffer the model's size
        shards = shard(rows, most=1 + _SHARD_GRADIENT_BYTES // max(1, self.grads.nbytes))
        if shards is None or not self.objective.rows_additive:
            return None
        return shards if all(layer.rows_independent for layer in self.layers) else None

    def _shard_parts(self, b, count):
        """Per shard but the first: a flat gradient buffer (zeros where nothing writes, e.g. below
        the first trained layer) and accumulators (the first shard uses the model's own)."""
        if self._parts is None:
            self._parts = []
        while len(self._parts) < count - 1:
            self._parts.append((b.zeros(self.grads.shape, self.dtype), self.accumulators(b)))
        return self._parts[: count - 1]

    def _sharded_gradients(self, b, ws, acc, weighted, record, gather, shards):
        """The batch's gradients as the sum of its row shards' (:meth:`Backend.row_shards`), each
        shard gathered, run forward and backward on its own thread; shards after the first
        write their gradients and sums into their own buffers, added in shard order after."""
        parts = self._shard_parts(b, len(shards))
        for _, part in parts:
            part.reset()

        def run(i, lo, hi):
            view = ws.rows(lo, hi)
            if gather is not None:
                gather(view, lo, hi)
            flat, part = (None, acc) if i == 0 else parts[i - 1]
            with gradients_into(flat):
                self._batch_gradients(b, view, part, weighted, record, share=(hi - lo) / ws.batch, first_row=lo)

        b.run_row_shards(run, shards)
        for flat, part in parts:
            self.grads += flat
            acc.add(part)

    def test_step(self, ws, acc, weighted):
        b = self.backend
        out = self.forward(b, ws.x, ws, self.objective.train_activations)
        self.objective.loss_grad(b, out, ws.t, ws.w if weighted else None, None, acc.sums)
        self._update_metrics(b, out, ws, acc, weighted)
        self._regularization(b, acc.sums, ws.batch, gradients=False)

    # -- whole passes ----------------------------------------------------------
    def evaluate(self, data, batch_size, prefix="", callbacks=None):
        """Logs of the loss and metrics over all of ``data`` (a data_adapter source); in a
        distributed run on sharded data, over every process's ``data``.

        callbacks: a :class:`gpunn.callbacks.CallbackList` whose ``on_test_*`` hooks run (the
        running logs reach ``on_test_batch_end`` only when a callback overrides it: reading
        them costs a host sync per batch).
        """
        n = data.rows
        acc = self.accumulators(combine=distributed.replicas().combine_evaluation)
        index = data.batch_index(np.arange(n))
        batch_logs = callbacks is not None and callbacks.overrides("on_test_batch_end")
        if callbacks is not None:
            callbacks.on_test_begin()
        run_blocks = getattr(self.backend, "run_row_blocks", None)
        hooked = callbacks is not None and (batch_logs or callbacks.overrides("on_test_batch_begin"))
        if run_blocks is not None and not hooked and self.objective.rows_additive:
            # no hook sees the batches: tall blocks on every core, whatever batch_size (every
            # sum is over rows, so only the order of the additions changes)
            self._evaluate_blocks(run_blocks, data, index, acc)
            n_batches = 0
        else:
            n_batches = -(-n // batch_size)
        for batch, start in enumerate(range(0, n_batches * batch_size, batch_size)):
            stop = min(n, start + batch_size)
            if callbacks is not None:
                callbacks.on_test_batch_begin(batch)
            self._test_rows(data, index, start, stop, acc)
            if callbacks is not None:
                callbacks.on_test_batch_end(batch, acc.read(stop) if batch_logs else None)
        logs = acc.read(n, prefix)
        if callbacks is not None:
            callbacks.on_test_end({k[len(prefix):]: v for k, v in logs.items()})
        return logs

    def _test_rows(self, data, index, lo, hi, acc):
        """test_step on rows ``index[lo:hi]`` of ``data`` in a pooled workspace, into ``acc``."""
        ws = self.take_workspace(hi - lo)
        try:
            data.gather(self.backend, index[lo:hi], ws)
            self.test_step(ws, acc, data.weighted)
        finally:
            self.give_workspace(ws)

    def _evaluate_blocks(self, run_blocks, data, index, acc):
        """test_step over ``data`` in the backend's row blocks (``run_row_blocks``), each block
        into its own accumulators, added to ``acc`` in row order as soon as every block before
        it is done: the same additions as after the last block, but only the few blocks that
        finished out of order wait (a block's metric states, e.g. a multi-label AUC's, times
        thousands of blocks would not fit in memory)."""
        widths = [self.input_dim] + [layer.output_dim for layer in self.layers]
        finished, lock = {}, threading.Lock()
        added = [0]  # the rows added to acc so far, [0, added[0])

        def run(lo, hi):
            part = self.accumulators()
            self._test_rows(data, index, lo, hi, part)
            with lock:
                finished[lo] = (hi, part)
                while added[0] in finished:
                    added[0], first = finished.pop(added[0])
                    acc.add(first)

        run_blocks(run, data.rows, self.backend.inference_block_rows(widths))

    def train_on_batch(self, data):
        """One step on all of ``data`` (a data_adapter source) as one batch; returns its logs."""
        acc = self.accumulators()
        ws = self.take_workspace(data.rows)
        try:
            data.gather(self.backend, data.batch_index(np.arange(data.rows)), ws)
            self.train_step(ws, acc, data.weighted)
        finally:
            self.give_workspace(ws)
        return acc.read(data.rows)

    def predict(self, X, batch_size):
        """Outputs (M, units) of backend-resident inputs ``X`` (M, features), as a backend array."""
        b = self.backend
        out = b.empty((X.shape[0], self.layers[-1].output_dim), self.dtype)
        for start in range(0, X.shape[0], batch_size):
            stop = min(X.shape[0], start + batch_size)
            ws = self.take_workspace(stop - start, training=False)
            try:
                out[start:stop] = self.forward(b, X[start:stop], ws, self.inference_activations)
            finally:
                self.give_workspace(ws, training=False)
        return out

    def predict_host(self, x, convert, batch_size):
        """Outputs (M, units) as a NumPy array for host rows ``x`` (M, features).

        ``convert(lo, hi)`` returns rows ``lo:hi`` checked and cast to the
        model's dtype.  A backend with row-block threads (NumPy) takes the rows
        in tall blocks of equal size (``inference_block_rows``), whatever
        ``batch_size``: in inference every layer works row by row (BatchNormalization
        uses its moving statistics, Dropout and GaussianNoise pass rows through),
        so the outputs do not depend on the blocking;
        conversion and forward of a block run on one core, back to back.
        Other backends convert and copy over whole batches of about
        ``checks.CONVERT_CHUNK_ELEMENTS`` values and run ``batch_size`` rows at a time.
        """
        b, rows = self.backend, x.shape[0]
        result = np.empty((rows, self.layers[-1].output_dim), self.dtype)
        run_blocks = getattr(b, "run_row_blocks", None)
        if run_blocks is None:
            chunk = batch_size * max(1, checks.CONVERT_CHUNK_ELEMENTS // (batch_size * x.shape[1]))
            for lo in range(0, rows, chunk):
                hi = min(rows, lo + chunk)
                result[lo:hi] = b.to_numpy(self.predict(b.asarray(convert(lo, hi)), batch_size))
            return result

        def run(lo, hi):
            ws = self.take_workspace(hi - lo, training=False)
            try:
                result[lo:hi] = self.forward(b, convert(lo, hi), ws, self.inference_activations)
            finally:
                self.give_workspace(ws, training=False)

        widths = [self.input_dim] + [layer.output_dim for layer in self.layers]
        run_blocks(run, rows, b.inference_block_rows(widths))
        return result

    def predictions_finite(self, data, batch_size) -> bool:
        """Whether every output of the model on ``data`` is finite (one host read at the end)."""
        b, xp = self.backend, self.backend.xp
        bad = b.zeros((1,), self.dtype)
        index = data.batch_index(np.arange(data.rows))
        for start in range(0, data.rows, batch_size):
            stop = min(data.rows, start + batch_size)
            ws = self.take_workspace(stop - start)
            try:
                data.gather(b, index[start:stop], ws)
                out = self.forward(b, ws.x, ws, self.inference_activations)
                bad += (~xp.isfinite(out)).sum()
            finally:
                self.give_workspace(ws)
        return float(b.to_numpy(bad)[0]) == 0.0

    def params_finite(self) -> bool:
        return bool(self.backend.xp.isfinite(self.params).all())


_BACKEND_CALLS = ("take_rows", "linear_forward", "linear_backward", "loss_grad", "xp")


def _graph_mode(graph, model_backend, stand_in) -> bool:
    """Whether a TrainStep captures CUDA graphs (see TrainStep's ``graph``)."""
    if not (isinstance(graph, (bool, np.bool_)) or (isinstance(graph, str) and graph == "auto")):
        raise ValueError(f"graph: expected True, False or 'auto', got {graph!r}")
    if graph != "auto" and not graph:
        return False
    if stand_in is not None:
        reason = "a stand-in backend was given (its calls would run once, at capture)"
    elif model_backend.name != "cuda":
        reason = f"the model's backend is {model_backend.name!r}; CUDA graphs need the 'cuda' backend"
    else:
        from gpunn._cuda import graph_capture_unavailable

        reason = graph_capture_unavailable()
    if reason is None:
        return True
    if graph == "auto":
        return False
    raise ValueError(f"graph: CUDA graphs are unavailable here: {reason}; use graph=False (eager launches) or graph='auto'")


class TrainStep:
    """A reusable training step for exactly ``batch_size`` rows (``Sequential.make_train_step``).

    ``load``/``load_rows`` fill the step's own buffers, ``run`` does forward,
    loss, backward and one optimizer update without reading anything back to
    the host, and ``logs`` reads the loss and metrics accumulated by every
    ``run`` since the step was made.  ``bind_rows`` + ``run_rows(start)``
    gather each batch on the device from a bound row order instead.  A step
    belongs to one thread.

    Per-step values (the step number, the optimizer's learning rate and bias
    corrections, the batch's start in the row order) are written by the host
    into the step's :class:`StepRecord` -- one small copy per step -- and read
    by the kernels from there.  With ``graph`` on, the step's launches (gather,
    forward, loss, backward, optimizer, loss/metric sums) are captured as one
    CUDA graph at the second run of each kind (the first runs eagerly, which
    compiles the kernels and sizes the graph's private memory pool) and
    replayed from then on; a step that cannot be captured (e.g. a user loss
    or metric that reads a device value on the host) warns once and stays
    eager.  ``graph``: False (eager launches), True (graphs; ValueError where
    they are unavailable: NumPy backend, CUDA simulator, a stand-in backend)
    or "auto" (graphs where available, eager otherwise).  The optimizer's
    configuration (clipping, weight decay, the optimizer itself) is captured
    as it is at capture time: make a new step after changing it.
    """

    def __init__(self, trainer, batch_size, standardize, backend=None, graph=False):
        if backend is not None and not all(hasattr(backend, name) for name in _BACKEND_CALLS):
            raise TypeError(
                f"backend: expected an object with the Backend methods {', '.join(_BACKEND_CALLS)}, got {type(backend).__name__}"
            )
        self.batch_size = batch_size
        self._standardize = standardize
        self.backend = trainer.backend if backend is None else backend
        self._trainer = trainer
        self._ws = trainer.new_workspace(batch_size)
        self._acc = trainer.accumulators(trainer.backend)
        self._weighted = False
        self._seen = 0
        #: the per-step values this step's kernels read (see StepRecord)
        self.record = StepRecord(trainer.backend, trainer.dtype)
        self._rows = None
        self.graph = _graph_mode(graph, trainer.backend, backend)
        self._graphs = {}
        self._graph_pool = None

    def _check_rows(self, argument, rows):
        if rows != self.batch_size:
            raise ValueError(f"{argument}: this step trains on exactly {self.batch_size} rows, got {rows}")

    def load(self, x, y, sample_weight=None):
        """Copy one batch into the step: ``x`` (batch, features), ``y`` targets, optional weights.

        Host (NumPy) data is checked as ``fit`` checks it; arrays already on
        the backend's device are only shape-checked (reading their values
        would synchronise).
        """
        ws, b = self._ws, self._trainer.backend
        if isinstance(x, np.ndarray) or not hasattr(x, "shape"):
            x, y, sample_weight = self._standardize(x, y, sample_weight)
        self._check_rows("x", x.shape[0])
        if tuple(x.shape) != tuple(ws.x.shape):
            raise ValueError(f"x: expected shape {tuple(ws.x.shape)}, got {tuple(x.shape)}")
        if getattr(y, "size", None) != ws.t.size:
            raise ValueError(f"y: expected targets of shape {tuple(ws.t.shape)}, got {tuple(getattr(y, 'shape', ()))}")
        ws.x[...] = b.asarray(x, dtype=ws.x.dtype)
        ws.t[...] = b.asarray(y, dtype=ws.t.dtype).reshape(ws.t.shape)
        self._weighted = sample_weight is not None
        if sample_weight is not None:
            ws.w[...] = b.asarray(sample_weight, dtype=ws.w.dtype).reshape(ws.w.shape)

    def load_rows(self, X, Y, index, sample_weight=None):
        """Gather rows ``index`` (batch_size integers) of backend-resident ``X``, ``Y``
        (and per-row ``sample_weight``) into the step's buffers, on the device.  Arrays in the
        model's dtype are gathered directly; integer labels (any numeric dtype) are cast per batch."""
        ws = self._ws
        self._check_rows("index", index.shape[0])
        if X.ndim != 2 or X.shape[1] != ws.x.shape[1]:
            raise ValueError(f"X: expected shape (rows, {ws.x.shape[1]}), got {tuple(X.shape)}")
        if tuple(Y.shape[1:]) != tuple(ws.t.shape[1:]):
            raise ValueError(f"Y: expected shape (rows, *{tuple(ws.t.shape[1:])}), got {tuple(Y.shape)}")
        index = self._trainer.backend.asarray(index)
        self._gather("X", X, index, ws.x)
        self._gather("Y", Y, index, ws.t)
        self._weighted = sample_weight is not None
        if sample_weight is not None:
            self._gather("sample_weight", sample_weight, index, ws.w)

    def _gather(self, argument, src, index, out):
        """``out[:] = src[index]``; as Keras does with integer labels, integer, boolean or other-width
        float arrays are cast to the model's dtype (a gather, then a cast of the batch alone)."""
        dtype = np.dtype(src.dtype)
        if dtype == out.dtype:
            self.backend.take_rows(src, index, out)
        elif dtype.kind in "biuf":
            out[...] = self._trainer.backend.xp.take(src, index, axis=0)
        else:
            raise TypeError(f"{argument}: expected a numeric array (the model computes in {out.dtype}), got dtype {dtype}")

    def bind_rows(self, X, Y, order, sample_weight=None):
        """Bind backend-resident ``X`` (rows, features), ``Y`` (rows, ...) targets, optional
        per-row ``sample_weight`` and ``order`` (n,) integer row indices (e.g. an epoch's
        shuffled permutation) for :meth:`run_rows`.  ``order`` is checked on the host
        (NumPy arrays are copied to the backend)."""
        ws, b = self._ws, self._trainer.backend
        if X.ndim != 2 or X.shape[1] != ws.x.shape[1]:
            raise ValueError(f"X: expected shape (rows, {ws.x.shape[1]}), got {tuple(X.shape)}")
        if tuple(Y.shape[1:]) != tuple(ws.t.shape[1:]) or Y.shape[0] != X.shape[0]:
            raise ValueError(f"Y: expected shape ({X.shape[0]}, *{tuple(ws.t.shape[1:])}), got {tuple(Y.shape)}")
        if sample_weight is not None and tuple(sample_weight.shape) != (X.shape[0],):
            raise ValueError(f"sample_weight: expected shape ({X.shape[0]},), got {tuple(sample_weight.shape)}")
        host_order = b.to_numpy(order)
        if host_order.ndim != 1 or host_order.dtype.kind not in "iu":
            raise ValueError(f"order: expected a 1-D array of integer row indices, got {host_order.dtype} of shape {host_order.shape}")
        if host_order.size and (host_order.min() < 0 or host_order.max() >= X.shape[0]):
            raise ValueError(f"order: row indices must lie in [0, {X.shape[0]}), got [{host_order.min()}, {host_order.max()}]")
        as_data = lambda a: a if a.dtype == ws.x.dtype else b.asarray(a, dtype=ws.x.dtype)  # noqa: E731
        weights = None if sample_weight is None else as_data(sample_weight)
        self._rows = (as_data(X), as_data(Y), weights, b.asarray(host_order.astype(np.int64)))
        # the bound arrays' addresses are baked into a captured graph: capture again
        self._graphs = {key: graph for key, graph in self._graphs.items() if key[0] != "rows"}

    def run_rows(self, start):
        """Gather rows ``order[start : start + batch_size]`` of the bound arrays on the device
        (the start is read from the step's record), then :meth:`run` on them."""
        if self._rows is None:
            raise RuntimeError("TrainStep.run_rows: bind the data first with step.bind_rows(X, Y, order)")
        start = checks.positive_int(start, "start", minimum=0)
        count = self._rows[3].shape[0]
        if start + self.batch_size > count:
            raise ValueError(f"start: a batch of {self.batch_size} rows from {start} runs past the {count} bound row indices")
        self._weighted = self._rows[2] is not None
        self._run("rows", start)

    def run(self):
        """Forward, loss, backward and one optimizer update on the loaded batch (no host sync)."""
        self._run("loaded", 0)

    def _run(self, kind, offset):
        trainer = self._trainer
        if not trainer.active:
            raise RuntimeError("TrainStep.run: the model was rebuilt or recompiled since this step was made; make a new step")
        optimizer = trainer.optimizer
        self.record.fill(optimizer.iterations, optimizer.step_scalars(), offset)
        key = (kind, self._weighted)
        graph = self._graphs.get(key) if self.graph else None
        if graph is not None:
            graph.launch()
            optimizer.iterations += 1
        elif self.graph and key in self._graphs:  # warmed up: capture now, then replay
            self._graphs[key] = graph = self._capture(kind)
            if graph is None:
                self._eager(kind)
            else:
                graph.launch()
                optimizer.iterations += 1
        elif self.graph:
            from gpunn._cuda import graph_memory, graph_pool

            if self._graph_pool is None:
                self._graph_pool = graph_pool()
            with graph_memory(self._graph_pool):
                self._eager(kind)
            self._graphs[key] = None
        else:
            self._eager(kind)
        self._seen += self.batch_size

    def _eager(self, kind):
        b, ws = self.backend, self._ws
        if kind == "rows":
            X, Y, W, order = self._rows
            b.gather_rows(X, order, self.record.offset, ws.x)
            b.gather_rows(Y, order, self.record.offset, ws.t)
            if W is not None:
                b.gather_rows(W, order, self.record.offset, ws.w)
        self._trainer.train_step(ws, self._acc, self._weighted, b, record=self.record)

    def _capture(self, kind):
        """The step's launches captured as a graph, or None (with a warning) when capture fails."""
        from gpunn._cuda import GraphCaptureError, capture_graph

        trainer = self._trainer
        unsafe = [layer.name for layer in trainer.layers if not getattr(layer, "graph_safe", True)]
        if unsafe:
            reason = f"layer(s) {', '.join(unsafe)} draw per-step random numbers from host-side state, which a replay would repeat"
        elif trainer.gradient_reduction is not None:
            reason = "a distributed fit's gradient all-reduce runs between backward and the update"
        else:
            iterations = trainer.optimizer.iterations
            try:
                return capture_graph(lambda: self._eager(kind), self._graph_pool)
            except GraphCaptureError as exc:
                reason = str(exc)
            finally:
                trainer.optimizer.iterations = iterations  # the capture ran nothing
        warnings.warn(f"TrainStep: the training step could not be captured as a CUDA graph ({reason}); running eager launches", RuntimeWarning, stacklevel=3)
        self.graph = False
        return None

    def logs(self) -> dict:
        """Mean loss and metrics over every ``run`` since the step was made (Keras names)."""
        return self._acc.read(self._seen)


def format_result(logs, return_dict):
    """Keras's result of evaluate / *_on_batch: the logs dict, the loss alone, or [loss, *metrics]."""
    if checks.boolean(return_dict, "return_dict"):
        return logs
    values = list(logs.values())
    return values[0] if len(values) == 1 else values
