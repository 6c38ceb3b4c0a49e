"""Export a trained model to a standard ONNX graph, for ONNX Runtime and other servers.

    model.export("model.onnx")                    # Keras 3's spelling, format="onnx"
    gpunn export clf.gpunn --format onnx --out clf.onnx

The graph is plain opset-18 ONNX with a dynamic batch dimension; every layer
gpunn has maps to standard operators, with its inference meaning: Dense is one
``Gemm`` (``MatMul`` without a bias) followed by the activation's operators;
Activation, ReLU, LeakyReLU and Softmax are the activation's operators;
BatchNormalization is ``BatchNormalization`` (inference mode, the moving
statistics); LayerNormalization is ``LayerNormalization`` (opset 17+);
Normalization is ``Sub``/``Div`` by its adapted mean and
``max(sqrt(variance), 1e-7)``; Dropout and GaussianNoise add nothing (the
identity at inference); Flatten is ``Flatten`` (a model declared with n-D
samples, ``Input(shape=(8, 8))`` then ``Flatten()``, takes them as declared).  Every file is checked with ``onnx.checker.check_model(...,
full_check=True)`` before it is written (atomically: a failed export leaves
an existing file untouched).

Graph inputs and outputs
------------------------
A model exported from Python takes ``features`` (batch, n_features) float32
and returns ``output`` (batch, units) float32: exactly what ``predict``
returns, softmax and sigmoid included.

A model trained by ``gpunn train`` (with its ``MODEL.preprocess.json``)
exports with the command line's preprocessing inside the graph, so it takes
raw rows as the CSV holds them: ``features`` (batch, n_features) float64 in
the order of the training file's columns (listed in the graph's
``feature_names`` metadata).  The standardization ``(x - mean) / scale``
runs in float64, as ``gpunn predict`` does, then the network in float32.
Outputs, as ``gpunn predict`` writes them:

- classification: ``label`` (batch,) string, the predicted class label, and
  ``probabilities`` (batch, classes) float32 in ``class_labels`` order
  (for a binary model the columns are ``1 - p`` and ``p``);
- regression: ``prediction`` (batch,) float64, in the target's units.

Precision: the graph computes in float32.  A float64 model is exported with
its weights rounded to float32 (ONNX Runtime's CPU provider has no float64
kernels for some of the operators used, e.g. ``Erf`` for GELU); a
``UserWarning`` and the graph's doc string say so.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np

from gpunn import opmath

#: ONNX operator-set version of the exported graphs: 18 is read by ONNX Runtime >= 1.14
OPSET = 18
#: IR version matching OPSET, so older runtimes accept the file
IR_VERSION = 8

#: keys of a ``gpunn train`` preprocessing file that the exporter knows how to put in the graph
_KNOWN_PREPROCESSING = frozenset(
    {"format", "format_version", "source", "task", "target", "feature_names", "scaler", "class_labels", "target_scaler"}
)

FLOAT64_NOTE = (
    "The model computes in float64; the ONNX graph computes in float32 (its weights are rounded to float32), "
    "because ONNX Runtime's CPU provider lacks float64 kernels for some operators (e.g. Erf, used by GELU). "
    "Its outputs differ from predict() by float32 rounding."
)


def _gpunn_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gpunn")
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


def _require_onnx():
    try:
        import onnx
    except ModuleNotFoundError as exc:
        if exc.name != "onnx":
            raise
        raise ModuleNotFoundError(
            "export(format='onnx') needs the onnx package: pip install 'gpunn[onnx]'", name="onnx"
        ) from None
    return onnx


class _GraphBuilder:
    """Collects nodes and constant initializers with unique names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes = []
        self.initializers = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, value, dtype=np.float32) -> str:
        name = self.fresh(stem)
        array = np.asarray(value, dtype=dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def string_const(self, stem: str, values) -> str:
        name = self.fresh(stem)
        tensor = self.helper.make_tensor(
            name, self.onnx.TensorProto.STRING, [len(values)], [str(v).encode("utf-8") for v in values]
        )
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, inputs, output=None, **attributes) -> str:
        output = output or self.fresh(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], name=self.fresh(op_type), **attributes))
        return output


