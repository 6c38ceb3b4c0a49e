"""Initializer classes and regularizer functions: Keras 3's formulas and defaults, seeds, configs, save/load."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn import initializers as init
from gpunn import regularizers as reg
from gpunn.layers import Dense

SHAPE = (300, 200)  # fan_in 300, fan_out 200
TRUNC = 0.87962566103423978


@pytest.mark.parametrize(
    "make, stddev, truncated",
    [
        (init.HeNormal, np.sqrt(2 / 300), True),
        (init.GlorotNormal, np.sqrt(2 / 500), True),
        (init.LecunNormal, np.sqrt(1 / 300), True),
        (lambda seed: init.VarianceScaling(3.0, "fan_out", "normal", seed=seed), np.sqrt(3 / 200), True),
        (lambda seed: init.VarianceScaling(0.5, "fan_avg", "untruncated_normal", seed=seed), np.sqrt(0.5 / 250), False),
    ],
)
def test_normal_variance_scaling(make, stddev, truncated):
    values = make(seed=4)(SHAPE, "float64")
    # the requested variance, with truncation at 2 / 0.8796 of it (the draw is rescaled so the variance holds)
    assert values.std() == pytest.approx(stddev, rel=0.02)
    assert abs(values.mean()) < 0.01 * stddev * 10
    if truncated:
        assert np.abs(values).max() <= 2 * stddev / TRUNC
        assert np.abs(values).max() > 1.95 * stddev / TRUNC
    else:
        assert np.abs(values).max() > 3 * stddev


@pytest.mark.parametrize(
    "make, limit",
    [
        (init.GlorotUniform, np.sqrt(6 / 500)),
        (init.HeUniform, np.sqrt(6 / 300)),
        (init.LecunUniform, np.sqrt(3 / 300)),
        (lambda seed: init.VarianceScaling(2.0, "fan_out", "uniform", seed=seed), np.sqrt(6 / 200)),
    ],
)
def test_uniform_variance_scaling(make, limit):
    values = make(seed=1)(SHAPE, "float64")
    assert np.abs(values).max() <= limit and np.abs(values).max() > 0.99 * limit
    # with a seed: exactly NumPy's uniform on [-limit, limit) from that seed
    np.testing.assert_allclose(values, np.random.default_rng(1).uniform(-limit, limit, SHAPE), rtol=1e-15)


def test_simple_initializers_and_defaults():
    assert np.all(init.Zeros()((2, 3)) == 0) and np.all(init.Ones()((4,)) == 1)
    assert np.all(init.Constant(0.25)((3, 2)) == 0.25)
    np.testing.assert_array_equal(init.Identity(gain=2.0)((3, 4)), 2 * np.eye(3, 4))
    normal = init.RandomNormal(seed=2)((400, 100), "float64")
    assert normal.std() == pytest.approx(0.05, rel=0.02)
    shifted = init.RandomNormal(mean=1.0, stddev=0.2, seed=2)((400, 100), "float64")
    assert shifted.mean() == pytest.approx(1.0, abs=0.005) and shifted.std() == pytest.approx(0.2, rel=0.02)
    uniform = init.RandomUniform(seed=2)((400, 100), "float64")
    assert uniform.min() >= -0.05 and uniform.max() < 0.05 and uniform.max() > 0.0499
    trunc = init.TruncatedNormal(mean=0.5, stddev=0.1, seed=3)((400, 100), "float64")
    assert np.abs(trunc - 0.5).max() <= 0.2  # redrawn beyond 2 stddev, not rescaled
    assert trunc.std() == pytest.approx(0.1 * TRUNC, rel=0.03)
    for rows, cols in ((5, 3), (3, 5)):
        q = init.Orthogonal(gain=1.5, seed=0)((rows, cols), "float64")
        small = q.T @ q if rows >= cols else q @ q.T
        np.testing.assert_allclose(small, 1.5**2 * np.eye(min(rows, cols)), atol=1e-12)
    assert init.GlorotUniform()((3, 3)).dtype == np.float32
    with pytest.raises(ValueError, match="2-D"):
        init.Identity()((3,))
    with pytest.raises(ValueError, match="mode"):
        init.VarianceScaling(mode="fan_sum")
    with pytest.raises(ValueError, match="distribution"):
        init.VarianceScaling(distribution="cauchy")


def test_names_resolve_to_the_classes():
    for name, cls in (
        ("truncated_normal", init.TruncatedNormal),
        ("variance_scaling", init.VarianceScaling),
        ("identity", init.Identity),
        ("he_normal", init.HeNormal),
        ("HeNormal", init.HeNormal),
        ("glorot_uniform", init.GlorotUniform),
        ("orthogonal", init.Orthogonal),
    ):
        assert type(init.get(name)) is cls
    assert init.truncated_normal is init.TruncatedNormal and init.variance_scaling is init.VarianceScaling


def test_user_initializers_with_either_signature():
    def keras_style(shape, dtype=None):
        return np.full(shape, 0.5, dtype=dtype)

    def rng_style(shape, rng):
        return rng.uniform(size=shape)

    assert np.all(init.initialize(keras_style, (2, 3), "float32") == 0.5)
    gpunn.set_seed(1)
    first = init.initialize(rng_style, (2, 3), "float64")
    gpunn.set_seed(1)
    np.testing.assert_array_equal(init.initialize(rng_style, (2, 3), "float64"), first)


def test_seeds_and_the_global_generator():
    a, b = init.HeNormal(seed=7), init.HeNormal(seed=7)
    np.testing.assert_array_equal(a((4, 3)), a((4, 3)))  # a seeded initializer repeats, as Keras 3's
    np.testing.assert_array_equal(a((4, 3)), b((4, 3)))
    assert not np.array_equal(a((4, 3)), init.HeNormal(seed=8)((4, 3)))
    gpunn.set_seed(3)
    first = init.HeNormal()((4, 3))
    gpunn.set_seed(3)
    np.testing.assert_array_equal(init.HeNormal()((4, 3)), first)
    # the names and the classes draw the same values from the same generator state
    gpunn.set_seed(3)
    np.testing.assert_array_equal(init.initialize("he_normal", (4, 3), "float32"), first)


@pytest.mark.parametrize(
    "initializer",
    [
        init.GlorotUniform(seed=3), init.HeNormal(seed=1), init.VarianceScaling(2.0, "fan_avg", "uniform", seed=5),
        init.RandomNormal(0.1, 0.3, seed=2), init.RandomUniform(-1.0, 2.0, seed=2), init.TruncatedNormal(stddev=0.2, seed=9),
        init.Constant(0.7), init.Identity(0.5), init.Orthogonal(2.0, seed=4), init.Zeros(), init.Ones(),
    ],
)  # fmt: skip
def test_configs_round_trip(initializer):
    again = init.get(init.serialize(initializer))
    assert type(again) is type(initializer) and again.get_config() == initializer.get_config()
    np.testing.assert_array_equal(again((4, 4)), initializer((4, 4)))


def test_initializers_and_regularizers_round_trip_through_save(tmp_path):
    gpunn.set_seed(0)
    model = gpunn.Sequential(
        [
            Dense(4, input_dim=3, kernel_initializer=init.GlorotUniform(seed=3), bias_initializer=init.Constant(0.1),
                  kernel_regularizer=reg.l1_l2()),
            Dense(3, kernel_initializer="identity", bias_initializer=init.Ones, kernel_regularizer=reg.l2()),
        ]
    )  # fmt: skip
    model.build()
    np.testing.assert_array_equal(model.get_weights()[1], np.full(4, 0.1, np.float32))
    np.testing.assert_array_equal(model.get_weights()[2], np.eye(4, 3))
    np.testing.assert_array_equal(model.get_weights()[0], init.GlorotUniform(seed=3)((3, 4)))
    model.compile(optimizer="adam", loss="mse")
    model.save(tmp_path / "m.gpunn")
    loaded = gpunn.load_model(tmp_path / "m.gpunn")
    assert [layer.get_config() for layer in loaded.layers] == [layer.get_config() for layer in model.layers]
    fresh = gpunn.Sequential.from_config(model.get_config())
    fresh.build()
    for got, expected in zip(fresh.get_weights(), model.get_weights()):  # seeded and constant initializers rebuild
        np.testing.assert_array_equal(got, expected)


def test_regularizer_functions_have_keras_defaults():
    w = np.array([[1.0, -2.0], [0.5, 0.0]])
    assert reg.l1()(w) == pytest.approx(0.01 * 3.5)
    assert reg.l2()(w) == pytest.approx(0.01 * 5.25)
    assert reg.l1_l2()(w) == pytest.approx(0.01 * 3.5 + 0.01 * 5.25)
    assert reg.l1_l2(l1=0.1, l2=0.0)(w) == pytest.approx(0.35)
    assert isinstance(reg.l2(), reg.L2) and isinstance(reg.l1(), reg.L1) and isinstance(reg.l1_l2(), reg.L1L2)
    assert reg.L1L2()(w) == 0.0  # the class's defaults are 0, as Keras's
    assert reg.get({"class_name": "L2", "config": {"l2": 0.5}})(w) == pytest.approx(0.5 * 5.25)
    with pytest.raises(ValueError, match="l1"):
        reg.l1(-1.0)
