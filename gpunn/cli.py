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

import csv
import dataclasses
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

#: sidecar file that older gpunn versions wrote next to a model (read by predict for those models)
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
    lines: np.ndarray | None = None  # the CSV line of each row (None for embedded data sets)
    notes: tuple[str, ...] = ()

    def where(self, row: int) -> str:
        """How to point the user at sample ``row``: its line in the file, or its row number."""
        return f"line {int(self.lines[row])}" if self.lines is not None else f"row {row}"


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


def _load_problem(ctx, dataset, data, target, task, delimiter=",", ignore_label_case=False) -> _Problem:
    from gpunn import csvdata, datasets

    if data is not None:
        if dataset is not None:
            raise click.UsageError("give either --dataset or --data, not both", ctx)
        if target is None:
            raise click.UsageError("--data needs --target COLUMN: the name of the column to predict", ctx)
        try:
            table = csvdata.read_training_csv(data, target, task, delimiter=delimiter, ignore_label_case=ignore_label_case)
        except csvdata.CSVDataError as exc:
            hint = "'--target'" if isinstance(exc, csvdata.MissingColumnError) else "'--data'"
            raise click.BadParameter(str(exc), ctx, param_hint=hint) from None
        return _Problem(
            table.X, table.y, table.task, table.feature_names, table.class_labels, target,
            os.path.basename(data), table.lines, table.notes,
        )
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


