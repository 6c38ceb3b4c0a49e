"""scikit-learn estimators: gpunn MLPs in pipelines, grid searches and cross-validation.

    from gpunn.sklearn import GpunnClassifier
    search = GridSearchCV(GpunnClassifier(), {"hidden_layer_sizes": [(32,), (64, 32)]}, n_jobs=2)
    search.fit(X, y)
    search.best_estimator_.export("best.onnx")      # serve with ONNX Runtime

The parameters follow :class:`sklearn.neural_network.MLPClassifier`, with
Keras's names where gpunn has its own (``epochs``, ``optimizer``):

- ``hidden_layer_sizes=(100,)``, ``activation="relu"`` (any of
  ``gpunn.activations.names()``): the hidden Dense layers;
- ``optimizer="adam"`` and ``learning_rate=None`` (the optimizer's Keras
  default: 0.001 for Adam); ``batch_size="auto"`` (``min(200, n_samples)``);
- ``epochs=200``: at most this many passes over the data.  Training stops
  earlier, as scikit-learn's MLP does, when the loss has not improved by
  ``tol=1e-4`` for ``n_iter_no_change=10`` epochs: the training loss, or
  with ``early_stopping=True`` the loss on a held-out ``validation_fraction``
  (stratified for classifiers), whose best weights are kept;
- ``class_weight`` (classifier): None, ``"balanced"`` or ``{label: weight}``;
- ``random_state``: None, an int or a ``RandomState``; an int makes ``fit``
  reproducible on the NumPy backend without reseeding the caller's randomness;
- ``backend``: None (the active one), ``"numpy"``, ``"cuda"`` or ``"auto"``;
- ``verbose``: 0, 1 or 2, as in ``Sequential.fit``.

A classifier ends in ``Dense(1, sigmoid)`` with binary cross-entropy for
two classes, ``Dense(C, softmax)`` with sparse categorical cross-entropy
for more; a regressor ends in ``Dense(n_outputs, linear)`` with MSE.  The
fitted network is ``model_`` (a :class:`gpunn.Sequential`).

Pickling (which joblib uses for ``n_jobs``) goes through scikit-learn's own
``__getstate__``: the network is stored as the bytes of a gpunn model file
(safetensors + JSON, never pickle) and rebuilt, with its integrity checked,
on the active backend (or ``backend``) when unpickled.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import tempfile

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

import gpunn
from gpunn import activations, optimizers
from gpunn.callbacks import EarlyStopping
from gpunn.random import seeded

#: rows per matrix product in ``predict``: inputs are padded to a multiple of it, so every
#: sample is computed in a product of exactly this many rows and its prediction does not
#: depend on what it is predicted with (BLAS sums in a different order for other sizes)
PREDICT_BLOCK_ROWS = 256


#: scikit-learn checks that minibatch training cannot pass, with the reason; give it to
#: ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)`` or
#: ``check_estimator(..., expected_failed_checks=expected_failed_checks(estimator))``
EXPECTED_FAILED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data": (
        "minibatch training: a sample with weight 2 and two copies of it with weight 1 minimise the same "
        "loss, but the copies fall into different shuffled minibatches (and the epoch has more steps), "
        "so the fitted weights differ"
    ),
}


def expected_failed_checks(estimator) -> dict:
    """The scikit-learn estimator checks ``estimator`` is expected to fail: {check name: reason}."""
    return dict(EXPECTED_FAILED_CHECKS) if isinstance(estimator, _GpunnEstimator) else {}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _backend_block(name):
    """Select backend ``name`` for a block (None: leave the active one), then restore the previous one."""
    return contextlib.nullcontext() if name is None else gpunn.use_backend(name)


class _GpunnEstimator(BaseEstimator):
    """What the classifier and the regressor share: the network, fit loop and pickling."""

    def _check_params(self):
        """The hidden layer sizes as a list, after checking every hyper-parameter."""
        sizes = self.hidden_layer_sizes
        if _is_int(sizes):
            sizes = (sizes,)
        if not isinstance(sizes, (tuple, list)) or not all(_is_int(s) and s > 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes: expected a tuple of positive integers such as (100,), got {self.hidden_layer_sizes!r}")
        activations.get(self.activation, "activation")
        if self.batch_size != "auto" and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size: expected 'auto' or a positive integer, got {self.batch_size!r}")
        for name in ("epochs", "n_iter_no_change"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.validation_fraction, numbers.Real) or not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction: expected a fraction in (0, 1), got {self.validation_fraction!r}")
        if not isinstance(self.tol, numbers.Real) or self.tol < 0:
            raise ValueError(f"tol: expected a non-negative number, got {self.tol!r}")
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise ValueError(f"early_stopping: expected a bool, got {self.early_stopping!r}")
        return [int(s) for s in sizes]

    def _optimizer(self):
        optimizer = optimizers.get(self.optimizer)
        if self.learning_rate is not None:
            optimizer.learning_rate = self.learning_rate
        return optimizer

    def _fit_network(self, X, y, sample_weight, output_layer, loss, stratify):
        """Build, compile and train ``model_`` on validated ``X`` and prepared targets ``y``."""
        hidden = self._check_params()
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape == (X.shape[0],) and not sample_weight.any():
                raise ValueError("sample_weight: expected some non-zero weights, got all weights zero")
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        batch_size = min(200, X.shape[0]) if self.batch_size == "auto" else int(self.batch_size)
        validation_data = None
        if self.early_stopping:
            parts = [X, y] if sample_weight is None else [X, y, sample_weight]
            try:
                split = train_test_split(*parts, test_size=self.validation_fraction, random_state=seed, stratify=stratify)
            except ValueError as exc:
                raise ValueError(
                    f"validation_fraction: cannot hold out {self.validation_fraction} of {X.shape[0]} samples "
                    f"for early stopping ({exc})"
                ) from None
            X, y = split[0], split[2]
            sample_weight = None if sample_weight is None else split[4]
            validation_data = (split[1], split[3]) if len(split) == 4 else (split[1], split[3], split[5])
        stopper = EarlyStopping(
            monitor="val_loss" if self.early_stopping else "loss",
            min_delta=self.tol,
            patience=self.n_iter_no_change,
            restore_best_weights=bool(self.early_stopping),
        )
        with seeded(seed), _backend_block(self.backend):
            model = gpunn.Sequential(
                [gpunn.Input(shape=(X.shape[1],))]
                + [gpunn.layers.Dense(units, activation=self.activation) for units in hidden]
                + [output_layer]
            )
            model.compile(optimizer=self._optimizer(), loss=loss)
            history = model.fit(
                X,
                y,
                batch_size=batch_size,
                epochs=self.epochs,
                verbose=self.verbose,
                sample_weight=sample_weight,
                validation_data=validation_data,
                callbacks=[stopper],
            )
        self.model_ = model
        self.n_iter_ = len(history.history["loss"])
        self.loss_curve_ = list(history.history["loss"])
        if self.early_stopping:
            self.validation_scores_ = list(history.history["val_loss"])
        return self

    def _network_output(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        n = X.shape[0]
        padded = -(-n // PREDICT_BLOCK_ROWS) * PREDICT_BLOCK_ROWS
        if padded != n:
            X = np.concatenate([X, np.zeros((padded - n, X.shape[1]), X.dtype)])
        return self.model_.predict(X, batch_size=PREDICT_BLOCK_ROWS, verbose=0)[:n]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    # -- pickling: the network travels as gpunn model-file bytes, never pickled itself
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns the live __dict__
        model = state.pop("model_", None)
        if model is not None:
            from gpunn.saving import serialize

            state["_model_file"] = serialize(model)
        return state

    def __setstate__(self, state):
        state = dict(state)
        blob = state.pop("_model_file", None)
        super().__setstate__(state)
        if blob is not None:
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "model" + gpunn.MODEL_SUFFIX)
                with open(path, "wb") as f:
                    f.write(blob)
                with _backend_block(getattr(self, "backend", None)):
                    self.model_ = gpunn.load_model(path, compile=False)

    def export(self, filepath, format="onnx"):
        """Write the fitted network as an ONNX graph that returns what ``predict`` returns.

        Input ``features`` (batch, n_features_in_) float32, columns in the
        order of ``feature_names_in_`` when fitted on a DataFrame.  A
        classifier's outputs are ``label`` (batch,) and ``probabilities``
        (batch, classes), as ``predict`` and ``predict_proba``; a regressor's
        is ``prediction`` in the targets' units (float64), (batch,) for one
        target, else (batch, n_outputs).
        """
        if format != "onnx":
            raise ValueError(f"format: expected 'onnx' (the export format gpunn writes), got {format!r}")
        check_is_fitted(self, "model_")
        from gpunn.onnx_export import export_onnx

        export_onnx(self.model_, filepath, preprocessing=self._export_spec())

    def _feature_names(self):
        names = getattr(self, "feature_names_in_", None)
        return None if names is None else [str(n) for n in names]


class GpunnClassifier(ClassifierMixin, _GpunnEstimator):
    """A gpunn MLP classifier with scikit-learn's interface (see the module docstring).

    Attributes after ``fit``: ``classes_``, ``n_features_in_``,
    ``feature_names_in_`` (DataFrame input), ``model_``, ``n_iter_`` (epochs
    run), ``loss_curve_`` and, with early stopping, ``validation_scores_``
    (validation losses).
    """

    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        optimizer="adam",
        learning_rate=None,
        batch_size="auto",
        epochs=200,
        validation_fraction=0.1,
        early_stopping=False,
        tol=1e-4,
        n_iter_no_change=10,
        class_weight=None,
        random_state=None,
        backend=None,
        verbose=0,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.class_weight = class_weight
        self.random_state = random_state
        self.backend = backend
        self.verbose = verbose

    def fit(self, X, y, sample_weight=None):
        """Train on ``X`` (n_samples, n_features) and class labels ``y`` (n_samples,)."""
        X, y = validate_data(self, X, y, dtype=(np.float32, np.float64))
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        if len(self.classes_) < 2:
            raise ValueError(f"y: expected samples of at least two classes, got 1 class ({self.classes_[0]!r})")
        index = encoder.transform(y)
        if self.class_weight is not None:
            weights = compute_sample_weight(self.class_weight, y)
            sample_weight = weights if sample_weight is None else np.asarray(sample_weight, dtype=np.float64) * weights
        if len(self.classes_) == 2:
            output, loss, targets = gpunn.layers.Dense(1, activation="sigmoid"), "binary_crossentropy", index.reshape(-1, 1)
        else:
            output = gpunn.layers.Dense(len(self.classes_), activation="softmax")
            loss, targets = "sparse_categorical_crossentropy", index
        stratify = index if np.bincount(index).min() >= 2 else None
        return self._fit_network(X, targets, sample_weight, output, loss, stratify)

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), columns in ``classes_`` order."""
        out = self._network_output(X).astype(np.float64)
        if out.shape[1] == 1:
            return np.column_stack([1.0 - out[:, 0], out[:, 0]])
        return out

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """The most probable class label for each sample (n_samples,)."""
        probabilities = self.predict_proba(X)
        return self.classes_[probabilities.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags

    def _export_spec(self):
        task = "binary" if len(self.classes_) == 2 else "multiclass"
        return {"task": task, "class_labels": list(self.classes_.tolist()), "feature_names": self._feature_names()}


class GpunnRegressor(RegressorMixin, _GpunnEstimator):
    """A gpunn MLP regressor with scikit-learn's interface (see the module docstring).

    ``y`` may be (n_samples,) or (n_samples, n_outputs); ``predict`` returns
    the same shape.  As ``gpunn train`` does, the network is trained on
    standardized targets (each output's mean and standard deviation, kept in
    ``target_mean_`` and ``target_scale_``) and ``predict`` maps its output
    back to the targets' units, so the defaults work whatever the targets'
    scale; ``loss_curve_`` is in standardized units.
    """

    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        optimizer="adam",
        learning_rate=None,
        batch_size="auto",
        epochs=200,
        validation_fraction=0.1,
        early_stopping=False,
        tol=1e-4,
        n_iter_no_change=10,
        random_state=None,
        backend=None,
        verbose=0,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.backend = backend
        self.verbose = verbose

    def fit(self, X, y, sample_weight=None):
        """Train on ``X`` (n_samples, n_features) and targets ``y`` ((n_samples,) or (n_samples, n_outputs))."""
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=(np.float32, np.float64))
        self._single_output = y.ndim == 1
        targets = np.asarray(y.reshape(-1, 1) if y.ndim == 1 else y, dtype=np.float64)
        self.target_mean_ = targets.mean(axis=0)
        scale = targets.std(axis=0)
        self.target_scale_ = np.where(scale > 0, scale, 1.0)
        output = gpunn.layers.Dense(targets.shape[1], activation="linear")
        standardized = (targets - self.target_mean_) / self.target_scale_
        return self._fit_network(X, standardized, sample_weight, output, "mse", None)

    def predict(self, X):
        """Predicted targets: (n_samples,) for one target, else (n_samples, n_outputs)."""
        out = self._network_output(X).astype(np.float64) * self.target_scale_ + self.target_mean_
        return out[:, 0] if self._single_output else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def _export_spec(self):
        target_scaler = {"mean": self.target_mean_.tolist(), "scale": self.target_scale_.tolist()}
        return {"task": "regression", "feature_names": self._feature_names(), "target_scaler": target_scaler}
