"""Keras 3 callbacks: LearningRateScheduler's one-argument schedules, BackupAndRestore, ProgbarLogger."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import binary_data, mlp

import gpunn
from gpunn import callbacks as cbs
from gpunn import saving


def _model(seed=0, optimizer=None):
    gpunn.set_seed(seed)
    model = mlp([8, 1], "relu", "sigmoid", input_dim=5)
    model.compile(optimizer=optimizer or gpunn.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy", "auc"])
    return model


# ------------------------------------------------------------- LearningRateScheduler
@pytest.mark.parametrize(
    "schedule",
    [
        lambda epoch: 0.1 / (epoch + 1),  # Keras's fallback: schedule(epoch)
        lambda epoch, lr: 0.1 / (epoch + 1),
        lambda epoch, lr=None: 0.1 / (epoch + 1),
    ],
)
def test_scheduler_accepts_one_and_two_argument_schedules(schedule):
    x, y = binary_data(0, n=24)
    model = _model()
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cbs.LearningRateScheduler(schedule)])
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])


def test_scheduler_gets_the_current_rate_and_checks_the_output():
    x, y = binary_data(0, n=16)
    model = _model()
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[cbs.LearningRateScheduler(lambda epoch, lr: lr * 0.5)])
    assert history.history["learning_rate"] == pytest.approx([0.005, 0.0025, 0.00125])
    with pytest.raises(ValueError, match="schedule"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cbs.LearningRateScheduler(lambda epoch: "fast")])
    with pytest.raises(TypeError, match="schedule"):
        cbs.LearningRateScheduler(lambda: 0.1)


def test_auto_mode_knows_which_metrics_improve_upwards():
    for monitor in ("val_auc", "f1_score", "val_r2_score", "top_k_categorical_accuracy", "precision"):
        assert cbs.EarlyStopping(monitor=monitor).mode == "max", monitor
    for monitor in ("val_loss", "root_mean_squared_error", "val_binary_crossentropy", "mape"):
        assert cbs.EarlyStopping(monitor=monitor).mode == "min", monitor


# ------------------------------------------------------------------ BackupAndRestore
class _Interrupt(cbs.Callback):
    """Raises at the start of batch ``batch`` of epoch ``epoch`` (a crash mid-epoch)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt("simulated interruption")


def _fit(model, callbacks, epochs=6):
    x, y = binary_data(1, n=45)
    return model.fit(x, y, epochs=epochs, batch_size=8, validation_split=0.2, verbose=0, callbacks=callbacks)


def test_backup_and_restore_resumes_bit_for_bit(tmp_path):
    backup = tmp_path / "backup"
    reference = _model()
    expected = _fit(reference, [])

    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, [cbs.BackupAndRestore(backup), _Interrupt(epoch=3, batch=2)])
    record = json.loads((backup / "training_metadata.json").read_text())
    assert record["epoch"] == 3 and sorted(os.listdir(backup)) == ["backup-epoch-3.gpunn", "training_metadata.json"]

    # a new process: another seed, fresh weights; the backup brings back weights, optimizer state and the generator
    resumed = _model(seed=99)
    callback = cbs.BackupAndRestore(backup)
    history = _fit(resumed, [callback])
    assert callback.resume_epoch == 3 and history.epoch == [3, 4, 5]
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert resumed.optimizer.iterations == reference.optimizer.iterations
    for name, slot in reference.optimizer.slots.items():
        np.testing.assert_array_equal(resumed.optimizer.slots[name], slot)
    for key, values in expected.history.items():
        assert history.history[key] == values[3:], key
    assert not backup.exists()  # fit completed: the backup is deleted


def test_backup_survives_a_failed_write_and_can_be_kept(tmp_path, monkeypatch):
    backup = tmp_path / "backup"
    model = _model(optimizer=gpunn.optimizers.SGD(0.05, momentum=0.9))
    real_write = saving.atomic_write
    writes = []

    def failing_second_record(path, data):
        if str(path).endswith("training_metadata.json"):
            writes.append(path)
            if len(writes) == 2:
                raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(saving, "atomic_write", failing_second_record)
    with pytest.raises(OSError, match="disk full"):
        _fit(model, [cbs.BackupAndRestore(backup)])
    monkeypatch.setattr(saving, "atomic_write", real_write)
    # the first epoch's record still names a complete file
    record = json.loads((backup / "training_metadata.json").read_text())
    assert record["epoch"] == 1 and (backup / record["model_file"]).exists()

    kept = _model(optimizer=gpunn.optimizers.SGD(0.05, momentum=0.9))
    callback = cbs.BackupAndRestore(backup, delete_checkpoint=False)
    history = _fit(kept, [callback], epochs=3)
    assert callback.resume_epoch == 1 and history.epoch == [1, 2]
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 3


