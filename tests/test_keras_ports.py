"""What Keras 3 scripts write, ported by changing the import: the functional API for a chain of
layers, clone_model, Keras's save/load spellings, compile's execution settings, the
``*_variables`` names and ``model(x, training=False)``."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import multiclass_data

import gpunn as keras
from gpunn import layers


def _functional(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(5,), name="features")
    x = layers.Dense(8, activation="relu", name="hidden")(inputs)
    x = layers.Dropout(0.0, name="dropout")(x)
    outputs = layers.Dense(3, activation="softmax", name="predictions")(x)
    return inputs, x, keras.Model(inputs=inputs, outputs=outputs, name="clf")


def test_functional_chain_is_the_same_model_as_sequential():
    inputs, hidden, model = _functional()
    assert isinstance(model, keras.Model) and isinstance(keras.Sequential(), keras.models.Model)
    assert hidden.shape == (None, 8) and model.name == "clf"
    assert [layer.name for layer in model.layers] == ["hidden", "dropout", "predictions"]
    assert model.count_params() == 5 * 8 + 8 + 8 * 3 + 3  # built at once: the input is declared
    keras.utils.set_random_seed(0)
    seq = keras.Sequential([keras.Input(shape=(5,)), layers.Dense(8, activation="relu"), layers.Dropout(0.0), layers.Dense(3, activation="softmax")])
    seq.set_weights(model.get_weights())
    x, y = multiclass_data(0, n=40, classes=3)
    for m in (model, seq):
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        m.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), seq.predict(x, verbose=0))


def test_functional_api_refusals_say_what_to_do():
    inputs, _, _ = _functional()
    with pytest.raises(TypeError, match="inputs: gpunn layers are called on gpunn.Input"):
        layers.Dense(2)(np.ones((2, 5)))
    with pytest.raises(ValueError, match="outputs: not computed from inputs"):
        keras.Model(keras.Input(shape=(5,)), layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="one input and one output"):
        keras.Model(inputs, [layers.Dense(2)(inputs), layers.Dense(2)(inputs)])
    with pytest.raises(TypeError, match="training"):
        layers.Dense(2)(inputs, training=True)

    class Custom(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassing Model"):
        Custom()


def test_clone_model_has_the_architecture_and_fresh_weights():
    _, _, model = _functional()
    clone = keras.models.clone_model(model)
    assert clone.get_config()["layers"][0]["units"] == 8 and clone.count_params() == model.count_params()
    assert not np.array_equal(clone.get_weights()[0], model.get_weights()[0])
    clone.set_weights(model.get_weights())
    x, _ = multiclass_data(1, n=6, classes=3)
    np.testing.assert_array_equal(clone.predict(x, verbose=0), model.predict(x, verbose=0))
    renamed = keras.models.clone_model(model, clone_function=lambda layer: type(layer).from_config({**layer.get_config(), "name": "c_" + layer.name}))
    assert [layer.name for layer in renamed.layers] == ["c_hidden", "c_dropout", "c_predictions"] and renamed.output_shape == (None, 3)


def test_keras_save_and_load_spellings(tmp_path):
    _, _, model = _functional()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    path = str(tmp_path / "m.keras")
    keras.models.save_model(model, path)
    x, _ = multiclass_data(2, n=6, classes=3)
    for loaded in (keras.saving.load_model(path), keras.models.load_model(path, custom_objects={}, compile=False)):
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.raises(TypeError, match="custom_objects"):
        keras.saving.load_model(path, custom_objects=[1])


def test_compile_takes_keras_execution_settings_and_checks_them():
    _, _, model = _functional()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True, jit_compile=False,
                  steps_per_execution=4, loss_weights=[1.0], auto_scale_loss=True)  # fmt: skip
    assert model.compiled
    with pytest.raises(TypeError, match="run_eagerly"):
        model.compile(optimizer="adam", loss="mse", run_eagerly="yes")
    with pytest.raises(ValueError, match="loss_weights"):
        model.compile(optimizer="adam", loss="mse", loss_weights=[0.5])
    with pytest.raises(ValueError, match="steps_per_execution"):
        model.compile(optimizer="adam", loss="mse", steps_per_execution=0)
    assert model.loss.get_config()["name"] == "sparse_categorical_crossentropy"  # refused compiles changed nothing


def test_variables_names_and_call_with_training_false():
    _, _, model = _functional()
    model.layers[0].trainable = False
    assert [v.shape for v in model.variables] == [w.shape for w in model.weights]
    assert len(model.trainable_variables) == 2 and len(model.non_trainable_variables) == 2
    x, _ = multiclass_data(3, n=4, classes=3)
    np.testing.assert_array_equal(model(x, training=False), model.predict(x, verbose=0))
    with pytest.raises(ValueError, match="training"):
        model(x, training=True)


def test_validation_data_error_describes_the_tuple_briefly():
    _, _, model = _functional()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = multiclass_data(4, n=10, classes=3)
    with pytest.raises(ValueError, match=r"got tuple of 1 \(shape \(10, 5\)\)$"):
        model.fit(x, y, validation_data=(x,), verbose=0)


def test_loss_function_forms_stand_for_the_built_in_losses_and_user_functions_are_refused_clearly():
    _, _, model = _functional()
    model.compile(optimizer="sgd", loss=keras.losses.sparse_categorical_crossentropy)
    assert type(model.loss) is keras.losses.SparseCategoricalCrossentropy
    x, y = multiclass_data(5, n=8, classes=3)
    p = model.predict(x, verbose=0)
    # the function form computes Keras's per-sample values: -log p[label]
    np.testing.assert_allclose(keras.losses.sparse_categorical_crossentropy(y, p), -np.log(p[np.arange(8), y]), rtol=1e-5)
    assert model.evaluate(x, y, verbose=0) == pytest.approx(float(np.mean(-np.log(p[np.arange(8), y]))), rel=1e-5)
    with pytest.raises(TypeError, match="loss: got the function 'my_loss'.*subclass gpunn.losses.Loss"):

        def my_loss(y_true, y_pred):
            return (y_true - y_pred) ** 2

        model.compile(optimizer="sgd", loss=my_loss)


def test_one_feature_models_take_1d_x_as_keras_3_does():
    """TensorFlow's regression tutorial: Sequential([Normalization(input_shape=[1], axis=None), Dense(1)])
    fitted and predicted on a 1-D column; Keras 3 adds the feature axis when the model takes one."""
    column = np.linspace(-1.0, 2.0, 30)
    norm = layers.Normalization(input_shape=[1], axis=None)
    norm.adapt(column)
    model = keras.Sequential([norm, layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mean_absolute_error")
    model.fit(column, 3 * column, epochs=2, verbose=0)
    np.testing.assert_array_equal(model.predict(column, verbose=0), model.predict(column.reshape(-1, 1), verbose=0))
    assert model.evaluate(column, 3 * column, verbose=0) == model.evaluate(column.reshape(-1, 1), 3 * column, verbose=0)
    wide = keras.Sequential([keras.Input(shape=(3,)), layers.Dense(1)])
    with pytest.raises(ValueError, match=r"x: expected a 2-D array .* shape \(3,\)"):
        wide.predict(np.ones(3), verbose=0)


def test_normalization_axis_none_and_weight_attributes_as_keras():
    data = np.arange(12.0).reshape(4, 3)
    norm = layers.Normalization(axis=None)
    norm.adapt(data)
    # one mean and variance over every value (Keras 3 gives mean 5.5, variance 11.9167 here)
    np.testing.assert_allclose(norm.mean, [5.5] * 3)
    np.testing.assert_allclose(norm.variance, [143 / 12] * 3)
    model = keras.Sequential([keras.Input(shape=(3,)), norm, layers.BatchNormalization()])
    np.testing.assert_allclose(model.layers[0].mean, [5.5] * 3)  # now the model's weight
    out = keras.Sequential.from_config(model.get_config())  # axis=None round-trips
    assert out.layers[0].axis is None
    bn = model.layers[1]
    assert bn.moving_mean is bn.weights[2] and bn.gamma is bn.weights[0]
    with pytest.raises(AttributeError, match="no attribute 'kernel'"):
        bn.kernel  # noqa: B018


def test_keras_model_files_are_refused_saying_what_they_are(tmp_path):
    model = keras.Sequential([keras.Input(shape=(2,)), layers.Dense(1)])
    for name, head in (("zip.keras", b"PK\x03\x04\x14\x00\x00\x00"), ("model.h5", b"\x89HDF\r\n\x1a\n\x00\x00")):
        path = tmp_path / name
        path.write_bytes(head + bytes(200))
        with pytest.raises(keras.ModelFileError, match="as Keras .*set_weights"):
            keras.models.load_model(str(path))
        with pytest.raises(keras.ModelFileError, match="as Keras"):
            model.load_weights(str(path))


@pytest.mark.parametrize("make", [lambda x: {"features": x}, lambda x: (row for row in x), lambda x: iter([x])])
def test_dicts_generators_and_datasets_are_refused_by_name(make):
    model = keras.Sequential([keras.Input(shape=(2,)), layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((3, 2))
    with pytest.raises(TypeError, match="x: got (a dict|generator|list_iterator)"):
        model.fit(make(x), np.ones(3), verbose=0)
    with pytest.raises(TypeError, match="x: got (a dict|generator|list_iterator)"):
        model.predict(make(x), verbose=0)


def test_rescaling_elu_and_identity_layers_train_save_and_load(tmp_path):
    """An MNIST-style MLP's first layer, Rescaling(1/255), and Keras's ELU and Identity layers."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(4,)), layers.Rescaling(1.0 / 255), layers.Dense(6), layers.ELU(alpha=0.5),
                              layers.Identity(), layers.Dense(2, activation="softmax")])  # fmt: skip
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 4)).astype("float32")
    labels = (pixels[:, 0] > 127).astype(int)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(pixels, labels, epochs=2, batch_size=8, verbose=0)
    kernel, bias = model.layers[1].get_weights()
    z = pixels / 255 @ kernel + bias
    hidden = np.where(z > 0, z, 0.5 * (np.exp(z) - 1))
    logits = hidden @ model.layers[4].get_weights()[0] + model.layers[4].get_weights()[1]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    model.save(tmp_path / "m.gpunn")
    loaded = keras.models.load_model(tmp_path / "m.gpunn")
    assert [type(layer).__name__ for layer in loaded.layers] == ["Rescaling", "Dense", "ELU", "Identity", "Dense"]
    np.testing.assert_array_equal(loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0))
    with pytest.raises(ValueError, match="scale"):
        layers.Rescaling("1/255")


