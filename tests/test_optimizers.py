"""Optimizer updates against independently written Keras 3 rules.

The references below are written from Keras 3's ``keras.optimizers`` update
rules, one variable at a time, and share no code with gpunn.  Each is run
for several steps on fresh random gradients, through both the raw
``numpy_ops`` functions and the ``Optimizer`` classes (which own the step
count, the slots and gradient clipping).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import analytic_gradient, mlp, regression_data, rng

import gpunn
from gpunn.backend import numpy_ops
from gpunn.backend.numpy_backend import NumpyBackend

P = 13
STEPS = 5


def ref_sgd(p, grads, lr, momentum=0.0, nesterov=False):
    v = np.zeros_like(p)
    for g in grads:
        if momentum == 0:
            p = p - lr * g
            continue
        v = momentum * v - lr * g
        p = p + momentum * v - lr * g if nesterov else p + v
    return p, ({"velocity": v} if momentum else {})


def ref_adam(p, grads, lr, b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.0):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - p * weight_decay * lr
        m = m + (g - m) * (1 - b1)
        v = v + (g**2 - v) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - alpha * m / (np.sqrt(v) + eps)
    return p, {"m": m, "v": v}


def ref_rmsprop(p, grads, lr, rho=0.9, momentum=0.0, eps=1e-7, centered=False):
    vel, avg, mom = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        vel = rho * vel + (1 - rho) * g**2
        if centered:
            avg = rho * avg + (1 - rho) * g
            denominator = vel - avg**2 + eps
        else:
            denominator = vel + eps
        increment = lr * g / np.sqrt(denominator)
        if momentum > 0:
            mom = momentum * mom + increment
            p = p - mom
        else:
            p = p - increment
    slots = {"velocity": vel}
    if centered:
        slots["average_gradient"] = avg
    if momentum > 0:
        slots["momentum"] = mom
    return p, slots


CASES = {
    "sgd": (lambda: gpunn.optimizers.SGD(0.05), lambda p, g: ref_sgd(p, g, 0.05)),
    "momentum": (lambda: gpunn.optimizers.SGD(0.05, momentum=0.9), lambda p, g: ref_sgd(p, g, 0.05, 0.9)),
    "nesterov": (lambda: gpunn.optimizers.SGD(0.05, momentum=0.8, nesterov=True), lambda p, g: ref_sgd(p, g, 0.05, 0.8, True)),
    "adam": (lambda: gpunn.optimizers.Adam(0.01), lambda p, g: ref_adam(p, g, 0.01)),
    "adam_betas": (
        lambda: gpunn.optimizers.Adam(0.02, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
        lambda p, g: ref_adam(p, g, 0.02, 0.5, 0.9, 1e-3),
    ),
    "adamw": (lambda: gpunn.optimizers.AdamW(0.01), lambda p, g: ref_adam(p, g, 0.01, weight_decay=0.004)),
    "adamw_decay": (
        lambda: gpunn.optimizers.AdamW(0.03, weight_decay=0.1),
        lambda p, g: ref_adam(p, g, 0.03, weight_decay=0.1),
    ),
    "rmsprop": (lambda: gpunn.optimizers.RMSprop(0.01), lambda p, g: ref_rmsprop(p, g, 0.01)),
    "rmsprop_momentum": (
        lambda: gpunn.optimizers.RMSprop(0.01, rho=0.8, momentum=0.7),
        lambda p, g: ref_rmsprop(p, g, 0.01, 0.8, 0.7),
    ),
    "rmsprop_centered": (
        lambda: gpunn.optimizers.RMSprop(0.01, centered=True, momentum=0.5),
        lambda p, g: ref_rmsprop(p, g, 0.01, momentum=0.5, centered=True),
    ),
}


def _run(optimizer, p0, grads, segments=((0, P),), dtype=np.float64):
    optimizer.build(NumpyBackend(), p0.shape[0], dtype)
    params = p0.astype(dtype)
    for g in grads:
        optimizer.apply(params, g.astype(dtype), list(segments))
    return params


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_matches_keras_rule(case):
    make, reference = CASES[case]
    r = rng(sorted(CASES).index(case))
    p0 = r.normal(size=P)
    grads = [r.normal(size=P) * (i + 1) for i in range(STEPS)]
    optimizer = make()
    params = _run(optimizer, p0, grads)
    expected, slots = reference(p0, grads)
    assert not np.allclose(params, p0)
    np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-14)
    assert optimizer.iterations == STEPS
    assert sorted(optimizer.slots) == sorted(slots)
    for name, value in slots.items():
        np.testing.assert_allclose(optimizer.slots[name], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_float32_close_to_float64_reference(case):
    make, reference = CASES[case]
    r = rng(100 + sorted(CASES).index(case))
    p0 = r.normal(size=P)
    grads = [r.normal(size=P) for _ in range(STEPS)]
    params = _run(make(), p0, grads, dtype=np.float32)
    assert params.dtype == np.float32
    np.testing.assert_allclose(params, reference(p0, grads)[0], rtol=1e-5, atol=1e-6)


def test_one_sgd_step_by_hand():
    params = np.array([1.0, -2.0, 0.5])
    grads = np.array([0.5, -1.0, 4.0])
    numpy_ops.sgd_update(params, grads, None, 0.1, 0.0, False)
    np.testing.assert_allclose(params, [0.95, -1.9, 0.1], rtol=1e-14)
    # momentum 0.9, second step: v1 = -0.1 g1; v2 = 0.9 v1 - 0.1 g2
    p = np.array([1.0])
    v = np.zeros(1)
    numpy_ops.sgd_update(p, np.array([2.0]), v, 0.1, 0.9, False)
    numpy_ops.sgd_update(p, np.array([1.0]), v, 0.1, 0.9, False)
    assert v[0] == pytest.approx(0.9 * -0.2 - 0.1)
    assert p[0] == pytest.approx(1.0 - 0.2 - 0.28)


def test_one_adam_step_by_hand():
    # step 1: m = 0.1 g, v = 0.001 g^2, lr_t = lr sqrt(0.001) / 0.1 => update = lr * g / (|g| + eps')
    p = np.array([1.0, 1.0])
    numpy_ops.adam_update(p, np.array([3.0, -0.5]), np.zeros(2), np.zeros(2), 0.1, 0.9, 0.999, 0.0, 1, 0.0)
    np.testing.assert_allclose(p, [0.9, 1.1], rtol=1e-12)


def _clipped(optimizer, grads, segments):
    """The gradient an SGD(learning_rate=1) optimizer really applied (params start at 0)."""
    return -_run(optimizer, np.zeros(P), [grads], segments)


def test_clipvalue_clipnorm_global_clipnorm():
    r = rng(7)
    grads = r.normal(size=P) * 5
    segments = [(0, 6), (6, 10), (10, P)]

    np.testing.assert_allclose(_clipped(gpunn.optimizers.SGD(1.0, clipvalue=0.5), grads, segments), np.clip(grads, -0.5, 0.5))

    expected = grads.copy()
    for a, b in segments:  # clipnorm: each variable on its own
        expected[a:b] *= min(1.0, 1.5 / np.linalg.norm(grads[a:b]))
    np.testing.assert_allclose(_clipped(gpunn.optimizers.SGD(1.0, clipnorm=1.5), grads, segments), expected, rtol=1e-12)

    expected = grads * min(1.0, 2.0 / np.linalg.norm(grads))
    np.testing.assert_allclose(_clipped(gpunn.optimizers.SGD(1.0, global_clipnorm=2.0), grads, segments), expected, rtol=1e-12)

    small = grads / (10 * np.linalg.norm(grads))  # under every limit: left alone
    np.testing.assert_allclose(_clipped(gpunn.optimizers.SGD(1.0, clipnorm=2.0), small, segments), small, rtol=1e-12)


def test_optimizer_inside_model_uses_model_gradient():
    """fit's Adam step on one full batch equals the reference rule applied to the model's gradient."""
    x, y = regression_data(11, n=20, features=4, outputs=2)
    model = mlp([6, 2], "tanh", input_dim=4, dtype="float64")
    model.compile(optimizer=gpunn.optimizers.SGD(0.1), loss="mse")
    model.build()
    grad = analytic_gradient(model, x, y)
    p0 = model.params.copy()
    model.compile(optimizer=gpunn.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(model.params, ref_adam(p0, [grad], 0.01)[0], rtol=1e-12, atol=1e-14)


def test_learning_rate_validation_and_config_round_trip():
    with pytest.raises(ValueError, match="learning_rate"):
        gpunn.optimizers.Adam(learning_rate=-1)
    with pytest.raises(ValueError, match="momentum"):
        gpunn.optimizers.SGD(momentum=1.0)
    opt = gpunn.optimizers.RMSprop(0.003, rho=0.8, momentum=0.2, centered=True, clipnorm=1.0)
    again = gpunn.optimizers.get(opt.get_config())
    assert type(again) is gpunn.optimizers.RMSprop and again.get_config() == opt.get_config()
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = float("nan")
    assert gpunn.optimizers.get("adamw").weight_decay == pytest.approx(0.004)


@pytest.mark.parametrize("pair", [("clipnorm", "clipvalue"), ("clipnorm", "global_clipnorm"), ("clipvalue", "global_clipnorm")])
def test_at_most_one_clipping_option(pair):
    with pytest.raises(ValueError, match="at most one") as info:
        gpunn.optimizers.Adam(**{pair[0]: 1.0, pair[1]: 1.0})
    assert pair[0] in str(info.value) and pair[1] in str(info.value)


# What Keras 3.15.1 (torch backend) printed, verbatim, for
# ``keras.optimizers.serialize(keras.optimizers.Adam(learning_rate=0.002))`` and for
# ``keras.optimizers.serialize(keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True))``.
KERAS_ADAM = {
    "module": "keras.src.backend.torch.optimizers.torch_adam", "class_name": "Adam",
    "config": {"name": "adam", "learning_rate": 0.0020000000949949026, "weight_decay": None, "clipnorm": None,
               "global_clipnorm": None, "clipvalue": None, "use_ema": False, "ema_momentum": 0.99,
               "ema_overwrite_frequency": None, "loss_scale_factor": None, "gradient_accumulation_steps": None,
               "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": False},
    "registered_name": "Adam",
}  # fmt: skip
KERAS_SGD = {
    "module": "keras.src.backend.torch.optimizers.torch_sgd", "class_name": "SGD",
    "config": {"name": "sgd", "learning_rate": 0.10000000149011612, "weight_decay": None, "clipnorm": None,
               "global_clipnorm": None, "clipvalue": None, "use_ema": False, "ema_momentum": 0.99,
               "ema_overwrite_frequency": None, "loss_scale_factor": None, "gradient_accumulation_steps": None,
               "momentum": 0.9, "nesterov": True},
    "registered_name": "SGD",
}  # fmt: skip


def test_keras_serialized_optimizers_and_their_inert_options_are_taken():
    adam = gpunn.optimizers.get(KERAS_ADAM)
    assert isinstance(adam, gpunn.optimizers.Adam) and adam.learning_rate == pytest.approx(0.002) and adam.epsilon == 1e-07
    sgd = gpunn.optimizers.get(KERAS_SGD)
    assert isinstance(sgd, gpunn.optimizers.SGD) and sgd.momentum == 0.9 and sgd.nesterov
    labelled = gpunn.optimizers.RMSprop(0.01, name="my_rmsprop", use_ema=False, ema_momentum=0.9, loss_scale_factor=None)
    assert labelled.get_config()["name"] == "rmsprop"  # the label is Keras's; gpunn's config names the class
    model = gpunn.Sequential([gpunn.Input(shape=(2,)), gpunn.layers.Dense(1)])
    model.compile(optimizer=KERAS_ADAM, loss="mse")
    assert isinstance(model.optimizer, gpunn.optimizers.Adam)


@pytest.mark.parametrize(
    "option, value",
    [("use_ema", True), ("gradient_accumulation_steps", 4), ("loss_scale_factor", 128.0), ("name", 3)],
)
def test_keras_options_gpunn_cannot_honour_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=f"^{option}: "):
        gpunn.optimizers.Adam(**{option: value})
    with pytest.raises(ValueError, match="config' of a serialized optimizer"):
        gpunn.optimizers.get({"class_name": "Adam", "config": [1]})
