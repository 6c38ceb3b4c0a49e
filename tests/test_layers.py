"""The layers beyond Dense: Keras 3's formulas and defaults (expected numbers worked out by
hand from the documented formulas), float64 finite-difference gradients of every backward on
both backends (CUDA in the simulator on machines without a GPU), training vs inference
behaviour, reproducibility, and save/load round trips with bit-exact resumption."""

from __future__ import annotations

import numpy as np
import pytest

import gpunn
from gpunn import layers
from gpunn.backend import numpy_ops
from gpunn.codes import Act
from gpunn.layer_base import TrainingPhase
from helpers import multiclass_data, rng, weights_equal

BACKENDS = ["numpy", "cuda"]


def _single(layer, features, backend="numpy"):
    """A float64 model holding just ``layer`` on ``backend`` (built), and the backend object."""
    with gpunn.use_backend(backend):
        model = gpunn.Sequential([gpunn.Input(shape=(features,)), layer], dtype="float64")
    return model, model.backend


def _forward(layer, b, x, training):
    y = b.empty((x.shape[0], layer.output_dim), np.float64)
    aux = layer.make_buffers(b, x.shape[0], np.float64, layer.activation, bool(training))
    out = layer.call(b, b.asarray(x), y, aux, layer.activation, training)
    return np.array(b.to_numpy(out)), y, aux, out


# ---------------------------------------------------------------- Keras formulas
def test_batch_normalization_matches_keras_formulas():
    bn = layers.BatchNormalization()
    assert (bn.momentum, bn.epsilon) == (0.99, 0.001)
    model, b = _single(bn, 1)
    x = np.array([[1.0], [5.0]])  # batch mean 3, biased variance 4
    out, *_ = _forward(bn, b, x, TrainingPhase(0))
    np.testing.assert_allclose(out, [[-2 / np.sqrt(4.001)], [2 / np.sqrt(4.001)]], rtol=1e-12)
    gamma, beta, moving_mean, moving_var = bn.get_weights()
    assert gamma == 1 and beta == 0
    np.testing.assert_allclose([moving_mean[0], moving_var[0]], [0.99 * 0 + 0.01 * 3, 0.99 * 1 + 0.01 * 4], rtol=1e-12)
    # inference: the moving statistics, and nothing changes
    out, *_ = _forward(bn, b, x, False)
    np.testing.assert_allclose(out, (x - 0.03) / np.sqrt(1.03 + 0.001), rtol=1e-12)
    assert bn.get_weights()[2] == moving_mean
    # Keras 3: a frozen BatchNormalization runs in inference mode even in training
    bn.trainable = False
    out, *_ = _forward(bn, b, x, TrainingPhase(1))
    np.testing.assert_allclose(out, (x - 0.03) / np.sqrt(1.031), rtol=1e-12)
    assert bn.get_weights()[2] == moving_mean
    assert [len(bn.trainable_weights), len(bn.non_trainable_weights)] == [0, 4]


def test_layer_normalization_matches_keras_formulas():
    ln = layers.LayerNormalization()
    assert ln.epsilon == 0.001
    model, b = _single(ln, 4)
    ln.set_weights([np.array([1.0, 2.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.5, 0.0])])
    x = np.array([[1.0, 2.0, 3.0, 6.0]])  # row mean 3, biased variance 3.5
    out, *_ = _forward(ln, b, x, False)
    xhat = (x - 3) / np.sqrt(3.501)
    np.testing.assert_allclose(out, xhat * [1, 2, 1, 1] + [0, 0, 0.5, 0], rtol=1e-12)


def test_normalization_adapt_matches_keras():
    norm = layers.Normalization()
    norm.adapt(np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0]]))  # means 2.5, 10; variances 1.25, 0
    model, b = _single(norm, 2)
    out, *_ = _forward(norm, b, np.array([[5.0, 11.0]]), False)
    np.testing.assert_allclose(out, [[2.5 / np.sqrt(1.25), 1.0 / 1e-7]], rtol=1e-9)
    mean, variance, count = norm.get_weights()
    assert count == 4 and norm.trainable_weights == [] and len(norm.non_trainable_weights) == 3
    inverse = layers.Normalization(mean=[2.0], variance=[4.0], invert=True)
    _, b = _single(inverse, 1)
    np.testing.assert_allclose(_forward(inverse, b, np.array([[1.5]]), False)[0], [[2.0 + 1.5 * 2.0]])
    with pytest.raises(ValueError, match="data: the layer has 2 features, got 3"):
        norm.adapt(np.ones((2, 3)))


