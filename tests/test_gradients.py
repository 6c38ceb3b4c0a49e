"""Gradients through the real model code path, against central finite differences (float64).

Every activation (in the hidden and, where the loss allows, the output layer)
meets every loss: the fused sigmoid+BCE / softmax+CE paths, their
``from_logits`` variants, and the non-fused probability paths (softmax
output with BCE, sigmoid outputs with CE).  The analytic gradient is the one
the model's training step leaves in ``model.grads``; the numeric one
differentiates ``test_on_batch``'s loss.  Also: numpy_ops' losses and
activations against independent NumPy formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import analytic_gradient, mlp, numeric_gradient, one_hot, randomize_weights, rng
from scipy import special

import gpunn
from gpunn import codes
from gpunn.backend import numpy_ops
from gpunn.backend.numpy_backend import NumpyBackend

ACTIVATIONS = gpunn.activations.names()
N_IN, N_HIDDEN, N_OUT, BATCH = 5, 7, 3, 11

# loss name, from_logits, output activation (None: the activation under test), targets, expected loss kind
LOSS_CASES = {
    "mse": ("mse", False, None, "real", codes.LOSS_MSE),
    "mae": ("mae", False, None, "real", codes.LOSS_MAE),
    "bce_fused": ("binary_crossentropy", False, "sigmoid", "unit", codes.LOSS_SIGMOID_BCE),
    "bce_logits": ("binary_crossentropy", True, None, "unit", codes.LOSS_SIGMOID_BCE),
    "bce_probs": ("binary_crossentropy", False, "softmax", "unit", codes.LOSS_BCE),
    "cce_fused": ("categorical_crossentropy", False, "softmax", "soft", codes.LOSS_SOFTMAX_CCE),
    "cce_logits": ("categorical_crossentropy", True, None, "soft", codes.LOSS_SOFTMAX_CCE),
    "cce_probs": ("categorical_crossentropy", False, "sigmoid", "soft", codes.LOSS_CCE),
    "sparse_fused": ("sparse_categorical_crossentropy", False, "softmax", "labels", codes.LOSS_SOFTMAX_SPARSE_CCE),
    "sparse_logits": ("sparse_categorical_crossentropy", True, None, "labels", codes.LOSS_SOFTMAX_SPARSE_CCE),
    "sparse_probs": ("sparse_categorical_crossentropy", False, "sigmoid", "labels", codes.LOSS_SPARSE_CCE),
}


def _targets(kind, seed):
    r = rng(seed)
    if kind == "real":
        return r.normal(size=(BATCH, N_OUT))
    if kind == "unit":
        t = r.uniform(size=(BATCH, N_OUT))
        t[::2] = np.round(t[::2])  # hard and soft labels
        return t
    if kind == "soft":
        t = r.dirichlet(np.ones(N_OUT), size=BATCH)
        t[::2] = one_hot(r.integers(0, N_OUT, BATCH // 2 + 1), N_OUT)
        return t
    return r.integers(0, N_OUT, size=BATCH)


def _model(activation, case, seed, **dense_kwargs):
    loss, from_logits, output_activation, target_kind, kind = LOSS_CASES[case]
    model = mlp([N_HIDDEN, N_OUT], activation, output_activation or activation, input_dim=N_IN, dtype="float64", **dense_kwargs)
    model.compile(
        optimizer=gpunn.optimizers.SGD(learning_rate=0.01),
        loss=gpunn.losses.get({"name": loss, "from_logits": from_logits}),
    )
    model.build()
    assert model._objective.kind == kind  # the case really exercises the path it names
    # exponential stacked on exponential is exp(exp(.)): smaller weights keep it in range
    randomize_weights(model, seed, scale=0.25 if activation == "exponential" else 0.6)
    x = rng(seed + 1).normal(size=(BATCH, N_IN))
    return model, x, _targets(target_kind, seed + 2)


def _check(model, x, y, sample_weight=None):
    analytic = analytic_gradient(model, x, y, sample_weight)
    numeric = numeric_gradient(model, x, y, sample_weight)
    assert np.abs(analytic).max() > 1e-4  # a gradient that is really there
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_every_activation_and_loss(activation, case):
    seed = 10 * ACTIVATIONS.index(activation) + sorted(LOSS_CASES).index(case)
    model, x, y = _model(activation, case, seed)
    _check(model, x, y)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_float32_gradient_matches_float64(case):
    """The float32 training step computes the same gradient (to float32 precision), in float32."""
    model, x, y = _model("gelu", case, 200)
    single = mlp([N_HIDDEN, N_OUT], "gelu", model.layers[-1].activation.name, input_dim=N_IN, dtype="float32")
    single.compile(optimizer=gpunn.optimizers.SGD(0.01), loss=model.loss)
    single.build()
    single.set_weights(model.get_weights())
    grad32 = analytic_gradient(single, x, y)
    assert single.grads.dtype == np.float32
    np.testing.assert_allclose(grad32, analytic_gradient(model, x, y), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_gradient_with_sample_weights(case):
    model, x, y = _model("tanh", case, 300)
    w = rng(301).uniform(0.0, 3.0, size=BATCH)
    w[3] = 0.0
    _check(model, x, y, sample_weight=w)


@pytest.mark.parametrize("case", ["mse", "bce_fused", "cce_fused", "sparse_probs"])
def test_gradient_with_regularizers(case):
    model, x, y = _model(
        "gelu",
        case,
        400,
        kernel_regularizer=gpunn.regularizers.L1L2(l1=0.01, l2=0.02),
        bias_regularizer=gpunn.regularizers.L2(0.05),
    )
    _check(model, x, y, sample_weight=rng(401).uniform(0.5, 2.0, size=BATCH))
    # the penalty is really part of the loss
    plain, _, _ = _model("gelu", case, 400)
    assert model.test_on_batch(x, y) > plain.test_on_batch(x, y) + 1e-3


def test_gradient_leaky_relu_custom_slope_and_no_bias():
    model = gpunn.Sequential(
        [
            gpunn.layers.Dense(N_HIDDEN, activation={"name": "leaky_relu", "alpha": 0.05}, input_dim=N_IN, use_bias=False),
            gpunn.layers.Dense(4, activation=gpunn.activations.leaky_relu(0.3)),
            gpunn.layers.Dense(2, activation="softmax", use_bias=False),
        ],
        dtype="float64",
    )
    model.compile(optimizer=gpunn.optimizers.SGD(0.1), loss="categorical_crossentropy")
    model.build()
    assert model.count_params() == N_IN * N_HIDDEN + N_HIDDEN * 4 + 4 + 4 * 2
    randomize_weights(model, 500)
    x = rng(501).normal(size=(BATCH, N_IN))
    _check(model, x, one_hot(rng(502).integers(0, 2, BATCH), 2))


@pytest.mark.parametrize("case", ["bce_fused", "cce_fused", "sparse_fused"])
def test_fused_and_logit_paths_agree(case):
    """Sigmoid/softmax + CE (fused) equals the same logits model with from_logits=True."""
    model, x, y = _model("relu", case, 600)
    loss, _, _, _, _ = LOSS_CASES[case]
    logits = mlp([N_HIDDEN, N_OUT], "relu", "linear", input_dim=N_IN, dtype="float64")
    logits.compile(optimizer=gpunn.optimizers.SGD(0.01), loss=gpunn.losses.get({"name": loss, "from_logits": True}))
    logits.build()
    logits.set_weights(model.get_weights())
    assert model.test_on_batch(x, y) == pytest.approx(logits.test_on_batch(x, y), rel=1e-12)
    np.testing.assert_allclose(analytic_gradient(model, x, y), analytic_gradient(logits, x, y), rtol=1e-10, atol=1e-14)


def test_sigmoid_output_fused_bce_vs_mse_differ():
    """The same sigmoid output trained with BCE (fused) and MSE (not fused) gets each loss's own gradient."""
    bce, x, y = _model("tanh", "bce_fused", 700)
    mse = mlp([N_HIDDEN, N_OUT], "tanh", "sigmoid", input_dim=N_IN, dtype="float64")
    mse.compile(optimizer=gpunn.optimizers.SGD(0.01), loss="mse")
    mse.build()
    mse.set_weights(bce.get_weights())
    np.testing.assert_allclose(mse.predict(x), bce.predict(x), rtol=1e-14)
    _check(mse, x, y)
    assert not np.allclose(analytic_gradient(mse, x, y), analytic_gradient(bce, x, y))


