"""Sequential's Keras-shaped API: training on real data, fit/evaluate/predict semantics, seeds, errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import binary_data, mlp, multiclass_data, one_hot, randomize_weights, regression_data, rng, weights_equal
from sklearn import metrics as skm
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import gpunn
from gpunn.layers import Dense


def _split(x, y, scale=True):
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    if scale:
        scaler = StandardScaler().fit(xtr)
        xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    return xtr, xte, ytr, yte


# ------------------------------------------------------------------ real data
def test_breast_cancer_binary_classification():
    xtr, xte, ytr, yte = _split(*load_breast_cancer(return_X_y=True))
    gpunn.set_seed(1)
    model = gpunn.Sequential([Dense(64, activation="relu"), Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(xtr, ytr, epochs=25, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    loss, accuracy = model.evaluate(xte, yte, verbose=0)
    assert accuracy >= 0.93
    predicted = (model.predict(xte)[:, 0] > 0.5).astype(int)
    assert accuracy == pytest.approx(skm.accuracy_score(yte, predicted))


def test_digits_softmax_sparse_crossentropy():
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = _split(x / 16.0, y, scale=False)
    gpunn.set_seed(2)
    model = gpunn.Sequential([gpunn.Input(shape=(64,)), Dense(64, activation="relu"), Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=25, batch_size=32, verbose=0)
    result = model.evaluate(xte, yte, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"}
    assert result["accuracy"] >= 0.95
    probs = model.predict(xte)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(yte, probs.argmax(axis=1)))


def test_diabetes_regression_loss_decreases():
    x, y = load_diabetes(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    y = (y - y.mean()) / y.std()
    gpunn.set_seed(3)
    model = gpunn.Sequential([Dense(32, activation="relu", input_dim=10), Dense(1)])
    model.compile(optimizer=gpunn.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    history = model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < 0.6 * history.history["loss"][0]
    assert history.history["loss"][-1] < 0.6  # better than predicting the mean (loss 1)
    mse = np.mean((model.predict(x)[:, 0] - y) ** 2)
    assert model.evaluate(x, y, verbose=0)[0] == pytest.approx(mse, rel=1e-5)


# ---------------------------------------------------------------- fit / logs
def _binary_model(seed=0, metrics=("accuracy",), **compile_kwargs):
    gpunn.set_seed(seed)
    model = mlp([8, 1], "relu", "sigmoid", input_dim=5)
    model.compile(optimizer=compile_kwargs.pop("optimizer", "adam"), loss="binary_crossentropy", metrics=list(metrics), **compile_kwargs)
    return model


def test_history_keys_and_lengths():
    x, y = binary_data(20)
    model = _binary_model(metrics=["accuracy", "precision"])
    history = model.fit(x, y, epochs=3, validation_split=0.25, verbose=0)
    assert history is model.history
    assert list(history.history) == ["loss", "accuracy", "precision", "val_loss", "val_accuracy", "val_precision"]
    assert all(len(v) == 3 for v in history.history.values())
    assert history.epoch == [0, 1, 2]
    assert all(isinstance(v, float) for vs in history.history.values() for v in vs)


def test_validation_split_takes_the_last_fraction():
    x, y = binary_data(21, n=40)
    model = _binary_model()
    history = model.fit(x, y, epochs=1, validation_split=0.25, batch_size=8, verbose=0)
    # the validation numbers are those of the last 10 samples, after the epoch's training
    loss, accuracy = model.evaluate(x[30:], y[30:], verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(loss, rel=1e-6)
    assert history.history["val_accuracy"][0] == pytest.approx(accuracy)
    assert history.history["val_loss"][0] != pytest.approx(model.evaluate(x[:10], y[:10], verbose=0)[0], rel=1e-3)


def test_validation_data_with_and_without_weights():
    x, y = binary_data(22, n=48)
    vx, vy = binary_data(23, n=16)
    vw = rng(24).uniform(0.1, 2.0, 16)
    model = _binary_model()
    history = model.fit(x, y, epochs=2, validation_data=(vx, vy, vw), verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(model.evaluate(vx, vy, sample_weight=vw, verbose=0)[0], rel=1e-6)
    history = model.fit(x, y, epochs=1, validation_data=(vx, vy), verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(model.evaluate(vx, vy, verbose=0)[0], rel=1e-6)


def test_sample_weight_scales_the_loss():
    x, y = regression_data(25, n=30)
    model = mlp([6, 1], "tanh", input_dim=5, dtype="float64")
    model.compile(optimizer="sgd", loss="mse")
    model.build()
    per_sample = (model.predict(x) - y)[:, 0] ** 2
    w = rng(26).uniform(0, 3, 30)
    # Keras's sum-over-batch-size: sum(w * l) / M, for any batch size
    for batch_size in (30, 7):
        assert model.evaluate(x, y, sample_weight=w, batch_size=batch_size, verbose=0) == pytest.approx(np.sum(w * per_sample) / 30)
    assert model.evaluate(x, y, sample_weight=2 * np.ones(30), verbose=0) == pytest.approx(2 * model.evaluate(x, y, verbose=0))
    assert model.test_on_batch(x, y, sample_weight=w) == pytest.approx(np.sum(w * per_sample) / 30)


def test_class_weight_equals_the_matching_sample_weight():
    x, labels = multiclass_data(27, n=40)
    class_weight = {0: 0.5, 1: 2.0, 2: 3.0}
    w = np.array([class_weight[k] for k in labels])
    for loss, y in (("sparse_categorical_crossentropy", labels), ("categorical_crossentropy", one_hot(labels, 3))):
        a, b = (mlp([6, 3], "relu", "softmax", input_dim=5, dtype="float64") for _ in range(2))
        for m in (a, b):
            m.compile(optimizer=gpunn.optimizers.SGD(0.1), loss=loss)
            m.build()
        randomize_weights(a, 28)
        b.set_weights(a.get_weights())
        first_a = a.train_on_batch(x, y, class_weight=class_weight)
        first_b = b.train_on_batch(x, y, sample_weight=w)
        assert first_a == pytest.approx(first_b, rel=1e-12)
        assert weights_equal(a.get_weights(), b.get_weights())
        ha = a.fit(x, y, class_weight=class_weight, epochs=2, batch_size=8, shuffle=False, verbose=0)
        hb = b.fit(x, y, sample_weight=w, epochs=2, batch_size=8, shuffle=False, verbose=0)
        assert ha.history["loss"] == pytest.approx(hb.history["loss"], rel=1e-12)
    # a binary model: the weight of class 1 is applied to positive samples
    xb, yb = binary_data(29, n=32)
    model = _binary_model(metrics=[])
    base = model.evaluate(xb, yb, verbose=0)
    expected = model.evaluate(xb, yb, sample_weight=(yb[:, 0] == 1).astype(float), verbose=0)
    weighted = model.train_on_batch(xb, yb, class_weight={0: 0.0, 1: 1.0})
    assert weighted == pytest.approx(expected, rel=1e-6)  # train_on_batch reports the pre-update loss
    assert weighted < base


def test_initial_epoch():
    x, y = binary_data(30)
    model = _binary_model()
    seen = []
    cb = gpunn.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs=None: seen.append(epoch))
    history = model.fit(x, y, epochs=5, initial_epoch=3, callbacks=[cb], verbose=0)
    assert seen == [3, 4]
    assert history.epoch == [3, 4]
    assert len(history.history["loss"]) == 2
    assert model.optimizer.iterations == 2 * 2  # 64 samples, batches of 32


def test_evaluate_return_forms():
    x, y = binary_data(31)
    plain = _binary_model(metrics=[])
    assert isinstance(plain.evaluate(x, y, verbose=0), float)
    model = _binary_model(metrics=["accuracy", "mse"])
    as_list = model.evaluate(x, y, verbose=0)
    as_dict = model.evaluate(x, y, verbose=0, return_dict=True)
    assert isinstance(as_list, list) and len(as_list) == 3
    assert list(as_dict) == ["loss", "accuracy", "mse"] == model.metrics_names
    assert list(as_dict.values()) == as_list
    p = model.predict(x)
    assert as_dict["mse"] == pytest.approx(np.mean((p - y) ** 2), rel=1e-5)
    assert as_dict["accuracy"] == pytest.approx(np.mean((p > 0.5) == y))


def test_predict_shape_and_batch_independence():
    x, _ = regression_data(32, n=53)
    model = mlp([9, 4], "gelu", "softmax", input_dim=5)
    out = model.predict(x, batch_size=1000)
    assert out.shape == (53, 4) and out.dtype == np.float32
    np.testing.assert_allclose(model.predict(x, batch_size=7), out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.predict(x, batch_size=1), out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model(x[:5]), out[:5], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.predict_on_batch(x[5:9]), out[5:9], rtol=1e-6, atol=1e-7)
    # against a forward pass written by hand from get_weights
    k1, b1, k2, b2 = model.get_weights()
    h = x @ k1 + b1
    from scipy.special import erf

    z = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ k2 + b2
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out, expected / expected.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_train_on_batch_and_test_on_batch():
    x, y = binary_data(33, n=16)
    model = _binary_model(optimizer=gpunn.optimizers.SGD(0.5))
    test_loss, test_acc = model.test_on_batch(x, y)
    before = model.get_weights()
    assert weights_equal(before, model.get_weights())  # test_on_batch does not train
    loss, acc = model.train_on_batch(x, y)
    assert (loss, acc) == pytest.approx((test_loss, test_acc))  # metrics from the pre-update weights
    assert not weights_equal(before, model.get_weights())
    assert model.optimizer.iterations == 1
    assert model.test_on_batch(x, y)[0] < test_loss
    logs = model.train_on_batch(x, y, return_dict=True)
    assert list(logs) == ["loss", "accuracy"]


def test_get_set_weights_order_and_shapes():
    model = gpunn.Sequential([Dense(7, activation="relu", input_dim=5), Dense(3, use_bias=False), Dense(2)])
    assert model.built  # the input size is declared: built at construction, as in Keras
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(5, 7), (7,), (7, 3), (3, 2), (2,)]
    new = [rng(34).normal(size=s) for s in shapes]
    model.set_weights(new)
    got = model.get_weights()
    assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(got, new))
    assert all(g.dtype == np.float32 for g in got)
    x = rng(35).normal(size=(4, 5))
    expected = (np.maximum(x @ new[0] + new[1], 0) @ new[2]) @ new[3] + new[4]
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-6)
    got[0][...] = 0  # a copy, not a view of the model's buffers
    assert np.abs(model.get_weights()[0]).sum() > 0
    with pytest.raises(ValueError, match="5 weight arrays"):
        model.set_weights(new[:4])
    with pytest.raises(ValueError, match="shape"):
        model.set_weights([new[0].T] + new[1:])


def test_summary_counts_params():
    model = gpunn.Sequential([gpunn.Input(shape=(10,)), Dense(16, activation="relu"), Dense(3, use_bias=False)], name="net")
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert '"net"' in text
    assert "176" in text and "48" in text  # 10*16+16, 16*3
    assert "Total params: 224" in text
    model.build()
    assert model.count_params() == 224


def test_input_shape_and_input_dim_declarations():
    for model in (
        gpunn.Sequential([gpunn.Input(shape=(6,)), Dense(2)]),
        gpunn.Sequential([Dense(2, input_dim=6)]),
        gpunn.Sequential([Dense(2, input_shape=(6,))]),
    ):
        assert model.input_dim == 6
        model.build()
        assert model.get_weights()[0].shape == (6, 2)
    lazy = gpunn.Sequential([Dense(2)])
    assert lazy.input_dim is None and not lazy.built
    lazy.predict(rng(36).normal(size=(3, 4)))
    assert lazy.built and lazy.get_weights()[0].shape == (4, 2)
    with pytest.raises(ValueError, match="6 features"):
        gpunn.Sequential([Dense(2, input_dim=6)]).predict(np.ones((2, 5)))


def test_use_bias_false_has_no_bias():
    model = gpunn.Sequential([Dense(3, use_bias=False, input_dim=4)])
    model.build()
    assert [w.shape for w in model.get_weights()] == [(4, 3)]
    assert np.abs(model.predict(np.zeros((2, 4)))).max() == 0.0  # x = 0 maps to exactly 0
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(37, n=16, features=4, outputs=3)
    model.fit(x, y, epochs=2, verbose=0)
    assert np.abs(model.predict(np.zeros((1, 4)))).max() == 0.0


# Keras 3 (keras/src/trainers/compile_utils.py, get_metric / is_binary_or_sparse_categorical):
# binary if y_pred.shape[-1] == 1; else sparse if rank(y_true) < rank(y_pred) or
# (y_true.shape[-1] == 1 and y_pred.shape[-1] > 1); else categorical.  The loss plays no part.
@pytest.mark.parametrize(
    "loss, units, expected",
    [
        ("binary_crossentropy", 1, "BinaryAccuracy"),
        ("binary_crossentropy", 3, "CategoricalAccuracy"),  # Keras 3: several sigmoid units -> categorical
        ("mse", 1, "BinaryAccuracy"),
        ("categorical_crossentropy", 3, "CategoricalAccuracy"),
        ("mse", 3, "CategoricalAccuracy"),
        ("sparse_categorical_crossentropy", 3, "SparseCategoricalAccuracy"),
        ("sparse_categorical_crossentropy", 1, "BinaryAccuracy"),  # one output unit: binary, whatever the labels
    ],
)
@pytest.mark.parametrize("spelling", ["accuracy", "acc", "Accuracy"])
def test_accuracy_resolution(loss, units, expected, spelling):
    model = mlp([units], input_dim=4, output_activation="sigmoid")
    model.compile(optimizer="sgd", loss=loss, metrics=[spelling])
    ((name, metric, _),) = model._objective.metrics
    # None: the fused loss pass already counts that accuracy
    kind = type(metric).__name__ if metric is not None else _natural_accuracy(model)
    assert kind == expected and name == spelling
    assert model.metrics_names == ["loss", spelling]


def _natural_accuracy(model):
    from gpunn import training

    return training._NATURAL_ACCURACY[model._objective.kind].__name__


@pytest.mark.parametrize(
    "target_shape, output_shape, expected",
    [((8, 1), (8, 1), "BinaryAccuracy"), ((8,), (8, 1), "BinaryAccuracy"), ((8,), (8, 4), "SparseCategoricalAccuracy"),
     ((8, 1), (8, 4), "SparseCategoricalAccuracy"), ((8, 4), (8, 4), "CategoricalAccuracy")],
)
def test_accuracy_shape_rule(target_shape, output_shape, expected):
    assert gpunn.metrics.resolve_accuracy(target_shape, output_shape).__name__ == expected
    metric = gpunn.metrics.get("acc", target_shape, output_shape)
    assert type(metric).__name__ == expected and metric.name == "acc"
    with pytest.raises(ValueError, match="shapes"):
        gpunn.metrics.get("accuracy")


def test_multi_output_bce_accuracy_is_categorical_as_keras3():
    """Three sigmoid units with binary cross-entropy: Keras 3 reports categorical accuracy,
    mean(argmax(y_pred) == argmax(y_true)), not the elementwise binary accuracy."""
    r = rng(40)
    x = r.normal(size=(30, 4))
    y = (r.random((30, 3)) > 0.5).astype(float)
    y[np.arange(30), r.integers(0, 3, 30)] = 1.0  # at least one positive label per row
    model = mlp([5, 3], "relu", "sigmoid", input_dim=4, dtype="float64")
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy", "binary_accuracy"])
    _, acc, binary = model.evaluate(x, y, batch_size=7, verbose=0)
    p = model.predict(x)
    assert acc == pytest.approx(np.mean(p.argmax(axis=1) == y.argmax(axis=1)), abs=1e-12)
    assert binary == pytest.approx(np.mean((p > 0.5) == (y > 0.5)), abs=1e-12)
    assert acc != pytest.approx(binary)  # the data makes the two differ, so the test can fail


def test_regression_accuracy_single_output_is_binary_as_keras3():
    """MSE with one output and "accuracy": Keras 3 picks binary accuracy (threshold 0.5)."""
    r = rng(41)
    x, y = r.normal(size=(25, 4)), r.uniform(0, 1, (25, 1))
    model = mlp([3, 1], input_dim=4, dtype="float64")
    model.compile(optimizer="sgd", loss="mse", metrics=["acc"])
    _, acc = model.evaluate(x, y.ravel(), verbose=0)
    assert acc == pytest.approx(np.mean((model.predict(x) > 0.5) == (y > 0.5)), abs=1e-12)


def test_saved_multi_output_bce_model_loads_with_keras3_accuracy(tmp_path):
    """Files store the metric's name ("accuracy"), not the class the old rule chose, so a model saved
    when multi-output BCE meant binary accuracy loads and reports Keras 3's categorical accuracy."""
    r = rng(42)
    x, y = r.normal(size=(20, 4)), (r.random((20, 3)) > 0.5).astype(float)
    model = mlp([5, 3], "relu", "sigmoid", input_dim=4, dtype="float64")
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy"])
    model.save(tmp_path / "m.gpunn")
    loaded = gpunn.load_model(tmp_path / "m.gpunn")
    assert loaded.metrics_names == ["loss", "accuracy"]
    _, acc = loaded.evaluate(x, y, verbose=0)
    assert acc == pytest.approx(np.mean(loaded.predict(x).argmax(axis=1) == y.argmax(axis=1)), abs=1e-12)


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "sparse_categorical_crossentropy", "mse"])
def test_accuracy_values_multiclass(loss):
    x, labels = multiclass_data(38, n=45)
    y = labels if loss.startswith("sparse") else one_hot(labels, 3)
    model = mlp([6, 3], "relu", "softmax", input_dim=5)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    _, accuracy = model.evaluate(x, y, batch_size=10, verbose=0)
    assert accuracy == pytest.approx(np.mean(model.predict(x).argmax(axis=1) == labels))
    w = rng(39).uniform(0, 1, 45)
    # Keras 3: plain metrics ignore sample weights, weighted_metrics use them
    _, unweighted = model.evaluate(x, y, sample_weight=w, verbose=0)
    assert unweighted == pytest.approx(accuracy)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"], weighted_metrics=["accuracy"])
    _, plain, weighted = model.evaluate(x, y, sample_weight=w, verbose=0)
    assert model.metrics_names == ["loss", "accuracy", "weighted_accuracy"]
    assert plain == pytest.approx(accuracy)
    assert weighted == pytest.approx(np.sum(w * (model.predict(x).argmax(axis=1) == labels)) / w.sum())