def test_activation_layers_match_keras_formulas():
    x = np.array([[-2.0, 0.5, 3.0]])
    leaky = layers.LeakyReLU()
    assert leaky.negative_slope == 0.3  # Keras 3's layer default (the function's is 0.2)
    _, b = _single(leaky, 3)
    np.testing.assert_allclose(_forward(leaky, b, x, False)[0], [[-0.6, 0.5, 3.0]])
    soft = layers.Activation("softmax")
    _, b = _single(soft, 3)
    e = np.exp([-2.0, 0.5, 3.0])
    np.testing.assert_allclose(_forward(soft, b, x, False)[0], [e / e.sum()], rtol=1e-12)
    relu6 = layers.ReLU(max_value=6)
    _, b = _single(relu6, 3)
    np.testing.assert_allclose(_forward(relu6, b, np.array([[-1.0, 4.0, 9.0]]), False)[0], [[0.0, 4.0, 6.0]])
    # an activation layer as Dense's activation= argument, as Keras accepts
    assert layers.Dense(2, activation=layers.LeakyReLU(negative_slope=0.1)).activation.alpha == 0.1
    elu = layers.ELU(alpha=0.5)  # x if x > 0 else alpha * (exp(x) - 1)
    _, b = _single(elu, 3)
    np.testing.assert_allclose(_forward(elu, b, x, False)[0], [[0.5 * (np.exp(-2.0) - 1), 0.5, 3.0]], rtol=1e-12)
    rescale = layers.Rescaling(1 / 255, offset=-1.0)  # x * scale + offset
    _, b = _single(rescale, 3)
    np.testing.assert_allclose(_forward(rescale, b, np.array([[0.0, 127.5, 255.0]]), False)[0], [[-1.0, -0.5, 0.0]], rtol=1e-12)


def test_dropout_is_inverted_active_only_in_training_and_reproducible():
    drop = layers.Dropout(0.25, seed=5)
    _, b = _single(drop, 400)
    x = rng(0).normal(size=(50, 400)) + 3
    out, *_ = _forward(drop, b, x, TrainingPhase(7))
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-12)  # survivors scaled by 1 / (1 - rate)
    assert abs(1 - kept.mean() - 0.25) < 0.01  # 20000 draws: the dropped fraction is the rate
    np.testing.assert_array_equal(_forward(drop, b, x, TrainingPhase(7))[0], out)  # same seed and step: same mask
    assert not np.array_equal(_forward(drop, b, x, TrainingPhase(8))[0], out)  # the next step: a new mask
    np.testing.assert_array_equal(_forward(drop, b, x, False)[0], x)  # inference: identity
    with pytest.raises(ValueError, match=r"rate: expected a number in \[0, 1\), got 1.0"):
        layers.Dropout(1.0)


def test_gaussian_noise_only_in_training():
    noise = layers.GaussianNoise(0.5, seed=2)
    _, b = _single(noise, 300)
    x = rng(1).normal(size=(100, 300))
    out, *_ = _forward(noise, b, x, TrainingPhase(0))
    assert abs((out - x).std() - 0.5) < 0.01 and abs((out - x).mean()) < 0.01
    np.testing.assert_array_equal(_forward(noise, b, x, False)[0], x)


# ---------------------------------------------------------------- gradients
def _finite_difference_check(layer, features, backend, training=True, h=1e-6, rows=5):
    """dL/dx and dL/dweights of ``L = sum(layer(x) * R)`` from ``backward`` vs central differences."""
    model, b = _single(layer, features, backend)
    r = rng(features)
    if layer.weights:  # fresh, non-trivial weights (not BN's ones and zeros)
        layer.set_weights([w + 0.3 * r.normal(size=w.shape) if w.ndim else w for w in layer.get_weights()])
        if isinstance(layer, layers.BatchNormalization):
            w = layer.get_weights()
            layer.set_weights(w[:3] + [np.abs(w[3]) + 0.5])
    x = r.normal(size=(rows, features))
    R = r.normal(size=(rows, layer.compute_output_dim(features)))
    phase = TrainingPhase(3) if training else False

    def loss(xv):
        return float((_forward(layer, b, xv, phase)[0] * R).sum())

    _, y, aux, out = _forward(layer, b, x, phase)
    dx = b.zeros((rows, features), np.float64)
    layer.backward(b, b.asarray(x), b.asarray(R.copy()), out, aux, dx, layer.activation)
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(b.to_numpy(dx), numeric, rtol=1e-6, atol=1e-7)
    for view, grad, _, spec in layer._views.values():
        if not spec.trainable:
            continue
        analytic = np.array(b.to_numpy(grad))
        numeric = np.zeros(spec.shape)
        for idx in np.ndindex(*spec.shape):
            keep = float(view[idx])
            view[idx] = keep + h
            up = loss(x)
            view[idx] = keep - h
            down = loss(x)
            view[idx] = keep
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=spec.attr)


