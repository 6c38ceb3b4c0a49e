"""``fit``'s loop over epochs and batches, and the rollback when training diverges.

The loop reads nothing back to the host per batch: the running loss sum is
read once per progress refresh or epoch; on a device backend each batch's
running sum is also copied to a device-side record so that the first
non-finite batch can be found after the epoch.

Divergence.  When a batch's loss turns NaN or infinite (or an update makes a
weight non-finite), the model is put back in the last state whose loss was
finite and whose predictions on the training data are all finite, and
:class:`NonFiniteLossError` is raised.  A state's loss is the loss of the
batch it was evaluated on, so the candidates are the states before the
failing batch's: they are rebuilt by replaying the epoch from a snapshot
taken at its start (same batches, same order), newest first, checking each
one's predictions on the whole training set.  When the epoch's own states
do not qualify, the previous epoch is searched the same way; when nothing
qualifies the model keeps the earliest snapshot it has (the state ``fit``
started the epoch from).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading

import numpy as np

from gpunn import checks, distributed
from gpunn.callbacks import BackupAndRestore, CallbackList, CSVLogger, History, ModelCheckpoint, ProgbarLogger, TerminateOnNaN
from gpunn.progress import EpochProgress

#: callbacks that only write files: in a distributed fit they run on rank 0 alone
_FILE_WRITERS = (ModelCheckpoint, CSVLogger)
#: candidate states kept by the first replay while searching backwards for the last good one;
#: each further replay keeps twice as many, up to _MAX_REPLAY_WINDOW device copies of the state
_REPLAY_WINDOW = 4
_MAX_REPLAY_WINDOW = 64
#: rows per forward pass when checking a candidate state's predictions (fewer, larger launches)
_CHECK_BATCH = 1024


class OneAtATime:
    """Refuses a second concurrent training call on one model (from another thread or a callback)."""

    def __init__(self):
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, what):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"{what}: this model is already training (fit or train_on_batch is running, in another "
                "thread or from a callback); one model trains one call at a time -- train a copy, or wait"
            )
        try:
            yield
        finally:
            self._lock.release()


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the model keeps its last finite state."""


class _Snapshot:
    """Copies of the parameters and optimizer state (on the device), with the step count and rate."""

    def __init__(self, trainer):
        xp, optimizer = trainer.backend.xp, trainer.optimizer
        self.params = xp.copy(trainer.params)
        self.slots = {k: xp.copy(v) for k, v in optimizer.slots.items()}
        self.iterations = optimizer.iterations
        self.learning_rate = optimizer.learning_rate

    def restore(self, trainer):
        optimizer = trainer.optimizer
        trainer.params[...] = self.params
        for k, v in self.slots.items():
            optimizer.slots[k][...] = v
        optimizer.iterations = self.iterations
        optimizer.learning_rate = self.learning_rate


class _EpochStart:
    """Where an epoch began: its snapshot (taken before step ``first_step``; 0 unless the
    epoch resumed a backup taken mid-epoch), sample order and number of steps."""

    def __init__(self, trainer, order, steps, first_step=0):
        self.snapshot = _Snapshot(trainer)
        self.order = order
        self.steps = steps
        self.first_step = first_step