# ----------------------------------------------------------------- activations
# Each maps the pre-activation tensor name to the activation's output name,
# with the meaning gpunn (and Keras 3) gives the activation.


def _gelu(g, x, act):
    # exact GELU (Keras 3's default, approximate=False): 0.5 x (1 + erf(x / sqrt 2))
    scaled = g.op("Mul", [x, g.const("inv_sqrt2", 1.0 / math.sqrt(2.0))])
    cdf = g.op("Add", [g.op("Erf", [scaled]), g.const("one", 1.0)])
    return g.op("Mul", [g.op("Mul", [x, cdf]), g.const("half", 0.5)])


def _swish(g, x, act):
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _mish(g, x, act):
    return g.op("Mul", [x, g.op("Tanh", [g.op("Softplus", [x])])])


def _relu6(g, x, act):
    return g.op("Clip", [x, g.const("zero", 0.0), g.const("six", 6.0)])


def _hard_sigmoid(g, x, act):
    # Keras 3: relu6(x + 3) / 6, i.e. clip(x / 6 + 1/2, 0, 1)
    return g.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)


def _elu(g, x, act):
    # gpunn keeps ELU's alpha (Keras's default 1.0) on the Activation, as for leaky ReLU
    return g.op("Elu", [x], alpha=float(act.alpha))


def _selu(g, x, act):
    # gpunn's (Keras 3's) constants: ONNX's defaults are their float32 roundings
    return g.op("Selu", [x], alpha=opmath.SELU_ALPHA, gamma=opmath.SELU_SCALE)


def _leaky_relu(g, x, act):
    return g.op("LeakyRelu", [x], alpha=float(act.alpha))


def _single(op_type):
    def apply(g, x, act):
        return g.op(op_type, [x])

    apply.__name__ = op_type.lower()
    return apply


#: activation name -> builder(graph, x, Activation) -> output name
ACTIVATION_BUILDERS = {
    "linear": lambda g, x, act: x,
    "relu": _single("Relu"),
    "leaky_relu": _leaky_relu,
    "sigmoid": _single("Sigmoid"),
    "tanh": _single("Tanh"),
    "gelu": _gelu,
    "softmax": lambda g, x, act: g.op("Softmax", [x], axis=-1),
    "elu": _elu,
    "selu": _selu,
    "softplus": _single("Softplus"),
    "softsign": _single("Softsign"),
    "swish": _swish,
    "silu": _swish,
    "relu6": _relu6,
    "hard_sigmoid": _hard_sigmoid,
    "mish": _mish,
    "exponential": _single("Exp"),
}


def supported_activations() -> list[str]:
    """Names of the activations the exporter can write."""
    return sorted(ACTIVATION_BUILDERS)


def _check_mapped(act) -> None:
    if act.name not in ACTIVATION_BUILDERS:
        raise NotImplementedError(
            f"export: no ONNX mapping for the activation {act.name!r} (supported: {', '.join(supported_activations())})"
        )


def _activation(g, x, act) -> str:
    _check_mapped(act)
    return ACTIVATION_BUILDERS[act.name](g, x, act)


# ----------------------------------------------------------------- layers
# Each maps a layer's input tensor name to its output name, with the meaning the
# layer has in ``predict`` (inference: Dropout and GaussianNoise pass inputs
# through, BatchNormalization uses its moving statistics).


def _weights(layer) -> dict:
    """The layer's weights by attribute name (``kernel``, ``moving_mean``, ...), as NumPy arrays."""
    return {spec.attr: value for spec, value in zip(layer.weight_specs(layer.input_dim), layer.get_weights())}


def _dense(g, layer, x):
    w = _weights(layer)
    kernel = g.const(f"{layer.name}_kernel", w["kernel"])
    if layer.use_bias:
        z = g.op("Gemm", [x, kernel, g.const(f"{layer.name}_bias", w["bias"])])
    else:
        z = g.op("MatMul", [x, kernel])
    return _activation(g, z, layer.activation)


def _activation_layer(g, layer, x):
    # Activation, ReLU, LeakyReLU and Softmax all carry the activation they apply
    return _activation(g, x, layer.activation)