def _frozen(layer):
    layer.trainable = False
    return layer


LAYERS_WITH_BACKWARD = {
    "batch_norm_training": (lambda: layers.BatchNormalization(momentum=0.0), True),
    "batch_norm_frozen": (lambda: _frozen(layers.BatchNormalization()), True),  # moving statistics
    "layer_norm": (lambda: layers.LayerNormalization(), True),
    "layer_norm_no_affine": (lambda: layers.LayerNormalization(center=False, scale=False), True),
    "normalization": (lambda: layers.Normalization(mean=[0.5, -1, 2, 0], variance=[4, 0.25, 1, 2]), True),
    "dropout": (lambda: layers.Dropout(0.4, seed=1), True),
    "gaussian_noise": (lambda: layers.GaussianNoise(0.3, seed=1), True),
    "flatten": (lambda: layers.Flatten(), True),
    "leaky_relu": (lambda: layers.LeakyReLU(0.2), True),
    "elu_layer": (lambda: layers.ELU(alpha=0.7), True),
    "identity": (lambda: layers.Identity(), True),
    "rescaling": (lambda: layers.Rescaling(0.5, offset=-1.5), True),
    "softmax": (lambda: layers.Activation("softmax"), True),
    **{f"activation_{name}": (lambda name=name: layers.Activation(name), True)
       for name in ("tanh", "sigmoid", "gelu", "elu", "swish", "softplus", "mish")},  # fmt: skip
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(LAYERS_WITH_BACKWARD))
def test_layer_gradients_match_finite_differences(case, backend):
    if backend == "cuda" and case.startswith("activation_") and case not in ("activation_gelu", "activation_tanh"):
        pytest.skip("the simulator run covers two activations; the kernel itself is checked for all below")
    make, training = LAYERS_WITH_BACKWARD[case]
    _finite_difference_check(make(), 4, backend, training)


