"""ONNX export: the graph ONNX Runtime runs gives what ``predict`` gives (<= 1e-5 in float32)."""

import csv
import json
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from scipy import special

import gpunn
from gpunn import onnx_export
from gpunn.activations import Activation
from gpunn.cli import load_preprocessing, main

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def numpy_backend():
    gpunn.set_backend("numpy")


def run_onnx(path, feeds):
    onnx.checker.check_model(os.fspath(path), full_check=True)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session, session.run(None, feeds)


def two_layer_model(activation, dtype=None, seed=0):
    gpunn.set_seed(seed)
    model = gpunn.Sequential(
        [gpunn.Input(shape=(5,)), gpunn.layers.Dense(7, activation=activation), gpunn.layers.Dense(3, activation=activation)],
        dtype=dtype,
    )
    model.build()
    return model


@pytest.mark.parametrize("name", gpunn.activations.names())
def test_export_matches_predict_for_every_activation(tmp_path, name):
    model = two_layer_model(name)
    path = tmp_path / "model.onnx"
    model.export(path, format="onnx")
    if name == "exponential":  # exp of exp: keep the outputs well inside float32's range
        x = np.random.default_rng(1).normal(scale=0.3, size=(37, 5)).astype(np.float32)
    else:
        x = np.random.default_rng(1).normal(scale=1.5, size=(37, 5)).astype(np.float32)
        x[0] = [8, -8, 30, -30, 0]  # saturating inputs for sigmoid-like activations
    session, (out,) = run_onnx(path, {"features": x})
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    assert session.get_inputs()[0].shape == ["batch", 5]  # dynamic batch dimension
    expected = model.predict(x, verbose=0)
    assert out.dtype == np.float32 and out.shape == expected.shape
    assert np.abs(out - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())
    # the same file serves other batch sizes
    (one,) = session.run(None, {"features": x[5:6]})
    assert np.abs(one - expected[5:6]).max() <= TOLERANCE * max(1.0, np.abs(expected).max())


# Keras 3's definitions, in float64, independent of gpunn's own code.
KERAS3 = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.2 * z),
    "sigmoid": special.expit,
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1 + special.erf(z / math.sqrt(2))),
    "softmax": lambda z: special.softmax(z, axis=-1),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "selu": lambda z: 1.05070098 * np.where(z > 0, z, 1.67326324 * np.expm1(np.minimum(z, 0))),
    "softplus": lambda z: np.logaddexp(z, 0),
    "softsign": lambda z: z / (np.abs(z) + 1),
    "swish": lambda z: z * special.expit(z),
    "silu": lambda z: z * special.expit(z),
    "relu6": lambda z: np.minimum(np.maximum(z, 0), 6),
    "hard_sigmoid": lambda z: np.minimum(np.maximum(z + 3, 0), 6) / 6,
    "mish": lambda z: z * np.tanh(np.logaddexp(z, 0)),
    "exponential": np.exp,
}


def test_every_gpunn_activation_has_a_keras_reference_here():
    assert set(gpunn.activations.names()) <= set(KERAS3) == set(onnx_export.supported_activations())


@pytest.mark.parametrize("name", sorted(KERAS3))
def test_activation_graph_matches_keras3_definition(name):
    """Each ONNX mapping alone, on a grid reaching far into saturation, against Keras 3's formula."""
    builder = onnx_export._GraphBuilder(onnx)
    alpha = {"leaky_relu": 0.2, "elu": 1.0}.get(name, 0.0)
    out = onnx_export.ACTIVATION_BUILDERS[name](builder, "z", Activation(name, 0, alpha))
    builder.op("Identity", [out], output="y")
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        builder.nodes, "act", [value("z", onnx.TensorProto.FLOAT, ["n", 4])], [value("y", onnx.TensorProto.FLOAT, ["n", 4])], builder.initializers
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET)], ir_version=onnx_export.IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    top = 20.0 if name == "exponential" else 60.0
    z = np.linspace(-top, top, 4000).reshape(-1, 4).astype(np.float32)
    (y,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"z": z})
    expected = KERAS3[name](z.astype(np.float64))
    assert np.isfinite(y).all()
    assert np.all(np.abs(y - expected) <= 2e-6 * np.maximum(1.0, np.abs(expected)))