#: float arrays a compiled model keeps per parameter: weights, gradients and up to 3 optimizer slots
_ARRAYS_PER_PARAMETER = 5


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _model_size(problem: _Problem, hidden, batch_size):
    """(parameters, bytes for weights, gradients, optimizer state and one batch's activations)."""
    sizes = [problem.X.shape[1], *hidden, len(problem.class_labels or []) if problem.task == "multiclass" else 1]
    params = sum((n_in + 1) * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    itemsize = np.dtype(gpunn.floatx()).itemsize
    return params, params * itemsize * _ARRAYS_PER_PARAMETER + 4 * batch_size * sum(sizes) * itemsize


def _too_big(ctx, hidden, params, needed, why) -> click.BadParameter:
    return click.BadParameter(
        f"layer sizes {','.join(map(str, hidden))} make a network of {params:,} parameters that needs about "
        f"{needed:,} bytes ({needed / 2**30:.1f} GiB) for its weights, gradients and optimizer state; {why}",
        ctx,
        param_hint="'--hidden'",
    )


def _check_model_size(ctx, problem: _Problem, hidden, batch_size):
    """A usage error naming --hidden when the network cannot fit in this machine's memory."""
    params, needed = _model_size(problem, hidden, batch_size)
    available = _physical_memory_bytes()
    if available is not None and needed > available:
        memory = f"this machine has {available:,} bytes ({available / 2**30:.1f} GiB) of memory"
        raise _too_big(ctx, hidden, params, needed, memory)


def _describe_model(model) -> str:
    parts = [f"Dense({layer.units}, {layer.activation.name})" for layer in model.layers]
    return " -> ".join(parts)


def _split(ctx, problem: _Problem, test_size, seed):
    """(train rows, held-out rows): indices into the problem's samples, stratified for classification."""
    from sklearn.model_selection import train_test_split

    stratify = None if problem.task == "regression" else problem.y
    try:
        return train_test_split(np.arange(len(problem.y)), test_size=test_size, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise click.BadParameter(
            f"cannot split {problem.X.shape[0]} samples of {problem.source} into training and held-out parts: {exc}",
            ctx,
            param_hint="'--test-size'",
        ) from None


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_destination(ctx, path, option, inputs):
    """Usage error unless ``path`` can be written: an existing directory, a regular file, not one of ``inputs``."""
    from gpunn.saving import resolve_destination

    if path is None:
        return
    for name, other in inputs:
        if other is not None and _same_file(path, other):
            raise click.BadParameter(
                f"{path!r} is the {name}; writing there would destroy it. Choose another file name",
                ctx,
                param_hint=f"'{option}'",
            )
    try:
        resolve_destination(path, option)
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        raise click.BadParameter(f"the directory {directory!r} does not exist", ctx, param_hint=f"'{option}'") from None
    except (ValueError, OSError) as exc:
        raise click.BadParameter(str(exc).removeprefix(f"{option}: "), ctx, param_hint=f"'{option}'") from None


def _largest_cell_error(ctx, problem: _Problem, rows, column, why) -> click.BadParameter:
    """A usage error pointing at the largest-magnitude value of feature ``column`` among ``rows``."""
    values = problem.X[rows, column]
    worst = int(np.argmax(np.abs(values)))
    return click.BadParameter(
        f"{problem.source}: {problem.where(rows[worst])}, column {problem.feature_names[column]!r}: "
        f"the value {values[worst]:.6g} is too large: {why}; rescale the column (e.g. divide it by a power of 10)",
        ctx,
        param_hint="'--data'",
    )


def _fit_scaler(ctx, problem: _Problem, train_rows):
    """StandardScaler fitted on the training rows; overflow is a usage error naming the culprit cell."""
    from sklearn.preprocessing import StandardScaler

    with np.errstate(over="ignore", invalid="ignore"):
        scaler = StandardScaler().fit(problem.X[train_rows])
    bad = ~(np.isfinite(scaler.mean_) & np.isfinite(scaler.scale_))
    if bad.any():
        raise _largest_cell_error(ctx, problem, train_rows, int(np.argmax(bad)), "the column's mean or variance overflows")
    return scaler


def _scaled(ctx, problem: _Problem, scaler, rows):
    """Standardized features of ``rows``, checked to fit the model's float type."""
    with np.errstate(over="ignore", invalid="ignore"):
        Z = scaler.transform(problem.X[rows])
    limit = float(np.finfo(gpunn.floatx()).max)
    bad = ~(np.abs(Z) <= limit)
    if bad.any():
        column = int(np.argwhere(bad)[0][1])
        raise _largest_cell_error(ctx, problem, rows, column, f"standardized it exceeds the {gpunn.floatx()} range")
    return Z


def _target_scaling(ctx, problem: _Problem, y_train, train_rows):
    """Mean and scale for standardizing regression targets; huge targets are a usage error."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, scale = float(y_train.mean()), float(y_train.std())
        finite = math.isfinite(mean) and math.isfinite(scale) and bool(np.isfinite((y_train - mean) / (scale or 1.0)).all())
    if not finite:
        worst = int(np.argmax(np.abs(y_train)))
        raise click.BadParameter(
            f"{problem.source}: {problem.where(train_rows[worst])}, column {problem.target!r}: the target "
            f"{y_train[worst]:.6g} is too large to standardize (the mean or variance of the targets overflows); "
            "rescale the column (e.g. divide it by a power of 10, or take its logarithm)",
            ctx,
            param_hint="'--data'",
        )
    return {"mean": mean, "scale": scale or 1.0}


def _class_weights(ctx, problem: _Problem, y_train, mode):
    if mode is None or mode == "none":
        return None
    if problem.task == "regression":
        raise click.BadParameter(
            "class weights apply to classification targets, not regression", ctx, param_hint="'--class-weight'"
        )
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.arange(len(problem.class_labels))
    present = np.unique(y_train)
    weights = compute_class_weight("balanced", classes=present, y=y_train)
    table = dict.fromkeys(classes.tolist(), 1.0)
    table.update({int(c): float(w) for c, w in zip(present, weights)})
    return table


def _binary_report(problem: _Problem, y_train, y_test, probs, class_weight) -> list[str]:
    """Lines on the rare class: majority baseline, precision, recall, ROC AUC, and a --class-weight hint."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    counts = np.bincount(y_train, minlength=2)
    rare = int(np.argmin(counts))
    label = problem.class_labels[rare]
    majority = int(np.argmax(np.bincount(y_train, minlength=2)))
    baseline = float((y_test == majority).mean())
    score = probs[:, 0] if rare == 1 else 1.0 - probs[:, 0]
    predicted = (probs[:, 0] > 0.5).astype(np.int64)
    truth, guess = (y_test == rare), (predicted == rare)
    precision = precision_score(truth, guess, zero_division=0.0)
    recall = recall_score(truth, guess, zero_division=0.0)
    auc = f"{roc_auc_score(truth, score):.4f}" if 0 < truth.sum() < len(truth) else "n/a (one class held out)"
    lines = [
        f"Majority-class baseline: {baseline:.4f} (always {problem.class_labels[majority]!r})",
        f"Class {label!r} ({int(truth.sum())} of {len(truth)} held out): precision {precision:.4f}, "
        f"recall {recall:.4f}, ROC AUC {auc}",
    ]
    share = counts[rare] / counts.sum()
    if share < 0.2 and class_weight is None:
        lines.append(
            f"Class {label!r} is rare ({share:.1%} of the training samples): accuracy says little here; "
            "--class-weight balanced gives both classes equal total weight"
        )
    return lines


def _embedded_preprocessing(info: dict) -> dict:
    """The user_metadata a model file holds for `gpunn predict`."""
    return {"preprocessing": info}


def _preprocessing_complete(info: dict) -> bool:
    """Whether every field predict reads is present, typed and finite."""
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
            ts = info["target_scaler"]
            ok = ok and all(isinstance(ts[k], (int, float)) and math.isfinite(ts[k]) for k in ("mean", "scale"))
    except (KeyError, TypeError):
        return False
    return ok


def _check_preprocessing(info, where: str) -> dict:
    """``info`` if it is a complete preprocessing description, else ValueError naming ``where``."""
    if not isinstance(info, dict) or info.get("format") != PREPROCESS_FORMAT:
        raise ValueError(f"{where}: not a gpunn preprocessing description")
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= PREPROCESS_VERSION:
        raise ValueError(f"{where}: format version {version!r} is not supported; upgrade gpunn")
    ok = _preprocessing_complete(info)
    if not ok:
        raise ValueError(f"{where}: the preprocessing description is incomplete or inconsistent")
    return info


def load_preprocessing(model_path, user_metadata=None) -> dict:
    """What ``predict`` needs to prepare its input: from the model file, or an older model's sidecar file.

    Models saved by this gpunn hold their preprocessing inside the model file
    (``user_metadata["preprocessing"]``), so the two cannot come from
    different training runs.  Model files from older versions have none and
    use ``MODEL.preprocess.json`` next to them.  ``user_metadata`` is what
    ``saving.load_model_with_metadata`` returned; None reads it from the file.
    """
    if user_metadata is None:
        from gpunn import saving

        user_metadata = saving.load_model_with_metadata(model_path, gpunn.Sequential, compile=False)[1]
    if isinstance(user_metadata, dict) and "preprocessing" in user_metadata:
        return _check_preprocessing(user_metadata["preprocessing"], f"{os.fspath(model_path)} (preprocessing)")
    path = preprocess_path(model_path)
    if not os.path.exists(path):
        raise ValueError(
            f"the model file holds no preprocessing and there is no {path!r} next to it; `gpunn predict` needs "
            "a model saved by `gpunn train --save MODEL`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the preprocessing file ({exc})") from None
    return _check_preprocessing(info, path)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


# -------------------------------------------------------------------- commands
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gpunn.__version__, prog_name="gpunn")
def main():
    """gpunn: train small neural networks (MLPs) with a Keras-shaped API, on CUDA or NumPy.

    Start with `gpunn train` (the breast-cancer classifier) or `gpunn info`.
    """


def _delimiter(ctx, param, value):
    text = {"\\t": "\t", "tab": "\t"}.get(value, value)
    if len(text) != 1 or text in "\r\n\"":
        raise click.BadParameter(f"expected one character such as ',' ';' or '\\t', got {value!r}", ctx, param)
    return text


@main.command()
@click.option("--dataset", metavar="NAME", help="Embedded data set (see `gpunn datasets`) [default: breast_cancer].")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), metavar="FILE.csv", help="Train on a CSV file (header row first).")
@click.option("--target", metavar="COLUMN", help="With --data: the column to predict.")
@click.option("--task", type=click.Choice(TASKS), help="With --data: the kind of problem [default: inferred from the target column].")
@click.option("--delimiter", default=",", show_default=True, callback=_delimiter, help="With --data: the field separator (',' ';' or '\\t').")
@click.option("--ignore-label-case", is_flag=True, help="With --data: class labels differing only in case (Yes/yes) are one class.")
@click.option("--hidden", default="64", show_default=True, callback=_parse_hidden, help="Hidden layer sizes, comma-separated (e.g. 128,64).")
@click.option("--activation", type=click.Choice(_HIDDEN_ACTIVATIONS, case_sensitive=False), default="relu", show_default=True, help="Hidden-layer activation.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--optimizer", type=click.Choice(optimizers_mod.names(), case_sensitive=False), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate [default: the optimizer's Keras default].")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True, help="balanced: weight classes inversely to their frequency (for rare classes).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES, case_sensitive=False), help="numpy, cuda or auto [default: $GPUNN_BACKEND or auto].")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), default=0, show_default=True, help="Seed for the split, initial weights and shuffling.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True, help="Held-out fraction.")
@click.option("--save", "save_path", type=click.Path(dir_okay=False), metavar="MODEL", help=f"Save the trained model, with its preprocessing, to MODEL (e.g. model{gpunn.MODEL_SUFFIX}).")
@click.option("--verbose", type=click.IntRange(0, 2), default=1, show_default=True, help="0 silent, 1 progress bar, 2 one line per epoch.")
@click.pass_context
def train(
    ctx, dataset, data, target, task, delimiter, ignore_label_case, hidden, activation, epochs, batch_size, optimizer, lr,
    class_weight, backend, seed, test_size, save_path, verbose,
):
    """Train an MLP and report its accuracy (or error) on held-out data.

    With no options: Dense(64, relu) -> Dense(1, sigmoid) with Adam and binary
    cross-entropy on the Wisconsin breast-cancer data, 20% held out.

    Launched by `mpiexec -n N gpunn train ...` it trains data-parallel on N
    processes (gpunn.distributed): --batch-size is the global batch; rank 0
    alone prints and saves.
    """
    _check_destination(ctx, save_path, "--save", [("training data (--data)", data)])
    problem = _load_problem(ctx, dataset, data, target, task, delimiter, ignore_label_case)
    _check_model_size(ctx, problem, hidden, batch_size)
    resolved = _select_backend(ctx, backend)
    if gpunn.distributed.launched_by_mpi():
        gpunn.distributed.init()
        if not gpunn.distributed.is_main():  # one report, from rank 0 (errors still reach stderr)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
    gpunn.set_seed(seed)
    train_rows, test_rows = _split(ctx, problem, test_size, seed)
    scaler = _fit_scaler(ctx, problem, train_rows)
    x_train, x_test = _scaled(ctx, problem, scaler, train_rows), _scaled(ctx, problem, scaler, test_rows)
    y_train, y_test = problem.y[train_rows], problem.y[test_rows]
    y_fit, target_scaler = y_train, None
    if problem.task == "regression":  # train on standardized targets; report in the data's units
        target_scaler = _target_scaling(ctx, problem, y_train, train_rows)
        y_fit = (y_train - target_scaler["mean"]) / target_scaler["scale"]
    weights = _class_weights(ctx, problem, y_train, class_weight)

    try:
        model = _build_model(problem, hidden, activation.lower(), optimizer.lower(), lr)
    except MemoryError:
        raise _too_big(ctx, hidden, *_model_size(problem, hidden, batch_size), "allocating it ran out of memory") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'--lr'") from None
    if verbose:
        _print_summary(problem, model, len(x_train), len(x_test), resolved, backend, weights)
    try:
        model.fit(x_train, y_fit, epochs=epochs, batch_size=batch_size, verbose=verbose, class_weight=weights)
    except gpunn.NonFiniteLossError as exc:
        raise click.ClickException(f"{exc} (--lr sets the learning rate)") from None
    except MemoryError as exc:  # the GPU's DeviceMemoryError names the batch size and the bytes
        detail = str(exc) or "no details"
        raise click.ClickException(f"out of memory while training: {detail} (see --hidden and --batch-size)") from None

    _report(problem, model, x_test, y_train, y_test, target_scaler, batch_size, weights)
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
        from gpunn import saving

        try:
            saving.save_model(model, save_path, user_metadata=_embedded_preprocessing(info))
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"--save: could not write {save_path!r}: {exc}") from None
        click.echo(f"Saved the model and its preprocessing to {save_path}")


def _print_summary(problem, model, n_train, n_test, resolved, backend, weights):
    labels = problem.class_labels or []
    classes = f" {'/'.join(labels)}" if 0 < len(labels) <= 4 else f", {len(labels)} classes" if labels else ""
    click.echo(
        f"Data: {problem.source} ({problem.task}{classes}, {problem.X.shape[1]} features): "
        f"{n_train} training / {n_test} held-out samples, features standardized"
    )
    for note in problem.notes:
        click.echo(f"Note: {note}")
    weighting = ", class weights balanced" if weights else ""
    click.echo(
        f"Model: {_describe_model(model)} ({model.count_params():,} parameters), "
        f"{model.optimizer.name} lr={model.optimizer.learning_rate:g}, loss {model.loss.name}{weighting}"
    )
    click.echo(f"Backend: {resolved}{_backend_note(backend, resolved)}")


def _report(problem, model, x_test, y_train, y_test, target_scaler, batch_size, weights):
    if problem.task == "regression":
        pred = model.predict(x_test, batch_size=max(batch_size, 256), verbose=0).reshape(-1).astype(np.float64)
        pred = pred * target_scaler["scale"] + target_scaler["mean"]
        err = pred - y_test
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
        total = float(((y_test - y_test.mean()) ** 2).sum())
        r2 = 1.0 - float((err**2).sum()) / total if total > 0 else float("nan")
        click.echo(f"Held-out MAE: {mae:.4f}  RMSE: {rmse:.4f}  R2: {r2:.4f}  ({len(y_test)} samples)")
        return
    result = model.evaluate(x_test, y_test, batch_size=max(batch_size, 256), verbose=0, return_dict=True)
    probs = model.predict(x_test, batch_size=max(batch_size, 256), verbose=0)
    classes = (probs[:, 0] > 0.5).astype(np.int64) if problem.task == "binary" else probs.argmax(axis=1)
    correct = int((classes == y_test).sum())
    click.echo(f"Held-out accuracy: {correct / len(y_test):.4f} ({correct}/{len(y_test)} correct), loss {result['loss']:.4f}")
    if problem.task == "binary":
        for line in _binary_report(problem, y_train, y_test, probs, weights):
            click.echo(line)


def _predict_rows(ctx, model, info, X, lines, ids, batch_size, csv_path):
    """CSV rows (lists of str) for one chunk of input records."""
    mean, scale = np.asarray(info["scaler"]["mean"]), np.asarray(info["scaler"]["scale"])
    with np.errstate(over="ignore", invalid="ignore"):
        Z = (X - mean) / scale
    bad = ~(np.abs(Z) <= float(np.finfo(model.dtype).max))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise click.BadParameter(
            f"{csv_path}: line {int(lines[i])}, column {info['feature_names'][j]!r}: the value {X[i, j]:.6g} is too "
            f"large: standardized with the training data's scaling it exceeds the model's {model.dtype} range",
            ctx,
            param_hint="'FILE.csv'",
        )
    out_values = model.predict(Z, batch_size=batch_size, verbose=0).astype(np.float64)
    task = info["task"]
    if task == "regression":
        ts = info["target_scaler"]
        rows = [[_fmt(v)] for v in out_values.reshape(-1) * ts["scale"] + ts["mean"]]
    else:
        labels = info["class_labels"]
        probs = np.column_stack([1.0 - out_values[:, 0], out_values[:, 0]]) if task == "binary" else out_values
        rows = [[labels[int(k)]] + [_fmt(p) for p in row] for k, row in zip(probs.argmax(axis=1), probs)]
    if ids is not None:
        rows = [[i, *row] for i, row in zip(ids, rows)]
    return rows


def _predict_header(ctx, model, info, id_column):
    task = info["task"]
    if task == "regression":
        header = ["prediction"]
    else:
        labels = info["class_labels"]
        outputs = 2 if task == "binary" else model.output_dim
        if (task == "binary" and model.output_dim != 1) or outputs != len(labels):
            raise click.BadParameter(
                f"the model has {model.output_dim} outputs but {len(labels)} class labels are stored", ctx, param_hint="'MODEL'"
            )
        header = ["prediction"] + [f"prob_{label}" for label in labels]
    return ([id_column] if id_column is not None else []) + header


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("csv_path", metavar="FILE.csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), metavar="PREDS.csv", help="Write the predictions here [default: standard output].")
@click.option("--id-column", metavar="COLUMN", help="Copy this column of FILE.csv into the output, first, to match rows.")
@click.option("--delimiter", default=",", show_default=True, callback=_delimiter, help="The field separator of FILE.csv.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES, case_sensitive=False), help="numpy, cuda or auto [default: $GPUNN_BACKEND or auto].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.pass_context
def predict(ctx, model_path, csv_path, out, id_column, delimiter, backend, batch_size):
    """Predict with a model saved by `gpunn train --save MODEL`.

    Features are taken from FILE.csv by column name (a target column and any
    other extra columns are ignored).  Writes one row per input record, in
    the same order: the predicted class and one probability column per
    class, or the predicted value for regression.  A record that cannot be
    predicted (an empty or non-numeric cell) is an error naming its line.
    """
    from gpunn import csvdata, saving

    _check_destination(ctx, out, "--out", [("input file (FILE.csv)", csv_path), ("model file (MODEL)", model_path)])
    _select_backend(ctx, backend)
    try:
        model, user_metadata = saving.load_model_with_metadata(model_path, gpunn.Sequential, compile=False)
        info = load_preprocessing(model_path, user_metadata or {})
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'MODEL'") from None
    if model.input_dim != len(info["feature_names"]):
        raise click.BadParameter(
            f"the model takes {model.input_dim} features but its preprocessing names "
            f"{len(info['feature_names'])}; the two do not belong together",
            ctx,
            param_hint="'MODEL'",
        )
    header = _predict_header(ctx, model, info, id_column)
    chunks = csvdata.iter_feature_chunks(csv_path, info["feature_names"], id_column=id_column, delimiter=delimiter)

    def write_all(file):
        count = 0
        writer = csv.writer(file, lineterminator="\n")
        try:
            for X, lines, ids in chunks:
                rows = _predict_rows(ctx, model, info, X, lines, ids, batch_size, csv_path)
                if count == 0:  # after the first chunk: a file that fails early prints nothing
                    writer.writerow(header)
                writer.writerows(rows)
                count += len(lines)
        except csvdata.CSVDataError as exc:
            missing_id = isinstance(exc, csvdata.MissingColumnError) and "no column named" in str(exc)
            hint = "'--id-column'" if missing_id else "'FILE.csv'"
            raise click.BadParameter(str(exc), ctx, param_hint=hint) from None
        return count

    if out is None:
        write_all(sys.stdout)
        return
    try:
        with saving.atomic_destination(out, "--out") as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                count = write_all(f)
    except OSError as exc:
        raise click.ClickException(f"--out: could not write {out!r}: {exc}") from None
    click.echo(f"Wrote {count} predictions to {out}", err=True)


@main.command("export")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "export_format", type=click.Choice(["onnx"], case_sensitive=False), default="onnx", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE", help="Write the exported model here (e.g. model.onnx).")
@click.pass_context
def export(ctx, model_path, export_format, out):
    """Export a saved model to ONNX, for ONNX Runtime and other servers.

    A model saved by `gpunn train --save MODEL` exports with its
    preprocessing inside the graph: it takes raw feature rows and returns
    the predicted label and class probabilities, or the prediction in the
    target's units, as `gpunn predict` does.
    """
    from gpunn import saving
    from gpunn.onnx_export import export_onnx

    _check_destination(ctx, out, "--out", [("model file (MODEL)", model_path)])
    gpunn.set_backend("numpy")  # exporting reads the weights once: no GPU needed
    try:
        model, user_metadata = saving.load_model_with_metadata(model_path, gpunn.Sequential, compile=False)
        trained_by_cli = "preprocessing" in (user_metadata or {}) or os.path.exists(preprocess_path(model_path))
        info = load_preprocessing(model_path, user_metadata or {}) if trained_by_cli else None
        export_onnx(model, out, preprocessing=info)
    except (ValueError, NotImplementedError) as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'MODEL'") from None
    except ModuleNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"--out: could not write {out!r}: {exc}") from None
    if info is None:
        what = f"input 'features' (batch, {model.input_dim}) float32, output 'output' (batch, {model.output_dim})"
    else:
        outputs = "'prediction'" if info["task"] == "regression" else "'label', 'probabilities'"
        what = f"input 'features' (batch, {model.input_dim}) float64 raw rows with preprocessing, outputs {outputs}"
    click.echo(f"Wrote {export_format.lower()} model to {out}: {what}")


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
    """Benchmark gpunn's backends (needs the 'bench' extra; see benchmarks/README.md)."""
    import importlib

    try:
        bench_mod = importlib.import_module("gpunn.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "gpunn.bench":
            raise
        bench_mod = None
    missing = ["gpunn.bench"] if bench_mod is None else bench_mod.missing_requirements()
    if missing:
        click.echo(
            f"Error: gpunn bench needs the optional 'bench' extra, which is not installed (missing: {', '.join(missing)}).\n"
            "Install it with: pip install 'gpunn[bench]'  (from a source checkout: pip install '.[bench]')",
            err=True,
        )
        ctx.exit(2)
    result = bench_mod.main(quick=quick, out=out)
    if isinstance(result, int) and not isinstance(result, bool) and result:
        ctx.exit(result)
    if isinstance(result, (str, os.PathLike)):
        click.echo(f"Report: {os.fspath(result)}")


if __name__ == "__main__":  # pragma: no cover
    main()
