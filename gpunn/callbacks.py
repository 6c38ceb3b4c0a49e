"""Callbacks with Keras's names, arguments and behaviour."""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import numbers
import os
import string
import warnings

import numpy as np

from gpunn import checks, distributed, saving
from gpunn import random as grandom
from gpunn.progress import EpochProgress


class Callback:
    """Base class: override any ``on_*`` hook; ``self.model`` is set by fit."""

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    # Keras 3's hooks; fit, evaluate and predict call each with a ``logs`` dict (empty when there is nothing to report)
    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_batch_begin(self, batch, logs=None): ...
    def on_batch_end(self, batch, logs=None): ...
    def on_test_begin(self, logs=None): ...
    def on_test_end(self, logs=None): ...
    def on_predict_begin(self, logs=None): ...
    def on_predict_end(self, logs=None): ...
    def on_test_batch_begin(self, batch, logs=None): ...
    def on_test_batch_end(self, batch, logs=None): ...
    def on_predict_batch_begin(self, batch, logs=None): ...
    def on_predict_batch_end(self, batch, logs=None): ...

    def on_train_batch_begin(self, batch, logs=None):
        # as in Keras, the training-batch hooks default to the older on_batch_* names
        self.on_batch_begin(batch, logs=logs)

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs=logs)

    @property
    def wants_batch_logs(self) -> bool:
        """True when this callback overrides on_train_batch_end or on_batch_end (which then costs a
        host sync per batch)."""
        cls = type(self)
        return cls.on_train_batch_end is not Callback.on_train_batch_end or cls.on_batch_end is not Callback.on_batch_end


class History(Callback):
    """Records every epoch's logs: ``history.history["loss"]`` etc."""

    def __init__(self):
        super().__init__()
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


class CallbackList:
    """Calls a hook on every callback, in order, as Keras's CallbackList does: every hook gets a
    ``logs`` dict (``{}`` when none is given), the same object for every callback, so what one
    callback adds (e.g. ``learning_rate``) the next ones see."""

    def __init__(self, callbacks, model, params):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks: expected gpunn.callbacks.Callback instances, got {type(cb).__name__}")
            cb.set_model(model)
            cb.set_params(params)
        self.wants_batch_logs = any(cb.wants_batch_logs for cb in self.callbacks)

    def overrides(self, hook) -> bool:
        """Whether any callback has its own ``hook`` (not the base class's no-op)."""
        return any(getattr(type(cb), hook) is not getattr(Callback, hook) or hook in vars(cb) for cb in self.callbacks)

    def __getattr__(self, hook):
        if not hook.startswith("on_") or not callable(getattr(Callback, hook, None)):
            raise AttributeError(hook)
        numbered = hook.startswith("on_epoch_") or hook.endswith(("batch_begin", "batch_end"))

        def call(*args, logs=None):
            # the epoch or batch number, then the logs (positional: a user's hook may name it anything)
            if len(args) > (1 if numbered else 0):
                *args, logs = args
            logs = {} if logs is None else logs
            for cb in self.callbacks:
                if hook.endswith(("batch_begin", "batch_end")):
                    getattr(cb, hook)(*args, logs=logs)  # Keras passes the batch hooks' logs by keyword
                else:
                    getattr(cb, hook)(*args, logs)

        return call


def callback_list(callbacks, model, params):
    """``callbacks`` (a list of :class:`Callback`, or None) as a CallbackList, or None."""
    if callbacks is None:
        return None
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks: expected a list of callbacks, got {type(callbacks).__name__}")
    return CallbackList(callbacks, model, params) if callbacks else None


def _monitor_op(monitor, mode, argument="mode"):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{argument}: expected 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        # metrics that improve upwards (Keras 3's metric directions); losses and errors improve downwards
        mode = "max" if any(k in monitor for k in ("acc", "precision", "recall", "auc", "f1_score", "fbeta_score", "r2_score")) else "min"
    return mode