def test_float64_model_exports_as_float32_with_a_note(tmp_path):
    model = two_layer_model("gelu", dtype="float64")
    path = tmp_path / "double.onnx"
    with pytest.warns(UserWarning, match="float32"):
        model.export(path)
    proto = onnx.load(path)
    assert "float32" in proto.graph.doc_string and "ONNX Runtime" in proto.graph.doc_string
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(2).normal(size=(11, 5))
    _, (out,) = run_onnx(path, {"features": x.astype(np.float32)})
    assert np.abs(out - model.predict(x, verbose=0)).max() <= TOLERANCE


def test_layers_without_bias_and_a_custom_leaky_slope(tmp_path):
    gpunn.set_seed(3)
    model = gpunn.Sequential(
        [
            gpunn.Input(shape=(4,)),
            gpunn.layers.Dense(6, activation=gpunn.activations.leaky_relu(0.05), use_bias=False),
            gpunn.layers.Dense(2, activation={"name": "leaky_relu", "alpha": 0.7}),
        ]
    )
    model.build()
    model.export(tmp_path / "m.onnx")
    assert [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node][:2] == ["MatMul", "LeakyRelu"]
    x = np.random.default_rng(6).normal(size=(9, 4)).astype(np.float32)
    _, (out,) = run_onnx(tmp_path / "m.onnx", {"features": x})
    assert np.abs(out - model.predict(x, verbose=0)).max() <= TOLERANCE


def test_export_metadata_names_and_errors(tmp_path):
    model = two_layer_model("relu")
    path = tmp_path / "m.onnx"
    model.export(path, input_name="x", output_name="scores")
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["scores"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["gpunn_config"])["layers"][0]["units"] == 7
    assert proto.opset_import[0].version == onnx_export.OPSET
    before = path.read_bytes()
    with pytest.raises(ValueError, match="format: expected 'onnx'.*'tf_saved_model'"):
        model.export(path, format="tf_saved_model")
    model.layers[0].activation = Activation("made_up", 0)
    with pytest.raises(NotImplementedError, match="made_up"):
        model.export(path)
    assert path.read_bytes() == before  # a failed export leaves the previous file
    with pytest.raises(ValueError, match="input_name: 'y' is also the name of an output"):
        model.export(path, input_name="y", output_name="y")
    with pytest.raises(ValueError, match="not built"):
        gpunn.Sequential([gpunn.layers.Dense(2)]).export(tmp_path / "unbuilt.onnx")


# ---------------------------------------------------------------- command line
def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_cli_trained_model_exports_with_its_preprocessing(tmp_path, task):
    rng = np.random.default_rng(3)
    # raw features on very different scales: the graph must standardize them itself
    X = rng.normal(size=(120, 3)) * [1.0, 250.0, 0.01] + [5.0, 3000.0, -1.0]
    signal = (X[:, 0] - 5) + (X[:, 1] - 3000) / 250
    target = {
        "binary": np.where(signal > 0, "yes", "no"),
        "multiclass": np.array(["low", "mid", "high"])[np.digitize(signal, [-0.7, 0.7])],
        "regression": 40 * signal + 500 + rng.normal(size=120),
    }[task]
    data = tmp_path / "data.csv"
    write_csv(data, ["age", "income", "ratio", "outcome"], [[*map(repr, row), t] for row, t in zip(X.tolist(), target)])
    model_path, onnx_path, preds = tmp_path / "m.gpunn", tmp_path / "m.onnx", tmp_path / "p.csv"
    runner = CliRunner()
    for args in (
        ["train", "--data", data, "--target", "outcome", "--epochs", "3", "--verbose", "0", "--activation", "tanh", "--save", model_path],
        ["export", model_path, "--format", "onnx", "--out", onnx_path],
        ["predict", model_path, data, "--out", preds],
    ):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert "Wrote onnx model" in result.output or onnx_path.exists()
    session, outputs = run_onnx(onnx_path, {"features": X})
    props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert json.loads(props["feature_names"]) == ["age", "income", "ratio"]
    header, rows = read_csv(preds)
    model = gpunn.load_model(model_path, compile=False)
    info = load_preprocessing(model_path)  # what `gpunn predict` applies, stored in the model file
    standardized = (X - info["scaler"]["mean"]) / info["scaler"]["scale"]
    network = model.predict(standardized, verbose=0).astype(np.float64)
    if task == "regression":
        (prediction,) = outputs
        assert [o.name for o in session.get_outputs()] == ["prediction"] and prediction.shape == (120,)
        in_units = network[:, 0] * info["target_scaler"]["scale"] + info["target_scaler"]["mean"]
        assert np.abs(prediction - in_units).max() <= TOLERANCE * info["target_scaler"]["scale"]
        assert np.allclose(prediction, [float(r[0]) for r in rows], rtol=1e-5)
    else:
        label, probabilities = outputs
        assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]
        expected = np.column_stack([1 - network[:, 0], network[:, 0]]) if task == "binary" else network
        assert np.abs(probabilities - expected).max() <= TOLERANCE
        assert label.tolist() == [r[0] for r in rows]  # the labels `gpunn predict` writes
        assert header[1:] == [f"prob_{c}" for c in info["class_labels"]]


