"""Public seams of Sequential: configs that round-trip, files written before the split,
layers that belong to one model, and calls that do not leak state into each other."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest

import gpunn
from gpunn import saving
from gpunn.callbacks import Callback
from gpunn.layers import Dense

from helpers import binary_data, weights_equal

DATA = Path(__file__).parent / "data"


def _compiled():
    model = gpunn.Sequential(
        [gpunn.Input(shape=(4,)), Dense(5, activation="gelu", kernel_regularizer={"l1": 0.0, "l2": 0.01}, name="h"),
         Dense(3, activation="softmax", use_bias=False, name="o")],
        name="net",
        dtype="float64",
    )  # fmt: skip
    model.compile(
        optimizer=gpunn.optimizers.RMSprop(learning_rate=0.02, momentum=0.5, centered=True, clipvalue=2.0),
        loss=gpunn.losses.CategoricalCrossentropy(from_logits=False),
        metrics=["accuracy", "mse"],
        weighted_metrics=["accuracy"],
    )
    return model


def test_config_and_compile_config_round_trip_through_json():
    model = _compiled()
    config = json.loads(json.dumps(model.get_config()))
    compile_config = json.loads(json.dumps(model.get_compile_config()))
    clone = gpunn.Sequential.from_config(config)
    # as in Keras, a config with a known input size gives a built (initialised) model
    assert clone.built and clone.dtype == np.float64 and clone.input_dim == 4
    assert not gpunn.Sequential.from_config(config, build=False).built
    clone.compile_from_config(compile_config)
    assert clone.get_config() == model.get_config()
    assert clone.get_compile_config() == model.get_compile_config()
    assert clone.metrics_names == model.metrics_names == ["loss", "accuracy", "mse", "weighted_accuracy"]
    # the clone trains exactly like the original from the same weights
    model.build()
    clone.build()
    clone.set_weights(model.get_weights())
    x, labels = np.random.default_rng(2).normal(size=(9, 4)), np.arange(9) % 3
    y = np.eye(3)[labels]
    assert model.train_on_batch(x, y, return_dict=True) == clone.train_on_batch(x, y, return_dict=True)
    assert weights_equal(model.get_weights(), clone.get_weights())


def test_uncompiled_models_have_no_compile_config_and_bad_configs_are_named():
    assert gpunn.Sequential([Dense(2)]).get_compile_config() is None
    with pytest.raises(TypeError, match="config: expected a mapping"):
        gpunn.Sequential.from_config(["layers"])
    with pytest.raises(ValueError, match="config: expected a non-empty list of layer configs"):
        gpunn.Sequential.from_config({"name": "x", "layers": []})
    with pytest.raises(TypeError, match="config: expected a compile config mapping"):
        gpunn.Sequential([Dense(2)]).compile_from_config("adam")
    with pytest.raises(TypeError, match="from_logits: expected a bool, got 'false'"):
        gpunn.losses.get({"name": "binary_crossentropy", "from_logits": "false"})


def test_files_written_before_the_split_still_load():
    """tests/data/legacy_v1*.gpunn were written by gpunn before models.py was split."""
    expected = json.loads((DATA / "legacy_v1_expected.json").read_text())
    x = np.array(expected["x"])
    model = gpunn.load_model(DATA / "legacy_v1.gpunn")
    np.testing.assert_allclose(model.predict(x, verbose=0), expected["predictions"], rtol=1e-6, atol=1e-7)
    assert model.optimizer.iterations == expected["iterations"]
    assert model.get_compile_config()["weighted_metrics"] == ["mae"]
    assert model.optimizer.clipnorm == 1.0 and model.layers[0].kernel_regularizer is not None
    # today's code writes the same metadata and tensors for it (the safetensors header's
    # key order is not fixed between processes, so bytes are not compared)
    (meta, tensors), (old_meta, old_tensors) = saving.parse(saving.serialize(model)), saving.parse((DATA / "legacy_v1.gpunn").read_bytes())
    # settings added since (Adam's amsgrad) are written too, with the value that reproduces the old behaviour
    added = {k: v for k, v in meta["compile"]["optimizer"].items() if k not in old_meta["compile"]["optimizer"]}
    assert added == {"amsgrad": False}
    for k in added:
        del meta["compile"]["optimizer"][k]
    assert meta == old_meta and sorted(tensors) == sorted(old_tensors)
    for name, value in old_tensors.items():
        np.testing.assert_array_equal(tensors[name], value)
    same = gpunn.Sequential.from_config(model.get_config())
    same.load_weights(DATA / "legacy_v1_weights.gpunn")
    np.testing.assert_array_equal(same.predict(x, verbose=0), model.predict(x, verbose=0))


def test_loading_draws_no_random_numbers():
    """load_model builds without running the initializers: the seeded stream is untouched."""
    gpunn.set_seed(11)
    expected = gpunn.random.generator().random(3)
    gpunn.set_seed(11)
    gpunn.load_model(DATA / "legacy_v1.gpunn")
    np.testing.assert_array_equal(gpunn.random.generator().random(3), expected)


def test_a_layer_belongs_to_one_model():
    shared = Dense(3, input_dim=2)
    first = gpunn.Sequential([shared], name="first")
    first.build()
    with pytest.raises(ValueError, match=r"layers: layer '\w+' already belongs to model 'first'") as info:
        gpunn.Sequential([Dense(2, input_dim=3), shared], name="second")
    assert "set_weights(get_weights())" in str(info.value)
    with pytest.raises(ValueError, match="already belongs to model 'first'"):
        gpunn.Sequential().add(shared)
    # the first model is untouched and still predicts
    assert first.predict(np.ones((1, 2)), verbose=0).shape == (1, 3)
    # once the first model is gone the layer may be used again
    del first, info  # the traceback holds the first model too
    gc.collect()
    again = gpunn.Sequential([shared])
    again.build()
    assert again.predict(np.ones((2, 2)), verbose=0).shape == (2, 3)


def test_evaluate_inside_a_callback_does_not_change_training():
    """Each call keeps its own state: an unweighted evaluate between batches must not switch
    the sample weights of the rest of the epoch off."""
    x, y = binary_data(31, n=40)
    w = np.linspace(0.1, 3.0, 40)

    class EvaluateEveryBatch(Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.evaluate(x[:8], y[:8], verbose=0)
            self.model.predict(x[:3], verbose=0)

    trained = []
    for callbacks in ([], [EvaluateEveryBatch()]):
        gpunn.set_seed(4)
        model = gpunn.Sequential([Dense(6, activation="tanh", input_dim=5), Dense(1, activation="sigmoid")])
        model.compile(optimizer="adam", loss="binary_crossentropy", weighted_metrics=["accuracy"])
        model.fit(x, y, sample_weight=w, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        trained.append((model.get_weights(), model.history.history))
    assert weights_equal(trained[0][0], trained[1][0])
    assert trained[0][1] == trained[1][1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend, rows", [("numpy", 5), ("numpy", 12), pytest.param("cuda", 5, marks=pytest.mark.simulator)])
def test_divergence_keeps_the_last_state_with_finite_predictions(backend, rows):
    """One weight w, ``rows`` rows (x=1, y=1) on which SGD maps w to 4 - 3w, then one row x=1e37.

    The first non-finite loss is that last row's, but the states from w = -39.5 (state 4) on
    already predict +-inf for it: the model must go back to w = 14.5 (state 3) -- with 12
    rows, further back than the first window of states the search replays."""
    x = np.array([[1.0]] * rows + [[1e37]])
    y = np.array([[1.0]] * rows + [[0.0]])
    model = gpunn.Sequential([Dense(1, use_bias=False, input_dim=1)], dtype="float32")
    model.compile(optimizer=gpunn.optimizers.SGD(learning_rate=2.0), loss="mse")
    with gpunn.use_backend(backend):  # the device path finds the failing batch after the epoch
        model.build()
    model.set_weights([np.array([[0.5]])])
    with pytest.raises(gpunn.NonFiniteLossError, match=rf"loss became infinite at epoch 1, batch {rows + 1};"):
        model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0)
    assert model.get_weights()[0][0, 0] == 14.5
    assert model.optimizer.iterations == 3
    assert np.isfinite(model.predict(x, verbose=0)).all()