def test_backup_and_restore_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="backup_dir"):
        cbs.BackupAndRestore(None)
    for bad in (0, -3, True, False, 2.5, "batch", None):
        with pytest.raises(ValueError, match="save_freq"):
            cbs.BackupAndRestore(tmp_path, save_freq=bad)
    backup = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), [cbs.BackupAndRestore(backup), _Interrupt(epoch=1, batch=0)])
    other = _model(optimizer="sgd")  # no optimizer slots: not the model the backup came from
    with pytest.raises(ValueError, match="optimizer state"):
        _fit(other, [cbs.BackupAndRestore(backup)])
    (backup / "training_metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="training_metadata.json"):
        _fit(_model(), [cbs.BackupAndRestore(backup)])


def _fit_shuffled(model, callbacks, shuffle, epochs=4, batch_size=8):
    """45 samples, 36 of them training: 5 batches per epoch (the last one of 4 rows)."""
    x, y = binary_data(1, n=45)
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, validation_split=0.2, shuffle=shuffle, verbose=0,
                     callbacks=callbacks)  # fmt: skip


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(
    "save_freq, interrupt, record",
    [
        # batches counted across epochs (Keras 3): saves after batches 3, 6, 9, 12 -> the last one after
        # 12 batches = epoch 2 (0-based), 2 of its 5 batches done
        (3, (2, 3), (2, 2)),
        (1, (1, 4), (1, 4)),
        # every 5th batch is an epoch's last: the backup says "start the next epoch"
        (5, (2, 3), (2, 0)),
        (7, (3, 0), (2, 4)),  # saves after 7 and 14 batches: epoch 1, 2 done; epoch 2, 4 done
    ],
)
def test_backup_every_n_batches_resumes_mid_epoch_bit_for_bit(tmp_path, shuffle, save_freq, interrupt, record):
    backup = tmp_path / "backup"
    reference = _model()
    expected = _fit_shuffled(reference, [], shuffle)

    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit_shuffled(interrupted, [cbs.BackupAndRestore(backup, save_freq=save_freq), _Interrupt(*interrupt)], shuffle)
    saved = json.loads((backup / "training_metadata.json").read_text())
    assert (saved["epoch"], saved["batch"]) == record
    assert sorted(os.listdir(backup)) == [saved["model_file"], "training_metadata.json"]

    resumed = _model(seed=99)  # another process: other weights and generator state
    callback = cbs.BackupAndRestore(backup, save_freq=save_freq)
    history = _fit_shuffled(resumed, [callback], shuffle)
    assert (callback.resume_epoch, callback.resume_step) == record
    assert history.epoch == list(range(record[0], 4))
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert resumed.optimizer.iterations == reference.optimizer.iterations == 20
    for name, slot in reference.optimizer.slots.items():
        np.testing.assert_array_equal(resumed.optimizer.slots[name], slot)
    # epochs after the resumed one see the same weights and batches: the same logs
    full = 1 if record[1] else 0
    for key, values in expected.history.items():
        assert history.history[key][full:] == values[record[0] + full:], key
    assert not backup.exists()


def test_backup_every_n_batches_resumes_on_the_simulated_gpu(tmp_path):
    """The CUDA backend (Numba's simulator) resumes mid-epoch to the uninterrupted weights too."""
    backup = tmp_path / "backup"

    def plain(seed=0):  # no metrics: the simulator runs every launch in Python
        gpunn.set_seed(seed)
        model = mlp([8, 1], "relu", "sigmoid", input_dim=5)
        model.compile(optimizer=gpunn.optimizers.Adam(0.01), loss="binary_crossentropy")
        return model

    with gpunn.use_backend("cuda"):
        reference = plain()
        _fit_shuffled(reference, [], True, epochs=2)
        interrupted = plain()
        with pytest.raises(KeyboardInterrupt):
            _fit_shuffled(interrupted, [cbs.BackupAndRestore(backup, save_freq=3), _Interrupt(1, 2)], True, epochs=2)
        resumed = plain(seed=99)
        callback = cbs.BackupAndRestore(backup, save_freq=3)
        _fit_shuffled(resumed, [callback], True, epochs=2)
    assert (callback.resume_epoch, callback.resume_step) == (1, 1)
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_mid_epoch_backup_needs_the_same_batches_per_epoch(tmp_path):
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        _fit_shuffled(_model(), [cbs.BackupAndRestore(backup, save_freq=2), _Interrupt(1, 1)], True)
    with pytest.raises(ValueError, match="batch_size"):
        _fit_shuffled(_model(), [cbs.BackupAndRestore(backup, save_freq=2)], True, batch_size=6)
    record = json.loads((backup / "training_metadata.json").read_text())
    record["batch"] = -1
    (backup / "training_metadata.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not a gpunn BackupAndRestore record"):
        _fit_shuffled(_model(), [cbs.BackupAndRestore(backup, save_freq=2)], True)


