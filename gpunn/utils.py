"""Keras's small utilities: ``to_categorical``, ``normalize``, ``set_random_seed``, ``clear_session``."""

from __future__ import annotations

import random

import numpy as np

from gpunn import checks, layer_base
from gpunn import random as grandom


def _labels(x):
    """Integer class labels (int64) from ``x``; TypeError/ValueError for anything else."""
    arr = np.asarray(x)
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool
    if not numeric:
        raise TypeError(f"x: expected integer class labels, got an array of dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr))):
        raise ValueError("x: expected integer class labels, got non-integer values")
    labels = arr.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"x: expected class labels >= 0, got {int(labels.min())}")
    return labels


def to_categorical(x, num_classes=None):
    """One-hot rows for integer class labels, as Keras: shape ``x.shape + (num_classes,)`` (a
    trailing axis of length 1 is dropped first), float64; ``num_classes`` defaults to max + 1."""
    labels = _labels(x)
    shape = labels.shape[:-1] if labels.ndim > 1 and labels.shape[-1] == 1 else labels.shape
    labels = labels.reshape(-1)
    largest = int(labels.max()) if labels.size else -1
    if not num_classes:
        num_classes = largest + 1
    else:
        num_classes = checks.positive_int(num_classes, "num_classes")
        if largest >= num_classes:
            raise ValueError(f"x: label {largest} is out of range for num_classes={num_classes}")
    categorical = np.zeros((labels.shape[0], num_classes))
    categorical[np.arange(labels.shape[0]), labels] = 1
    return categorical.reshape(shape + (num_classes,))


def normalize(x, axis=-1, order=2):
    """``x`` divided by its ``order``-norm along ``axis`` (zero norms left as 1), as Keras does."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"x: expected a numeric array, got dtype {arr.dtype}")
    norm = np.atleast_1d(np.linalg.norm(arr, order, axis))
    norm[norm == 0] = 1
    axis = axis or -1
    return arr / np.expand_dims(norm, axis)


def set_random_seed(seed):
    """Seed Python's, NumPy's and gpunn's generators (gpunn's fixes initial weights, shuffling,
    dropout masks): with the same seed, a NumPy-backend run repeats bit for bit."""
    seed = checks.positive_int(seed, "seed", minimum=0)
    random.seed(seed)
    grandom.set_seed(seed)


def clear_session(free_memory=True):
    """Keras's ``clear_session``: layer names start over (``dense``, ``dense_1``...).  Models
    hold their own state, so nothing else needs resetting; harmless to call at any time."""
    layer_base.reset_names()