def _identity_at_inference(g, layer, x):
    return x


def _rescaling(g, layer, x):
    # x * scale + offset
    scaled = g.op("Mul", [x, g.const(f"{layer.name}_scale", np.asarray(layer.scale))])
    return g.op("Add", [scaled, g.const(f"{layer.name}_offset", np.asarray(layer.offset))])


def _flatten(g, layer, x):
    # samples reach the first layer as declared (e.g. (batch, 8, 8)); later a Flatten sees rows already
    return g.op("Flatten", [x], axis=1)


def _affine_inputs(g, layer, w):
    """LayerNormalization's / BatchNormalization's scale and bias inputs (ones / zeros when the
    layer has no gamma / beta, as ``scale=False`` / ``center=False`` mean)."""
    n = layer.input_dim
    gamma = w.get("gamma", np.ones(n))
    beta = w.get("beta", np.zeros(n))
    return g.const(f"{layer.name}_gamma", gamma), g.const(f"{layer.name}_beta", beta)


def _batch_normalization(g, layer, x):
    # inference: gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta (ONNX's inference mode)
    w = _weights(layer)
    gamma, beta = _affine_inputs(g, layer, w)
    mean = g.const(f"{layer.name}_moving_mean", w["moving_mean"])
    var = g.const(f"{layer.name}_moving_variance", w["moving_variance"])
    return g.op("BatchNormalization", [x, gamma, beta, mean, var], epsilon=float(layer.epsilon))


def _layer_normalization(g, layer, x):
    # per row: gamma * (x - mean) / sqrt(var + epsilon) + beta (biased variance): ONNX LayerNormalization, opset >= 17
    gamma, beta = _affine_inputs(g, layer, _weights(layer))
    return g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=float(layer.epsilon))


def _normalization(g, layer, x):
    # (x - mean) / max(sqrt(variance), 1e-7); invert: mean + x * max(sqrt(variance), 1e-7)
    w = _weights(layer)
    denom = np.maximum(np.sqrt(w["variance"].astype(np.float64)), layer.EPSILON)
    mean = g.const(f"{layer.name}_mean", w["mean"])
    scale = g.const(f"{layer.name}_std", denom)
    if layer.invert:
        return g.op("Add", [g.op("Mul", [x, scale]), mean])
    return g.op("Div", [g.op("Sub", [x, mean]), scale])


#: layer class name -> builder(graph, layer, x) -> output name
LAYER_BUILDERS = {
    "Dense": _dense,
    "Activation": _activation_layer,
    "ReLU": _activation_layer,
    "LeakyReLU": _activation_layer,
    "ELU": _activation_layer,
    "Softmax": _activation_layer,
    "Flatten": _flatten,
    "Identity": _identity_at_inference,
    "Rescaling": _rescaling,
    "Dropout": _identity_at_inference,
    "GaussianNoise": _identity_at_inference,
    "BatchNormalization": _batch_normalization,
    "LayerNormalization": _layer_normalization,
    "Normalization": _normalization,
}


def _check_layer(layer) -> None:
    kind = type(layer).__name__
    if kind not in LAYER_BUILDERS:
        raise ValueError(
            f"export: no ONNX mapping for layer {layer.name!r}, a {kind} (mapped: {', '.join(sorted(LAYER_BUILDERS))})"
        )
    _check_mapped(layer.activation)


def _describe(layer) -> str:
    if type(layer).__name__ == "Dense":
        return f"Dense({layer.units}, {layer.activation.name})"
    if layer.activation.name != "linear":
        return f"{type(layer).__name__}({layer.activation.name})"
    return f"{type(layer).__name__}()"


# ----------------------------------------------------------------- the graph
def _network(g, model, x: str) -> str:
    """Every layer's operators from tensor ``x``; returns the output name."""
    for layer in model.layers:
        x = LAYER_BUILDERS[type(layer).__name__](g, layer, x)
    return x


def _input_shape(model):
    """The graph input's shape: the declared sample shape when the model flattens n-D samples."""
    shape = model.sample_shape
    if shape is not None and len(shape) > 1 and type(model.layers[0]).__name__ == "Flatten":
        return ["batch", *shape]
    return ["batch", model.input_dim]