# --------------------------------------------------------------------- ProgbarLogger
@pytest.mark.parametrize("verbose, lines", [(2, 3), (0, 0)])
def test_progbar_logger_is_the_one_display(capsys, verbose, lines):
    x, y = binary_data(0, n=16)
    model = _model()
    model.fit(x, y, epochs=3, batch_size=8, verbose=verbose, callbacks=[cbs.ProgbarLogger()])
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch")]
    assert len(out) == lines
    if lines:
        assert out[0].startswith("Epoch 1/3 - 2/2") and "auc" in out[0]


# ------------------------------------------------------------- Keras's hook protocol
class _Recorder(cbs.Callback):
    """Written as Keras users write callbacks: ``logs`` is a required positional parameter and the
    per-batch hook is the older ``on_batch_end``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs):
        self.calls.append(("train_begin", dict(logs)))

    def on_train_end(self, logs):
        self.calls.append(("train_end", dict(logs)))

    def on_epoch_begin(self, epoch, logs):
        self.calls.append(("epoch_begin", dict(logs)))

    def on_batch_end(self, batch, logs):
        self.calls.append(("batch_end", batch, logs["loss"]))

    def on_test_begin(self, logs):
        self.calls.append(("test_begin", dict(logs)))

    def on_test_batch_end(self, batch, logs):
        self.calls.append(("test_batch_end", batch, logs["loss"]))

    def on_test_end(self, logs):
        self.calls.append(("test_end", dict(logs)))

    def on_predict_begin(self, logs):
        self.calls.append(("predict_begin", dict(logs)))

    def on_predict_batch_end(self, batch, logs):
        self.calls.append(("predict_batch_end", batch, logs["outputs"].copy()))

    def on_predict_end(self, logs):
        self.calls.append(("predict_end", dict(logs)))


def test_fit_calls_every_hook_with_a_logs_dict_as_keras_does():
    x, y = binary_data(0, n=24)
    model, rec = _model(), _Recorder()
    history = model.fit(x, y, epochs=2, batch_size=10, verbose=0, validation_data=(x[:15], y[:15]), callbacks=[rec])
    kinds = [c[0] for c in rec.calls]
    epoch = ["epoch_begin", "batch_end", "batch_end", "batch_end", "test_begin", "test_batch_end", "test_batch_end", "test_end"]
    assert kinds == ["train_begin", *epoch, *epoch, "train_end"]
    assert [c[1] for c in rec.calls if c[0] == "batch_end"] == [0, 1, 2, 0, 1, 2]
    assert all(np.isfinite(c[2]) for c in rec.calls if c[0] == "batch_end")
    last = {k: v[-1] for k, v in history.history.items()}
    assert rec.calls[-1][1] == pytest.approx(last)  # on_train_end gets the last epoch's logs
    # on_test_end gets the validation logs without the val_ prefix; the last batch's running loss is their loss
    assert rec.calls[-2][1] == pytest.approx({k[4:]: v for k, v in last.items() if k.startswith("val_")})
    assert rec.calls[-3][2] == pytest.approx(last["val_loss"])


def test_evaluate_and_predict_take_callbacks():
    x, y = binary_data(1, n=23)
    model, rec = _model(), _Recorder()
    result = model.evaluate(x, y, batch_size=10, verbose=0, return_dict=True, callbacks=[rec])
    assert [c[0] for c in rec.calls] == ["test_begin", "test_batch_end", "test_batch_end", "test_batch_end", "test_end"]
    assert rec.calls[-1][1] == pytest.approx(result)
    rec.calls.clear()
    out = model.predict(x, batch_size=10, verbose=0, callbacks=[rec])
    assert [c[0] for c in rec.calls] == ["predict_begin", "predict_batch_end", "predict_batch_end", "predict_batch_end", "predict_end"]
    assert [c[2].shape[0] for c in rec.calls[1:4]] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([c[2] for c in rec.calls[1:4]]), out)
    np.testing.assert_array_equal(out, model.predict(x, verbose=0))


def test_lambda_callback_on_batch_end_gets_the_batch_logs():
    x, y = binary_data(2, n=20)
    losses = []
    _model().fit(x, y, epochs=1, batch_size=5, verbose=0, callbacks=[cbs.LambdaCallback(on_batch_end=lambda batch, logs: losses.append(logs["loss"]))])
    assert len(losses) == 4 and all(np.isfinite(losses))


@pytest.mark.parametrize("method", ["evaluate", "predict"])
def test_steps_with_arrays_is_refused_naming_it(method):
    x, y = binary_data(3, n=12)
    model = _model()
    call = model.evaluate if method == "evaluate" else lambda x, y, **kw: model.predict(x, **kw)
    with pytest.raises(ValueError, match="steps"):
        call(x, y, steps=2, verbose=0)
    with pytest.raises(TypeError, match="callbacks"):
        call(x, y, callbacks=_Recorder(), verbose=0)


def test_a_schedule_decaying_to_zero_trains_on_as_in_keras():
    """Keras takes a learning rate of 0: a linear decay reaching 0 at the last epoch must not stop fit."""
    x, y = binary_data(4, n=16)
    model = _model(optimizer=gpunn.optimizers.SGD(0.1))
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cbs.LearningRateScheduler(lambda epoch: 0.1 * (2 - epoch) / 2)])
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.0])
    before = model.get_weights()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # the rate stays 0: nothing moves
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    with pytest.raises(ValueError, match="learning_rate"):
        gpunn.optimizers.SGD(-0.1)


def test_model_checkpoint_creates_a_missing_directory_as_keras_3_does(tmp_path):
    x, y = binary_data(5, n=16)
    model = _model()
    pattern = tmp_path / "runs" / "a" / "model_{epoch:02d}.keras"
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cbs.ModelCheckpoint(str(pattern))])
    assert sorted(os.listdir(tmp_path / "runs" / "a")) == ["model_01.keras", "model_02.keras"]
    np.testing.assert_array_equal(gpunn.load_model(tmp_path / "runs" / "a" / "model_02.keras").predict(x, verbose=0), model.predict(x, verbose=0))


def test_model_checkpoint_initial_value_threshold(tmp_path):
    x, y = binary_data(6, n=16)
    model = _model()
    path = tmp_path / "best.keras"
    check = cbs.ModelCheckpoint(str(path), monitor="loss", save_best_only=True, initial_value_threshold=1e-9)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[check])
    assert not path.exists()  # no epoch beat the threshold
    check = cbs.ModelCheckpoint(str(path), monitor="loss", save_best_only=True, initial_value_threshold=1e9)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[check])
    assert path.exists()
    with pytest.raises(ValueError, match="initial_value_threshold"):
        cbs.ModelCheckpoint(str(path), initial_value_threshold="low")


def test_terminate_on_nan_raise_error_raises_runtime_error_at_the_batch():
    from helpers import mlp, regression_data

    x, y = regression_data(7, n=64)
    gpunn.set_seed(7)
    model = mlp([8, 1], "relu", input_dim=5)
    model.compile(optimizer=gpunn.optimizers.SGD(1e6), loss="mse")
    ended = []
    with np.errstate(all="ignore"), pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch"):
        model.fit(x, 1e3 * y, epochs=5, batch_size=8, verbose=0,
                  callbacks=[cbs.TerminateOnNaN(raise_error=True), cbs.LambdaCallback(on_train_end=lambda logs: ended.append(1))])  # fmt: skip
    assert model.optimizer.iterations < 8 and ended == []  # raised inside the first epoch, before on_train_end
    with pytest.raises(TypeError, match="raise_error"):
        cbs.TerminateOnNaN(raise_error="yes")


def test_model_checkpoint_save_freq_in_batches_names_files_as_keras_3(tmp_path):
    """save_freq=2 over 2 epochs of 3 batches: saves after the 2nd, 4th and 6th batch, named with
    the epoch and the 1-based batch as Keras 3 names them (m_1_2, m_2_1, m_2_3)."""
    x, y = binary_data(7, n=24)
    model = _model()
    check = cbs.ModelCheckpoint(str(tmp_path / "m_{epoch}_{batch}.keras"), save_freq=2)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[check])
    assert sorted(os.listdir(tmp_path)) == ["m_1_2.keras", "m_2_1.keras", "m_2_3.keras"]
    np.testing.assert_array_equal(gpunn.load_model(tmp_path / "m_2_3.keras").predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.raises(ValueError, match="val_loss"):  # between epochs there are no validation logs
        model.fit(x, y, epochs=1, verbose=0, validation_split=0.5, callbacks=[cbs.ModelCheckpoint(str(tmp_path / "{val_loss}.keras"), save_freq=1)])
    for bad in (0, -1, 1.5, "batch"):
        with pytest.raises(ValueError, match="save_freq"):
            cbs.ModelCheckpoint(str(tmp_path / "m.keras"), save_freq=bad)
