"""Keras 3's losses beyond the cross-entropies, MSE and MAE; label smoothing; user losses.

Expected numbers are written from Keras's formulas by hand; the fused passes
(CPU and, in the simulator, CUDA) are checked against numpy_ops on ragged
shapes with NaN-poisoned gradients; gradients against float64 finite
differences through a whole model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import analytic_gradient, backend_params, make_backend, numeric_gradient, randomize_weights

import gpunn
from gpunn import losses
from gpunn.backend import numpy_ops
from gpunn.backend.numpy_backend import NumpyBackend
from gpunn.codes import LossKind

NEW_KINDS = [
    LossKind.HUBER, LossKind.LOG_COSH, LossKind.POISSON, LossKind.HINGE, LossKind.SQUARED_HINGE, LossKind.MAPE,
    LossKind.MSLE, LossKind.KL_DIVERGENCE, LossKind.CATEGORICAL_HINGE, LossKind.COSINE_SIMILARITY,
]  # fmt: skip


def keras_value(loss, y_true, y_pred):
    """The loss of one batch through the NumPy backend's fused pass, as Keras's reduction gives it."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    kind, _ = loss.resolve("linear")
    target = loss.prepare_targets(y_true, y_true.shape[0], y_true.shape[1])
    sums = np.zeros(2)
    NumpyBackend().loss_grad(kind, y_pred, target, None, None, sums, loss.param)
    return sums[0] / y_true.shape[0]


@pytest.mark.parametrize(
    "loss, y_true, y_pred, expected",
    [
        (losses.Huber(), [[0.0, 3.0]], [[0.5, 0.0]], (0.5 * 0.25 + (3 - 0.5)) / 2),
        (losses.Huber(delta=2.0), [[0.0]], [[3.0]], 2 * (3 - 1)),
        (losses.LogCosh(), [[1.0, 0.0]], [[0.0, 2.0]], (math.log(math.cosh(1)) + math.log(math.cosh(2))) / 2),
        (losses.Poisson(), [[2.0]], [[1.0]], 1.0 - 2.0 * math.log(1.0 + 1e-7)),
        (losses.Hinge(), [[1.0, 0.0]], [[0.3, 0.4]], ((1 - 0.3) + (1 + 0.4)) / 2),
        (losses.Hinge(), [[-1.0, 1.0]], [[-2.0, 0.5]], (0 + 0.5) / 2),
        (losses.SquaredHinge(), [[1.0, -1.0]], [[0.5, 0.5]], (0.25 + 2.25) / 2),
        (losses.CategoricalHinge(), [[0.0, 1.0, 0.0]], [[0.3, 0.4, 0.6]], max(0.6 - 0.4 + 1, 0)),
        (losses.MeanAbsolutePercentageError(), [[2.0, -4.0]], [[1.0, -5.0]], 100 * (0.5 + 0.25) / 2),
        (losses.MeanSquaredLogarithmicError(), [[1.0]], [[3.0]], (math.log(4) - math.log(2)) ** 2),
        (losses.KLDivergence(), [[0.2, 0.8]], [[0.5, 0.5]], 0.2 * math.log(0.4) + 0.8 * math.log(1.6)),
        (losses.CosineSimilarity(), [[1.0, 0.0]], [[1.0, 1.0]], -1 / math.sqrt(2)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, losses.Loss) else "",
)
def test_values_from_keras_formulas(loss, y_true, y_pred, expected):
    assert keras_value(loss, y_true, y_pred) == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_moves_targets_as_keras():
    bce = losses.BinaryCrossentropy(label_smoothing=0.2)
    np.testing.assert_allclose(bce.prepare_targets(np.array([[1.0], [0.0]]), 2, 1), [[0.9], [0.1]])
    cce = losses.CategoricalCrossentropy(label_smoothing=0.3)
    np.testing.assert_allclose(cce.prepare_targets(np.array([[0.0, 1.0, 0.0]]), 1, 3), [[0.1, 0.8, 0.1]])
    p = 0.7
    expected = -(0.9 * math.log(p) + 0.1 * math.log(1 - p))
    assert keras_value(bce, [[1.0]], [[p]]) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.CategoricalCrossentropy(label_smoothing=1.5)


def test_names_and_configs_resolve_to_classes():
    for name, cls in [
        ("huber", losses.Huber), ("logcosh", losses.LogCosh), ("kld", losses.KLDivergence), ("mape", losses.MeanAbsolutePercentageError),
        ("msle", losses.MeanSquaredLogarithmicError), ("categorical_hinge", losses.CategoricalHinge),
        ("cosine_similarity", losses.CosineSimilarity), ("squared_hinge", losses.SquaredHinge), ("poisson", losses.Poisson),
    ]:  # fmt: skip
        assert type(losses.get(name)) is cls
    restored = losses.get(losses.Huber(delta=0.7).get_config())
    assert isinstance(restored, losses.Huber) and restored.delta == 0.7
    smooth = losses.get({"name": "binary_crossentropy", "from_logits": True, "label_smoothing": 0.1})
    assert smooth.from_logits and smooth.label_smoothing == 0.1
    with pytest.raises(ValueError, match="loss"):
        losses.get({"name": "huber", "bogus": 1})


def _inputs(kind, rng, m, n, dtype):
    if kind in (LossKind.POISSON, LossKind.MSLE, LossKind.KL_DIVERGENCE):
        pred = rng.uniform(0.05, 0.95, (m, n))
        target = rng.uniform(0.05, 0.95, (m, n))
    elif kind in (LossKind.HINGE, LossKind.SQUARED_HINGE):
        pred = rng.standard_normal((m, n))
        target = rng.choice([-1.0, 1.0], (m, n))
    elif kind == LossKind.CATEGORICAL_HINGE:
        pred = rng.standard_normal((m, n))
        target = np.eye(n)[rng.integers(0, n, m)]
    else:
        pred = rng.standard_normal((m, n)) * 2
        target = rng.standard_normal((m, n))
    return pred.astype(dtype), target.astype(dtype)


@pytest.mark.parametrize("backend_name", list(backend_params()))
@pytest.mark.parametrize("kind", NEW_KINDS, ids=lambda k: k.name.lower())
def test_fused_pass_matches_reference(kind, backend_name):
    backend = make_backend(backend_name)
    rng = np.random.default_rng(int(kind))
    m, n = 7, 3  # ragged
    for dtype, tol in ((np.float32, dict(rtol=2e-5, atol=2e-6)), (np.float64, dict(rtol=1e-10, atol=1e-12))):
        pred, target = _inputs(kind, rng, m, n, dtype)
        weight = rng.uniform(0.5, 2, m).astype(dtype)
        param = 0.8 if kind == LossKind.HUBER else 0.0
        ref_grad, ref_sums = np.empty((m, n), dtype), np.array([0.5, 0.0], dtype)
        numpy_ops.loss_grad(kind, pred, target, weight, ref_grad, ref_sums, param)
        grad = backend.asarray(np.full((m, n), np.nan, dtype))
        sums = backend.asarray(np.array([0.5, 0.0], dtype))
        backend.loss_grad(kind, backend.asarray(pred), backend.asarray(target), backend.asarray(weight), grad, sums, param)
        got = backend.to_numpy(grad)
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, ref_grad, **tol)
        np.testing.assert_allclose(backend.to_numpy(sums)[0], ref_sums[0], **tol)


