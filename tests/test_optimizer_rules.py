"""Every optimizer, weight decay, AMSGrad and the learning-rate schedules, against Keras 3's rules.

Three layers of checks: single steps computed by hand from Keras 3's update
formulas (which pin down numpy_ops.optimizer_step, the reference); several
steps of each Optimizer class on each backend (the CUDA one in the simulator)
against that reference; and schedules, learning-rate assignment and
save/load round trips at the model level.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import backend_params, make_backend, regression_data

import gpunn
from gpunn import optimizers
from gpunn.backend import numpy_ops
from gpunn.backend.numpy_backend import NumpyBackend
from gpunn.optimizers import schedules



# ------------------------------------------------------------ single steps by hand


def one_step(name, p, g, slots, lr, t=1, **config):
    optimizer = optimizers.get({"name": name, "learning_rate": lr, **config})
    p = np.array(p, dtype=np.float64)
    slots = {k: np.array(v, dtype=np.float64) for k, v in slots.items()}
    numpy_ops.optimizer_step(name, p, np.array(g, dtype=np.float64), slots, lr, t, optimizer.get_config())
    return p, slots


def test_nadam_first_step_by_hand():
    # t = 1: u1 = 0.9 (1 - 0.5 * 0.96) = 0.468, u2 = 0.9 (1 - 0.5 * 0.9216) = 0.47528
    u1, u2 = 0.9 * (1 - 0.5 * 0.96), 0.9 * (1 - 0.5 * 0.96**2)
    m, v = 0.1 * 2.0, 0.001 * 4.0
    m_hat = u2 * m / (1 - u1 * u2) + (1 - u1) * 2.0 / (1 - u1)
    expected = 1.0 - m_hat * 0.1 / (math.sqrt(v / 0.001) + 1e-7)
    p, slots = one_step("nadam", [1.0], [2.0], {"m": [0.0], "v": [0.0]}, 0.1)
    assert p[0] == pytest.approx(expected, rel=1e-12)
    assert slots["m"][0] == pytest.approx(0.2) and slots["v"][0] == pytest.approx(0.004)


def test_adagrad_adadelta_adamax_lion_ftrl_steps_by_hand():
    p, s = one_step("adagrad", [1.0], [2.0], {"accumulator": [0.1]}, 0.5)
    assert p[0] == pytest.approx(1.0 - 0.5 * 2.0 / math.sqrt(4.1 + 1e-7)) and s["accumulator"][0] == pytest.approx(4.1)

    p, s = one_step("adadelta", [1.0], [2.0], {"accumulated_grad": [0.0], "accumulated_delta_var": [0.0]}, 1.0)
    ag = 0.05 * 4.0
    delta = -math.sqrt(1e-7) * 2.0 / math.sqrt(ag + 1e-7)
    assert p[0] == pytest.approx(1.0 + delta) and s["accumulated_delta_var"][0] == pytest.approx(0.05 * delta**2)

    p, s = one_step("adamax", [1.0], [-2.0], {"m": [0.0], "u": [0.0]}, 0.1)
    assert s["u"][0] == 2.0 and p[0] == pytest.approx(1.0 - 0.1 * (-0.2) / (0.1 * (2.0 + 1e-7)))

    p, s = one_step("lion", [1.0, 1.0], [2.0, -1.0], {"m": [-1.0, 0.0]}, 0.1)
    # sign(0.9 m + 0.1 g) = sign(-0.7), sign(-0.1); m = 0.99 m + 0.01 g
    np.testing.assert_allclose(p, [1.1, 1.1])
    np.testing.assert_allclose(s["m"], [-0.99 + 0.02, -0.01])

    p, s = one_step("ftrl", [0.5], [1.0], {"accumulator": [0.1], "linear": [0.0]}, 0.1, l1_regularization_strength=0.01)
    new_acc = 1.1
    linear = 1.0 - (new_acc**0.5 - 0.1**0.5) / 0.1 * 0.5
    quadratic = new_acc**0.5 / 0.1
    assert p[0] == pytest.approx((np.clip(linear, -0.01, 0.01) - linear) / quadratic)
    assert s["accumulator"][0] == pytest.approx(1.1) and s["linear"][0] == pytest.approx(linear)


def test_amsgrad_keeps_the_largest_second_moment():
    p, s = one_step("adam", [0.0], [0.1], {"m": [0.0], "v": [0.5], "v_hat": [0.7]}, 0.1, amsgrad=True, t=2)
    v = 0.5 + (0.01 - 0.5) * 0.001
    assert s["v"][0] == pytest.approx(v) and s["v_hat"][0] == 0.7
    m = 0.1 * 0.1
    assert p[0] == pytest.approx(-m * 0.1 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2) / (math.sqrt(0.7) + 1e-7))


def test_weight_decay_is_decoupled_and_applied_first():
    p, _ = one_step("sgd", [2.0], [0.0], {}, 0.1, weight_decay=0.5)
    assert p[0] == pytest.approx(2.0 - 2.0 * 0.5 * 0.1)


# -------------------------------------------- every optimizer class on every backend

CONFIGS = [
    ("nadam", {}),
    ("adagrad", {"initial_accumulator_value": 0.2}),
    ("adadelta", {"learning_rate": 1.0, "rho": 0.9}),
    ("adamax", {"weight_decay": 0.01}),
    ("lion", {"learning_rate": 0.01}),
    ("ftrl", {"learning_rate": 0.1, "l1_regularization_strength": 0.001, "l2_regularization_strength": 0.01}),
    ("adam", {"amsgrad": True, "weight_decay": 0.02}),
    ("rmsprop", {"weight_decay": 0.01, "momentum": 0.3}),
    ("sgd", {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
]
P, STEPS = 11, 4


@pytest.mark.parametrize("backend_name", list(backend_params()))
@pytest.mark.parametrize("name, config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_optimizer_class_matches_reference(name, config, backend_name):
    backend = make_backend(backend_name)
    rng = np.random.default_rng(hash(name) % 1000)
    optimizer = optimizers.get({"name": name, **config})
    optimizer.build(backend, P, np.float32)
    initial = {slot: backend.to_numpy(value).copy() for slot, value in optimizer.slots.items()}
    p0 = rng.standard_normal(P).astype(np.float32)
    params = backend.asarray(p0.copy())
    expected, slots = p0.copy(), {k: v.copy() for k, v in initial.items()}
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(P).astype(np.float32)
        lr = optimizer.learning_rate
        numpy_ops.optimizer_step(name, expected, g, slots, lr, t, optimizer.get_config())
        optimizer.apply(params, backend.asarray(g), [(0, P)])
    assert optimizer.iterations == STEPS
    got = backend.to_numpy(params)
    assert not np.allclose(got, p0)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    for slot, value in slots.items():
        np.testing.assert_allclose(backend.to_numpy(optimizer.slots[slot]), value, rtol=2e-5, atol=2e-6, err_msg=slot)


def test_optimizers_by_name_with_keras_defaults():
    assert set(optimizers.names()) >= {"sgd", "adam", "adamw", "rmsprop", "nadam", "adagrad", "adadelta", "adamax", "lion", "ftrl"}
    assert optimizers.get("adagrad").initial_accumulator_value == 0.1
    assert optimizers.get("adadelta").rho == 0.95
    assert optimizers.get("lion").beta_2 == 0.99
    assert optimizers.get("ftrl").learning_rate_power == -0.5
    with pytest.raises(ValueError, match="learning_rate_power"):
        optimizers.Ftrl(learning_rate_power=0.5)
    with pytest.raises(ValueError, match="beta_1"):
        optimizers.Lion(beta_1=1.5)


# ----------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        (schedules.ExponentialDecay(0.1, 10, 0.5), 5, 0.1 * 0.5**0.5),
        (schedules.ExponentialDecay(0.1, 10, 0.5, staircase=True), 15, 0.05),
        (schedules.InverseTimeDecay(0.1, 10, 1.0), 10, 0.05),
        (schedules.InverseTimeDecay(0.1, 10, 1.0, staircase=True), 19, 0.05),
        (schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.0), 5, 0.05),
        (schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=2.0), 20, 0.01),
        (schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.0, cycle=True), 15, 0.1 * (1 - 15 / 20)),
        (schedules.PiecewiseConstantDecay([5, 10], [0.1, 0.05, 0.01]), 5, 0.1),
        (schedules.PiecewiseConstantDecay([5, 10], [0.1, 0.05, 0.01]), 6, 0.05),
        (schedules.PiecewiseConstantDecay([5, 10], [0.1, 0.05, 0.01]), 11, 0.01),
        (schedules.CosineDecay(0.1, 10), 5, 0.05),
        (schedules.CosineDecay(0.1, 10, alpha=0.2), 10, 0.02),
        (schedules.CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=4), 2, 0.05),
        (schedules.CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=4), 9, 0.05),
    ],
)
def test_schedule_values_from_keras_formulas(schedule, step, expected):
    assert schedule(step) == pytest.approx(expected, rel=1e-12)


def test_schedule_drives_the_learning_rate_and_cannot_be_overwritten_by_a_number():
    schedule = schedules.ExponentialDecay(0.1, 1, 0.5)
    optimizer = optimizers.SGD(learning_rate=schedule)
    optimizer.build(NumpyBackend(), 1, np.float64)
    params = np.array([0.0])
    seen = []
    for _ in range(3):
        seen.append(optimizer.learning_rate)
        before = params.copy()
        optimizer.apply(params, np.array([1.0]), [(0, 1)])
        assert params[0] == pytest.approx(before[0] - seen[-1])
    assert seen == pytest.approx([0.1, 0.05, 0.025])
    with pytest.raises(TypeError, match="learning_rate"):
        optimizer.learning_rate = 0.3
    optimizer.learning_rate = schedules.PiecewiseConstantDecay([1], [1.0, 2.0])
    assert optimizer.learning_rate == 2.0


def test_learning_rate_assignable_during_training():
    x, y = regression_data(3, n=40)
    model = gpunn.Sequential([gpunn.Input((x.shape[1],)), gpunn.layers.Dense(1)])
    model.compile(optimizer=optimizers.SGD(0.01), loss="mse")
    rates = []

    class Halve(gpunn.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = 0.01 / 2**epoch
            rates.append(self.model.optimizer.learning_rate)

    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[Halve()])
    assert rates == [0.01, 0.005, 0.0025]


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: optimizers.Nadam(learning_rate=schedules.CosineDecay(0.01, 20)),
        lambda: optimizers.Adagrad(0.05),
        lambda: optimizers.Adadelta(1.0),
        lambda: optimizers.Adamax(0.01, weight_decay=0.01),
        lambda: optimizers.Lion(0.001),
        lambda: optimizers.Ftrl(0.05, l1_regularization_strength=0.001),
        lambda: optimizers.Adam(learning_rate=schedules.ExponentialDecay(0.01, 5, 0.9), amsgrad=True),
    ],
    ids=["nadam-cosine", "adagrad", "adadelta", "adamax-wd", "lion", "ftrl", "adam-amsgrad-exp"],
)
def test_save_load_resumes_bit_exactly(tmp_path, optimizer):
    x, y = regression_data(5, n=48)

    def fresh():
        gpunn.set_seed(1)
        model = gpunn.Sequential([gpunn.Input((x.shape[1],)), gpunn.layers.Dense(6, activation="tanh"), gpunn.layers.Dense(1)])
        model.compile(optimizer=optimizer(), loss="mse")
        return model

    gpunn.set_seed(2)
    straight = fresh()
    straight.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0)

    first = fresh()
    first.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    path = tmp_path / "model.gpunn"
    first.save(path)
    resumed = gpunn.load_model(path)
    assert type(resumed.optimizer) is type(first.optimizer)
    assert resumed.optimizer.get_config() == first.optimizer.get_config()
    resumed.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