def _fixed_probability_model(probs):
    """A 1-input model whose predictions on x = logit(probs) are exactly ``probs`` (columns)."""
    n = probs.shape[1]
    model = gpunn.Sequential([Dense(n, activation="sigmoid", input_dim=n)], dtype="float64")
    model.build()
    model.set_weights([np.eye(n), np.zeros(n)])
    return model, np.log(probs / (1 - probs))


def test_precision_recall_against_sklearn():
    r = rng(40)
    y = (r.uniform(size=(60, 1)) < 0.4).astype(float)
    probs = np.clip(0.35 * y + 0.65 * r.uniform(size=(60, 1)), 0.01, 0.99)
    model, x = _fixed_probability_model(probs)
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["precision", "recall", "accuracy"])
    np.testing.assert_allclose(model.predict(x), probs, rtol=1e-12)
    _, precision, recall, accuracy = model.evaluate(x, y, batch_size=16, verbose=0)
    pred = (probs > 0.5).astype(int)
    assert precision == pytest.approx(skm.precision_score(y, pred))
    assert recall == pytest.approx(skm.recall_score(y, pred))
    assert accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert 0.2 < precision < 0.99 and 0.2 < recall < 0.99  # a prediction set where both are informative
    w = r.uniform(0.1, 2.0, 60)
    model.compile(optimizer="sgd", loss="binary_crossentropy", weighted_metrics=["precision", "recall"])
    _, precision, recall = model.evaluate(x, y, sample_weight=w, verbose=0)
    assert precision == pytest.approx(skm.precision_score(y, pred, sample_weight=w))
    assert recall == pytest.approx(skm.recall_score(y, pred, sample_weight=w))