@pytest.mark.parametrize("act", [a for a in Act], ids=lambda a: a.name.lower())
@pytest.mark.parametrize("shape", [(7, 5), (33, 3)])
def test_activation_backward_kernel_matches_the_reference(act, shape):
    """The CUDA kernel (simulator) vs numpy_ops.activation_backward on ragged shapes (not multiples
    of the launch's block), outputs NaN-poisoned first; both with the pre-activation and, for the
    activations that do not read it, with y passed in its place (as Dense's backward does)."""
    from gpunn import kernels

    r = rng(int(act) + 40 + shape[0])
    alpha = act.default_alpha or 0.1
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        z = r.normal(scale=2, size=shape).astype(dtype)
        y = np.empty_like(z)
        numpy_ops.apply_activation(z, act, alpha, y)
        dy = r.normal(size=shape).astype(dtype)
        for given_z in (z,) if act.needs_preactivation else (z, y):
            dx, ref = np.full_like(z, np.nan), np.full_like(z, np.nan)
            kernels.activation_backward(dy, y, given_z, act, alpha, dx)
            numpy_ops.activation_backward(dy, y, given_z, act, alpha, ref)
            assert np.isfinite(ref).all()
            np.testing.assert_allclose(dx, ref, rtol=tol, atol=tol)
        # the reference means dy * act'(z), written independently of it
        expected = dy * numpy_ops.activation_derivative(y, z, act, alpha)
        np.testing.assert_allclose(numpy_ops.activation_backward(dy, y, z, act, alpha, np.empty_like(z)), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- in a model
def _digits_like(backend="numpy", seed=0):
    with gpunn.use_backend(backend):
        gpunn.set_seed(seed)
        model = gpunn.Sequential(
            [
                gpunn.Input(shape=(6,)),
                layers.Normalization(mean=np.full(6, 0.1), variance=np.full(6, 1.5)),
                layers.Dense(8),
                layers.BatchNormalization(),
                layers.LeakyReLU(),
                layers.Dropout(0.3),
                layers.GaussianNoise(0.05),
                layers.Dense(6, activation=layers.Activation("tanh")),
                layers.LayerNormalization(),
                layers.Dense(3),
                layers.Activation("softmax"),
            ],
            dtype="float64",
        )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_save_load_round_trip_restores_architecture_weights_and_moving_statistics_and_resumes_exactly(tmp_path):
    x, labels = multiclass_data(8, n=48, features=6)
    model = _digits_like()
    model.fit(x, labels, epochs=2, batch_size=16, verbose=0)
    bn = model.layers[2]
    assert bn.get_weights()[2].any()  # the moving mean moved
    model.save(tmp_path / "m.gpunn")
    loaded = gpunn.load_model(tmp_path / "m.gpunn")
    assert loaded.get_config() == model.get_config()
    assert weights_equal(loaded.get_weights(), model.get_weights())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # resuming is bit-exact: the same data order, and the same dropout masks and noise (keyed by step)
    model.fit(x, labels, epochs=2, batch_size=16, shuffle=False, verbose=0)
    loaded.fit(x, labels, epochs=2, batch_size=16, shuffle=False, verbose=0)
    assert weights_equal(loaded.get_weights(), model.get_weights())


def test_training_is_reproducible_under_set_seed_and_inference_is_deterministic():
    x, labels = multiclass_data(9, n=40, features=6)
    runs = []
    for _ in range(2):
        model = _digits_like(seed=3)
        model.fit(x, labels, epochs=2, batch_size=8, verbose=0)
        runs.append(model.get_weights())
    assert weights_equal(*runs)
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    # evaluate runs in inference mode: it equals the loss of predict's probabilities
    probs = model.predict(x, verbose=0)
    expected = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert model.evaluate(x, labels, verbose=0)[0] == pytest.approx(expected, rel=1e-9)


def test_the_new_layers_train_on_the_cuda_backend_like_on_numpy():
    x, labels = multiclass_data(10, n=16, features=6)
    results = []
    for backend in BACKENDS:
        model = _digits_like(backend, seed=5)
        model.layers[4].rate = 0.0  # the device random stream differs from the CPU's; compare without it
        model.layers[5].stddev = 0.0
        model.fit(x, labels, epochs=1, batch_size=8, shuffle=False, verbose=0)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_flatten_takes_n_d_samples():
    gpunn.set_seed(0)
    model = gpunn.Sequential([gpunn.Input(shape=(2, 3)), layers.Flatten(), layers.Dense(2)])
    assert model.input_shape == (None, 2, 3) and model.output_shape == (None, 2) and model.count_params() == 14
    x = rng(2).normal(size=(4, 2, 3))
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(model.predict(x, verbose=0), x.reshape(4, 6) @ kernel + bias, rtol=1e-5)
    model.compile("sgd", "mse")
    model.fit(x, np.ones((4, 2)), verbose=0)
    clone = gpunn.models.model_from_json(model.to_json())
    assert clone.input_shape == (None, 2, 3)


def test_an_activation_layer_after_dense_trains_like_the_fused_activation():
    """Dense(k) + Activation("softmax") is Dense(k, activation="softmax"): the loss folds the
    softmax in either way, so training matches to rounding."""
    x, labels = multiclass_data(11, n=24, features=4)
    weights, runs = None, []
    for split in (False, True):
        gpunn.set_seed(1)
        tail = [layers.Dense(3), layers.Activation("softmax")] if split else [layers.Dense(3, activation="softmax")]
        model = gpunn.Sequential([gpunn.Input(shape=(4,)), layers.Dense(5, activation="relu"), *tail], dtype="float64")
        weights = weights or model.get_weights()
        model.set_weights(weights)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(x, labels, epochs=2, batch_size=8, shuffle=False, verbose=0).history
        runs.append((model.get_weights(), history, model.predict(x, verbose=0)))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(runs[0][2], runs[1][2], rtol=1e-12)
    assert runs[0][1]["accuracy"] == runs[1][1]["accuracy"]


def test_n_d_input_without_flatten_is_refused():
    with pytest.raises(ValueError, match=r"put layers.Flatten\(\) first"):
        gpunn.Sequential([gpunn.Input(shape=(2, 3)), layers.Dense(2)])


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: layers.Dropout(-0.1), "rate"),
        (lambda: layers.Dropout("0.5"), "rate"),
        (lambda: layers.Dropout(0.5, noise_shape=(1, 3)), "noise_shape"),
        (lambda: layers.GaussianNoise(-1.0), "stddev"),
        (lambda: layers.BatchNormalization(axis=0), "axis"),
        (lambda: layers.BatchNormalization(momentum=1.5), "momentum"),
        (lambda: layers.BatchNormalization(epsilon=0), "epsilon"),
        (lambda: layers.LayerNormalization(center="yes"), "center"),
        (lambda: layers.Normalization(mean=[1.0]), "mean, variance"),
        (lambda: layers.Normalization(mean=[1.0, 2.0], variance=[1.0]), "mean, variance"),
        (lambda: layers.LeakyReLU(negative_slope=-1), "negative_slope"),
        (lambda: layers.Activation("nope"), "activation"),
        (lambda: layers.ReLU(max_value=3), "max_value"),
        (lambda: setattr(layers.Dense(2), "trainable", "no"), "trainable"),
        (lambda: layers.Dense(2, input_shape=(2, 3)), "input_shape"),
    ],
)
def test_bad_layer_arguments_are_named(make, argument):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert str(info.value).startswith(argument + ":"), str(info.value)