def _improved(mode, current, reference, min_delta=0.0):
    """Whether ``current`` beats ``reference`` by more than ``min_delta`` in direction ``mode``."""
    if mode == "min":
        return current < reference - min_delta
    return current > reference + min_delta


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has stopped improving for ``patience`` epochs."""

    def __init__(
        self,
        monitor="val_loss",
        min_delta=0,
        patience=0,
        verbose=0,
        mode="auto",
        baseline=None,
        restore_best_weights=False,
        start_from_epoch=0,
    ):
        super().__init__()
        self.monitor = monitor
        self.min_delta = abs(checks.number(min_delta, "min_delta"))
        self.patience = checks.positive_int(patience, "patience", minimum=0)
        self.verbose = verbose
        self.mode = _monitor_op(monitor, mode)
        self.baseline = None if baseline is None else checks.number(baseline, "baseline")
        self.restore_best_weights = checks.boolean(restore_best_weights, "restore_best_weights")
        self.start_from_epoch = checks.positive_int(start_from_epoch, "start_from_epoch", minimum=0)
        self.stopped_epoch = 0

    def on_train_begin(self, logs=None):
        self.wait = 0
        self.stopped_epoch = 0
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_weights = None
        self.best_epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None:
            warnings.warn(
                f"EarlyStopping: monitor {self.monitor!r} is not in the logs (available: {', '.join(logs or {})})",
                stacklevel=2,
            )
            return
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.model.get_weights()
        self.wait += 1
        if _improved(self.mode, current, self.best, self.min_delta):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or _improved(self.mode, current, self.baseline, self.min_delta):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


class _SavesEveryNBatches:
    """``save_freq`` as Keras 3 reads it: "epoch", or a save every n batches counted across epochs."""

    _batches_since_save = 0

    def _batch_save_due(self) -> bool:
        """Count one more batch; True (and the count restarts) when ``save_freq`` batches have passed."""
        if self.save_freq == "epoch":
            return False
        self._batches_since_save += 1
        if self._batches_since_save < self.save_freq:
            return False
        self._batches_since_save = 0
        return True


class ModelCheckpoint(_SavesEveryNBatches, Callback):
    """Save the model (atomically) every epoch, or only when ``monitor`` improves.

    ``filepath`` may hold format fields such as ``{epoch:02d}`` or
    ``{val_loss:.3f}``.  The fields are checked when training starts, against
    the keys the epoch logs can have (``epoch``, the loss and metrics, their
    ``val_`` versions, ``learning_rate``): a misspelt key is a ValueError
    listing the available ones, raised before any training.  An epoch whose
    logs lack a named key (``val_loss`` without validation data on that
    epoch) is not saved, with a warning.
    """

    def __init__(
        self,
        filepath,
        monitor="val_loss",
        verbose=0,
        save_best_only=False,
        save_weights_only=False,
        mode="auto",
        save_freq="epoch",
        initial_value_threshold=None,
    ):
        super().__init__()
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(f"filepath: expected a path, got {filepath!r}")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, numbers.Integral) or save_freq < 1):
            raise ValueError(f"save_freq: expected 'epoch' or a positive number of batches, got {save_freq!r}")
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self._batches_since_save = 0
        self._epoch = 0
        self.filepath = os.fspath(filepath)
        self._fields = _template_fields(self.filepath)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = checks.boolean(save_best_only, "save_best_only")
        self.save_weights_only = checks.boolean(save_weights_only, "save_weights_only")
        self.mode = _monitor_op(monitor, mode)
        # Keras: the value the monitored quantity must beat before the first save (save_best_only)
        self.best = math.inf if self.mode == "min" else -math.inf
        if initial_value_threshold is not None:
            self.best = checks.number(initial_value_threshold, "initial_value_threshold")

    @property
    def wants_batch_logs(self):
        return self.save_freq != "epoch"  # per-batch saves read the running logs (epoch saves need none)

    def _available_keys(self):
        names = list(self.model.metrics_names) if self.model is not None and self.model.compiled else ["loss"]
        if self.save_freq != "epoch":  # saved between epochs: the running training logs and the batch number
            return ["epoch", "batch", *names, "learning_rate"]
        return ["epoch", *names, *("val_" + name for name in names), "learning_rate"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._batch_save_due():  # {batch} is 1-based
            self._save(f"Epoch {self._epoch + 1}, batch {batch + 1}", {**(logs or {}), "epoch": self._epoch + 1, "batch": batch + 1}, logs or {})

    def on_train_begin(self, logs=None):
        available = self._available_keys()
        unknown = [name for name in self._fields if name not in available]
        if unknown:
            raise ValueError(
                f"filepath: the template {self.filepath!r} names {', '.join(map(repr, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not in the logs of this training; the available keys are: "
                f"{', '.join(available)}"
            )
        sample = {name: 1 if name == "epoch" else 0.5 for name in available}
        try:
            self.filepath.format(**sample)
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"filepath: the template {self.filepath!r} cannot be formatted ({exc})") from None
        if not self._fields:  # a fixed path: refuse a FIFO or device before training, not after the first epoch
            from gpunn.saving import resolve_destination

            resolve_destination(self.filepath)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(f"Epoch {epoch + 1}", {**(logs or {}), "epoch": epoch + 1}, logs or {})

    def _save(self, when, values, logs):
        """Save to the path ``values`` fill in, if ``monitor`` improved (with ``save_best_only``)."""
        missing = [name for name in self._fields if name not in values]
        if missing:  # e.g. val_loss on an epoch without validation (validation_freq > 1)
            warnings.warn(f"ModelCheckpoint: {', '.join(missing)} not in the logs; not saving", stacklevel=3)
            return
        path = self.filepath.format(**values)
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:
                warnings.warn(f"ModelCheckpoint: monitor {self.monitor!r} is not in the logs", stacklevel=3)
                return
            if not _improved(self.mode, current, self.best):
                return
            if self.verbose > 0:
                print(f"{when}: {self.monitor} improved from {self.best:.5f} to {current:.5f}, saving model to {path}")
            self.best = current
        elif self.verbose > 0:
            print(f"{when}: saving model to {path}")
        directory = os.path.dirname(path)
        if directory:  # as Keras 3 does: a missing checkpoint directory is created, not an error mid-fit
            os.makedirs(directory, exist_ok=True)
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
            self.model.save(path)


def _template_fields(template: str) -> list[str]:
    """The key names a ``str.format`` path template uses; ValueError if it is malformed or positional."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"filepath: malformed template {template!r} ({exc}); write a literal brace as {{{{ or }}}}") from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise ValueError(f"filepath: template fields must be named, such as {{epoch:02d}} or {{val_loss:.3f}}; got {{{field}}}")
        if name not in fields:
            fields.append(name)
    return fields