LOSSES_FOR_GRADIENTS = {
    "huber": (lambda: losses.Huber(delta=0.5), "real"),
    "log_cosh": (losses.LogCosh, "real"),
    "poisson": (losses.Poisson, "positive"),
    "hinge": (losses.Hinge, "signs"),
    "squared_hinge": (losses.SquaredHinge, "signs"),
    "categorical_hinge": (losses.CategoricalHinge, "onehot"),
    "mape": (losses.MeanAbsolutePercentageError, "real"),
    "msle": (losses.MeanSquaredLogarithmicError, "positive"),
    "kl_divergence": (losses.KLDivergence, "distribution"),
    "cosine_similarity": (losses.CosineSimilarity, "real"),
    "bce_smoothed": (lambda: losses.BinaryCrossentropy(label_smoothing=0.2), "binary"),
    "cce_smoothed": (lambda: losses.CategoricalCrossentropy(label_smoothing=0.1), "onehot"),
}


def _targets(kind, rng, n, outputs):
    if kind == "real":
        return rng.standard_normal((n, outputs))
    if kind == "positive":
        return rng.uniform(0.2, 2.0, (n, outputs))
    if kind == "signs":
        return rng.choice([-1.0, 1.0], (n, outputs))
    if kind == "binary":
        return (rng.uniform(size=(n, outputs)) > 0.5).astype(float)
    if kind == "distribution":
        return rng.dirichlet(np.ones(outputs), n)
    return np.eye(outputs)[rng.integers(0, outputs, n)]


@pytest.mark.parametrize("name", sorted(LOSSES_FOR_GRADIENTS))
def test_gradient_matches_finite_differences(name):
    make, target_kind = LOSSES_FOR_GRADIENTS[name]
    rng = np.random.default_rng(len(name))
    # positive outputs (softplus) where the loss needs them, softmax for KL and the cross-entropy
    output = {"poisson": "softplus", "msle": "softplus", "kl_divergence": "softmax", "cce_smoothed": "softmax", "bce_smoothed": "sigmoid"}
    model = gpunn.Sequential(
        [gpunn.Input((4,)), gpunn.layers.Dense(5, activation="tanh"), gpunn.layers.Dense(3, activation=output.get(name, "linear"))],
        dtype="float64",
    )
    model.compile(optimizer="sgd", loss=make())
    model.build()
    randomize_weights(model, 3)
    x = rng.standard_normal((9, 4))
    y = _targets(target_kind, rng, 9, 3)
    analytic = analytic_gradient(model, x, y)
    numeric = numeric_gradient(model, x, y)
    assert np.abs(analytic).max() > 1e-4
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


