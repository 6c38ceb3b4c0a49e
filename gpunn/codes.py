"""The tables of ops: activations, fused loss kinds and optimizers, as integer enums.

Each member is one op.  Its lower-case name is the name of its scalar math in
:mod:`gpunn.opmath` (``Act.ELU`` -> ``opmath.elu`` and ``opmath.elu_grad``),
and its attributes say what the rest of gpunn needs to know about it, so
validation, dispatch and the tests' parametrisation all iterate these enums:
adding an op is one member here plus its math.

Kernels specialise on these codes at compile time; members are ``int``s
(``Act.RELU == 1``).  This module imports nothing heavy.
"""

from __future__ import annotations

import enum


class Act(enum.IntEnum):
    """Activations the fused linear kernels apply in their epilogue.

    ``needs_preactivation``: the derivative cannot be recovered from the
    output ``y`` alone, so the forward pass also keeps ``z = x @ w + b``.
    ``default_alpha``: Keras's default for the activation's one parameter
    (leaky ReLU's negative slope, ELU's alpha), 0 where it has none.
    """

    def __new__(cls, value, needs_preactivation=False, default_alpha=0.0):
        member = int.__new__(cls, value)
        member._value_ = value
        member.needs_preactivation = needs_preactivation
        member.default_alpha = default_alpha
        return member

    LINEAR = 0
    RELU = 1
    LEAKY_RELU = 2, False, 0.2
    SIGMOID = 3
    TANH = 4
    GELU = 5, True
    ELU = 6, False, 1.0
    SELU = 7
    SOFTPLUS = 8
    SOFTSIGN = 9
    SWISH = 10, True
    RELU6 = 11
    HARD_SIGMOID = 12
    MISH = 13, True
    EXPONENTIAL = 14

    @property
    def math_name(self) -> str:
        return self.name.lower()

    @property
    def keeps_z(self) -> bool:
        """Whether a fused forward pass needs a second (M, N) buffer ``z`` for its backward pass.

        True for the activations that need the pre-activation, and for those
        whose derivative from ``y`` costs the GPU's backward loop too much
        (softplus, ELU, SELU, relu6, hard_sigmoid): a backend may store
        ``act'(z)`` itself there in the forward epilogue, so that backward
        needs one multiply per element.
        """
        return self.needs_preactivation or self in _DERIVATIVE_WORTH_STORING


class LossKind(enum.IntEnum):
    """Fused loss kinds: each folds the output non-linearity (when any) into the loss.

    ``elementwise``: the row loss reduces an elementwise loss
    ``opmath.<function>(p, t, param) -> (loss, dloss/dp, hit)`` over the N
    outputs, by its mean, or by its sum when ``summed``; the others are
    row-wise losses (``opmath.<function>(pred, target, grad, i, gscale,
    sparse, has_grad) -> (loss_i, hit_i)``).  ``sparse``: targets are integer
    class indices, one per row.  ``classification``: the loss pass also
    counts accuracy hits.  ``param``: the name of the loss's one parameter
    (Huber's delta), passed to the elementwise function.
    """

    def __new__(cls, value, function, elementwise, sparse=False, classification=False, summed=False, param=None):
        member = int.__new__(cls, value)
        member._value_ = value
        member.function = function
        member.elementwise = elementwise
        member.sparse = sparse
        member.classification = classification
        member.summed = summed
        member.param = param
        return member

    SIGMOID_BCE = 0, "loss_sigmoid_bce", True, False, True  # logits, targets in [0, 1]
    SOFTMAX_CCE = 1, "loss_softmax_cce", False, False, True  # logits, one-hot or probability targets
    SOFTMAX_SPARSE_CCE = 2, "loss_softmax_cce", False, True, True  # logits, integer class targets
    BCE = 3, "loss_bce", True, False, True  # probabilities, targets in [0, 1]
    CCE = 4, "loss_cce", False, False, True  # probabilities (normalised per row), one-hot targets
    SPARSE_CCE = 5, "loss_cce", False, True, True  # probabilities (normalised per row), integer targets
    MSE = 6, "loss_mse", True
    MAE = 7, "loss_mae", True
    HUBER = 8, "loss_huber", True, False, False, False, "delta"
    LOG_COSH = 9, "loss_log_cosh", True
    POISSON = 10, "loss_poisson", True
    HINGE = 11, "loss_hinge", True  # targets in {-1, 1}
    SQUARED_HINGE = 12, "loss_squared_hinge", True
    MAPE = 13, "loss_mape", True
    MSLE = 14, "loss_msle", True
    KL_DIVERGENCE = 15, "loss_kl_divergence", True, False, False, True
    CATEGORICAL_HINGE = 16, "loss_categorical_hinge", False
    COSINE_SIMILARITY = 17, "loss_cosine_similarity", False