# ---------------------------------------------------------------- numpy_ops
def _ref_rows(kind, pred, target):
    """Per-row loss from textbook formulas, independent of numpy_ops."""
    eps = 1e-7
    if kind == codes.LOSS_MSE:
        return ((pred - target) ** 2).mean(axis=1)
    if kind == codes.LOSS_MAE:
        return np.abs(pred - target).mean(axis=1)
    if kind == codes.LOSS_SIGMOID_BCE:
        p = 1 / (1 + np.exp(-pred))
        return -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean(axis=1)
    if kind == codes.LOSS_BCE:
        p = np.clip(pred, eps, 1 - eps)
        return -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean(axis=1)
    if kind in (codes.LOSS_SOFTMAX_CCE, codes.LOSS_SOFTMAX_SPARSE_CCE):
        p = np.exp(pred) / np.exp(pred).sum(axis=1, keepdims=True)
    else:
        p = np.clip(pred / pred.sum(axis=1, keepdims=True), eps, 1 - eps)
    t = one_hot(target, pred.shape[1]) if target.ndim == 1 else target
    return -(t * np.log(p)).sum(axis=1)


def _ref_correct(kind, pred, target):
    if kind in (codes.LOSS_MSE, codes.LOSS_MAE):
        return None
    if kind in (codes.LOSS_SIGMOID_BCE, codes.LOSS_BCE):
        threshold = 0.0 if kind == codes.LOSS_SIGMOID_BCE else 0.5
        return ((pred > threshold) == (target > 0.5)).mean(axis=1)
    labels = target if target.ndim == 1 else target.argmax(axis=1)
    return (pred.argmax(axis=1) == labels).astype(float)


