"""Layers' ``dtype=`` as Keras scripts pass it: float32/float64 honoured, mixed-precision
policies accepted with one clear warning, anything else a ValueError naming the argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpunn
from gpunn import layers

RNG = np.random.default_rng(7)
X = RNG.standard_normal((24, 3))
Y = RNG.standard_normal((24, 1))


class KerasLikePolicy:
    """Stands in for keras.DTypePolicy / keras.mixed_precision.Policy: a name and a compute dtype."""

    def __init__(self, name):
        self.name = name
        self.compute_dtype = "float16" if "float16" in name else "bfloat16"


def trained(model):
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    return model


def dtype_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and "dtype=" in str(w.message)]


@pytest.mark.parametrize("dtype", ["float64", np.float64, np.dtype("float64")])
def test_layers_asking_for_float64_get_a_float64_model(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreed requests: nothing to warn about
        model = trained(gpunn.Sequential([layers.Dense(4, activation="relu", dtype=dtype), layers.Dense(1, dtype=dtype)]))
    assert model.dtype == np.float64
    assert [layer.dtype for layer in model.layers] == ["float64", "float64"]
    assert all(w.dtype == np.float64 for w in model.get_weights())
    assert model.predict(X, verbose=0).dtype == np.float64


def test_float32_layers_in_a_float32_model_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = trained(gpunn.Sequential([layers.Dense(4, dtype="float32"), layers.Dense(1, dtype="float32")]))
    assert model.dtype == np.float32


@pytest.mark.parametrize(
    "policy, name",
    [
        ("mixed_float16", "mixed_float16"),
        ("mixed_bfloat16", "mixed_bfloat16"),
        ("float16", "float16"),
        (np.float16, "float16"),
        ("bfloat16", "bfloat16"),
        (KerasLikePolicy("mixed_float16"), "mixed_float16"),
    ],
)
@pytest.mark.parametrize("model_dtype", [None, "float64"])
def test_mixed_precision_policies_warn_once_and_use_the_models_dtype(policy, name, model_dtype):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = gpunn.Sequential(
            [layers.Dense(4, activation="relu", dtype=policy), layers.Dropout(0.1, dtype=policy), layers.Dense(1)],
            dtype=model_dtype,
        )
        trained(model)
        model.add(layers.Dense(1))  # a rebuild does not repeat the warning
        trained(model)
    expected = model_dtype or "float32"
    messages = dtype_warnings(record)
    assert len(messages) == 1, messages
    assert f"dtype={name!r}" in messages[0] and "ignored" in messages[0]
    assert f"model's dtype, {expected}" in messages[0]
    assert repr(model.layers[0].name) in messages[0] and repr(model.layers[1].name) in messages[0]
    assert model.dtype == np.dtype(expected)
    assert all(w.dtype == np.dtype(expected) for w in model.get_weights())
    assert model.layers[0].dtype == expected


def test_a_float_dtype_the_model_cannot_follow_is_named_in_a_warning():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = trained(gpunn.Sequential([layers.Dense(4, dtype="float64"), layers.Dense(1)], dtype="float32"))
    messages = dtype_warnings(record)
    assert len(messages) == 1 and "dtype='float64'" in messages[0] and "float32" in messages[0], messages
    assert model.dtype == np.float32
    # layers that disagree among themselves: the model keeps floatx() and says so
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = trained(gpunn.Sequential([layers.Dense(4, dtype="float64"), layers.Dense(1, dtype="float32")]))
    messages = dtype_warnings(record)
    assert len(messages) == 1 and "dtype='float64'" in messages[0], messages
    assert model.dtype == np.float32


@pytest.mark.parametrize("bad", ["int32", "mixed_float", "floatx", 3, True, object()])
def test_a_dtype_that_is_not_a_float_dtype_or_policy_is_refused(bad):
    with pytest.raises(ValueError, match=r"dtype \(layer 'out'\): expected 'float32', 'float64', None, or a Keras mixed-precision"):
        layers.Dense(1, dtype=bad, name="out")
    with pytest.raises(ValueError, match=r"dtype \(layer 'noise'\)"):
        layers.GaussianNoise(0.1, dtype=bad, name="noise")


def test_input_dtype_is_checked_and_any_numeric_dtype_is_converted():
    with pytest.raises(ValueError, match=r"dtype: expected a numeric dtype .* got 'floaty'"):
        gpunn.Input(shape=(3,), dtype="floaty")
    model = trained(gpunn.Sequential([gpunn.Input(shape=(3,), dtype="int32"), layers.Dense(1)]))
    assert model.predict(X.astype(np.int32), verbose=0).dtype == np.float32


def test_a_requested_float_dtype_survives_the_layer_config():
    dense = layers.Dense(2, dtype="float64")
    assert dense.get_config()["dtype"] == "float64"
    assert layers.Dense.from_config(dense.get_config()).requested_dtype == "float64"
    assert "dtype" not in layers.Dense(2).get_config()
    assert "dtype" not in layers.Dense(2, dtype="mixed_float16").get_config()  # ignored, so not kept
    model = gpunn.Sequential.from_config(gpunn.Sequential([gpunn.Input((3,)), dense]).get_config())
    assert model.dtype == np.float64
