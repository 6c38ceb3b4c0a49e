"""Embedded data sets: small tabular problems that load offline.

A thin registry over scikit-learn's bundled loaders (the data ship inside
scikit-learn, so nothing is downloaded).  ``load(name)`` returns a
:class:`Dataset` with float64 features ``X``, targets ``y`` (class indices
for classification, floats for regression), the task, the class names and
the feature names::

    from gpunn import datasets
    data = datasets.load("breast_cancer")
    data.X.shape, data.task, data.class_names   # (569, 30), 'binary', ['malignant', 'benign']
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpunn.checks import lookup

#: the kinds of problem gpunn's command line knows how to set up
TASKS = ("binary", "multiclass", "regression")

#: the data set ``gpunn train`` uses when none is named
DEFAULT = "breast_cancer"


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    task: str
    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    #: class labels in class-index order (None for regression)
    class_names: list[str] | None
    target_name: str
    description: str

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


@dataclasses.dataclass(frozen=True)
class _Entry:
    loader: str  # name of the sklearn.datasets function
    task: str
    target_name: str
    description: str


_REGISTRY = {
    "breast_cancer": _Entry(
        "load_breast_cancer", "binary", "diagnosis", "Wisconsin breast-cancer diagnosis (malignant/benign) from 30 cell-nucleus measurements"
    ),
    "digits": _Entry("load_digits", "multiclass", "digit", "8x8 images of handwritten digits 0-9 (64 pixel intensities)"),
    "iris": _Entry("load_iris", "multiclass", "species", "Fisher's iris flowers: 3 species from 4 measurements"),
    "wine": _Entry("load_wine", "multiclass", "cultivar", "Italian wines: 3 cultivars from 13 chemical measurements"),
    "diabetes": _Entry(
        "load_diabetes", "regression", "progression", "Diabetes disease progression one year after baseline, from 10 measurements"
    ),
}


def names() -> list[str]:
    """Names of the embedded data sets, default first."""
    return [DEFAULT] + sorted(n for n in _REGISTRY if n != DEFAULT)


def load(name: str = DEFAULT) -> Dataset:
    """Load an embedded data set by name (ValueError listing the names if unknown)."""
    entry = lookup("dataset", "data set", name, _REGISTRY)
    key = name.strip().lower()
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, entry.loader)()
    X = np.ascontiguousarray(bunch.data, dtype=np.float64)
    if entry.task == "regression":
        y = np.asarray(bunch.target, dtype=np.float64)
        class_names = None
    else:
        y = np.asarray(bunch.target, dtype=np.int64)
        class_names = [str(c) for c in getattr(bunch, "target_names", np.unique(y))]
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [])] or [f"x{i}" for i in range(X.shape[1])]
    return Dataset(key, entry.task, X, y, feature_names, class_names, entry.target_name, entry.description)


def describe() -> list[dict]:
    """One row per data set: name, task, samples, features, classes, description."""
    rows = []
    for name in names():
        data = load(name)
        rows.append(
            {
                "name": name,
                "task": data.task,
                "samples": data.n_samples,
                "features": data.n_features,
                "classes": data.n_classes,
                "description": data.description,
            }
        )
    return rows