class Divergence:
    """The snapshots that let ``fit`` roll back to the last good state (see the module doc).

    plan: the epoch's :class:`gpunn.distributed.BatchPlan` (which rows each
    step trains on); replicas: the processes of a distributed fit, which
    replay the same steps together and agree on each candidate state.
    """

    def __init__(self, trainer, data, plan, batch_size, enabled, replicas):
        self.trainer, self.data, self.plan, self.enabled = trainer, data, plan, enabled
        self.batch_size, self.replicas = batch_size, replicas
        self.current = self.previous = None

    def epoch_begin(self, order, first_step=0):
        if self.enabled:
            self.previous, self.current = self.current, _EpochStart(self.trainer, order, self.plan.steps, first_step)

    def _search(self, start, last):
        """Restore the newest state W_s, s <= ``last``, of the epoch begun at ``start`` whose
        weights and predictions are finite; returns (s, first update that made the weights
        non-finite or None), s None when no state qualifies."""
        trainer = self.trainer
        index = self.data.batch_index(start.order)
        bad_update, size = None, _REPLAY_WINDOW
        while last >= start.first_step:
            first = max(start.first_step, last - size + 1)
            size = min(2 * size, _MAX_REPLAY_WINDOW)
            start.snapshot.restore(trainer)
            acc = trainer.accumulators()
            for step in range(start.first_step, first):
                self._replay_one(step, index, acc)
            window = []
            for s in range(first, last + 1):
                if not trainer.params_finite():
                    bad_update = s - 1 if bad_update is None else min(bad_update, s - 1)
                    break
                window.append((s, _Snapshot(trainer)))
                if s < last:
                    self._replay_one(s, index, acc)
            for s, snap in reversed(window):
                snap.restore(trainer)
                if self.replicas.all_true(trainer.predictions_finite(self.data, max(self.batch_size, _CHECK_BATCH))):
                    return s, bad_update
            last = first - 1
        return None, bad_update

    def _replay_one(self, step, index, acc):
        lo, hi = self.plan.local(step)
        ws = self.trainer.take_workspace(hi - lo)
        try:
            if hi > lo:
                self.data.gather(self.trainer.backend, index[lo:hi], ws)
            self.trainer.train_step(ws, acc, self.data.weighted, global_rows=self.plan.global_rows(step))
        finally:
            self.trainer.give_workspace(ws)

    def recover(self, epoch, bad_step, value):
        """Roll back and raise NonFiniteLossError.

        bad_step: the first batch whose loss was non-finite (``value``), or
        with ``value`` None the number of updates done when the weights were
        found non-finite (every loss was finite).
        """
        rate = self.trainer.optimizer.learning_rate
        found, bad_update = self._search(self.current, bad_step - 1)
        if found is None and self.previous is not None:
            found, _ = self._search(self.previous, self.previous.steps - 1)
        if found is None:
            (self.previous or self.current).snapshot.restore(self.trainer)
        self.trainer.optimizer.learning_rate = rate
        if value is None:
            bad_update = bad_step - 1 if bad_update is None else bad_update
            what = f"the update of epoch {epoch + 1}, batch {bad_update + 1} made the weights non-finite"
        else:
            what = f"the loss became {'NaN' if math.isnan(value) else 'infinite'} at epoch {epoch + 1}, batch {bad_step + 1}"
        raise NonFiniteLossError(
            f"fit: {what}; training stopped and the model keeps its last state whose loss and predictions "
            f"on the training data were finite. Try a lower learning rate (currently {rate:g}), "
            "gradient clipping (e.g. clipnorm=1.0), or check the data for extreme values." + self.trainer.objective.probability_hint
        )


def run_epoch(trainer, model, data, order, plan, cbs, progress, divergence, epoch, replicas, first_step=0):
    """One pass over ``data`` in ``order`` following ``plan`` (the rows of each step), from step
    ``first_step`` (a resumed backup's next batch; 0 otherwise); returns (logs, batches done).
    In a distributed fit every read of the logs is global."""
    b = trainer.backend
    steps = plan.steps
    divergence.epoch_begin(order, first_step)
    index = data.batch_index(order)
    acc = trainer.accumulators(combine=replicas.combine if replicas.size > 1 else None)
    # running loss after each batch: finds the first non-finite batch without a per-batch sync
    # (nor, in a distributed fit, a per-batch collective)
    deferred = divergence.enabled and (b.name != "numpy" or replicas.size > 1)
    record = b.zeros((steps,), trainer.dtype) if deferred else None
    held = {}
    seen, done = 0, first_step
    try:
        for step in range(first_step, steps):
            start, stop = plan.local(step)
            ws = held.get(stop - start) or held.setdefault(stop - start, trainer.take_workspace(stop - start))
            cbs.on_train_batch_begin(step)
            gather = lambda view, lo, hi, rows=index[start:stop]: data.gather(b, rows[lo:hi], view)  # noqa: E731
            trainer.train_step(ws, acc, data.weighted, global_rows=plan.global_rows(step), gather=gather if stop > start else None)
            seen, done = seen + stop - start, step + 1
            if record is not None:
                record[step] = acc.sums[0]
            elif divergence.enabled and not math.isfinite(acc.sums[0]):
                divergence.recover(epoch, step, float(acc.sums[0]))
            if cbs.wants_batch_logs:
                cbs.on_train_batch_end(step, acc.read(seen))
            else:
                cbs.on_train_batch_end(step)  # no callback reads the logs: nothing is read back
                if progress.due():
                    # the bar's running figures are this process's own (a global read is a collective)
                    progress.update(done, acc.read(seen, local=True))
            if model.stop_training:
                break
    finally:
        for ws in held.values():
            trainer.give_workspace(ws)
    logs = acc.read(seen)
    if record is not None and not math.isfinite(logs["loss"]):
        host_record = replicas.combine(b.to_numpy(record[:done]))
        bad = int(np.flatnonzero(~np.isfinite(host_record))[0])
        divergence.recover(epoch, bad, float(host_record[bad]))
    if divergence.enabled and not trainer.params_finite():
        # every loss was finite but an update overflowed (e.g. the epoch's last): roll back
        divergence.recover(epoch, done, None)
    return logs, done


