"""One module of argument checks (gpunn.checks) used by every public constructor:
booleans are booleans, any real number type is a number."""

import numpy as np
import pytest

import gpunn
from gpunn import callbacks as cbs
from gpunn import checks
from gpunn.layers import Dense

BOOLEAN_SETTINGS = {
    "use_bias": lambda v: Dense(2, use_bias=v),
    "from_logits": lambda v: gpunn.losses.BinaryCrossentropy(from_logits=v),
    "nesterov": lambda v: gpunn.optimizers.SGD(nesterov=v),
    "centered": lambda v: gpunn.optimizers.RMSprop(centered=v),
    "restore_best_weights": lambda v: cbs.EarlyStopping(restore_best_weights=v),
    "save_best_only": lambda v: cbs.ModelCheckpoint("m.gpunn", save_best_only=v),
    "save_weights_only": lambda v: cbs.ModelCheckpoint("m.gpunn", save_weights_only=v),
}


@pytest.mark.parametrize("argument", sorted(BOOLEAN_SETTINGS))
@pytest.mark.parametrize("value", ["false", "True", 0, 1, None])
def test_boolean_settings_take_only_booleans(argument, value):
    with pytest.raises(TypeError, match=rf"{argument}: expected a bool, got {value!r}"):
        BOOLEAN_SETTINGS[argument](value)
    BOOLEAN_SETTINGS[argument](np.bool_(True))  # NumPy's bool is a bool


def test_fit_shuffle_takes_only_booleans():
    model = gpunn.Sequential([Dense(1, input_dim=2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(TypeError, match="shuffle: expected a bool, got 'false'"):
        model.fit(np.zeros((4, 2)), np.zeros(4), shuffle="false", verbose=0)


@pytest.mark.parametrize("kind", [float, np.float32, np.float64, np.float16])
def test_every_real_number_type_is_a_number(kind):
    assert gpunn.optimizers.Adam(learning_rate=kind(0.5), beta_1=kind(0.5)).learning_rate == 0.5
    assert gpunn.regularizers.L2(kind(0.25)).l2 == 0.25
    assert cbs.ReduceLROnPlateau(factor=kind(0.5)).factor == 0.5


def test_number_checks_name_the_argument_and_the_range():
    with pytest.raises(ValueError, match=r"factor: expected a number in \(0, 1\), got 1.5"):
        cbs.ReduceLROnPlateau(factor=1.5)
    with pytest.raises(ValueError, match=r"factor: expected a number in \(0, 1\), got 0.0"):
        cbs.ReduceLROnPlateau(factor=0)
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\), got 1.0"):
        gpunn.optimizers.SGD(momentum=1)
    with pytest.raises(ValueError, match="learning_rate: expected a finite number, got True"):
        gpunn.optimizers.SGD(learning_rate=True)
    with pytest.raises(ValueError, match="learning_rate: expected a finite number, got nan"):
        gpunn.optimizers.SGD(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="l2: expected a non-negative number, got -1.0"):
        gpunn.regularizers.L2(-1)
    with pytest.raises(ValueError, match="patience: expected a non-negative integer, got 2.5"):
        cbs.EarlyStopping(patience=2.5)
    with pytest.raises(ValueError, match="units: expected a positive integer, got 0"):
        Dense(0)
    assert checks.positive_int(np.int32(3), "n") == 3