class Quartic(losses.Loss):
    """A user loss: the mean fourth power of the error, with its gradient."""

    name = "quartic"

    def call(self, y_true, y_pred):
        return ((y_pred - y_true) ** 4).mean(axis=1)

    def gradient(self, y_true, y_pred):
        return 4 * (y_pred - y_true) ** 3 / y_pred.shape[1]


def test_user_loss_gradient_and_training():
    # the shuffle order comes from gpunn's global generator: seed it, so the outcome does not depend
    # on how many random numbers earlier tests drew (a quartic loss at this rate can diverge on some orders)
    gpunn.set_seed(0)
    rng = np.random.default_rng(8)
    model = gpunn.Sequential([gpunn.Input((4,)), gpunn.layers.Dense(5, activation="tanh"), gpunn.layers.Dense(2)], dtype="float64")
    model.compile(optimizer=gpunn.optimizers.SGD(0.05), loss=Quartic())
    model.build()
    randomize_weights(model, 4)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 2)) * 0.5
    np.testing.assert_allclose(analytic_gradient(model, x, y), numeric_gradient(model, x, y), rtol=1e-5, atol=1e-7)
    before = model.evaluate(x, y, verbose=0)
    assert before == pytest.approx(float((((model.predict(x, verbose=0) - y) ** 4).mean(axis=1)).mean()), rel=1e-9)
    model.fit(x, y, epochs=30, batch_size=4, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before


def test_user_loss_without_gradient_is_refused_clearly():
    class NoGradient(losses.Loss):
        def call(self, y_true, y_pred):
            return (y_pred - y_true).mean(axis=1)

    model = gpunn.Sequential([gpunn.Input((2,)), gpunn.layers.Dense(1)])
    model.compile(optimizer="sgd", loss=NoGradient())
    with pytest.raises(NotImplementedError, match="gradient"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)


@pytest.mark.parametrize("loss", [lambda: losses.Huber(delta=0.3), lambda: losses.BinaryCrossentropy(label_smoothing=0.1)], ids=["huber", "bce-smoothing"])
def test_losses_round_trip_through_model_files(tmp_path, loss):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((20, 3)), (rng.uniform(size=(20, 1)) > 0.5).astype(float)
    model = gpunn.Sequential([gpunn.Input((3,)), gpunn.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss=loss())
    model.fit(x, y, epochs=2, verbose=0)
    model.save(tmp_path / "m.gpunn")
    restored = gpunn.load_model(tmp_path / "m.gpunn")
    assert restored.loss.get_config() == model.loss.get_config()
    assert restored.evaluate(x, y, verbose=0) == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-6)


# Keras 3 (keras/src/trainers/compile_utils.py, get_loss): "crossentropy" / "ce" are chosen from the
# shapes -- binary if y_pred.shape[-1] == 1, else sparse if rank(y_true) < rank(y_pred) or
# (y_true.shape[-1] == 1 and y_pred.shape[-1] > 1), else categorical.
@pytest.mark.parametrize(
    "units, labels, expected",
    [
        (1, "binary", "binary_crossentropy"),
        (3, "indices", "sparse_categorical_crossentropy"),
        (3, "column", "sparse_categorical_crossentropy"),
        (3, "one_hot", "categorical_crossentropy"),
    ],
)
@pytest.mark.parametrize("spelling", ["crossentropy", "ce"])
def test_crossentropy_is_chosen_from_the_shapes_as_keras3(units, labels, expected, spelling, tmp_path):
    r = np.random.default_rng(9)
    x = r.normal(size=(20, 4))
    classes = r.integers(0, max(units, 2), 20)
    y = {"binary": lambda: classes.reshape(-1, 1).astype(float), "indices": lambda: classes,
         "column": lambda: classes.reshape(-1, 1), "one_hot": lambda: np.eye(units)[classes]}[labels]()  # fmt: skip
    models = []
    for loss in (spelling, expected):
        gpunn.set_seed(2)
        model = gpunn.Sequential([gpunn.Input(shape=(4,)), gpunn.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")],
                                 dtype="float64")  # fmt: skip
        model.compile(optimizer="sgd", loss=loss, metrics=["accuracy"])
        history = model.fit(x, y, epochs=2, batch_size=5, shuffle=False, verbose=0)
        models.append((model, history.history))
    (chosen, history), (named, named_history) = models
    assert chosen._objective.loss.name == expected
    assert chosen.loss.name == "crossentropy"  # the model keeps the user's choice, as Keras keeps the identifier
    assert history == named_history
    np.testing.assert_array_equal(chosen.predict(x, verbose=0), named.predict(x, verbose=0))
    chosen.save(tmp_path / "ce.gpunn")  # saved as "crossentropy": chosen again from the next targets
    loaded = gpunn.load_model(tmp_path / "ce.gpunn")
    assert loaded.get_compile_config()["loss"] == {"name": "crossentropy"}
    assert loaded.evaluate(x, y, verbose=0) == pytest.approx(named.evaluate(x, y, verbose=0), rel=1e-12)
    assert loaded._objective.loss.name == expected