_OP_CASES = [
    (codes.LOSS_MSE, "normal", "real"),
    (codes.LOSS_MAE, "normal", "real"),
    (codes.LOSS_SIGMOID_BCE, "normal", "unit"),
    (codes.LOSS_BCE, "prob", "unit"),
    (codes.LOSS_SOFTMAX_CCE, "normal", "soft"),
    (codes.LOSS_SOFTMAX_SPARSE_CCE, "normal", "labels"),
    (codes.LOSS_CCE, "positive", "soft"),
    (codes.LOSS_SPARSE_CCE, "positive", "labels"),
]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind, pred_kind, target_kind", _OP_CASES)
def test_loss_grad_matches_reference(kind, pred_kind, target_kind, weighted):
    r = rng(800 + kind)
    m, n = 9, 4
    pred = {"normal": r.normal(size=(m, n)) * 2, "prob": r.uniform(0.02, 0.98, (m, n)), "positive": r.uniform(0.05, 2.0, (m, n))}[pred_kind]
    target = {
        "real": r.normal(size=(m, n)),
        "unit": np.round(r.uniform(size=(m, n))),
        "soft": r.dirichlet(np.ones(n), size=m),
        "labels": r.integers(0, n, m).astype(np.float64),
    }[target_kind]
    w = r.uniform(0, 2, m) if weighted else None
    ones = np.ones(m) if w is None else w
    grad = np.empty_like(pred)
    sums = np.array([0.25, 0.5])  # accumulates into what is there
    numpy_ops.loss_grad(kind, pred, target, w, grad, sums)

    ref_target = target.astype(int) if target_kind == "labels" else target
    rows = _ref_rows(kind, pred, ref_target)
    assert sums[0] == pytest.approx(0.25 + ones @ rows, rel=1e-12)
    correct = _ref_correct(kind, pred, ref_target)
    # the accuracy count is unweighted: Keras 3's plain metrics ignore sample weights
    assert sums[1] == pytest.approx(0.5 + (0.0 if correct is None else correct.sum()), rel=1e-12)

    # gradient of L = sum_i w_i l_i / M w.r.t. pred, by central differences of the reference formula
    h = 1e-6
    numeric = np.empty_like(pred)
    for idx in np.ndindex(*pred.shape):
        up, down = pred.copy(), pred.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = ones @ (_ref_rows(kind, up, ref_target) - _ref_rows(kind, down, ref_target)) / (2 * h * m)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)

    # grad=None computes the same loss without touching anything else
    sums2 = np.zeros(2)
    numpy_ops.loss_grad(kind, pred, target, w, None, sums2)
    assert sums2[0] == pytest.approx(sums[0] - 0.25, rel=1e-12)


