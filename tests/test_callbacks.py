"""Callbacks behave as Keras's do: EarlyStopping, ModelCheckpoint, TerminateOnNaN,
ReduceLROnPlateau, CSVLogger, LearningRateScheduler, LambdaCallback."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import binary_data, mlp, regression_data, weights_equal

import gpunn
from gpunn import callbacks as cbs


def _model(lr=0.01, optimizer=None, seed=0):
    gpunn.set_seed(seed)
    model = mlp([8, 1], "relu", "sigmoid", input_dim=5)
    model.compile(optimizer=optimizer or gpunn.optimizers.Adam(lr), loss="binary_crossentropy", metrics=["accuracy"])
    return model


class _Recorder(cbs.Callback):
    """Keeps each epoch's logs and the weights at its end."""

    def __init__(self):
        super().__init__()
        self.logs, self.weights, self.lrs = [], [], []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        self.weights.append(self.model.get_weights())
        self.lrs.append(self.model.optimizer.learning_rate)


def _scripted(values):
    """A callback that overwrites ``logs["val_loss"]`` with ``values[epoch]`` (runs before the others)."""
    return gpunn.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.__setitem__("val_loss", values[epoch]))


def test_early_stopping_patience():
    x, y = binary_data(1)
    model = _model()
    stopper = cbs.EarlyStopping(monitor="val_loss", patience=2)
    history = model.fit(x, y, epochs=20, callbacks=[_scripted([5, 4, 4.5, 4.2, 3, 1, 1, 1] + [0] * 12), stopper], verbose=0)
    # best at epoch 1; epochs 2 and 3 do not improve -> stop after epoch 3
    assert history.epoch == [0, 1, 2, 3]
    assert stopper.stopped_epoch == 3 and stopper.best == 4
    assert model.stop_training


def test_early_stopping_min_delta_and_mode_max():
    x, y = binary_data(2)
    model = _model()
    stopper = cbs.EarlyStopping(monitor="val_loss", mode="max", min_delta=0.5, patience=1)
    history = model.fit(x, y, epochs=10, callbacks=[_scripted([1, 1.4, 2.0, 2.2, 2.3] + [9] * 5), stopper], verbose=0)
    # improvements must exceed 0.5: epoch 1 (1.4) is not one -> stop there
    assert history.epoch == [0, 1]


def test_early_stopping_restores_best_weights():
    x, y = binary_data(3)
    model = _model()
    recorder = _Recorder()
    stopper = cbs.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    model.fit(x, y, epochs=10, callbacks=[_scripted([3, 2, 1, 2, 3, 4, 5, 6, 7, 8]), recorder, stopper], verbose=0)
    assert len(recorder.weights) == 5 and stopper.best_epoch == 2
    assert weights_equal(model.get_weights(), recorder.weights[2])
    assert not weights_equal(model.get_weights(), recorder.weights[-1])


def test_early_stopping_on_real_val_loss():
    x, y = binary_data(4, n=80)
    model = _model(lr=0.5)  # overfits and oscillates quickly
    stopper = cbs.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    history = model.fit(x, y, epochs=200, validation_split=0.25, callbacks=[stopper], verbose=0)
    assert len(history.epoch) < 200
    best = int(np.argmin(history.history["val_loss"]))
    assert stopper.best_epoch == best
    assert model.evaluate(x[60:], y[60:], verbose=0)[0] == pytest.approx(history.history["val_loss"][best], rel=1e-5)