def _check_preprocessing(info, model) -> None:
    unknown = sorted(set(info) - _KNOWN_PREPROCESSING)
    if unknown:
        raise ValueError(
            f"preprocessing: the preprocessing file has steps this exporter cannot put in the graph: {unknown}; "
            "upgrade gpunn"
        )
    names = info.get("feature_names")
    if names is not None and len(names) != model.input_dim:
        raise ValueError(
            f"preprocessing: names {len(names)} features but the model takes {model.input_dim}; "
            "the two files do not belong together"
        )
    if info.get("task") not in ("binary", "multiclass", "regression"):
        raise ValueError(f"preprocessing: task: expected 'binary', 'multiclass' or 'regression', got {info.get('task')!r}")
    if info["task"] != "regression":
        labels = info.get("class_labels") or []
        classes = 1 if info["task"] == "binary" else len(labels)
        if len(labels) < 2 or (info["task"] == "binary" and len(labels) != 2) or model.output_dim != classes:
            raise ValueError(
                f"preprocessing: {len(labels)} class labels do not fit the model's {model.output_dim} output(s)"
            )


def _value_info(onnx, name, elem_type, shape):
    return onnx.helper.make_tensor_value_info(name, elem_type, shape)


def _labels_const(g, labels):
    """A constant holding the class labels: int64 or float64 when they are numbers, else strings."""
    TP = g.onnx.TensorProto
    values = np.asarray(labels)
    if values.dtype.kind in "iub":
        return g.const("class_labels", values, np.int64), TP.INT64
    if values.dtype.kind == "f":
        return g.const("class_labels", values, np.float64), TP.DOUBLE
    return g.string_const("class_labels", [str(v) for v in labels]), TP.STRING


def _regression_outputs(g, model, net, target_scaler):
    """``prediction``: the network's output in the target's units, (batch,) for one output."""
    TP = g.onnx.TensorProto
    value, elem = net, TP.FLOAT
    if target_scaler is not None:  # undo the target standardization in float64, as `gpunn predict` does
        value = g.op("Cast", [net], to=TP.DOUBLE)
        value = g.op("Mul", [value, g.const("target_scale", target_scaler["scale"], np.float64)])
        value = g.op("Add", [value, g.const("target_mean", target_scaler["mean"], np.float64)])
        elem = TP.DOUBLE
    if model.output_dim == 1:
        g.op("Reshape", [value, g.const("flat", [-1], np.int64)], output="prediction")
        return [_value_info(g.onnx, "prediction", elem, ["batch"])]
    g.op("Identity", [value], output="prediction")
    return [_value_info(g.onnx, "prediction", elem, ["batch", model.output_dim])]


def _classification_outputs(g, task, net, labels):
    """``label`` (the most probable class) and ``probabilities`` (binary: columns 1 - p, p)."""
    if task == "binary":
        negative = g.op("Sub", [g.const("one", 1.0), net])
        g.op("Concat", [negative, net], output="probabilities", axis=1)
    else:
        g.op("Identity", [net], output="probabilities")
    index = g.op("ArgMax", ["probabilities"], axis=1, keepdims=0)
    table, elem = _labels_const(g, labels)
    g.op("Gather", [table, index], output="label", axis=0)
    return [
        _value_info(g.onnx, "label", elem, ["batch"]),
        _value_info(g.onnx, "probabilities", g.onnx.TensorProto.FLOAT, ["batch", len(labels)]),
    ]