def test_precision_recall_multilabel_micro():
    r = rng(41)
    y = (r.uniform(size=(50, 3)) < 0.5).astype(float)
    probs = np.clip(0.3 * y + 0.7 * r.uniform(size=(50, 3)), 0.01, 0.99)
    model, x = _fixed_probability_model(probs)
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["precision", "recall"])
    _, precision, recall = model.evaluate(x, y, verbose=0)
    pred = (probs > 0.5).astype(int)
    assert precision == pytest.approx(skm.precision_score(y, pred, average="micro"))
    assert recall == pytest.approx(skm.recall_score(y, pred, average="micro"))


# ----------------------------------------------------------------------- seeds
def _seeded_run(seed, x, y):
    gpunn.set_seed(seed)
    model = mlp([8, 1], "relu", "sigmoid")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, y, epochs=3, batch_size=10, validation_split=0.2, verbose=0)
    return model.get_weights()


def test_set_seed_reproduces_training_bit_for_bit():
    x, y = binary_data(42)
    first, second = _seeded_run(5, x, y), _seeded_run(5, x, y)
    assert weights_equal(first, second)
    assert not any(np.allclose(a, b) for a, b in zip(first, _seeded_run(6, x, y)) if a.ndim == 2)


def test_same_seed_different_shuffle_changes_weights():
    """Shuffling draws from the seeded generator too: same init, different order, different result."""
    x, y = binary_data(43)
    gpunn.set_seed(7)
    a = mlp([8, 1], "relu", "sigmoid", input_dim=5)
    a.compile(optimizer="adam", loss="binary_crossentropy")
    a.build()
    b = mlp([8, 1], "relu", "sigmoid", input_dim=5)
    b.compile(optimizer="adam", loss="binary_crossentropy")
    b.build()
    b.set_weights(a.get_weights())
    a.fit(x, y, epochs=2, batch_size=8, shuffle=True, verbose=0)
    b.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert not weights_equal(a.get_weights(), b.get_weights())


