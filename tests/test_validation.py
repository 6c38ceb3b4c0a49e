"""Bad input fails at the API boundary, before any work, with a message that
names the argument, what was expected and what was received.

Covers fit, evaluate, predict, train_on_batch and test_on_batch; unknown
names of activations, losses, optimizers, metrics and initializers; and a
hypothesis test that throws random malformed input at every entry point and
accepts nothing but ValueError/TypeError (with the model left untouched).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rng
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpunn
from gpunn.layers import Dense

N, K = 8, 3

# loss, output units, output activation, valid targets
TASKS = {
    "mse": ("mse", 2, "linear", lambda r: r.normal(size=(N, 2))),
    "bce": ("binary_crossentropy", 1, "sigmoid", lambda r: r.integers(0, 2, size=(N, 1)).astype(float)),
    "sparse": ("sparse_categorical_crossentropy", 3, "softmax", lambda r: r.integers(0, 3, size=N)),
    "cce": ("categorical_crossentropy", 3, "softmax", lambda r: np.eye(3)[r.integers(0, 3, size=N)]),
}


def _model(task="mse", built=True):
    loss, units, act, make_y = TASKS[task]
    # an input size declared up front builds the model at construction (as Keras); leave it to the data otherwise
    first = Dense(4, activation="tanh", input_dim=K) if built else Dense(4, activation="tanh")
    model = gpunn.Sequential([first, Dense(units, activation=act)])
    model.compile(optimizer="sgd", loss=loss, metrics=["mae"] if task == "mse" else ["accuracy"])
    return model, rng(0).normal(size=(N, K)), make_y(rng(1))


def _assert_message(exc_info, argument, *fragments):
    msg = str(exc_info.value)
    assert msg.startswith(argument) or f"{argument}:" in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


# ------------------------------------------------------------------ data
def _with_nan(x, where=(2, 1), value=np.nan):
    x = np.array(x, dtype=float)
    x[where] = value
    return x


# (case id, task, kwargs override for fit/evaluate/train_on_batch, error type, argument, fragments)
DATA_CASES = [
    ("x_strings", "mse", dict(x=np.full((N, K), "a")), TypeError, "x", ["numeric", "<U1"]),
    ("x_objects", "mse", dict(x=np.array([[object()] * K] * N)), TypeError, "x", ["numeric", "object"]),
    ("x_ragged", "mse", dict(x=[[1.0, 2.0, 3.0], [1.0]] * 4), TypeError, "x", ["rectangular"]),
    ("x_complex", "mse", dict(x=np.ones((N, K)) * 1j), TypeError, "x", ["real", "complex"]),
    ("x_none", "mse", dict(x=None), TypeError, "x", ["expected", "None"]),
    ("x_nan", "mse", dict(x="nan"), ValueError, "x", ["finite", "NaN", "row 2, column 1"]),
    ("x_inf", "mse", dict(x="inf"), ValueError, "x", ["finite", "infinity"]),
    ("x_overflow", "mse", dict(x="huge"), ValueError, "x", ["float32", "1e+300", "row 2, column 1"]),
    ("x_1d", "mse", dict(x=np.ones(N)), ValueError, "x", ["2-D", "1-D", "(8,)", "reshape"]),
    ("x_3d", "mse", dict(x=np.ones((N, K, 1))), ValueError, "x", ["2-D", "3-D"]),
    ("x_empty", "mse", dict(x=np.ones((0, K)), y=np.ones((0, 2))), ValueError, "x", ["at least one sample", "(0, 3)"]),
    ("x_features", "mse", dict(x=np.ones((N, K + 2))), ValueError, "x", ["expects 3 features", "got 5"]),
    ("y_none", "mse", dict(y=None), ValueError, "y", ["expected targets", "None"]),
    ("y_count", "mse", dict(y=np.ones((N - 3, 2))), ValueError, "y", ["expected 8 targets", "got 5"]),
    ("y_nan", "mse", dict(y="nan"), ValueError, "y", ["finite", "NaN"]),
    ("y_strings", "mse", dict(y=np.full((N, 2), "b")), TypeError, "y", ["numeric"]),
    ("y_width", "mse", dict(y=np.ones((N, 5))), ValueError, "y", ["(8, 2)", "(8, 5)"]),
    ("sw_count", "mse", dict(sample_weight=np.ones(N + 1)), ValueError, "sample_weight", ["expected 8 weights", "got 9"]),
    ("sw_nan", "mse", dict(sample_weight=_with_nan(np.ones(N), 3)), ValueError, "sample_weight", ["finite", "NaN", "row 3"]),
    ("sw_negative", "mse", dict(sample_weight=-np.ones(N)), ValueError, "sample_weight", ["non-negative", "-1"]),
    ("sw_2d", "mse", dict(sample_weight=np.ones((N, 2))), ValueError, "sample_weight", ["1-D", "(8, 2)"]),
    ("sparse_high", "sparse", dict(y=np.r_[np.zeros(N - 1), 3]), ValueError, "y", ["[0, 3)", "3.0"]),
    ("sparse_negative", "sparse", dict(y=np.r_[np.zeros(N - 1), -1]), ValueError, "y", ["[0, 3)", "-1.0"]),
    ("sparse_fraction", "sparse", dict(y=np.r_[np.zeros(N - 1), 0.5]), ValueError, "y", ["integer", "0.5"]),
    ("sparse_one_hot", "sparse", dict(y=np.eye(3)[np.zeros(N, int)]), ValueError, "y", ["class labels", "categorical_crossentropy"]),
    ("binary_high", "bce", dict(y=np.full((N, 1), 2.0)), ValueError, "y", ["[0, 1]", "2.0"]),
    ("binary_negative", "bce", dict(y=np.full((N, 1), -0.5)), ValueError, "y", ["[0, 1]", "-0.5"]),
    ("one_hot_width", "cce", dict(y=np.eye(4)[np.zeros(N, int)]), ValueError, "y", ["(8, 3)", "3 outputs", "(8, 4)"]),
    ("one_hot_labels", "cce", dict(y=np.zeros(N)), ValueError, "y", ["(8, 3)", "sparse_categorical_crossentropy"]),
    ("one_hot_negative", "cce", dict(y=-np.eye(3)[np.zeros(N, int)]), ValueError, "y", ["non-negative", "-1.0"]),
]


def _resolve(value, x, y):
    return {"nan": _with_nan(x), "inf": _with_nan(x, value=np.inf), "huge": _with_nan(x, value=1e300)}.get(value, value) if isinstance(value, str) else value


def _call(model, method, x, y, sample_weight=None, **kwargs):
    if method == "fit":
        return model.fit(x, y, sample_weight=sample_weight, epochs=1, verbose=0, **kwargs)
    if method == "evaluate":
        return model.evaluate(x, y, sample_weight=sample_weight, verbose=0, **kwargs)
    if method == "train_on_batch":
        return model.train_on_batch(x, y, sample_weight=sample_weight, **kwargs)
    if method == "test_on_batch":
        return model.test_on_batch(x, y, sample_weight=sample_weight, **kwargs)
    return model.predict(x, verbose=0, **kwargs)


@pytest.mark.parametrize("method", ["fit", "evaluate", "train_on_batch", "test_on_batch"])
@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_rejected_before_any_work(case, method):
    _, task, override, error, argument, fragments = case
    model, x, y = _model(task)
    before = model.get_weights()
    iterations = model.optimizer.iterations
    args = {"x": x, "y": y, "sample_weight": None}
    for key, value in override.items():
        args[key] = _resolve(value, x if key == "x" else np.asarray(y, dtype=float), y)
    if args["y"] is not None and isinstance(override.get("y"), str):
        args["y"] = _with_nan(y)
    with pytest.raises(error) as info:
        _call(model, method, args["x"], args["y"], args["sample_weight"])
    _assert_message(info, argument, "expect", *fragments)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.optimizer.iterations == iterations


@pytest.mark.parametrize(
    "case", [c for c in DATA_CASES if c[4] == "x" and c[0] != "x_empty"], ids=lambda c: c[0]
)
def test_bad_x_is_rejected_by_predict(case):
    _, task, override, error, argument, fragments = case
    model, x, _ = _model(task)
    with pytest.raises(error) as info:
        model.predict(_resolve(override["x"], x, None), verbose=0)
    _assert_message(info, argument, "expect", *fragments)


def test_predict_empty_and_unbuilt_feature_count():
    model, x, _ = _model(built=False)
    with pytest.raises(ValueError, match=r"x: expected at least one sample, got shape \(0, 3\)"):
        model.predict(np.ones((0, K)))
    assert not model.built  # nothing was allocated
    model.predict(x)
    with pytest.raises(ValueError, match="x: the model expects 3 features per sample, got 2"):
        model.predict(np.ones((2, 2)))


def test_validation_data_is_checked_like_x():
    model, x, y = _model()
    with pytest.raises(ValueError, match="validation_data x: expected finite values, found NaN"):
        model.fit(x, y, validation_data=(_with_nan(x), y), verbose=0)
    with pytest.raises(ValueError, match="validation_data y: expected 8 targets"):
        model.fit(x, y, validation_data=(x, y[:3]), verbose=0)
    with pytest.raises(ValueError, match="validation_data sample_weight: expected finite values"):
        model.fit(x, y, validation_data=(x, y, _with_nan(np.ones(N), 0)), verbose=0)
    with pytest.raises(ValueError, match=r"validation_data: expected a tuple .* got an array of shape \(8, 3\)"):
        model.fit(x, y, validation_data=x, verbose=0)
    with pytest.raises(ValueError, match="validation_split: expected a fraction in \\[0, 1\\), got 1.5"):
        model.fit(x, y, validation_split=1.5, verbose=0)


# -------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, argument, got",
    [
        (dict(batch_size=0), "batch_size", "got 0"),
        (dict(batch_size=-4), "batch_size", "got -4"),
        (dict(batch_size=2.5), "batch_size", "got 2.5"),
        (dict(batch_size="8"), "batch_size", "got '8'"),
        (dict(batch_size=True), "batch_size", "got True"),
        (dict(epochs=-1), "epochs", "got -1"),
        (dict(epochs=1.5), "epochs", "got 1.5"),
        (dict(initial_epoch=-1), "initial_epoch", "got -1"),
        (dict(verbose=3), "verbose", "got 3"),
        (dict(verbose="loud"), "verbose", "got 'loud'"),
        (dict(verbose=-1), "verbose", "got -1"),
        (dict(validation_freq=0), "validation_freq", "got 0"),
        (dict(validation_batch_size=0), "validation_batch_size", "got 0"),
        (dict(shuffle="yes"), "shuffle", "got 'yes'"),
        (dict(callbacks="EarlyStopping"), "callbacks", "got str"),
        (dict(class_weight=[1, 2]), "class_weight", "got list"),
    ],
)
def test_bad_fit_arguments(kwargs, argument, got):
    model, x, y = _model()
    before = model.get_weights()
    kwargs.setdefault("verbose", 0)
    with pytest.raises((ValueError, TypeError)) as info:
        model.fit(x, y, **kwargs)
    _assert_message(info, argument, "expect", got)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("method", ["evaluate", "predict"])
@pytest.mark.parametrize("kwargs, argument", [(dict(batch_size=0), "batch_size"), (dict(verbose=7), "verbose"), (dict(verbose="x"), "verbose")])
def test_bad_evaluate_and_predict_arguments(method, kwargs, argument):
    model, x, y = _model()
    call = model.evaluate if method == "evaluate" else model.predict
    args = (x, y) if method == "evaluate" else (x,)
    with pytest.raises(ValueError) as info:
        call(*args, **kwargs)
    _assert_message(info, argument, "expect", "got")


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.1", None])  # 0 is taken, as in Keras
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_non_positive_learning_rate(name, lr):
    with pytest.raises(ValueError) as info:
        getattr(gpunn.optimizers, name)(learning_rate=lr)
    _assert_message(info, "learning_rate", "expected", repr(lr))
    opt = gpunn.optimizers.get(name.lower())
    with pytest.raises(ValueError, match="learning_rate: expected"):
        opt.learning_rate = lr  # schedules and ReduceLROnPlateau go through the same check


# ------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "make, argument, got, suggestion, listed",
    [
        (lambda: Dense(2, activation="rleu"), "activation", "'rleu'", "'relu'", "leaky_relu"),
        (lambda: Dense(2, activation="softmx"), "activation", "'softmx'", "'softmax'", "gelu"),
        (lambda: _model()[0].compile("sgd", "mean_sqared_error"), "loss", "'mean_sqared_error'", "'mean_squared_error'", "binary_crossentropy"),
        (lambda: _model()[0].compile("adm", "mse"), "optimizer", "'adm'", "'adam'", "rmsprop"),
        (lambda: _model()[0].compile({"name": "rmsprop2"}, "mse"), "optimizer", "'rmsprop2'", "'rmsprop'", "sgd"),
        (lambda: _model()[0].compile("sgd", "mse", metrics=["acuracy"]), "metrics", "'acuracy'", "'accuracy'", "precision"),
        (lambda: _model()[0].compile("sgd", "mse", metrics=["recal"]), "metrics", "'recal'", "'recall'", "accuracy"),
        (lambda: Dense(2, kernel_initializer="he_unifrom"), "kernel_initializer", "'he_unifrom'", "'he_uniform'", "glorot_uniform"),
        (lambda: Dense(2, bias_initializer="zero"), "bias_initializer", "'zero'", "'zeros'", "ones"),
    ],
)
def test_unknown_names_list_valid_ones_and_suggest(make, argument, got, suggestion, listed):
    with pytest.raises(ValueError) as info:
        make()
    _assert_message(info, argument, "unknown", got, "expected one of", listed, f"did you mean {suggestion}")


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: Dense(2, activation=3), "activation"),
        (lambda: _model()[0].compile("sgd", 3), "loss"),
        (lambda: _model()[0].compile(3, "mse"), "optimizer"),
        (lambda: _model()[0].compile("sgd", "mse", metrics=[3]), "metrics"),
        (lambda: _model()[0].compile("sgd", "mse", metrics="accuracy"), "metrics"),
        (lambda: _model()[0].compile("sgd", None), "loss"),
    ],
)
def test_wrong_types_for_names(make, argument):
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    _assert_message(info, argument, "expected")


@pytest.mark.parametrize("bad", [dict(optimizer="adm"), dict(loss="msee"), dict(metrics=["acuracy"])])
def test_failed_compile_leaves_the_model_as_it_was(bad):
    model, x, y = _model()
    optimizer, loss = model.optimizer, model.loss
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError):
        model.compile(**{"optimizer": "adam", "loss": "mae", "metrics": [], **bad})
    assert model.optimizer is optimizer and model.loss is loss
    model.fit(x, y, epochs=1, verbose=0)  # still trains


def test_uncompiled_calls_say_so():
    model = gpunn.Sequential([Dense(1, input_dim=K)])
    for call in (lambda: model.fit(np.ones((2, K)), np.ones(2)), lambda: model.evaluate(np.ones((2, K)), np.ones(2))):
        with pytest.raises(RuntimeError, match="must be compiled first"):
            call()


# ------------------------------------------------------- random malformed input
def _valid(task, seed):
    model, x, y = _model(task)
    return model, x, np.asarray(y, dtype=float)


_BAD_X = st.one_of(
    st.tuples(st.just("ndim"), st.sampled_from([0, 1, 3, 4])),
    st.tuples(st.just("features"), st.integers(1, 9).filter(lambda k: k != K)),
    st.tuples(st.just("rows"), st.just(0)),
    st.tuples(st.just("nonfinite"), st.sampled_from([np.nan, np.inf, -np.inf, 1e39])),
    st.tuples(st.just("dtype"), st.sampled_from(["U3", "O", "complex128", "datetime64[s]", "S2"])),
    st.tuples(st.just("ragged"), st.integers(0, N - 1)),
    st.tuples(st.just("none"), st.none()),
    st.tuples(st.just("scalar"), st.one_of(st.floats(allow_nan=False), st.text(max_size=3))),
)
_BAD_Y = st.one_of(
    st.tuples(st.just("count"), st.integers(1, 2 * N).filter(lambda n: n != N)),
    st.tuples(st.just("nonfinite"), st.sampled_from([np.nan, np.inf])),
    st.tuples(st.just("range"), st.sampled_from([-1.0, 1.5, 3.0, 7.0, -0.25])),
    st.tuples(st.just("width"), st.integers(4, 6)),
    st.tuples(st.just("text"), st.text(min_size=1, max_size=3)),
)
_BAD_W = st.one_of(
    st.tuples(st.just("count"), st.integers(0, 2 * N).filter(lambda n: n != N)),
    st.tuples(st.just("nonfinite"), st.sampled_from([np.nan, np.inf])),
    st.tuples(st.just("negative"), st.floats(-1e6, -1e-6)),
    st.tuples(st.just("shape"), st.integers(2, 4)),
)
_BAD_ARG = st.one_of(
    st.tuples(st.just("batch_size"), st.one_of(st.integers(-5, 0), st.floats(0.1, 9.9), st.text(max_size=2), st.just(True))),
    st.tuples(st.just("verbose"), st.one_of(st.integers(3, 9), st.integers(-5, -1), st.text(min_size=1, max_size=4).filter(lambda s: s != "auto"))),
    st.tuples(st.just("epochs"), st.one_of(st.integers(-9, -1), st.floats(0.1, 3.9))),
)


def _corrupt_x(x, kind, param, r):
    if kind == "ndim":
        return np.ones((N,) + (K,) * (param - 1)) if param else np.float64(1.0)
    if kind == "features":
        return r.normal(size=(N, param))
    if kind == "rows":
        return np.ones((0, K))
    if kind == "nonfinite":
        x = x.copy()
        x[r.integers(0, N), r.integers(0, K)] = param
        return x
    if kind == "dtype":
        return np.zeros((N, K), dtype=param) if param != "O" else np.full((N, K), None, dtype=object)
    if kind == "ragged":
        rows = x.tolist()
        rows[param] = rows[param][:-1]
        return rows
    return param


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task=st.sampled_from(sorted(TASKS)),
    method=st.sampled_from(["fit", "evaluate", "train_on_batch", "test_on_batch", "predict"]),
    bad_x=st.one_of(st.none(), _BAD_X),
    bad_y=st.one_of(st.none(), _BAD_Y),
    bad_w=st.one_of(st.none(), _BAD_W),
    bad_arg=st.one_of(st.none(), _BAD_ARG),
    seed=st.integers(0, 2**16),
)
def test_random_malformed_input_raises_only_value_or_type_errors(task, method, bad_x, bad_y, bad_w, bad_arg, seed):
    r = np.random.default_rng(seed)
    model, x, y = _valid(task, seed)
    w = np.ones(N)
    arguments = set()
    if bad_x is not None:
        x = _corrupt_x(x, *bad_x, r)
        arguments.add("x")
    if method != "predict":
        if bad_y is not None:
            kind, param = bad_y
            if kind == "count":
                y = y[:param] if param <= N else np.concatenate([y, y])[:param]
            elif kind == "nonfinite":
                y = y.copy()
                y.reshape(N, -1)[r.integers(0, N), 0] = param
            elif kind == "range":
                if task == "mse":  # any real target is fine for mse: make it non-finite instead
                    param = np.nan
                y = y.copy()
                y.reshape(N, -1)[r.integers(0, N), 0] = param
            elif kind == "width":
                y = np.zeros((N, param))
            else:
                y = np.full(y.shape, param)
            arguments.add("y")
        if bad_w is not None and method != "predict":
            kind, param = bad_w
            w = {"count": lambda: np.ones(param), "shape": lambda: np.ones((N, param))}.get(kind, lambda: None)()
            if w is None:
                w = np.ones(N)
                w[r.integers(0, N)] = param
            arguments.add("sample_weight")
    kwargs = {}
    if bad_arg is not None and (method in ("fit", "evaluate", "predict") or bad_arg[0] not in ("batch_size", "verbose", "epochs")):
        name, value = bad_arg
        if name == "epochs" and method != "fit":
            name = "batch_size"
            value = 0
        kwargs[name] = value
        arguments.add(name)
    if not arguments or (method == "predict" and arguments <= {"y", "sample_weight"}):
        x = np.full((N, K), np.nan)
        arguments.add("x")
    before = model.get_weights()
    with pytest.raises((ValueError, TypeError)) as info:
        if method == "fit":
            model.fit(x, y, sample_weight=w, **{"verbose": 0, **kwargs})
        elif method == "evaluate":
            model.evaluate(x, y, sample_weight=w, **{"verbose": 0, **kwargs})
        elif method == "predict":
            model.predict(x, **{"verbose": 0, **kwargs})
        elif method == "train_on_batch":
            model.train_on_batch(x, y, sample_weight=w)
        else:
            model.test_on_batch(x, y, sample_weight=w)
    message = str(info.value)
    assert any(message.startswith(a) for a in arguments), (arguments, message)
    assert "expect" in message or "unknown" in message, message
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