def test_a_model_with_more_weightless_layers_than_weight_tensors_loads(tmp_path):
    """5 layers, 4 weight tensors: the file is valid (load once refused it as forged)."""
    model = keras.Sequential([keras.Input(shape=(4,)), layers.Dense(3), layers.ReLU(), layers.Dropout(0.1),
                              layers.Activation("tanh"), layers.Dense(1)])  # fmt: skip
    model.save(tmp_path / "five.gpunn")
    loaded = keras.models.load_model(tmp_path / "five.gpunn")
    assert len(loaded.layers) == 5
    x = np.ones((2, 4))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_input_takes_keras_3_batch_shape_and_keras_2_input_shape():
    for head in (keras.Input(batch_shape=(None, 4)), layers.InputLayer(input_shape=(4,)), keras.Input(shape=[4])):
        assert keras.Sequential([head, layers.Dense(2)]).count_params() == 10
    with pytest.raises(ValueError, match="shape: expected exactly one"):
        keras.Input()
    with pytest.raises(ValueError, match="shape: expected exactly one"):
        keras.Input(shape=(4,), batch_shape=(None, 4))
    with pytest.raises(ValueError, match="batch_shape"):
        keras.Input(batch_shape=(4,))


def test_loss_classes_take_keras_name_reduction_dtype_axis():
    loss = keras.losses.BinaryCrossentropy(from_logits=True, name="bce", reduction="sum_over_batch_size", dtype="float32", axis=-1)
    assert loss.from_logits and keras.losses.CosineSimilarity(axis=-1, name="cos").get_config()["name"] == "cosine_similarity"
    keras.losses.MeanSquaredError(reduction="auto")
    with pytest.raises(ValueError, match="reduction: .*sum_over_batch_size.*got 'sum'"):
        keras.losses.MeanSquaredError(reduction="sum")
    with pytest.raises(ValueError, match="ignore_class"):
        keras.losses.SparseCategoricalCrossentropy(ignore_class=0)

    class Quartic(keras.losses.Loss):  # a user loss keeps its own signature
        def __init__(self, name="quartic"):
            super().__init__(name=name, reduction="sum_over_batch_size")
            self.label = name

    assert Quartic(name="q").label == "q"


