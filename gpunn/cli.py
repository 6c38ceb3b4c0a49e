"""The ``gpunn`` command line (also ``python -m gpunn``).

``gpunn train`` with no arguments trains the classic Keras example -- Dense(64,
relu) -> Dense(1, sigmoid), Adam, binary cross-entropy -- on the Wisconsin
breast-cancer data and prints the held-out accuracy.  ``gpunn --help`` lists
the other commands: predict, info, datasets, bench.

Errors in what the user gave (an option, a column, a cell) are reported as
click usage errors (exit status 2, no traceback); failures while running
(training diverged, a file could not be written) exit with status 1.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import platform
import sys

import click
import numpy as np

import gpunn
from gpunn import activations as activations_mod
from gpunn import optimizers as optimizers_mod
from gpunn.backend import BACKEND_NAMES
from gpunn.datasets import TASKS

#: file written next to a saved model, holding what ``predict`` needs to prepare its input
PREPROCESS_SUFFIX = ".preprocess.json"
PREPROCESS_FORMAT = "gpunn-preprocess"
PREPROCESS_VERSION = 1

_HIDDEN_ACTIVATIONS = [name for name in activations_mod.names() if name != "softmax"]


def preprocess_path(model_path) -> str:
    """The preprocessing sidecar of a model file: ``<model path>.preprocess.json``."""
    return os.fspath(model_path) + PREPROCESS_SUFFIX


# --------------------------------------------------------------------- helpers
@dataclasses.dataclass
class _Problem:
    X: np.ndarray
    y: np.ndarray
    task: str
    feature_names: list[str]
    class_labels: list[str] | None
    target: str
    source: str  # what to call the data in messages


def _parse_hidden(ctx, param, value):
    text = value.strip()
    if text.lower() in ("", "none"):
        return []
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise click.BadParameter(
                f"expected comma-separated positive layer sizes such as 64 or 128,64, got {value!r}", ctx, param
            )
        sizes.append(int(part))
    return sizes


def _select_backend(ctx, name):
    """Activate ``name`` (or the GPUNN_BACKEND/auto default); returns the resolved backend name."""
    try:
        if name is not None:
            return gpunn.set_backend(name)
        return gpunn.get_backend()
    except (RuntimeError, ValueError) as exc:
        if name is not None:
            raise click.BadParameter(str(exc), ctx, param_hint="'--backend'") from None
        raise click.UsageError(f"GPUNN_BACKEND={os.environ.get('GPUNN_BACKEND')!r}: {exc}", ctx) from None


def _backend_note(requested, resolved) -> str:
    if (requested or os.environ.get("GPUNN_BACKEND") or "auto").lower() == "auto" and resolved == "numpy":
        return " (auto: CUDA is not usable here; `gpunn info` says why)"
    return ""


def _load_problem(ctx, dataset, data, target, task) -> _Problem:
    from gpunn import csvdata, datasets

    if data is not None:
        if dataset is not None:
            raise click.UsageError("give either --dataset or --data, not both", ctx)
        if target is None:
            raise click.UsageError("--data needs --target COLUMN: the name of the column to predict", ctx)
        try:
            table = csvdata.read_training_csv(data, target, task)
        except csvdata.CSVDataError as exc:
            hint = "'--target'" if isinstance(exc, csvdata.MissingColumnError) else "'--data'"
            raise click.BadParameter(str(exc), ctx, param_hint=hint) from None
        return _Problem(table.X, table.y, table.task, table.feature_names, table.class_labels, target, os.path.basename(data))
    if target is not None:
        raise click.UsageError("--target only applies to --data FILE.csv", ctx)
    if task is not None:
        raise click.UsageError("--task only applies to --data FILE.csv (embedded data sets know their task)", ctx)
    try:
        ds = datasets.load(dataset or datasets.DEFAULT)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("dataset: "), ctx, param_hint="'--dataset'") from None
    return _Problem(ds.X, ds.y, ds.task, ds.feature_names, ds.class_names, ds.target_name, ds.name)


def _build_model(problem: _Problem, hidden, activation, optimizer, lr):
    Dense = gpunn.layers.Dense
    layers = [Dense(units, activation=activation) for units in hidden]
    if problem.task == "binary":
        layers.append(Dense(1, activation="sigmoid"))
        loss, metrics = "binary_crossentropy", ["accuracy"]
    elif problem.task == "multiclass":
        layers.append(Dense(len(problem.class_labels), activation="softmax"))
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    else:
        layers.append(Dense(1, activation="linear"))
        loss, metrics = "mse", ["mae"]
    model = gpunn.Sequential([gpunn.Input(shape=(problem.X.shape[1],)), *layers])
    opt = optimizers_mod.get(optimizer)
    if lr is not None:
        opt.learning_rate = lr
    model.compile(optimizer=opt, loss=loss, metrics=metrics)
    model.build()
    return model


def _describe_model(model) -> str:
    parts = [f"Dense({layer.units}, {layer.activation.name})" for layer in model.layers]
    return " -> ".join(parts)


def _split(ctx, problem: _Problem, test_size, seed):
    from sklearn.model_selection import train_test_split

    stratify = None if problem.task == "regression" else problem.y
    try:
        return train_test_split(problem.X, problem.y, test_size=test_size, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise click.BadParameter(
            f"cannot split {problem.X.shape[0]} samples of {problem.source} into training and held-out parts: {exc}",
            ctx,
            param_hint="'--test-size'",
        ) from None


def _check_save_path(ctx, path):
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise click.BadParameter(f"the directory {directory!r} does not exist", ctx, param_hint="'--save'")


def _write_preprocessing(model_path, info: dict) -> None:
    from gpunn.saving import atomic_write

    atomic_write(preprocess_path(model_path), (json.dumps(info, indent=2) + "\n").encode("utf-8"))


def load_preprocessing(model_path) -> dict:
    """Read and check the preprocessing sidecar written by ``gpunn train --save``."""
    path = preprocess_path(model_path)
    if not os.path.exists(path):
        raise ValueError(
            f"no preprocessing file {path!r} next to the model; `gpunn predict` needs a model saved by "
            "`gpunn train --save MODEL`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the preprocessing file ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != PREPROCESS_FORMAT:
        raise ValueError(f"{path}: not a gpunn preprocessing file")
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= PREPROCESS_VERSION:
        raise ValueError(f"{path}: format version {version!r} is not supported; upgrade gpunn")
    try:
        names = info["feature_names"]
        mean, scale = info["scaler"]["mean"], info["scaler"]["scale"]
        task = info["task"]
        ok = (
            isinstance(names, list)
            and all(isinstance(n, str) for n in names)
            and len(names) == len(mean) == len(scale)
            and task in TASKS
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in [*mean, *scale])
            and all(s > 0 for s in scale)
        )
        if task != "regression":
            labels = info["class_labels"]
            ok = ok and isinstance(labels, list) and len(labels) >= 2 and all(isinstance(c, str) for c in labels)
        else:
            ok = ok and all(isinstance(info["target_scaler"][k], (int, float)) for k in ("mean", "scale"))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: the preprocessing file is incomplete or inconsistent")
    return info


def _fmt(value: float) -> str:
    return f"{value:.6g}"


# -------------------------------------------------------------------- commands
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gpunn.__version__, prog_name="gpunn")
def main():
    """gpunn: train small neural networks (MLPs) with a Keras-shaped API, on CUDA or NumPy.

    Start with `gpunn train` (the breast-cancer classifier) or `gpunn info`.
    """


@main.command()
@click.option("--dataset", metavar="NAME", help="Embedded data set (see `gpunn datasets`) [default: breast_cancer].")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), metavar="FILE.csv", help="Train on a CSV file (header row first).")
@click.option("--target", metavar="COLUMN", help="With --data: the column to predict.")
@click.option("--task", type=click.Choice(TASKS), help="With --data: the kind of problem [default: inferred from the target column].")
@click.option("--hidden", default="64", show_default=True, callback=_parse_hidden, help="Hidden layer sizes, comma-separated (e.g. 128,64).")
@click.option("--activation", type=click.Choice(_HIDDEN_ACTIVATIONS, case_sensitive=False), default="relu", show_default=True, help="Hidden-layer activation.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--optimizer", type=click.Choice(optimizers_mod.names(), case_sensitive=False), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate [default: the optimizer's Keras default].")
@click.option("--backend", type=click.Choice(BACKEND_NAMES, case_sensitive=False), help="numpy, cuda or auto [default: $GPUNN_BACKEND or auto].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for the split, initial weights and shuffling.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True, help="Held-out fraction.")
@click.option("--save", "save_path", type=click.Path(dir_okay=False), metavar="MODEL", help=f"Save the trained model (e.g. model{gpunn.MODEL_SUFFIX}) and its preprocessing (MODEL{PREPROCESS_SUFFIX}).")
@click.option("--verbose", type=click.IntRange(0, 2), default=1, show_default=True, help="0 silent, 1 progress bar, 2 one line per epoch.")
@click.pass_context
def train(ctx, dataset, data, target, task, hidden, activation, epochs, batch_size, optimizer, lr, backend, seed, test_size, save_path, verbose):
    """Train an MLP and report its accuracy (or error) on held-out data.

    With no options: Dense(64, relu) -> Dense(1, sigmoid) with Adam and binary
    cross-entropy on the Wisconsin breast-cancer data, 20% held out.
    """
    from sklearn.preprocessing import StandardScaler

    problem = _load_problem(ctx, dataset, data, target, task)
    _check_save_path(ctx, save_path)
    resolved = _select_backend(ctx, backend)
    gpunn.set_seed(seed)
    x_train, x_test, y_train, y_test = _split(ctx, problem, test_size, seed)

    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    y_fit = y_train
    target_scaler = None
    if problem.task == "regression":  # train on standardized targets; report in the data's units
        target_scaler = {"mean": float(y_train.mean()), "scale": float(y_train.std()) or 1.0}
        y_fit = (y_train - target_scaler["mean"]) / target_scaler["scale"]

    try:
        model = _build_model(problem, hidden, activation.lower(), optimizer.lower(), lr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'--lr'") from None
    if verbose:
        labels = problem.class_labels or []
        classes = f" {'/'.join(labels)}" if 0 < len(labels) <= 4 else f", {len(labels)} classes" if labels else ""
        click.echo(
            f"Data: {problem.source} ({problem.task}{classes}, {problem.X.shape[1]} features): "
            f"{len(x_train)} training / {len(x_test)} held-out samples, features standardized"
        )
        click.echo(
            f"Model: {_describe_model(model)} ({model.count_params():,} parameters), "
            f"{model.optimizer.name} lr={model.optimizer.learning_rate:g}, loss {model.loss.name}"
        )
        click.echo(f"Backend: {resolved}{_backend_note(backend, resolved)}")
    try:
        model.fit(x_train, y_fit, epochs=epochs, batch_size=batch_size, verbose=verbose)
    except gpunn.NonFiniteLossError as exc:
        raise click.ClickException(f"{exc} (--lr sets the learning rate)") from None

    if problem.task == "regression":
        pred = model.predict(x_test, batch_size=max(batch_size, 256), verbose=0).reshape(-1).astype(np.float64)
        pred = pred * target_scaler["scale"] + target_scaler["mean"]
        err = pred - y_test
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
        total = float(((y_test - y_test.mean()) ** 2).sum())
        r2 = 1.0 - float((err**2).sum()) / total if total > 0 else float("nan")
        click.echo(f"Held-out MAE: {mae:.4f}  RMSE: {rmse:.4f}  R2: {r2:.4f}  ({len(y_test)} samples)")
    else:
        result = model.evaluate(x_test, y_test, batch_size=max(batch_size, 256), verbose=0, return_dict=True)
        probs = model.predict(x_test, batch_size=max(batch_size, 256), verbose=0)
        classes = (probs[:, 0] > 0.5).astype(np.int64) if problem.task == "binary" else probs.argmax(axis=1)
        correct = int((classes == y_test).sum())
        click.echo(
            f"Held-out accuracy: {correct / len(y_test):.4f} ({correct}/{len(y_test)} correct), loss {result['loss']:.4f}"
        )

    if save_path is not None:
        info = {
            "format": PREPROCESS_FORMAT,
            "format_version": PREPROCESS_VERSION,
            "source": problem.source,
            "task": problem.task,
            "target": problem.target,
            "feature_names": list(problem.feature_names),
            "scaler": {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()},
            "class_labels": None if problem.class_labels is None else list(problem.class_labels),
            "target_scaler": target_scaler,
        }
        try:
            model.save(save_path)
            _write_preprocessing(save_path, info)
        except OSError as exc:
            raise click.ClickException(f"--save: could not write {save_path!r}: {exc}") from None
        click.echo(f"Saved the model to {save_path} and its preprocessing to {preprocess_path(save_path)}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("csv_path", metavar="FILE.csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), metavar="PREDS.csv", help="Write the predictions here [default: standard output].")
@click.option("--backend", type=click.Choice(BACKEND_NAMES, case_sensitive=False), help="numpy, cuda or auto [default: $GPUNN_BACKEND or auto].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.pass_context
def predict(ctx, model_path, csv_path, out, backend, batch_size):
    """Predict with a model saved by `gpunn train --save MODEL`.

    Features are taken from FILE.csv by column name (a target column and any
    other extra columns are ignored).  Writes one row per input row: the
    predicted class and one probability column per class, or the predicted
    value for regression.
    """
    from gpunn import csvdata

    try:
        info = load_preprocessing(model_path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'MODEL'") from None
    _select_backend(ctx, backend)
    try:
        model = gpunn.load_model(model_path, compile=False)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'MODEL'") from None
    if model.input_dim != len(info["feature_names"]):
        raise click.BadParameter(
            f"the model takes {model.input_dim} features but {preprocess_path(model_path)} names "
            f"{len(info['feature_names'])}; the two files do not belong together",
            ctx,
            param_hint="'MODEL'",
        )
    try:
        X = csvdata.read_features_csv(csv_path, info["feature_names"])
    except csvdata.CSVDataError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'FILE.csv'") from None
    X = (X - np.asarray(info["scaler"]["mean"])) / np.asarray(info["scaler"]["scale"])
    out_values = model.predict(X, batch_size=batch_size, verbose=0).astype(np.float64)

    task = info["task"]
    if task == "regression":
        ts = info["target_scaler"]
        values = out_values.reshape(-1) * ts["scale"] + ts["mean"]
        header = ["prediction"]
        rows = [[_fmt(v)] for v in values]
    else:
        labels = info["class_labels"]
        probs = np.column_stack([1.0 - out_values[:, 0], out_values[:, 0]]) if task == "binary" else out_values
        if probs.shape[1] != len(labels):
            raise click.BadParameter(
                f"the model has {probs.shape[1]} outputs but {len(labels)} class labels are stored", ctx, param_hint="'MODEL'"
            )
        header = ["prediction"] + [f"prob_{label}" for label in labels]
        rows = [[labels[int(k)]] + [_fmt(p) for p in row] for k, row in zip(probs.argmax(axis=1), probs)]

    if out is None:
        csvdata.write_csv(sys.stdout, header, rows)
        return
    buffer = io.StringIO()
    csvdata.write_csv(buffer, header, rows)
    from gpunn.saving import atomic_write

    try:
        atomic_write(out, buffer.getvalue().encode("utf-8"))
    except OSError as exc:
        raise click.ClickException(f"--out: could not write {out!r}: {exc}") from None
    click.echo(f"Wrote {len(rows)} predictions to {out}", err=True)


def _dist_version(*names) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


@main.command()
def info():
    """Versions, the active backend, the GPU, and why CUDA is unusable if it is."""
    from gpunn._cuda import cuda_status

    status = cuda_status()
    import numba

    rows = [
        ("gpunn", gpunn.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("numba-cuda", _dist_version("numba-cuda") or "not installed"),
        ("cupy", status.cupy_version or _dist_version("cupy-cuda13x", "cupy-cuda12x", "cupy") or "not installed"),
    ]
    requested = (os.environ.get("GPUNN_BACKEND") or "auto").lower()
    source = "GPUNN_BACKEND" if os.environ.get("GPUNN_BACKEND") else "default"
    try:
        active = gpunn.get_backend()
    except (RuntimeError, ValueError) as exc:
        active = f"none ({exc})"
    rows.append(("backend", f"{active} (requested: {requested}, from {source})"))
    if status.simulator:
        rows.append(("GPU", "none: Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"))
    else:
        rows.append(("GPU", status.device_name or "none"))
    rows.append(("CUDA", ("usable: " if status.usable else "unusable: ") + status.reason))
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        click.echo(f"{key.ljust(width)}{value}")


@main.command("datasets")
def datasets_command():
    """List the embedded data sets (for `gpunn train --dataset NAME`)."""
    from gpunn import datasets

    rows = [("name", "task", "samples", "features", "classes", "description")]
    for d in datasets.describe():
        rows.append((d["name"], d["task"], str(d["samples"]), str(d["features"]), str(d["classes"] or "-"), d["description"]))
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(5)]
    for r in rows:
        click.echo("".join(c.ljust(w) for c, w in zip(r[:5], widths)) + r[5])


@main.command()
@click.option("--quick", is_flag=True, help="A short run (smaller sizes, fewer repeats).")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR", help="Directory for the report [default: the benchmark's own].")
@click.pass_context
def bench(ctx, quick, out):
    """Benchmark gpunn's backends (see benchmarks/README.md)."""
    import importlib

    try:
        bench_mod = importlib.import_module("gpunn.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "gpunn.bench":
            raise
        raise click.ClickException(
            "the benchmark suite (gpunn.bench) is not part of this installation of gpunn"
        ) from None
    result = bench_mod.main(quick=quick, out=out)
    if isinstance(result, int) and not isinstance(result, bool) and result:
        ctx.exit(result)
    if isinstance(result, (str, os.PathLike)):
        click.echo(f"Report: {os.fspath(result)}")


if __name__ == "__main__":  # pragma: no cover
    main()