def fit(model, trainer, data, val_data, settings) -> History:
    """The epoch loop of ``Sequential.fit`` with validated ``settings`` (a dict of fit's arguments).

    After ``gpunn.distributed.init()`` with several processes the same loop
    trains data-parallel (see :mod:`gpunn.distributed`): each process trains
    on its rows of every batch and ``trainer.gradient_reduction`` all-reduces
    the gradient; an exception on one process aborts the job.
    """
    replicas = distributed.replicas()
    trainer.gradient_reduction = replicas.gradient_reduction
    try:
        return _fit(model, trainer, data, val_data, settings, replicas)
    except (NonFiniteLossError, distributed.ReplicaMismatchError):
        raise  # raised on every process alike
    except BaseException as exc:
        replicas.fail(exc)
        raise
    finally:
        trainer.gradient_reduction = None


def _fit(model, trainer, data, val_data, settings, replicas) -> History:
    batch_size, epochs = settings["batch_size"], settings["epochs"]
    replicas.start(trainer, data, settings)
    plan = replicas.plan(data.rows, batch_size)
    history = model.history = History()
    user_callbacks = list(settings["callbacks"] or [])
    # History last, as in Keras: it records what other callbacks add to the logs (e.g. learning_rate)
    verbose = settings["verbose"] if replicas.is_main else 0
    params = {"epochs": epochs, "steps": plan.steps, "verbose": verbose}
    cbs = CallbackList(replicas.select_callbacks(user_callbacks, _FILE_WRITERS) + [history], model, params)
    # a batch-logs read is a collective: every process reads when any of its callbacks would
    cbs.wants_batch_logs = any(cb.wants_batch_logs for cb in user_callbacks)
    raise_on_nonfinite = not any(isinstance(cb, TerminateOnNaN) for cb in user_callbacks)
    divergence = Divergence(trainer, data, plan, batch_size, raise_on_nonfinite, replicas)
    progbar = next((cb for cb in user_callbacks if isinstance(cb, ProgbarLogger)), None)
    progress = progbar.progress if progbar is not None else EpochProgress(verbose, epochs, plan.steps)
    model.stop_training = False
    cbs.on_train_begin()
    logs = {}
    first_epoch, first_step = settings["initial_epoch"], 0
    for cb in user_callbacks:  # a restored backup says where the interrupted fit stopped
        if isinstance(cb, BackupAndRestore) and cb.resume_epoch is not None:
            first_epoch, first_step = cb.resume_epoch, cb.resume_step
    for epoch in range(first_epoch, epochs):
        if model.stop_training:
            break
        cbs.on_epoch_begin(epoch)
        progress.epoch_begin(epoch)
        order = replicas.order(data.rows, settings["shuffle"])
        logs, done = run_epoch(trainer, model, data, order, plan, cbs, progress, divergence, epoch, replicas, first_step)
        first_step = 0
        if val_data is not None and (epoch + 1 - settings["initial_epoch"]) % settings["validation_freq"] == 0:
            logs.update(trainer.evaluate(val_data, settings["validation_batch_size"], prefix="val_", callbacks=cbs))
        cbs.on_epoch_end(epoch, logs)
        progress.epoch_end(epoch, done, logs)
        model.stop_training = replicas.any_true(model.stop_training)
    cbs.on_train_end(logs)  # the last epoch's logs, as in Keras
    return history


def check_settings(batch_size, epochs, verbose, callbacks, validation_split, shuffle, initial_epoch,
                  validation_batch_size, validation_freq) -> dict:  # fmt: skip
    """fit's loop arguments, checked, as the ``settings`` of :func:`fit`."""
    batch_size = checks.positive_int(batch_size, "batch_size", allow_none_default=32)
    # numbers.Real: np.float32 is accepted like float (it is not a float subclass)
    if not isinstance(validation_split, numbers.Real) or isinstance(validation_split, bool) or not 0 <= validation_split < 1:
        raise ValueError(f"validation_split: expected a fraction in [0, 1), got {validation_split!r}")
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks: expected a list of callbacks, got {type(callbacks).__name__}")
    return {
        "batch_size": batch_size,
        "epochs": checks.positive_int(epochs, "epochs", minimum=0),
        "initial_epoch": checks.positive_int(initial_epoch, "initial_epoch", minimum=0),
        "validation_freq": checks.positive_int(validation_freq, "validation_freq"),
        "verbose": checks.verbose(verbose),
        "validation_batch_size": checks.positive_int(validation_batch_size, "validation_batch_size", allow_none_default=batch_size),
        "shuffle": checks.boolean(shuffle, "shuffle"),
        "callbacks": callbacks,
    }