def test_loss_grad_float32_extreme_logits_stay_finite():
    pred = np.array([[80.0, -80.0, 0.0], [-90.0, 90.0, 1.0]], dtype=np.float32)
    grad = np.empty_like(pred)
    for kind, target in (
        (codes.LOSS_SIGMOID_BCE, np.array([[0, 1, 1], [1, 0, 0]], np.float32)),
        (codes.LOSS_SOFTMAX_SPARSE_CCE, np.array([1, 0], np.float32)),
        (codes.LOSS_SOFTMAX_CCE, np.array([[0, 1, 0], [1, 0, 0]], np.float32)),
    ):
        sums = np.zeros(2, np.float32)
        numpy_ops.loss_grad(kind, pred, target, None, grad, sums)
        assert np.isfinite(sums).all() and np.isfinite(grad).all()
        assert sums[0] > 100  # confidently wrong: a large, finite loss


def test_bce_on_probabilities_clips_like_keras():
    pred = np.array([[0.0, 1.0, 0.3]])
    target = np.array([[1.0, 0.0, 1.0]])
    grad = np.empty_like(pred)
    sums = np.zeros(2)
    numpy_ops.loss_grad(codes.LOSS_BCE, pred, target, None, grad, sums)
    expected = -(2 * np.log(1e-7) + np.log(0.3)) / 3
    assert sums[0] == pytest.approx(expected, rel=1e-6)
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # no gradient through the clip
    assert grad[0, 2] == pytest.approx((0.3 - 1) / (0.3 * 0.7) / 3)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


#: Keras 3's definitions (keras.activations), with Keras's default parameters.
KERAS_DEFINITIONS = {
    "relu": lambda v: np.maximum(v, 0),
    "leaky_relu": lambda v: np.where(v > 0, v, 0.2 * v),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "linear": lambda v: v,
    "gelu": lambda v: 0.5 * v * (1 + special.erf(v / np.sqrt(2))),
    "elu": lambda v: np.where(v > 0, v, 1.0 * (np.exp(v) - 1)),
    "selu": lambda v: 1.05070098 * np.where(v > 0, v, 1.67326324 * (np.exp(v) - 1)),
    "softplus": lambda v: np.log(np.exp(v) + 1),
    "softsign": lambda v: v / (np.abs(v) + 1),
    "swish": lambda v: v * _sigmoid(v),
    "relu6": lambda v: np.minimum(np.maximum(v, 0), 6),
    "hard_sigmoid": lambda v: np.where(v < -3, 0.0, np.where(v > 3, 1.0, v / 6 + 0.5)),
    "mish": lambda v: v * np.tanh(np.log(1 + np.exp(v))),
    "exponential": np.exp,
}


def test_every_activation_has_a_keras_definition_here():
    assert sorted(KERAS_DEFINITIONS) == sorted(set(gpunn.activations.names()) - {"softmax"})


