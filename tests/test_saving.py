"""Save/load: identical predictions and optimizer state, bit-exact resumption, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import binary_data, mlp, multiclass_data, weights_equal

import gpunn
from gpunn.layers import Dense

OPTIMIZERS = {
    "adam": lambda: gpunn.optimizers.Adam(0.01),
    "adamw": lambda: gpunn.optimizers.AdamW(0.01, weight_decay=0.01),
    "sgd_nesterov": lambda: gpunn.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "rmsprop_centered": lambda: gpunn.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
}


def _classifier(optimizer, dtype=None, seed=0):
    gpunn.set_seed(seed)
    model = gpunn.Sequential(
        [
            Dense(9, activation="gelu", input_dim=5, kernel_regularizer=gpunn.regularizers.L2(1e-3)),
            Dense(6, activation={"name": "leaky_relu", "alpha": 0.1}, use_bias=False),
            Dense(3, activation="softmax"),
        ],
        name="saved_net",
        dtype=dtype,
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy", "precision"])
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_save_load_round_trip(tmp_path, opt, dtype):
    x, y = multiclass_data(1, n=40)
    model = _classifier(OPTIMIZERS[opt](), dtype)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    path = tmp_path / "model.gpunn"
    model.save(path)
    loaded = gpunn.load_model(path)

    assert loaded.name == "saved_net" and loaded.dtype == np.dtype(dtype)
    assert [layer.get_config() for layer in loaded.layers] == [layer.get_config() for layer in model.layers]
    assert weights_equal(loaded.get_weights(), model.get_weights())
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
    assert loaded.metrics_names == model.metrics_names
    assert loaded.loss.get_config() == model.loss.get_config()
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.iterations == model.optimizer.iterations == 10
    assert sorted(loaded.optimizer.slots) == sorted(model.optimizer.slots) != []
    for name, slot in model.optimizer.slots.items():
        assert np.abs(slot).max() > 0
        np.testing.assert_array_equal(loaded.optimizer.slots[name], slot)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_resume_after_load_is_bit_identical(tmp_path, opt):
    x, y = multiclass_data(2, n=44)
    straight = _classifier(OPTIMIZERS[opt]())
    straight.fit(x, y, epochs=5, batch_size=8, shuffle=False, verbose=0)

    first = _classifier(OPTIMIZERS[opt]())
    first.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    first.save(tmp_path / "half.gpunn")
    resumed = gpunn.load_model(tmp_path / "half.gpunn")
    history = resumed.fit(x, y, epochs=5, initial_epoch=2, batch_size=8, shuffle=False, verbose=0)

    assert history.epoch == [2, 3, 4]
    assert resumed.optimizer.iterations == straight.optimizer.iterations
    assert weights_equal(resumed.get_weights(), straight.get_weights())
    for name, slot in straight.optimizer.slots.items():
        np.testing.assert_array_equal(resumed.optimizer.slots[name], slot)


def test_changed_learning_rate_is_saved(tmp_path):
    x, y = binary_data(3)
    gpunn.set_seed(3)
    model = mlp([4, 1], "relu", "sigmoid", input_dim=5)
    model.compile(optimizer=gpunn.optimizers.Adam(0.1), loss="binary_crossentropy")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[gpunn.callbacks.LearningRateScheduler(lambda e, lr: 0.1 / (e + 2))])
    model.save(tmp_path / "m.gpunn")
    assert gpunn.load_model(tmp_path / "m.gpunn").optimizer.learning_rate == pytest.approx(0.1 / 3)


def test_load_without_compile_and_uncompiled_save(tmp_path):
    x, y = binary_data(4)
    model = mlp([4, 1], "tanh", "sigmoid", input_dim=5)
    model.build()
    model.save(tmp_path / "plain.gpunn")  # built, never compiled
    plain = gpunn.load_model(tmp_path / "plain.gpunn")
    assert not plain.compiled
    np.testing.assert_array_equal(plain.predict(x), model.predict(x))

    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "trained.gpunn")
    again = gpunn.load_model(tmp_path / "trained.gpunn", compile=False)
    assert not again.compiled
    assert weights_equal(again.get_weights(), model.get_weights())


def test_save_overwrites_and_leaves_no_temporary_files(tmp_path):
    x, y = binary_data(5)
    gpunn.set_seed(5)
    model = mlp([4, 1], "relu", "sigmoid", input_dim=5)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.build()
    path = tmp_path / "m.gpunn"
    model.save(path)
    model.fit(x, y, epochs=2, verbose=0)
    model.save(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.gpunn"]
    assert weights_equal(gpunn.load_model(path).get_weights(), model.get_weights())


def test_load_weights_into_same_architecture(tmp_path):
    a = _classifier(gpunn.optimizers.Adam(), seed=6)
    a.build()
    a.save_weights(tmp_path / "w.gpunn")
    b = _classifier(gpunn.optimizers.Adam(), seed=7)
    b.build()
    assert not weights_equal(a.get_weights(), b.get_weights())
    b.load_weights(tmp_path / "w.gpunn")
    assert weights_equal(a.get_weights(), b.get_weights())
    other = gpunn.Sequential([Dense(4, input_dim=5), Dense(3)])
    other.build()
    with pytest.raises(gpunn.ModelFileError, match="weight"):
        other.load_weights(tmp_path / "w.gpunn")


def test_missing_file_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        gpunn.load_model(tmp_path / "nope.gpunn")
    with pytest.raises(FileNotFoundError):
        _save_built(tmp_path / "no_such_dir" / "m.gpunn")
    with pytest.raises(ValueError, match="not built"):
        mlp([2]).save(tmp_path / "unbuilt.gpunn")

    good = tmp_path / "good.gpunn"
    _save_built(good)
    blob = good.read_bytes()
    for name, data in {
        "truncated": blob[: len(blob) // 2],
        "tiny": blob[:5],
        "flipped": blob[:-3] + bytes([blob[-3] ^ 0xFF]) + blob[-2:],
        "text": b"hello, this is not a model file at all" * 3,
    }.items():
        path = tmp_path / f"{name}.gpunn"
        path.write_bytes(data)
        with pytest.raises(gpunn.ModelFileError, match=name + ".gpunn"):
            gpunn.load_model(path)


def _save_built(path):
    model = mlp([3, 2], input_dim=4)
    model.build()
    model.save(path)
