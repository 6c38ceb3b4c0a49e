"""fit reads results back to the host once per epoch, not once per batch.

On a GPU every device-to-host read is a synchronisation that stalls the
launch queue, so the training loop must not read per batch.  A NumPy backend
that pretends to be a device (any name but "numpy" takes the device code
path) counts every read-back.
"""

import numpy as np
import pytest

import gpunn
from gpunn.callbacks import Callback
from gpunn.layers import Dense

from helpers import CountingBackend


@pytest.fixture
def device(monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(gpunn.model_layers.backends, "current", lambda: backend)
    return backend


def _reads_during_fit(device, samples, callbacks=None):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((samples, 4))
    y = rng.integers(0, 3, samples)
    model = gpunn.Sequential([Dense(8, activation="relu", input_dim=4), Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy", "mae"])
    model.build()
    assert model.backend is device
    before = device.reads
    model.fit(x, y, batch_size=8, epochs=2, verbose=2, callbacks=callbacks)
    return device.reads - before


def test_fit_reads_back_per_epoch_not_per_batch(device):
    few = _reads_during_fit(device, 16)  # 2 batches per epoch
    many = _reads_during_fit(device, 160)  # 20 batches per epoch
    assert few == many
    assert few <= 2 * 4  # a handful per epoch: the loss sums and each metric's state


def test_a_per_batch_callback_is_the_only_reason_to_read_per_batch(device):
    class PerBatch(Callback):
        def on_train_batch_end(self, batch, logs=None):
            assert "loss" in logs

    quiet = _reads_during_fit(device, 160)
    chatty = _reads_during_fit(device, 160, callbacks=[PerBatch()])
    assert chatty > quiet + 20