def test_cli_export_of_a_python_saved_model_and_errors(tmp_path):
    model = two_layer_model("sigmoid")
    model.save(tmp_path / "plain.gpunn")
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(tmp_path / "plain.gpunn"), "--out", str(tmp_path / "plain.onnx")])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(4).normal(size=(6, 5)).astype(np.float32)
    _, (out,) = run_onnx(tmp_path / "plain.onnx", {"features": x})
    assert np.abs(out - model.predict(x, verbose=0)).max() <= TOLERANCE
    result = runner.invoke(main, ["export", str(tmp_path / "plain.gpunn"), "--format", "tflite", "--out", "x"])
    assert result.exit_code == 2 and "tflite" in result.output
    (tmp_path / "plain.gpunn.preprocess.json").write_text(json.dumps({"format": "other"}))
    result = runner.invoke(main, ["export", str(tmp_path / "plain.gpunn"), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "not a gpunn preprocessing description" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.onnx").exists()


def test_dataframe_trained_model_records_its_column_order(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(np.random.default_rng(5).normal(size=(20, 3)), columns=["b", "a", "c"])
    model = gpunn.Sequential([gpunn.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(frame, np.arange(20) % 2, epochs=1, verbose=0)
    model.export(tmp_path / "frame.onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path / "frame.onnx").metadata_props}
    assert json.loads(props["feature_names"]) == ["b", "a", "c"]
    _, (out,) = run_onnx(tmp_path / "frame.onnx", {"features": frame.to_numpy(np.float32)})
    assert np.abs(out - model.predict(frame[["c", "a", "b"]], verbose=0)).max() <= TOLERANCE


def test_without_onnx_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    model = two_layer_model("relu")
    model.save(tmp_path / "m.gpunn")
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # as if onnx were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'gpunn\[onnx\]'"):
        model.export(tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "m.gpunn"), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "gpunn[onnx]" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- every layer
L = gpunn.layers


def _layer_cases():
    """One model per layer kind (between Dense layers, so each sees non-trivial inputs), and mixed stacks."""
    return {
        "activation": lambda: [L.Dense(6), L.Activation("gelu"), L.Dense(3)],
        "relu": lambda: [L.Dense(6), L.ReLU(), L.Dense(3)],
        "relu6": lambda: [L.Dense(6), L.ReLU(max_value=6), L.Dense(3)],
        "leaky_relu": lambda: [L.Dense(6), L.LeakyReLU(negative_slope=0.15), L.Dense(3)],
        "softmax": lambda: [L.Dense(6), L.Dense(3), L.Softmax()],
        "flatten": lambda: [L.Flatten(), L.Dense(3, activation="tanh")],
        "elu_identity_rescaling": lambda: [L.Rescaling(0.25, offset=-0.5), L.Dense(6), L.ELU(alpha=0.7), L.Identity(), L.Dense(3)],
        "dropout": lambda: [L.Dense(6, activation="relu"), L.Dropout(0.4), L.Dense(3)],
        "gaussian_noise": lambda: [L.GaussianNoise(0.5), L.Dense(6, activation="relu"), L.Dense(3)],
        "batch_normalization": lambda: [L.Dense(6), L.BatchNormalization(momentum=0.5), L.Dense(3)],
        "batch_normalization_no_affine": lambda: [L.Dense(6), L.BatchNormalization(center=False, scale=False, epsilon=0.1), L.Dense(3)],
        "layer_normalization": lambda: [L.Dense(6), L.LayerNormalization(epsilon=1e-5), L.Dense(3)],
        "layer_normalization_scale_only": lambda: [L.Dense(6), L.LayerNormalization(center=False), L.Dense(3)],
        "normalization": lambda: [L.Normalization(), L.Dense(3, activation="sigmoid")],
        "normalization_invert": lambda: [L.Normalization(invert=True), L.Dense(3)],
        "mixed": lambda: [L.Normalization(), L.Dense(8), L.BatchNormalization(), L.LeakyReLU(), L.Dropout(0.2),
                          L.Dense(8, activation="swish"), L.LayerNormalization(), L.GaussianNoise(0.1),
                          L.Dense(5), L.Activation("elu"), L.Dense(3), L.Softmax()],  # fmt: skip
    }


def _trained_stack(name, dtype=None):
    """The case's model trained a few steps (BatchNormalization's moving statistics and every
    gamma/beta move away from their initial values), Normalization adapted on shifted data."""
    gpunn.set_seed(3)
    r = np.random.default_rng(4)
    x = r.normal(loc=2.0, scale=3.0, size=(64, 5))
    y = r.normal(size=(64, 3))
    stack = _layer_cases()[name]()
    for layer in stack:
        if isinstance(layer, L.Normalization):
            layer.adapt(x)
    model = gpunn.Sequential([gpunn.Input(shape=(5,)), *stack], dtype=dtype)
    model.compile(optimizer=gpunn.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    return model, x


@pytest.mark.parametrize("name", sorted(_layer_cases()))
def test_every_layer_exports_and_matches_predict(tmp_path, name):
    model, x_train = _trained_stack(name)
    weights = model.get_weights()
    path = tmp_path / "stack.onnx"
    model.export(path)
    x = (np.random.default_rng(5).normal(loc=2.0, scale=3.0, size=(29, 5))).astype(np.float32)
    session, (out,) = run_onnx(path, {"features": x})
    expected = model.predict(x, verbose=0)
    assert out.shape == expected.shape == (29, model.output_dim)
    assert np.abs(out - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())
    # inference meaning: a Dropout / GaussianNoise model's predict is deterministic, and export changed nothing
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    for got, want in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(got, want)
    ops = {node.op_type for node in onnx.load(path).graph.node}
    if "batch_normalization" in name or name == "mixed":
        assert "BatchNormalization" in ops
    if "layer_normalization" in name or name == "mixed":
        assert "LayerNormalization" in ops and onnx_export.OPSET >= 17


def test_statistics_are_the_inference_ones(tmp_path):
    """BatchNormalization exports its moving statistics, written from Keras's formula here."""
    gpunn.set_seed(0)
    bn = L.BatchNormalization(epsilon=0.01)
    model = gpunn.Sequential([gpunn.Input(shape=(4,)), bn])
    r = np.random.default_rng(6)
    gamma, beta, mm, mv = r.normal(size=4), r.normal(size=4), r.normal(size=4), r.uniform(0.5, 2.0, 4)
    model.set_weights([gamma, beta, mm, mv])
    path = tmp_path / "bn.onnx"
    model.export(path)
    x = r.normal(size=(9, 4)).astype(np.float32)
    _, (out,) = run_onnx(path, {"features": x})
    keras = gamma * (x - mm) / np.sqrt(mv + 0.01) + beta
    np.testing.assert_allclose(out, keras, rtol=1e-5, atol=1e-5)


def test_image_shaped_input_is_flattened_in_the_graph(tmp_path):
    gpunn.set_seed(1)
    model = gpunn.Sequential([gpunn.Input(shape=(3, 4)), L.Flatten(), L.Dense(5, activation="relu"), L.Dense(2)])
    path = tmp_path / "img.onnx"
    model.export(path)
    x = np.random.default_rng(7).normal(size=(6, 3, 4)).astype(np.float32)
    session, (out,) = run_onnx(path, {"features": x})
    assert session.get_inputs()[0].shape == ["batch", 3, 4]
    expected = model.predict(x, verbose=0)
    assert np.abs(out - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())


def test_float64_stack_exports_as_float32(tmp_path):
    model, _ = _trained_stack("mixed", dtype="float64")
    path = tmp_path / "mixed64.onnx"
    with pytest.warns(UserWarning, match="float32"):
        model.export(path)
    x = np.random.default_rng(8).normal(loc=2.0, scale=3.0, size=(11, 5))
    _, (out,) = run_onnx(path, {"features": x.astype(np.float32)})
    np.testing.assert_allclose(out, model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