@pytest.mark.parametrize("name", sorted(KERAS_DEFINITIONS))
def test_activation_forward_and_derivative(name):
    act = gpunn.activations.get(name)
    # wide enough to cross relu6's and hard_sigmoid's upper kinks; kinks themselves avoided
    z = rng(900).normal(size=(6, 5)) * 4
    reference = KERAS_DEFINITIONS[name]
    y = np.empty_like(z)
    numpy_ops.apply_activation(z, act.code, act.alpha, y)
    # SELU's constants are Keras's to 8 digits
    np.testing.assert_allclose(y, reference(z), rtol=1e-12 if name != "selu" else 1e-8, atol=1e-15)
    g = rng(901).normal(size=z.shape)
    h = 1e-6
    numeric = g * (reference(z + h) - reference(z - h)) / (2 * h)
    for z_given in (z, None if not act.code.needs_preactivation else z):
        out = numpy_ops.multiply_activation_grad(g.copy(), y, z_given, act.code, act.alpha)
        np.testing.assert_allclose(out, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "name, z, expected",
    [
        ("elu", -1.0, np.exp(-1.0) - 1),
        ("selu", 2.0, 2.10140197),
        ("selu", -1.0, 1.05070098 * 1.67326324 * (np.exp(-1.0) - 1)),
        ("softplus", 0.0, np.log(2.0)),
        ("softsign", 3.0, 0.75),
        ("swish", 0.0, 0.0),
        ("relu6", 7.5, 6.0),
        ("relu6", -1.0, 0.0),
        ("hard_sigmoid", 1.5, 0.75),
        ("hard_sigmoid", -4.0, 0.0),
        ("hard_sigmoid", 3.5, 1.0),
        ("mish", 1.0, np.tanh(np.log1p(np.e))),
        ("exponential", 2.0, np.e**2),
    ],
)
def test_activation_values_from_keras_formulas(name, z, expected):
    """Hand-computed values of Keras's definitions, on every backend path (reference and CPU pass)."""
    act = gpunn.activations.get(name)
    x = np.array([[z]])
    for impl in (numpy_ops, NumpyBackend()):
        y = np.full_like(x, np.nan)
        impl.apply_activation(x, act.code, act.alpha, y)
        assert y[0, 0] == pytest.approx(expected, rel=1e-7, abs=1e-12), impl


def test_leaky_relu_slope_above_one():
    z = np.array([[-2.0, 3.0]])
    y = np.empty_like(z)
    numpy_ops.apply_activation(z, codes.ACT_LEAKY_RELU, 1.5, y)
    np.testing.assert_array_equal(y, [[-3.0, 3.0]])


def test_softmax_and_its_backward():
    z = rng(902).normal(size=(4, 6)) * 3
    p = np.empty_like(z)
    numpy_ops.softmax(z, p)
    np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), rtol=1e-12)
    g = rng(903).normal(size=z.shape)
    jvp = numpy_ops.softmax_backward(g.copy(), p)
    expected = np.stack([(np.diag(pr) - np.outer(pr, pr)) @ gr for pr, gr in zip(p, g)])
    np.testing.assert_allclose(jvp, expected, rtol=1e-10, atol=1e-14)


def test_linear_backward_weight_and_data_match_fused_backward():
    r = rng(904)
    x, w, b = r.normal(size=(5, 4)), r.normal(size=(4, 3)), r.normal(size=3)
    y, z = np.empty((5, 3)), np.empty((5, 3))
    numpy_ops.linear_forward(x, w, b, codes.ACT_GELU, 0.0, y, z)
    np.testing.assert_allclose(z, x @ w + b, rtol=1e-12)
    dy = r.normal(size=(5, 3))
    dw, db, dx = np.empty((4, 3)), np.empty(3), np.empty((5, 4))
    numpy_ops.linear_backward_weight(x, dy, y, z, codes.ACT_GELU, 0.0, dw, db)
    numpy_ops.linear_backward_data(dy, w, y, z, codes.ACT_GELU, 0.0, dx)
    dw2, db2, dx2 = np.empty((4, 3)), np.empty(3), np.empty((5, 4))
    numpy_ops.linear_backward(x, w, dy.copy(), y, z, codes.ACT_GELU, 0.0, dx2, dw2, db2)
    np.testing.assert_allclose(dw, dw2, rtol=1e-12)
    np.testing.assert_allclose(db, db2, rtol=1e-12)
    np.testing.assert_allclose(dx, dx2, rtol=1e-12)
