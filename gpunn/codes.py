"""Integer codes shared by the NumPy backend and the CUDA kernels.

Kernels specialise on these codes at compile time, so they are plain ``int``
constants; this module imports nothing heavy and may be imported anywhere.
"""

# Activations that the fused linear kernels apply in their epilogue.
ACT_LINEAR = 0
ACT_RELU = 1
ACT_LEAKY_RELU = 2
ACT_SIGMOID = 3
ACT_TANH = 4
ACT_GELU = 5

#: Activations whose derivative cannot be recovered from the output alone,
#: so the forward pass must also keep the pre-activation ``z``.
ACT_NEEDS_PREACTIVATION = frozenset({ACT_GELU})

# Loss kinds: each fuses the output non-linearity (when any) with the loss.
LOSS_SIGMOID_BCE = 0  # logits, targets in [0, 1]
LOSS_SOFTMAX_CCE = 1  # logits, one-hot or probability targets
LOSS_SOFTMAX_SPARSE_CCE = 2  # logits, integer class targets
LOSS_BCE = 3  # probabilities, targets in [0, 1]
LOSS_CCE = 4  # probabilities (normalised per row), one-hot targets
LOSS_SPARSE_CCE = 5  # probabilities (normalised per row), integer targets
LOSS_MSE = 6
LOSS_MAE = 7

#: Loss kinds whose targets are integer class indices of shape (M,).
SPARSE_LOSSES = frozenset({LOSS_SOFTMAX_SPARSE_CCE, LOSS_SPARSE_CCE})

#: Loss kinds with a natural accuracy that the loss pass also counts.
CLASSIFICATION_LOSSES = frozenset(
    {LOSS_SIGMOID_BCE, LOSS_SOFTMAX_CCE, LOSS_SOFTMAX_SPARSE_CCE, LOSS_BCE, LOSS_CCE, LOSS_SPARSE_CCE}
)

#: Probabilities are clipped to [EPSILON, 1 - EPSILON] before a logarithm (Keras's epsilon).
EPSILON = 1e-7

# Optimizers updating one flat parameter buffer.
OPT_SGD = 0
OPT_ADAM = 1
OPT_ADAMW = 2
OPT_RMSPROP = 3
