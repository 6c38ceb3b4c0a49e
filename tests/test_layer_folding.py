"""A linear Dense followed by an activation layer runs as one fused linear + activation call.

Folding changes how many backend calls a step makes, never the result: each test compares a
folded model with the same model run layer by layer (folding switched off), trained from the
same weights on the same batches, on the NumPy backend and on the CUDA backend in the simulator.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import rng

import gpunn
from gpunn import layers
from gpunn.layer_base import FusedStep, fused_steps, reset_names

BACKENDS = ["numpy", "cuda"]


def _steps(stack):
    return [(s.first, s.last, s.activation.name) for s in fused_steps(stack, [layer.activation for layer in stack])]


def test_which_layers_fold():
    stack = [layers.Dense(4), layers.Activation("gelu"), layers.Dense(4, activation="relu"), layers.Activation("tanh"),
             layers.Dense(3), layers.LeakyReLU(0.2), layers.Dense(3), layers.Dropout(0.5), layers.Dense(3),
             layers.ReLU(max_value=6), layers.Dense(2), layers.Activation("linear"), layers.Softmax()]  # fmt: skip
    assert _steps(stack) == [
        (0, 1, "gelu"),  # Dense(linear) + Activation: one step
        (2, 2, "relu"),  # a Dense with its own activation keeps the next activation layer apart
        (3, 3, "tanh"),
        (4, 5, "leaky_relu"),
        (6, 7, "linear"),  # a Dropout after a Dense folds in too (its mask is drawn in the Dense's epilogue)
        (8, 9, "relu6"),
        (10, 12, "softmax"),  # a linear activation layer keeps the Dense linear: the softmax folds too
    ]
    assert isinstance(fused_steps(stack, [la.activation for la in stack])[0], FusedStep)
    assert fused_steps([], []) == []


def _stack(backend, seed=0):
    with gpunn.use_backend(backend):
        gpunn.set_seed(seed)
        reset_names()  # the same layer names in both models (they show in summary)
        return gpunn.Sequential(
            [
                gpunn.Input(shape=(5,)),
                layers.Dense(7),
                layers.Activation("gelu"),  # needs the pre-activation in backward
                layers.Dense(6),
                layers.LeakyReLU(0.1),
                layers.Dense(6),
                layers.ReLU(),
                layers.BatchNormalization(),
                layers.Dense(4),
                layers.Softmax(),  # the output: folded into the loss in training, into the Dense at inference
            ],
            dtype="float64",
        )


def _train(model, x, y):
    model.compile(optimizer=gpunn.optimizers.Adam(0.01), loss="categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    return history.history


@pytest.fixture
def no_folding(monkeypatch):
    def off():
        monkeypatch.setattr(layers.Dense, "absorb", lambda self, *args: None)

    return off


@pytest.mark.parametrize("backend", BACKENDS)
def test_folded_stack_trains_and_predicts_as_the_layer_by_layer_stack(backend, no_folding, tmp_path):
    r = rng(11)
    x = r.normal(size=(24, 5))
    y = np.eye(4)[r.integers(0, 4, 24)]
    folded = _stack(backend)
    history = _train(folded, x, y)
    predicted = folded.predict(x, verbose=0)
    summary = io.StringIO()
    folded.summary(print_fn=lambda line, **kw: summary.write(line + "\n"))

    no_folding()
    plain = _stack(backend)
    plain_history = _train(plain, x, y)
    assert _steps(plain.layers) == [(i, i, la.activation.name) for i, la in enumerate(plain.layers)]
    plain_summary = io.StringIO()
    plain.summary(print_fn=lambda line, **kw: plain_summary.write(line + "\n"))

    assert summary.getvalue() == plain_summary.getvalue()
    assert [w.shape for w in folded.get_weights()] == [w.shape for w in plain.get_weights()]
    for got, want in zip(folded.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(predicted, plain.predict(x, verbose=0), rtol=1e-11, atol=1e-12)
    for key in history:
        np.testing.assert_allclose(history[key], plain_history[key], rtol=1e-11, err_msg=key)
    # the file is the same architecture and weights: a folded model saves and loads as before
    folded.save(tmp_path / "folded.gpunn")
    with gpunn.use_backend(backend):
        loaded = gpunn.load_model(tmp_path / "folded.gpunn")
    assert loaded.get_config() == folded.get_config() == plain.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), predicted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_folded_step_is_one_linear_call(backend, monkeypatch):
    """Forward and backward of Dense(linear) + Activation make one linear_forward / linear_backward
    call and no separate activation pass (on a GPU: one kernel instead of two)."""
    model = _stack(backend)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    r = rng(12)
    x, y = r.normal(size=(8, 5)), np.eye(4)[r.integers(0, 4, 8)]
    model.train_on_batch(x, y)  # compile the kernels, make the workspaces
    calls = []
    b = model.backend
    for name in ("linear_forward", "linear_backward", "apply_activation"):
        real = getattr(b, name)
        monkeypatch.setattr(b, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    model.train_on_batch(x, y)
    assert calls.count("linear_forward") == 4 and calls.count("linear_backward") == 4
    assert "apply_activation" not in calls
    calls.clear()
    model.predict(x, verbose=0)
    assert calls == ["linear_forward"] * 4
