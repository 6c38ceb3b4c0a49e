"""gpunn: train small neural networks (MLPs) with a Keras-shaped API.

The GPU path runs gpunn's own fused Numba CUDA kernels on CuPy arrays; the
CPU path runs the same model with NumPy.  Quick start::

    import gpunn
    model = gpunn.Sequential([
        gpunn.layers.Dense(64, activation="relu"),
        gpunn.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(X, y, epochs=10)
"""

from __future__ import annotations

import logging as _logging

from gpunn import activations, callbacks, distributed, initializers, layers, losses, metrics, models, optimizers, regularizers, utils
from gpunn import backend
from gpunn.backend import get_backend, set_backend, use_backend
from gpunn.config import floatx, set_floatx
from gpunn.layers import Input
from gpunn.models import DeviceMemoryError, Model, NonFiniteLossError, Sequential, load_model
from gpunn.random import set_seed
from gpunn.saving import MODEL_SUFFIX, ModelFileError

__version__ = "0.1.0"

_logging.getLogger("gpunn").addHandler(_logging.NullHandler())

__all__ = [
    "MODEL_SUFFIX",
    "DeviceMemoryError",
    "Input",
    "Model",
    "ModelFileError",
    "NonFiniteLossError",
    "Sequential",
    "activations",
    "backend",
    "callbacks",
    "distributed",
    "floatx",
    "get_backend",
    "initializers",
    "layers",
    "load_model",
    "losses",
    "metrics",
    "models",
    "optimizers",
    "regularizers",
    "set_backend",
    "set_floatx",
    "set_seed",
    "use_backend",
    "utils",
]
