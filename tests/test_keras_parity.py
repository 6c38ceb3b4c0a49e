"""Issue 10's four divergences from Keras, and the Keras model API and utilities.

The expected numbers come from Keras's documented behaviour (split points,
which losses are weighted, what freezing means), never from gpunn itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gpunn
from gpunn import layers
from helpers import binary_data, rng, weights_equal


def _binary_model(seed=0, **first):
    gpunn.set_seed(seed)
    model = gpunn.Sequential([layers.Dense(6, activation="relu", input_dim=5, **first), layers.Dense(1, activation="sigmoid")], dtype="float64")
    return model


# ----------------------------------------------------------------- divergence 1
@pytest.mark.parametrize("n, split, n_train", [(569, 0.2, 455), (10, 0.25, 7), (7, 0.5, 3), (100, 0.1, 90)])
def test_validation_split_trains_on_the_first_floor_n_times_one_minus_split(n, split, n_train):
    """Keras: split_at = floor(n * (1 - split)); 569 at 0.2 is 455 training / 114 validation samples."""
    r = rng(n)
    x, y = r.normal(size=(n, 5)), (r.random((n, 1)) > 0.5).astype(float)
    split_model, head_model = _binary_model(), _binary_model()
    head_model.set_weights(split_model.get_weights())
    for m in (split_model, head_model):
        m.compile(optimizer="sgd", loss="binary_crossentropy")
    history = split_model.fit(x, y, validation_split=split, epochs=1, batch_size=n, shuffle=False, verbose=0)
    head_model.fit(x[:n_train], y[:n_train], epochs=1, batch_size=n, shuffle=False, verbose=0)
    assert weights_equal(split_model.get_weights(), head_model.get_weights())
    assert history.history["val_loss"][0] == pytest.approx(split_model.evaluate(x[n_train:], y[n_train:], verbose=0), rel=1e-12)


# ----------------------------------------------------------------- divergence 2
def test_class_weight_weights_training_but_not_the_validation_loss():
    x, y = binary_data(3, n=60)
    class_weight = {0: 1.0, 1: 5.0}
    model, plain = _binary_model(), _binary_model()
    plain.set_weights(model.get_weights())
    for m in (model, plain):
        m.compile(optimizer="sgd", loss="binary_crossentropy")
    history = model.fit(x, y, validation_split=0.25, class_weight=class_weight, epochs=1, batch_size=60, shuffle=False, verbose=0)
    x_val, y_val = x[45:], y[45:]
    assert history.history["val_loss"][0] == pytest.approx(model.evaluate(x_val, y_val, verbose=0), rel=1e-12)
    weighted = model.evaluate(x_val, y_val, sample_weight=np.where(y_val[:, 0] > 0.5, 5.0, 1.0), verbose=0)
    assert abs(weighted - history.history["val_loss"][0]) > 1e-3
    # the training part is class-weighted: the same as passing those weights per sample
    plain.fit(x[:45], y[:45], sample_weight=np.where(y[:45, 0] > 0.5, 5.0, 1.0), epochs=1, batch_size=60, shuffle=False, verbose=0)
    assert weights_equal(model.get_weights(), plain.get_weights())


# ----------------------------------------------------------------- divergence 3
def _frozen_middle(backend="numpy"):
    with gpunn.use_backend(backend):
        gpunn.set_seed(4)
        model = gpunn.Sequential(
            [
                gpunn.Input(shape=(5,)),
                layers.Dense(6, activation="tanh"),
                layers.Dense(4, activation="relu", kernel_regularizer=gpunn.regularizers.L2(0.5), name="frozen"),
                layers.Dense(1, activation="sigmoid"),
            ],
            dtype="float64",
        )
    model.get_layer("frozen").trainable = False
    return model


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop", "nadam", "lion", "ftrl", "adagrad"])
def test_a_frozen_layer_gets_no_update_no_regularisation_and_still_passes_gradients(optimizer):
    model = _frozen_middle()
    x, y = binary_data(5, n=40)
    model.compile(optimizer=gpunn.optimizers.get(optimizer) if optimizer != "sgd" else gpunn.optimizers.SGD(0.1, momentum=0.9),
                  loss="binary_crossentropy")  # fmt: skip
    before = model.get_weights()
    frozen_before = model.get_layer("frozen").get_weights()
    # the frozen layer's L2 penalty is not part of the loss (Keras regularises trainable weights only)
    plain = model.evaluate(x, y, verbose=0)
    model.get_layer("frozen").kernel_regularizer = None
    assert model.evaluate(x, y, verbose=0) == plain
    model.get_layer("frozen").kernel_regularizer = gpunn.regularizers.L2(0.5)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    after = model.get_weights()
    assert weights_equal(model.get_layer("frozen").get_weights(), frozen_before)  # bit for bit, even under (AdamW) decay
    assert not np.array_equal(after[0], before[0]) and not np.array_equal(after[4], before[4])  # the others train
    # unfreezing takes effect at the next step
    model.get_layer("frozen").trainable = True
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(model.get_layer("frozen").get_weights()[0], frozen_before[0])


def test_trainable_weights_non_trainable_weights_and_summary_report_freezing():
    model = _frozen_middle()
    assert len(model.weights) == 6 and len(model.trainable_weights) == 4 and len(model.non_trainable_weights) == 2
    assert [w.shape for w in model.non_trainable_weights] == [(6, 4), (4,)]
    assert model.get_layer("frozen").trainable_weights == []
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "Total params: 69 " in text and "Trainable params: 41 " in text and "Non-trainable params: 28 " in text
    assert "frozen (Dense, frozen)" in text
    model.trainable = False
    assert model.trainable_weights == [] and len(model.non_trainable_weights) == 6


def test_freezing_survives_save_and_load(tmp_path):
    model = _frozen_middle()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.save(tmp_path / "m.gpunn")
    loaded = gpunn.models.load_model(tmp_path / "m.gpunn")
    assert not loaded.get_layer("frozen").trainable and len(loaded.trainable_weights) == 4


def test_a_frozen_layer_stays_frozen_on_the_cuda_backend():
    pytest.importorskip("numba")
    model = _frozen_middle("cuda")
    x, y = binary_data(6, n=8)
    model.compile(optimizer="adamw", loss="binary_crossentropy")
    frozen_before = model.get_layer("frozen").get_weights()
    first_before = model.get_layer(index=0).get_weights()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert model.backend.name == "cuda"
    assert weights_equal(model.get_layer("frozen").get_weights(), frozen_before)
    assert not weights_equal(model.get_layer(index=0).get_weights(), first_before)


# ----------------------------------------------------------------- divergence 4
@pytest.mark.parametrize(
    "make",
    [
        lambda: gpunn.Sequential([gpunn.Input(shape=(3,)), layers.Dense(4), layers.Dense(2)]),
        lambda: gpunn.Sequential([layers.Dense(4, input_shape=(3,)), layers.Dense(2)]),
        lambda: gpunn.Sequential([layers.Dense(4, input_dim=3), layers.Dense(2)]),
    ],
)
def test_a_model_with_a_known_input_shape_is_built_at_construction(make):
    model = make()
    assert model.built and model.count_params() == 3 * 4 + 4 + 4 * 2 + 2
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(3, 4), (4,), (4, 2), (2,)]
    new = [rng(1).normal(size=s) for s in shapes]
    model.set_weights(new)
    x = rng(2).normal(size=(5, 3))
    np.testing.assert_allclose(model.predict(x, verbose=0), (x @ new[0] + new[1]) @ new[2] + new[3], rtol=1e-5, atol=1e-6)
    assert model.input_shape == (None, 3) and model.output_shape == (None, 2)


def test_a_model_without_an_input_shape_is_built_by_its_data():
    model = gpunn.Sequential([layers.Dense(4), layers.Dense(2)])
    assert not model.built and model.get_weights() == []
    with pytest.raises(ValueError, match="count_params: the model is not built"):
        model.count_params()
    with pytest.raises(AttributeError, match="input_shape"):
        model.input_shape
    assert model.output_shape == (None, 2)
    model.predict(np.ones((2, 7)), verbose=0)
    assert model.input_shape == (None, 7) and model.count_params() == 7 * 4 + 4 + 4 * 2 + 2


# ------------------------------------------------------------------ model API
def test_add_pop_and_get_layer_keep_the_other_weights():
    model = gpunn.models.Sequential()
    model.add(gpunn.Input(shape=(4,)))
    model.add(layers.Dense(5, activation="relu", name="hidden"))
    assert model.built and model.count_params() == 25
    hidden = model.get_layer("hidden").get_weights()
    model.add(layers.Dense(3, name="out"))
    assert model.count_params() == 25 + 18 and weights_equal(model.get_layer("hidden").get_weights(), hidden)
    assert model.get_layer(index=-1).name == "out" and model.get_layer(index=0) is model.get_layer("hidden")
    popped = model.pop()
    assert popped.name == "out" and [layer.name for layer in model.layers] == ["hidden"]
    assert model.count_params() == 25 and weights_equal(model.get_weights(), hidden)
    with pytest.raises(ValueError, match="name: no layer named 'nope'"):
        model.get_layer("nope")
    with pytest.raises(ValueError, match="index: .* index 3 but the model has 1 layers"):
        model.get_layer(index=3)
    with pytest.raises(ValueError, match="either a layer name or an index"):
        model.get_layer()
    model.add(layers.Dense(1, activation="sigmoid"))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = binary_data(7, n=16, features=4)
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    with pytest.raises(ValueError, match="layer names must be unique"):
        model.add(layers.Dense(1, name="hidden"))


def test_to_json_and_model_from_json_round_trip():
    model = gpunn.Sequential([gpunn.Input(shape=(4,)), layers.Dense(5, activation="relu"), layers.Dropout(0.2, seed=3),
                              layers.BatchNormalization(momentum=0.9), layers.Dense(2, activation="softmax")], name="net")  # fmt: skip
    text = model.to_json()
    assert json.loads(text)["class_name"] == "Sequential"
    clone = gpunn.models.model_from_json(text)
    assert clone.built and clone.get_config() == model.get_config()
    assert [type(layer).__name__ for layer in clone.layers] == ["Dense", "Dropout", "BatchNormalization", "Dense"]
    assert clone.layers[2].momentum == 0.9 and clone.layers[1].seed == 3
    with pytest.raises(ValueError, match="json_string"):
        gpunn.models.model_from_json('{"class_name": "Functional"}')


def test_utils_follow_keras():
    np.testing.assert_array_equal(gpunn.utils.to_categorical([0, 2, 1]), [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    out = gpunn.utils.to_categorical(np.array([[1], [3]]), num_classes=5)
    assert out.shape == (2, 5) and out.dtype == np.float64 and out[1, 3] == 1
    with pytest.raises(ValueError, match="out of range for num_classes=2"):
        gpunn.utils.to_categorical([0, 2], num_classes=2)
    with pytest.raises(ValueError, match="integer class labels"):
        gpunn.utils.to_categorical([0.5, 1])
    np.testing.assert_allclose(gpunn.utils.normalize([[3.0, 4.0], [0.0, 0.0]]), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(gpunn.utils.normalize(np.array([[3.0, 4.0]]), order=1), [[3 / 7, 4 / 7]])
    gpunn.utils.set_random_seed(11)
    a = gpunn.Sequential([layers.Dense(3, input_dim=2)]).get_weights()
    gpunn.utils.set_random_seed(11)
    assert weights_equal(a, gpunn.Sequential([layers.Dense(3, input_dim=2)]).get_weights())
    gpunn.backend.clear_session()
    assert layers.Dense(1).name == "dense"


def test_a_frozen_base_is_not_back_propagated_through_and_stays_put():
    """Transfer learning: freeze the first layers, train the head; the frozen base's weights and
    BatchNormalization statistics are untouched (a frozen BatchNormalization runs in inference mode)."""
    gpunn.set_seed(2)
    model = gpunn.Sequential([gpunn.Input(shape=(5,)), layers.Dense(6, activation="relu"), layers.BatchNormalization(),
                              layers.Dense(1, activation="sigmoid", name="head")], dtype="float64")  # fmt: skip
    for layer in model.layers[:2]:
        layer.trainable = False
    model.compile(optimizer="adamw", loss="binary_crossentropy")
    x, y = binary_data(8, n=32)
    base = [layer.get_weights() for layer in model.layers[:2]]
    head = model.get_layer("head").get_weights()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert all(weights_equal(layer.get_weights(), w) for layer, w in zip(model.layers[:2], base))
    assert not weights_equal(model.get_layer("head").get_weights(), head)
    assert len(model.trainable_weights) == 2 and len(model.non_trainable_weights) == 6


def test_onnx_export_names_a_layer_it_cannot_map(tmp_path):
    """Every gpunn layer exports (tests/test_onnx_export.py); a layer class of the user's does not."""
    pytest.importorskip("onnx", reason="onnx is in the onnx extra")

    class Doubling(layers.Layer):
        def call(self, backend, x, y, buffers, activation=None, training=False):
            return backend.xp.multiply(x, 2, out=y)

    model = gpunn.Sequential([gpunn.Input(shape=(3,)), layers.Dense(4), layers.BatchNormalization(), Doubling(name="twice"), layers.Dense(1)])
    with pytest.raises(ValueError, match="export: no ONNX mapping for layer 'twice', a Doubling"):
        model.export(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
