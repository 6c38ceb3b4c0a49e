"""gpunn.kernels: gpunn's fused CUDA kernels (Numba) and their launch wrappers.

Each wrapper has the name, arguments and meaning of the function of the same
name in :mod:`gpunn.backend.numpy_ops`, plus a trailing ``stream=0``
keyword.  Kernels are compiled per (dtype, activation/kind, flags) on first
use and cached.
"""

from .activation import activation_backward, apply_activation
from .dropout import dropout
from .gather import gather_rows
from .linear import linear_backward_data, linear_backward_weight, linear_forward
from .loss import loss_grad
from .optimizers import optimizer_update

__all__ = [
    "activation_backward",
    "apply_activation",
    "dropout",
    "gather_rows",
    "linear_backward_data",
    "linear_backward_weight",
    "linear_forward",
    "loss_grad",
    "optimizer_update",
]