class Opt(enum.IntEnum):
    """Optimizers updating one flat parameter buffer.

    ``step``: the name of its element update in :mod:`gpunn.opmath`
    (``step(p, g, state, k, h) -> p``); ``slots``: its state rows, in order.
    """

    def __new__(cls, value, step, slots):
        member = int.__new__(cls, value)
        member._value_ = value
        member.step = step
        member.slots = slots
        return member

    SGD = 0, "sgd_step", ("velocity",)
    ADAM = 1, "adam_step", ("m", "v", "v_hat")
    ADAMW = 2, "adam_step", ("m", "v", "v_hat")
    RMSPROP = 3, "rmsprop_step", ("velocity", "average_gradient", "momentum")
    NADAM = 4, "nadam_step", ("m", "v")
    ADAGRAD = 5, "adagrad_step", ("accumulator",)
    ADADELTA = 6, "adadelta_step", ("accumulated_grad", "accumulated_delta_var")
    ADAMAX = 7, "adamax_step", ("m", "u")
    LION = 8, "lion_step", ("m",)
    FTRL = 9, "ftrl_step", ("accumulator", "linear")
    SGD_NESTEROV = 10, "sgd_nesterov_step", ("velocity",)


# The flat names older code and tests use; each is the enum member itself.
ACT_LINEAR, ACT_RELU, ACT_LEAKY_RELU, ACT_SIGMOID, ACT_TANH, ACT_GELU = (
    Act.LINEAR, Act.RELU, Act.LEAKY_RELU, Act.SIGMOID, Act.TANH, Act.GELU,
)  # fmt: skip
LOSS_SIGMOID_BCE, LOSS_SOFTMAX_CCE, LOSS_SOFTMAX_SPARSE_CCE, LOSS_BCE = (
    LossKind.SIGMOID_BCE, LossKind.SOFTMAX_CCE, LossKind.SOFTMAX_SPARSE_CCE, LossKind.BCE,
)  # fmt: skip
LOSS_CCE, LOSS_SPARSE_CCE, LOSS_MSE, LOSS_MAE = LossKind.CCE, LossKind.SPARSE_CCE, LossKind.MSE, LossKind.MAE
OPT_SGD, OPT_ADAM, OPT_ADAMW, OPT_RMSPROP = Opt.SGD, Opt.ADAM, Opt.ADAMW, Opt.RMSPROP

#: Activations whose derivative needs the pre-activation ``z``.
ACT_NEEDS_PREACTIVATION = frozenset(a for a in Act if a.needs_preactivation)

#: Activations whose derivative from y costs more than the backward main loop can hide: softplus
#: (-expm1(-y)), and the two-sided tests of ELU, SELU, relu6 and hard_sigmoid (an add or a second
#: compare per element left the 64x64 backward-data loop at a 0.6995 FMA share, offline sm_90).
_DERIVATIVE_WORTH_STORING = frozenset({Act.SOFTPLUS, Act.ELU, Act.SELU, Act.RELU6, Act.HARD_SIGMOID})

#: Activations whose fused forward pass keeps a z buffer (``Act.keeps_z``).
ACT_KEEPS_Z = frozenset(a for a in Act if a.keeps_z)

#: Loss kinds whose targets are integer class indices of shape (M,).
SPARSE_LOSSES = frozenset(k for k in LossKind if k.sparse)

#: Loss kinds with a natural accuracy that the loss pass also counts.
CLASSIFICATION_LOSSES = frozenset(k for k in LossKind if k.classification)

#: Probabilities are clipped to [EPSILON, 1 - EPSILON] before a logarithm (Keras's epsilon).
EPSILON = 1e-7


def _member(table, code, argument, what):
    """``code`` as a member of enum ``table``, or ValueError naming ``argument`` (bools are not codes)."""
    try:
        if isinstance(code, bool):
            raise TypeError
        return table(code)
    except (ValueError, TypeError):
        raise ValueError(f"{argument}: unknown {what} code {code!r}; expected one of {[int(m) for m in table]}") from None


def activation(code, argument: str = "act") -> Act:
    """``code`` as an :class:`Act` member, or ValueError naming ``argument``."""
    return _member(Act, code, argument, "activation")


def loss_kind(code, argument: str = "kind") -> LossKind:
    """``code`` as a :class:`LossKind` member, or ValueError naming ``argument``."""
    return _member(LossKind, code, argument, "loss")


def optimizer(code, argument: str = "opt") -> Opt:
    """``code`` as an :class:`Opt` member, or ValueError naming ``argument``."""
    return _member(Opt, code, argument, "optimizer")