def _build_graph(onnx, model, preprocessing, input_name, output_name):
    """(builder, inputs, outputs) for ``model``, with ``preprocessing``'s steps when given."""
    TP = onnx.TensorProto
    g = _GraphBuilder(onnx)
    spec = preprocessing or {}
    scaler = spec.get("scaler")
    if scaler is not None:  # standardize raw rows in float64, as `gpunn predict` does
        centred = g.op("Sub", [input_name, g.const("feature_mean", scaler["mean"], np.float64)])
        standardized = g.op("Div", [centred, g.const("feature_scale", scaler["scale"], np.float64)])
        net = _network(g, model, g.op("Cast", [standardized], to=TP.FLOAT))
    else:
        net = _network(g, model, input_name)
    shape = ["batch", model.input_dim] if scaler is not None else _input_shape(model)
    inputs = [_value_info(onnx, input_name, TP.DOUBLE if scaler is not None else TP.FLOAT, shape)]
    task = spec.get("task")
    if task is None:
        g.op("Identity", [net], output=output_name)
        return g, inputs, [_value_info(onnx, output_name, TP.FLOAT, ["batch", model.output_dim])]
    if task == "regression":
        return g, inputs, _regression_outputs(g, model, net, spec.get("target_scaler"))
    return g, inputs, _classification_outputs(g, task, net, spec["class_labels"])


def to_onnx(model, preprocessing=None, input_name="features", output_name="output"):
    """The ``onnx.ModelProto`` for a built ``model``, checked with ``full_check=True``.

    ``preprocessing`` is None (input ``input_name``, output ``output_name``:
    what ``predict`` returns) or a dict of the steps around the network, as
    ``gpunn train --save`` writes it beside the model (read it with
    ``gpunn.cli.load_preprocessing``):

    - ``task``: ``"binary"`` / ``"multiclass"`` (outputs ``label`` and
      ``probabilities``, with ``class_labels``) or ``"regression"`` (output
      ``prediction``, mapped back by ``target_scaler`` {mean, scale} if given);
    - ``scaler`` {mean, scale}: when given, the input is raw float64 rows,
      standardized in the graph;
    - ``feature_names``: recorded in the graph's metadata.
    """
    onnx = _require_onnx()
    __version__ = _gpunn_version()

    if not model.built:
        raise ValueError("export: the model is not built yet (no weights); call build(), fit or predict first")
    for argument, value in (("input_name", input_name), ("output_name", output_name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{argument}: expected a non-empty string, got {value!r}")
    reserved = {"label", "probabilities", "prediction"} if preprocessing is not None else {output_name}
    if input_name in reserved:
        raise ValueError(f"input_name: {input_name!r} is also the name of an output; choose another name")
    for layer in model.layers:  # fail before any work on a layer or activation without a mapping
        _check_layer(layer)
    if preprocessing is not None:
        _check_preprocessing(preprocessing, model)
    doc = f"gpunn {__version__} Sequential {model.name!r}: " + " -> ".join(_describe(layer) for layer in model.layers)
    if np.dtype(model.dtype) == np.float64:
        warnings.warn(f"export: {FLOAT64_NOTE}", UserWarning, stacklevel=3)
        doc += ". " + FLOAT64_NOTE
    g, inputs, outputs = _build_graph(onnx, model, preprocessing, input_name, output_name)
    graph = onnx.helper.make_graph(g.nodes, model.name or "gpunn", inputs, outputs, g.initializers, doc_string=doc)
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="gpunn",
        producer_version=__version__,
        doc_string=doc,
    )
    metadata = {"gpunn_config": json.dumps(model.get_config(), sort_keys=True), "gpunn_dtype": str(model.dtype)}
    names = model.feature_names
    if preprocessing is not None:
        names = preprocessing.get("feature_names") or names
        metadata["task"] = preprocessing["task"]
        if preprocessing.get("class_labels") is not None:
            metadata["class_labels"] = json.dumps(list(preprocessing["class_labels"]))
    if names is not None:
        metadata["feature_names"] = json.dumps(list(names))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, filepath, format="onnx", **kwargs) -> None:
    """``model.export(filepath, format)``: ``"onnx"`` (the only format) is :func:`export_onnx`."""
    if format != "onnx":
        raise ValueError(f"format: expected 'onnx' (the export format gpunn writes), got {format!r}")
    export_onnx(model, filepath, **kwargs)


def export_onnx(model, filepath, preprocessing=None, input_name="features", output_name="output") -> None:
    """Write ``model`` as an ONNX file at ``filepath`` (atomically); see :func:`to_onnx`."""
    from gpunn.saving import atomic_write

    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    proto = to_onnx(model, preprocessing, input_name, output_name)
    atomic_write(filepath, proto.SerializeToString())