def test_model_checkpoint_every_epoch_and_best_only(tmp_path):
    x, y = binary_data(5)
    model = _model()
    every = cbs.ModelCheckpoint(tmp_path / "m-{epoch:02d}.gpunn", monitor="val_loss")
    best = cbs.ModelCheckpoint(tmp_path / "best.gpunn", monitor="val_loss", save_best_only=True)
    recorder = _Recorder()
    model.fit(x, y, epochs=4, callbacks=[_scripted([3, 1, 2, 4]), recorder, every, best], verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.gpunn", "m-01.gpunn", "m-02.gpunn", "m-03.gpunn", "m-04.gpunn"]
    for epoch in range(4):
        assert weights_equal(gpunn.load_model(tmp_path / f"m-{epoch + 1:02d}.gpunn").get_weights(), recorder.weights[epoch])
    assert weights_equal(gpunn.load_model(tmp_path / "best.gpunn").get_weights(), recorder.weights[1])
    assert best.best == 1


def test_model_checkpoint_weights_only(tmp_path):
    x, y = binary_data(6)
    model = _model()
    path = tmp_path / "w.gpunn"
    model.fit(x, y, epochs=2, callbacks=[cbs.ModelCheckpoint(path, save_weights_only=True)], verbose=0)
    fresh = _model(seed=99)
    fresh.build()
    fresh.load_weights(path)
    assert weights_equal(fresh.get_weights(), model.get_weights())
    with pytest.raises(gpunn.ModelFileError, match="weights only"):
        gpunn.load_model(path)


def test_terminate_on_nan_stops_without_raising(capsys):
    x, y = regression_data(7, n=64)
    gpunn.set_seed(7)
    model = mlp([8, 1], "relu", input_dim=5)
    model.compile(optimizer=gpunn.optimizers.SGD(1e6), loss="mse")
    with np.errstate(all="ignore"):
        history = model.fit(x, 1e3 * y, epochs=5, batch_size=8, callbacks=[cbs.TerminateOnNaN()], verbose=0)
    assert history.epoch == [0]  # stopped inside the first epoch
    assert not np.isfinite(history.history["loss"][0])
    assert model.optimizer.iterations < 8  # fewer than an epoch's 8 batches
    assert "Invalid loss" in capsys.readouterr().out


def test_reduce_lr_on_plateau():
    x, y = binary_data(8)
    model = _model(lr=0.1)
    recorder = _Recorder()
    reduce = cbs.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=0.02)
    history = model.fit(x, y, epochs=8, callbacks=[_scripted([1, 2, 2, 2, 2, 2, 2, 2]), reduce, recorder], verbose=0)
    # no improvement after epoch 0: reduce after epochs 2, 4 and 6 (0.1 -> 0.05 -> 0.025 -> 0.02 floor)
    assert recorder.lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02, 0.02])
    # the history records the rate each epoch trained with (logged before that epoch's reduction)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02])
    assert model.optimizer.learning_rate == pytest.approx(0.02)


def test_reduce_lr_on_plateau_cooldown():
    x, y = binary_data(9)
    model = _model(lr=1.0, optimizer=gpunn.optimizers.SGD(1.0))
    recorder = _Recorder()
    reduce = cbs.ReduceLROnPlateau(monitor="val_loss", factor=0.1, patience=1, cooldown=2)
    model.fit(x, y, epochs=6, callbacks=[_scripted([1] * 6), reduce, recorder], verbose=0)
    # Keras's rule: reduce at epoch 1, two cooldown epochs (the second ends it), reduce at 3 and 5
    assert recorder.lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_csv_logger_writes_rows(tmp_path):
    x, y = binary_data(10)
    model = _model()
    path = tmp_path / "log.csv"
    history = model.fit(x, y, epochs=3, validation_split=0.25, callbacks=[cbs.CSVLogger(path)], verbose=0)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.history["loss"])
    assert [float(r["val_accuracy"]) for r in rows] == pytest.approx(history.history["val_accuracy"])
    # append adds rows under the existing header
    model.fit(x, y, epochs=2, callbacks=[cbs.CSVLogger(path, append=True)], verbose=0)
    with open(path, newline="") as f:
        lines = f.read().strip().splitlines()
    assert len(lines) == 1 + 3 + 2 and lines.count(lines[0]) == 1