def test_a_keras_style_custom_layer_is_refused_when_added_saying_why():
    class MyDense(keras.layers.Layer):  # as Keras's "making new layers" guide writes one
        def __init__(self, units=32):
            super().__init__()
            self.units = units

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], self.units), initializer="random_normal")

        def call(self, inputs):
            return inputs @ self.w

    class Forward(keras.layers.Layer):  # gpunn's signature but no backward: it could not train
        def call(self, backend, x, y, buffers, activation=None, training=False):
            return x

    with pytest.raises(TypeError, match=r"layers: layer .* build\(input_shape\).*no automatic differentiation"):
        keras.Sequential([keras.Input(shape=(4,)), MyDense(3)])
    model = keras.Sequential([keras.Input(shape=(4,)), layers.Dense(2), Forward(), layers.Dense(1)])
    x = np.ones((3, 4))
    assert model.predict(x, verbose=0).shape == (3, 1)  # a forward-only layer predicts
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(NotImplementedError, match="no backward"):
        model.fit(x, np.ones(3), verbose=0)


def test_a_dense_config_carries_only_a_declared_input_size_as_keras():
    _, _, model = _functional()
    hidden, out = model.layers[0], model.layers[2]
    assert out.get_config()["input_dim"] is None and layers.Dense(2, input_dim=5).get_config()["input_dim"] == 5
    # so a clone may change a width and the next layer takes the new size, as in Keras
    wider = keras.models.clone_model(model, clone_function=lambda layer: layers.Dense(16, activation="relu") if layer is hidden else type(layer).from_config(layer.get_config()))
    assert wider.layers[2].get_weights()[0].shape == (16, 3) and wider.count_params() == 5 * 16 + 16 + 16 * 3 + 3
    # and a saved model (config without per-layer sizes) loads as before
    assert keras.Sequential.from_config(model.get_config()).count_params() == model.count_params()


def test_sequential_takes_any_iterable_of_layers_as_keras():
    model = keras.Sequential(layer for layer in [keras.Input(shape=(3,)), layers.Dense(4), layers.Dense(1)])
    assert model.count_params() == 3 * 4 + 4 + 4 + 1
    for bad in ("dense", {"a": layers.Dense(1)}, 3):
        with pytest.raises(TypeError, match="layers: expected a list of layers"):
            keras.Sequential(bad)