# ------------------------------------------------------------- non-finite loss
def _sgd_regressor(lr, seed):
    gpunn.set_seed(seed)
    model = mlp([8, 1], "relu", input_dim=5)
    model.compile(optimizer=gpunn.optimizers.SGD(lr), loss="mse")
    model.build()
    return model


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_raises_and_keeps_finite_weights():
    x, y = regression_data(44, n=64)
    model = _sgd_regressor(1e6, seed=8)
    start = model.get_weights()
    with pytest.raises(gpunn.NonFiniteLossError, match=r"epoch 1, batch \d+") as info:
        model.fit(x, 1e3 * y, epochs=5, batch_size=8, shuffle=False, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert isinstance(info.value, FloatingPointError)
    bad_batch = int(str(info.value).split("batch ")[1].split(";")[0])
    assert bad_batch > 2  # this data and rate diverge after a few finite steps
    # replayed by hand: the states whose batch loss was finite are those before the failing batch's;
    # the model holds the newest of them whose predictions on the training data are finite
    replay = _sgd_regressor(1e6, seed=0)
    replay.set_weights(start)
    states = [replay.get_weights()]
    for step in range(bad_batch - 2):
        replay.train_on_batch(x[8 * step : 8 * step + 8], 1e3 * y[8 * step : 8 * step + 8])
        states.append(replay.get_weights())
    good = [s for s, w in enumerate(states) if replay.set_weights(w) or np.isfinite(replay.predict(x, verbose=0)).all()]
    assert weights_equal(states[good[-1]], model.get_weights())
    assert model.optimizer.iterations == good[-1]
    assert np.isfinite(model.predict(x, verbose=0)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_in_a_later_epoch_names_it():
    x, y = regression_data(45, n=32)
    model = _sgd_regressor(0.01, seed=9)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    model.optimizer.learning_rate = 1e7
    with pytest.raises(gpunn.NonFiniteLossError, match=r"epoch 2, batch"):
        model.fit(x, 1e4 * y, epochs=3, initial_epoch=1, batch_size=8, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("epochs", [1, 2])
def test_update_that_overflows_the_weights_is_caught(epochs):
    """A finite loss whose update overflows (here the last batch's) still raises and rolls back."""
    x, y = regression_data(47, n=24)
    model = _sgd_regressor(1e39, seed=10)  # lr * grad overflows float32 in the first update
    start = model.get_weights()
    with pytest.raises(gpunn.NonFiniteLossError, match=r"epoch 1, batch 1 made the weights non-finite"):
        model.fit(x, y, epochs=epochs, batch_size=24, verbose=0)
    assert weights_equal(model.get_weights(), start)
    assert model.optimizer.iterations == 0


# ---------------------------------------------------------------------- errors
def test_clear_errors():
    model = mlp([4, 1], input_dim=3)
    for name in ("fit", "evaluate", "train_on_batch", "test_on_batch"):
        with pytest.raises(RuntimeError, match=f"^{name}: the model must be compiled"):
            getattr(model, name)(np.ones((4, 3)), np.ones(4))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="3 features"):
        model.fit(np.ones((4, 2)), np.ones(4), verbose=0)
    with pytest.raises(ValueError, match="expected 4 targets"):
        model.fit(np.ones((4, 3)), np.ones(5), verbose=0)
    with pytest.raises(ValueError, match="NaN"):
        model.fit(np.array([[1.0, np.nan, 0]]), np.ones(1), verbose=0)
    with pytest.raises(ValueError, match="validation_split"):
        model.fit(np.ones((4, 3)), np.ones(4), validation_split=1.5, verbose=0)
    with pytest.raises(ValueError, match="unknown loss"):
        model.compile(optimizer="sgd", loss="msee")
    sparse = mlp([3], input_dim=3, output_activation="softmax")
    sparse.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"class labels in \[0, 3\)"):
        sparse.fit(np.ones((2, 3)), np.array([0, 3]), verbose=0)


def test_set_floatx_float64_and_float32_default():
    assert gpunn.floatx() == "float32"
    x, y = regression_data(46, n=20)
    try:
        gpunn.set_floatx("float64")
        model = mlp([4, 1], "tanh", input_dim=5)
        model.compile(optimizer="adam", loss="mse")
        model.fit(x, y, epochs=1, verbose=0)
        assert model.params.dtype == np.float64 and model.predict(x).dtype == np.float64
    finally:
        gpunn.set_floatx("float32")
    model = mlp([4, 1], "tanh", input_dim=5)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.fit(x, y, epochs=1, verbose=0)
    assert model.params.dtype == np.float32 and model.grads.dtype == np.float32
    assert all(s.dtype == np.float32 for s in model.optimizer.slots.values())
    with pytest.raises(ValueError, match="float32"):
        gpunn.set_floatx("float16")


def test_float64_model_keeps_float64_targets_before_it_is_built():
    """The first fit of an unbuilt float64 model must not round targets to float32 (floatx)."""
    x, y = regression_data(7, n=40, features=4)

    def fresh():
        gpunn.set_seed(11)
        model = mlp([5, 1], activation="tanh", input_dim=4, dtype="float64")
        model.compile(optimizer="sgd", loss="mse")
        return model

    straight = fresh()
    straight.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    split = fresh()
    split.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    split.fit(x, y, epochs=2, initial_epoch=1, batch_size=8, shuffle=False, verbose=0)
    stepped = fresh()
    for _ in range(2):
        for i in range(0, 40, 8):
            stepped.train_on_batch(x[i : i + 8], y[i : i + 8])
    assert weights_equal(straight.get_weights(), split.get_weights())
    assert weights_equal(straight.get_weights(), stepped.get_weights())


def test_evaluate_and_predict_print_one_keras_line_unless_silent(capsys):
    x, y = binary_data(44, n=20, features=3)
    model = mlp([4, 1], "relu", "sigmoid", input_dim=3)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.evaluate(x, y, batch_size=8)
    line = capsys.readouterr().out.strip()
    assert line.startswith("3/3 - ") and "loss: " in line and "accuracy: " in line
    model.predict(x, batch_size=8)
    assert capsys.readouterr().out.strip().startswith("3/3 - ")
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    assert capsys.readouterr().out == ""


def test_elementwise_metrics_one_hot_encode_sparse_labels():
    """mse/mae next to a sparse categorical loss compare the outputs with one-hot rows (mse = Brier score)."""
    x, labels = multiclass_data(45, n=30)
    model = mlp([6, 3], "relu", "softmax", input_dim=5)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["mse", "mae"])
    _, mse, mae = model.evaluate(x, labels, batch_size=7, verbose=0)
    probs = model.predict(x, verbose=0)
    onehot = one_hot(labels, 3)
    assert mse == pytest.approx(np.mean((probs - onehot) ** 2), rel=1e-5)
    assert mae == pytest.approx(np.mean(np.abs(probs - onehot)), rel=1e-5)


def test_accuracy_metrics_take_labels_one_hot_or_as_indices():
    x, labels = multiclass_data(46, n=24)
    model = mlp([6, 3], "relu", "softmax", input_dim=5)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["sparse_categorical_accuracy"])
    _, from_one_hot = model.evaluate(x, one_hot(labels, 3), verbose=0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["categorical_accuracy"])
    _, from_indices = model.evaluate(x, labels, verbose=0)
    expected = np.mean(model.predict(x, verbose=0).argmax(axis=1) == labels)
    assert from_one_hot == pytest.approx(expected) and from_indices == pytest.approx(expected)


def test_probability_loss_on_a_linear_output_warns_at_compile():
    x, labels = multiclass_data(47, n=24)
    model = mlp([6, 3], "relu", "linear", input_dim=5)
    with pytest.warns(UserWarning, match="from_logits=True"):
        model.compile(optimizer=gpunn.optimizers.SGD(1.0), loss="categorical_crossentropy")
    model.compile(optimizer="adam", loss=gpunn.losses.CategoricalCrossentropy(from_logits=True))  # no warning