def test_learning_rate_scheduler():
    x, y = binary_data(11)
    model = _model(lr=0.1, optimizer=gpunn.optimizers.SGD(0.1))
    seen = []
    schedule = cbs.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch > 0 else lr)
    probe = cbs.LambdaCallback(on_epoch_begin=lambda epoch, logs=None: seen.append(model.optimizer.learning_rate))
    history = model.fit(x, y, epochs=4, callbacks=[schedule, probe], verbose=0)
    assert seen == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert history.history["learning_rate"] == pytest.approx(seen)
    with pytest.raises(TypeError, match="schedule"):
        cbs.LearningRateScheduler(0.1)


def test_scheduled_learning_rate_really_drives_the_update():
    """An SGD step after the schedule sets lr uses that lr: params move by -lr * grad."""
    x, y = binary_data(12, n=16)
    a, b = _model(optimizer=gpunn.optimizers.SGD(0.3)), _model(optimizer=gpunn.optimizers.SGD(0.01))
    b.build()
    a.build()
    b.set_weights(a.get_weights())
    a.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    b.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[cbs.LearningRateScheduler(lambda e, lr: 0.3)])
    assert all(np.allclose(u, v, rtol=1e-6, atol=1e-7) for u, v in zip(a.get_weights(), b.get_weights()))


def test_batch_hooks_and_params():
    x, y = binary_data(13, n=50)
    model = _model()
    batches, params = [], []
    cb = cbs.LambdaCallback(
        on_train_begin=lambda logs=None: params.append(dict(cb.params)),
        on_train_batch_end=lambda batch, logs: batches.append((batch, sorted(logs))),
    )
    model.fit(x, y, epochs=2, batch_size=16, callbacks=[cb], verbose=0)
    assert params == [{"epochs": 2, "steps": 4, "verbose": 0}]
    assert [b for b, _ in batches] == [0, 1, 2, 3] * 2
    assert batches[0][1] == ["accuracy", "loss"]


def test_callback_validation():
    with pytest.raises(TypeError, match="callbacks"):
        _model().fit(*binary_data(14), callbacks=cbs.TerminateOnNaN(), verbose=0)
    with pytest.raises(TypeError, match="Callback"):
        _model().fit(*binary_data(14), callbacks=[print], verbose=0)
    with pytest.raises(ValueError, match="factor"):
        cbs.ReduceLROnPlateau(factor=1.5)
    with pytest.raises(ValueError, match="mode"):
        cbs.EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="not a callback hook"):
        cbs.LambdaCallback(on_epoch_finish=print)
    with pytest.warns(UserWarning, match="nope"):
        _model().fit(*binary_data(14), epochs=1, callbacks=[cbs.EarlyStopping(monitor="nope")], verbose=0)


def test_model_checkpoint_formats_logs_into_the_path(tmp_path):
    x, y = binary_data(15)
    model = _model()
    cb = cbs.ModelCheckpoint(str(tmp_path / "e{epoch}-{val_loss:.1f}.gpunn"), monitor="val_loss", save_best_only=True, mode="min")
    model.fit(x, y, epochs=3, callbacks=[_scripted([0.25, 0.5, 0.125]), cb], verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1-0.2.gpunn", "e3-0.1.gpunn"]


def test_early_stopping_baseline():
    x, y = binary_data(16)
    values = [0.9, 0.8] + [0.8] * 8
    # Keras's rule: improvements that do not beat the baseline leave the patience counter running
    with_baseline = cbs.EarlyStopping(monitor="val_loss", patience=2, baseline=0.5)
    assert _model().fit(x, y, epochs=10, callbacks=[_scripted(values), with_baseline], verbose=0).epoch == [0, 1, 2]
    without = cbs.EarlyStopping(monitor="val_loss", patience=2)
    assert _model().fit(x, y, epochs=10, callbacks=[_scripted(values), without], verbose=0).epoch == [0, 1, 2, 3]