class TerminateOnNaN(Callback):
    """Stop training (without an error) when a batch's loss is NaN or infinite; with
    ``raise_error=True`` (Keras 3) raise RuntimeError there instead, before any further hook runs."""

    def __init__(self, raise_error=False):
        super().__init__()
        self.raise_error = checks.boolean(raise_error, "raise_error")

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            if self.raise_error:
                raise RuntimeError(f"NaN or Inf loss encountered at batch {batch}. Loss value: {loss}. Terminating training immediately.")
            print(f"Batch {batch}: Invalid loss, terminating training")
            self.model.stop_training = True


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` plateaus."""

    def __init__(
        self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto", min_delta=1e-4, cooldown=0, min_lr=0.0
    ):
        super().__init__()
        self.factor = checks.number(factor, "factor", minimum=0, allow_minimum=False, below=1)
        self.monitor = monitor
        self.patience = checks.positive_int(patience, "patience", minimum=0)
        self.verbose = verbose
        self.mode = _monitor_op(monitor, mode)
        self.min_delta = checks.positive_number(min_delta, "min_delta", allow_zero=True)
        self.cooldown = checks.positive_int(cooldown, "cooldown", minimum=0)
        self.min_lr = checks.positive_number(min_lr, "min_lr", allow_zero=True)

    def on_train_begin(self, logs=None):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["learning_rate"] = self.model.optimizer.learning_rate
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"ReduceLROnPlateau: monitor {self.monitor!r} is not in the logs", stacklevel=2)
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if _improved(self.mode, current, self.best, self.min_delta):
            self.best = current
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = self.model.optimizer.learning_rate
                if old > self.min_lr:
                    new = max(old * self.factor, self.min_lr)
                    self.model.optimizer.learning_rate = new
                    if self.verbose > 0:
                        print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
                    self.cooldown_counter = self.cooldown
                    self.wait = 0


class CSVLogger(Callback):
    """Stream each epoch's logs to a CSV file (``epoch`` first, then sorted keys)."""

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename = os.fspath(filename)
        self.sep = separator
        self.append = checks.boolean(append, "append")
        self.keys = None
        self._file = None

    def on_train_begin(self, logs=None):
        exists = self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self._writer = None
        self._header_done = exists

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self.keys, delimiter=self.sep)
            if not self._header_done:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **{k: logs.get(k, "NA") for k in self.keys}})
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


def _schedule_arity(schedule) -> int:
    """2 when ``schedule`` takes (epoch, lr), 1 when it takes only (epoch,), 0 when its signature is unknown."""
    try:
        signature = inspect.signature(schedule)
    except (TypeError, ValueError):
        return 0
    for arity, args in ((2, (0, 0.1)), (1, (0,))):
        try:
            signature.bind(*args)
            return arity
        except TypeError:
            continue
    raise TypeError(f"schedule: expected a callable schedule(epoch, lr) or schedule(epoch), got {schedule!r} with signature {signature}")


class LearningRateScheduler(Callback):
    """Set the learning rate at each epoch start from ``schedule(epoch, lr)``, or ``schedule(epoch)``
    for a one-argument schedule (Keras's fallback); epochs count from 0."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"schedule: expected a callable (epoch, lr) -> lr, got {schedule!r}")
        self.schedule = schedule
        self.verbose = verbose
        self._arity = _schedule_arity(schedule)

    def _rate(self, epoch, current):
        if self._arity == 2:
            return self.schedule(epoch, current)
        if self._arity == 1:
            return self.schedule(epoch)
        try:  # a builtin or C callable without a signature: Keras's order of attempts
            return self.schedule(epoch, current)
        except TypeError:
            return self.schedule(epoch)

    def on_epoch_begin(self, epoch, logs=None):
        lr = self._rate(epoch, float(self.model.optimizer.learning_rate))
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise ValueError(f"schedule: the output of the schedule function should be a float, got {lr!r} at epoch {epoch}")
        self.model.optimizer.learning_rate = float(lr)
        if self.verbose > 0:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {float(lr)}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.model.optimizer.learning_rate


class ProgbarLogger(Callback):
    """The progress display of ``fit`` (Keras 3's ProgbarLogger): a bar per epoch at verbose=1
    on a terminal, one line per epoch otherwise, nothing at verbose=0.

    ``fit`` shows this display by itself; passing a ProgbarLogger in ``callbacks``
    makes it the display (never a second one).  It reads the running metrics back
    from the device only when the display refreshes.
    """

    def __init__(self):
        super().__init__()
        self.progress = None

    def set_params(self, params):
        super().set_params(params)
        self.progress = EpochProgress(params.get("verbose", 1), params.get("epochs", 1), params.get("steps", 0))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class BackupAndRestore(_SavesEveryNBatches, Callback):
    """Resume an interrupted ``fit`` (an exception, a killed process) where its last backup was
    taken: weights, optimizer state (slots, iteration count, learning rate) and gpunn's random
    generator (the following epochs shuffle as they would have).

    save_freq: ``"epoch"`` (a backup at each epoch end) or a positive int ``n`` (a backup every
    ``n`` training batches, counted across epochs as in Keras 3).  A mid-epoch backup records the
    epoch, the batches done in it and the generator's state at that epoch's start; the resumed
    ``fit`` draws the same sample order for that epoch and continues with its next batch, so an
    interrupted and resumed fit ends with the weights of an uninterrupted one.  (Keras 3 records
    the batch too but restarts the interrupted epoch from its first batch; the interrupted
    epoch's logs here cover the batches run after the resume.)  The fit being resumed must use
    the same data and ``batch_size``: a backup taken at a different number of batches per
    epoch is refused.

    Each backup is a model file written atomically, then an atomically replaced
    ``training_metadata.json`` naming it, so a crash at any moment leaves the previous backup
    usable.  When ``fit`` completes, the backup is deleted (unless ``delete_checkpoint=False``).
    In a distributed fit rank 0 writes and every process restores: ``backup_dir`` must be on a
    filesystem all of them see.
    """

    METADATA = "training_metadata.json"

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__()
        if not isinstance(backup_dir, (str, os.PathLike)) or not os.fspath(backup_dir):
            raise TypeError(f"backup_dir: expected a directory path, got {backup_dir!r}")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, numbers.Integral)):
            raise ValueError(
                f"save_freq: expected 'epoch' or a positive number of batches (int), got {save_freq!r}"
                + (" (save_freq=False is for preemption checkpointing, which gpunn does not have)" if save_freq is False else "")
            )
        if save_freq != "epoch" and save_freq < 1:
            raise ValueError(f"save_freq: expected 'epoch' or a positive number of batches, got {save_freq!r}")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.delete_checkpoint = checks.boolean(delete_checkpoint, "delete_checkpoint")
        #: the epoch ``fit`` continues from after a restore (None: no backup was found)
        self.resume_epoch = None
        #: the batches of ``resume_epoch`` the interrupted fit had already trained on
        self.resume_step = 0
        self._epoch = 0
        self._epoch_random_state = None
        self._batches_since_save = 0

    @property
    def wants_batch_logs(self):
        return False  # the per-batch backup needs no logs (reading them would sync a GPU every batch)

    @property
    def _metadata_path(self):
        return os.path.join(self.backup_dir, self.METADATA)

    def _read_metadata(self):
        try:
            with open(self._metadata_path, encoding="utf-8") as f:
                metadata = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"backup_dir: {self._metadata_path} is not a gpunn BackupAndRestore record ({exc})") from None
        if (
            not isinstance(metadata, dict)
            or not _count(metadata.get("epoch"))
            or not _count(metadata.get("batch", 0))
            or not isinstance(metadata.get("model_file"), str)
        ):
            raise ValueError(f"backup_dir: {self._metadata_path} is not a gpunn BackupAndRestore record")
        if os.path.basename(metadata["model_file"]) != metadata["model_file"]:
            raise ValueError(f"backup_dir: {self._metadata_path} names a file outside the backup directory")
        return metadata

    def on_train_begin(self, logs=None):
        self.resume_epoch, self.resume_step, self._batches_since_save = None, 0, 0
        if not os.path.exists(self._metadata_path):
            return
        metadata = self._read_metadata()
        steps = self.params.get("steps")
        if metadata.get("batch", 0) and metadata.get("steps") != steps:
            raise ValueError(
                f"backup_dir: the backup in {self.backup_dir} was taken after batch {metadata['batch']} of an epoch of "
                f"{metadata.get('steps')} batches; this fit has {steps} batches per epoch: resume with the same data and batch_size"
            )
        path = os.path.join(self.backup_dir, metadata["model_file"])
        with open(path, "rb") as f:
            meta, tensors = saving.parse(f.read(), path)
        model, optimizer = self.model, self.model.optimizer
        model.set_weights([tensors[name] for name in sorted(k for k in tensors if k.startswith("weight."))])
        spec = meta.get("compile") or {}
        if sorted(spec.get("slots", [])) != sorted(optimizer.slots):
            raise ValueError(
                f"backup_dir: the backup in {path} holds optimizer state {sorted(spec.get('slots', []))}, "
                f"this model's optimizer has {sorted(optimizer.slots)}; compile the model as when the backup was made"
            )
        for name in spec.get("slots", []):
            optimizer.slots[name][...] = model.backend.asarray(tensors[f"optimizer.{name}"])
        optimizer.iterations = spec["iterations"]
        rate = metadata.get("learning_rate")
        if rate is not None and rate != optimizer.learning_rate:  # (a schedule's rate follows the iterations)
            optimizer.learning_rate = rate
        if metadata.get("random_state") is not None:
            grandom.generator().bit_generator.state = metadata["random_state"]
        self.resume_epoch, self.resume_step = metadata["epoch"], metadata.get("batch", 0)

    def on_epoch_begin(self, epoch, logs=None):
        # the state the epoch's sample order is drawn from: a mid-epoch backup redraws that order
        self._epoch, self._epoch_random_state = epoch, grandom.generator().bit_generator.state

    def on_train_batch_end(self, batch, logs=None):
        if self._batch_save_due():
            if batch + 1 == self.params.get("steps"):  # the epoch's last batch: resume with the next epoch
                self._save(self._epoch + 1, 0, grandom.generator().bit_generator.state)
            else:
                self._save(self._epoch, batch + 1, self._epoch_random_state)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0, grandom.generator().bit_generator.state)

    def _save(self, epoch, batch, random_state):
        """Back up the model as it is after ``batch`` batches of ``epoch`` (0: at the epoch's start)."""
        if not distributed.is_main():  # one writer; every process restores from the same backup
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"backup-epoch-{epoch}.gpunn" if not batch else f"backup-epoch-{epoch}-batch-{batch}.gpunn"
        self.model.save(os.path.join(self.backup_dir, name))
        rate = self.model.optimizer.learning_rate
        metadata = {
            "epoch": epoch,
            "batch": batch,
            "steps": self.params.get("steps"),
            "model_file": name,
            "learning_rate": float(rate) if isinstance(rate, numbers.Real) else None,
            "random_state": random_state,
        }
        saving.atomic_write(self._metadata_path, json.dumps(metadata).encode("utf-8"))
        for old in self._backup_files():
            if old != name:
                os.unlink(os.path.join(self.backup_dir, old))

    def _backup_files(self):
        return [f for f in os.listdir(self.backup_dir) if f.startswith("backup-epoch-") and f.endswith(".gpunn")]

    def on_train_end(self, logs=None):
        if not self.delete_checkpoint or not distributed.is_main() or not os.path.isdir(self.backup_dir):
            return
        for name in [self.METADATA, *self._backup_files()]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.backup_dir, name))
        with contextlib.suppress(OSError):  # only when empty: the directory may hold the user's files
            os.rmdir(self.backup_dir)


class LambdaCallback(Callback):
    """Callbacks from plain functions, e.g. ``LambdaCallback(on_epoch_end=lambda e, logs: ...)``."""

    def __init__(self, **hooks):
        super().__init__()
        for name, fn in hooks.items():
            if not name.startswith("on_") or not hasattr(Callback, name):
                raise ValueError(f"{name}: not a callback hook")
            setattr(self, name, fn)

    @property
    def wants_batch_logs(self):
        return "on_train_batch_end" in self.__dict__ or "on_batch_end" in self.__dict__
