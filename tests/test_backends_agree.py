"""Whole models trained on the NumPy and CUDA backends from the same weights agree.

Without a GPU the CUDA backend runs gpunn's kernels in Numba's simulator on
NumPy arrays (tests/conftest.py turns it on), so this is the end-to-end
check of the GPU path that CI can run: every activation, every loss path
(fused, from logits, on probabilities) and every optimizer variant, a few
training steps each, relative error < 1e-4.  Shapes are tiny because the
simulator runs one Python thread per CUDA thread.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn import data_adapter
from gpunn._cuda import cuda_status
from gpunn.layers import Dense

_STATUS = cuda_status()
pytestmark = [
    pytest.mark.simulator,
    pytest.mark.skipif(not _STATUS.usable, reason=f"the CUDA backend cannot run here: {_STATUS.reason}"),
]

FEATURES, SAMPLES = 3, 6
#: optimizer tests take 2 steps per epoch (the second a ragged batch) so that state carries over;
#: the others one step, to keep the simulator's time down
RAGGED_BATCH = 4


def _targets(kind, rng, outputs):
    if kind == "binary":
        return (rng.uniform(size=(SAMPLES, outputs)) < 0.5).astype(np.float32)
    if kind == "onehot":
        return np.eye(outputs, dtype=np.float32)[rng.integers(0, outputs, SAMPLES)]
    if kind == "labels":
        return rng.integers(0, outputs, SAMPLES)
    return rng.standard_normal((SAMPLES, outputs)).astype(np.float32)


def train_on(backend, build, compile_args, targets, batch_size, sample_weight=None):
    """Build on ``backend`` from fixed weights, train, and return (weights, history, predictions)."""
    previous = gpunn.get_backend()
    gpunn.set_backend(backend)
    try:
        gpunn.set_seed(5)
        model = build()
        model.compile(**compile_args)
        rng = np.random.default_rng(9)
        x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
        history = model.fit(
            x, targets, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, sample_weight=sample_weight
        )
        return model.get_weights(), history.history, model.predict(x, batch_size=batch_size)
    finally:
        gpunn.set_backend(previous)


def check_backends_agree(build, compile_args, targets, batch_size=SAMPLES, sample_weight=None):
    numpy_run = train_on("numpy", build, compile_args, targets, batch_size, sample_weight)
    cuda_run = train_on("cuda", build, compile_args, targets, batch_size, sample_weight)
    for got, want in zip(cuda_run[0], numpy_run[0]):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert cuda_run[1].keys() == numpy_run[1].keys()
    for key in numpy_run[1]:
        np.testing.assert_allclose(cuda_run[1][key], numpy_run[1][key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(cuda_run[2], numpy_run[2], rtol=1e-4, atol=1e-6)


def two_layers(hidden_activation, output_activation, outputs):
    return lambda: gpunn.Sequential(
        [gpunn.Input((FEATURES,)), Dense(5, activation=hidden_activation), Dense(outputs, activation=output_activation)]
    )


@pytest.mark.parametrize("activation", gpunn.activations.names())
def test_every_activation(activation):
    rng = np.random.default_rng(1)
    check_backends_agree(two_layers(activation, "linear", 2), {"optimizer": "sgd", "loss": "mse"}, _targets("real", rng, 2))


LOSS_CASES = {
    # name: (output activation, outputs, loss, target kind, metrics)
    "mse": ("linear", 2, "mse", "real", ["mae"]),
    "mae": ("tanh", 2, "mae", "real", ["mse"]),
    "bce_fused_sigmoid": ("sigmoid", 1, "binary_crossentropy", "binary", ["accuracy", "precision", "recall"]),
    "bce_from_logits": ("linear", 2, gpunn.losses.BinaryCrossentropy(from_logits=True), "binary", ["accuracy"]),
    "bce_on_probabilities": ("softmax", 2, "binary_crossentropy", "binary", ["accuracy"]),
    "cce_fused_softmax": ("softmax", 3, "categorical_crossentropy", "onehot", ["accuracy"]),
    "cce_from_logits": ("linear", 3, gpunn.losses.CategoricalCrossentropy(from_logits=True), "onehot", ["accuracy"]),
    "cce_on_probabilities": ("sigmoid", 3, "categorical_crossentropy", "onehot", ["accuracy"]),
    "sparse_fused_softmax": ("softmax", 3, "sparse_categorical_crossentropy", "labels", ["accuracy"]),
    "sparse_from_logits": ("linear", 3, gpunn.losses.SparseCategoricalCrossentropy(from_logits=True), "labels", ["accuracy"]),
    "sparse_on_probabilities": ("sigmoid", 3, "sparse_categorical_crossentropy", "labels", ["accuracy"]),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_every_loss(case):
    output_activation, outputs, loss, target_kind, metrics = LOSS_CASES[case]
    rng = np.random.default_rng(2)
    check_backends_agree(
        two_layers("tanh", output_activation, outputs),
        {"optimizer": "adam", "loss": loss, "metrics": metrics},
        _targets(target_kind, rng, outputs),
    )


OPTIMIZERS = {
    "sgd": lambda: gpunn.optimizers.SGD(0.1),
    "sgd_momentum": lambda: gpunn.optimizers.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda: gpunn.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: gpunn.optimizers.Adam(0.01),
    "adamw": lambda: gpunn.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop": lambda: gpunn.optimizers.RMSprop(0.01),
    "rmsprop_centered_momentum": lambda: gpunn.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "adam_clipnorm": lambda: gpunn.optimizers.Adam(0.01, clipnorm=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer(name):
    rng = np.random.default_rng(3)
    check_backends_agree(
        two_layers("relu", "sigmoid", 1),
        {"optimizer": OPTIMIZERS[name](), "loss": "binary_crossentropy"},
        _targets("binary", rng, 1),
        batch_size=RAGGED_BATCH,
    )


def test_sample_weights_and_regularizer():
    rng = np.random.default_rng(4)

    def build():
        return gpunn.Sequential(
            [gpunn.Input((FEATURES,)), Dense(4, activation="relu", kernel_regularizer="l2"), Dense(3, activation="softmax")]
        )

    check_backends_agree(
        build,
        {"optimizer": "rmsprop", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"], "weighted_metrics": ["accuracy"]},
        _targets("labels", rng, 3),
        batch_size=RAGGED_BATCH,
        sample_weight=rng.uniform(0.5, 2.0, SAMPLES),
    )


def test_train_on_cuda_load_on_numpy(tmp_path):
    """A model trained on the CUDA backend saves NumPy-readable files; they load on the CPU unchanged."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    y = _targets("binary", rng, 1)
    gpunn.set_backend("cuda")
    try:
        model = two_layers("relu", "sigmoid", 1)()
        model.compile(optimizer="adam", loss="binary_crossentropy")
        model.fit(x, y, batch_size=SAMPLES, epochs=1, verbose=0)
        assert model.backend.name == "cuda"
        path = tmp_path / ("m" + gpunn.MODEL_SUFFIX)
        model.save(path)
        on_gpu = model.predict(x)
    finally:
        gpunn.set_backend("numpy")
    loaded = gpunn.load_model(path)
    assert loaded.backend.name == "numpy"
    np.testing.assert_allclose(loaded.predict(x), on_gpu, rtol=1e-5, atol=1e-7)
    assert loaded.optimizer.iterations == model.optimizer.iterations
    for name, slot in model.optimizer.slots.items():
        np.testing.assert_array_equal(loaded.optimizer.slots[name], model.backend.to_numpy(slot))


def test_data_larger_than_the_device_is_streamed(monkeypatch):
    """When the data would not fit, fit/evaluate gather batches on the host; the results are unchanged."""
    from gpunn.backend.cuda_backend import CudaBackend

    rng = np.random.default_rng(8)
    y = _targets("labels", rng, 3)
    build = two_layers("tanh", "softmax", 3)
    args = {"optimizer": "sgd", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    resident = train_on("cuda", build, args, y, RAGGED_BATCH)
    monkeypatch.setattr(CudaBackend, "free_device_bytes", lambda self: 64)
    sources = []
    for source in (data_adapter.DeviceData, data_adapter.StreamedData):

        def spy(self, backend, index, ws, gather=source.gather):
            sources.append(type(self).__name__)
            return gather(self, backend, index, ws)

        monkeypatch.setattr(source, "gather", spy)
    streamed = train_on("cuda", build, args, y, RAGGED_BATCH)
    assert sources and set(sources) == {"StreamedData"}
    for got, want in zip(streamed[0], resident[0]):
        np.testing.assert_array_equal(got, want)
    assert streamed[1] == resident[1]
