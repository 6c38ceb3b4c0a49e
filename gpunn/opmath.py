"""The scalar math of every op, written once for the CPU and the GPU.

Each function here is compiled twice: by Numba's CPU ``njit`` (inlined into
the fused loops of :mod:`gpunn.backend.cpu_fused`) and by Numba's CUDA target
as a device function (inlined into the kernels of :mod:`gpunn.kernels`).  The
CPU passes and the kernels differ only in how they loop over rows, columns
and threads; the arithmetic of an activation, a loss or an optimizer update
is the function below, so the two backends cannot drift apart.
:mod:`gpunn.backend.numpy_ops` is the independent, vectorised specification
both are tested against.

Names follow :mod:`gpunn.codes`: activation ``Act.X`` is ``x(z, alpha)``
with derivative ``x_grad(y, z, alpha)``; loss kind ``LossKind.K`` is the
function named by ``K.function``; optimizer ``Opt.O`` updates one element with
``o_step``.  Constants are written ``like(z, c)``: ``c`` in ``z``'s own
floating type, because a bare Python float literal would widen float32
arithmetic to float64 on the GPU.  Functions call only :mod:`math`, ``like``
and each other.
"""

from __future__ import annotations

import math

import numpy as np
from numba.extending import overload

from gpunn.codes import EPSILON, Act, LossKind, Opt

_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
#: SELU's constants (Klambauer et al. 2017), as Keras defines them.
SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805

#: Every function of this module that compiled code may call, in definition order.
SCALAR_FUNCTIONS: list = []

#: Numba options of every scalar function on the CPU: NumPy's float semantics
#: for 1/0 (inf, not an exception).  Each is inlined into its caller.
CPU_OPTIONS = dict(nogil=True, error_model="numpy")


def scalar(fn):
    """Mark ``fn`` as shared scalar math: plain Python, compiled where it is called.

    Registers ``fn`` as its own implementation for Numba's CPU target (inlined
    into the calling ``njit`` loop); :mod:`gpunn.kernels` registers the same
    function for the CUDA target.  Called from Python (tests, the CUDA
    simulator) it simply runs as Python.
    """
    overload(fn, inline="always", strict=False, jit_options=CPU_OPTIONS)(lambda *args: fn)
    SCALAR_FUNCTIONS.append(fn)
    return fn


def like(ref, value):
    """``value`` converted to the floating type of ``ref`` (float32 stays float32)."""
    return type(ref)(value)


def like_impl(ref, value):
    """Numba implementation of :func:`like` for argument types ``ref``, ``value``."""

    def impl(ref, value):
        return ref_type(value)

    ref_type = ref
    return impl


overload(like, inline="always")(like_impl)


# ----------------------------------------------------------------------------
# Activations.  forward(z, alpha) -> act(z); derivative(y, z, alpha) -> act'(z)
# where y = act(z).  The derivative reads only y unless the member of
# codes.Act says needs_preactivation (then z is the pre-activation; otherwise
# callers may pass anything of the right type for z).
# ----------------------------------------------------------------------------


@scalar
def linear(z, alpha):
    return z


@scalar
def linear_grad(y, z, alpha):
    return like(y, 1)


@scalar
def relu(z, alpha):
    return z if z > like(z, 0) else like(z, 0)


@scalar
def relu_grad(y, z, alpha):
    return like(y, 1) if y > like(y, 0) else like(y, 0)


@scalar
def leaky_relu(z, alpha):
    """``z`` for z > 0, else ``alpha z`` (alpha >= 0, Keras's negative_slope)."""
    return z if z > like(z, 0) else alpha * z


@scalar
def leaky_relu_grad(y, z, alpha):
    return like(y, 1) if y > like(y, 0) else alpha


@scalar
def sigmoid(z, alpha):
    # two branches so that exp never overflows
    if z >= like(z, 0):
        return like(z, 1) / (like(z, 1) + math.exp(-z))
    e = math.exp(z)
    return e / (like(z, 1) + e)


@scalar
def sigmoid_grad(y, z, alpha):
    return y * (like(y, 1) - y)


@scalar
def tanh(z, alpha):
    return math.tanh(z)


@scalar
def tanh_grad(y, z, alpha):
    return like(y, 1) - y * y


@scalar
def gelu(z, alpha):
    """Exact GELU (Keras's default, approximate=False): ``z Phi(z)``, Phi the normal CDF."""
    return z * (like(z, 0.5) * (like(z, 1) + math.erf(z * like(z, _SQRT_HALF))))


@scalar
def gelu_grad(y, z, alpha):
    cdf = like(z, 0.5) * (like(z, 1) + math.erf(z * like(z, _SQRT_HALF)))
    return cdf + z * (math.exp(-like(z, 0.5) * z * z) * like(z, _INV_SQRT_2PI))


@scalar
def elu(z, alpha):
    """``z`` for z > 0, else ``alpha (e^z - 1)`` (Keras: alpha = 1.0; alpha > 0 here)."""
    return z if z > like(z, 0) else alpha * math.expm1(z)


@scalar
def elu_grad(y, z, alpha):
    # for z <= 0, alpha e^z = y + alpha; y > 0 exactly when z > 0 (alpha > 0)
    return like(y, 1) if y > like(y, 0) else y + alpha


@scalar
def selu(z, alpha):
    """``scale z`` for z > 0, else ``scale alpha_selu (e^z - 1)``, Keras's fixed constants."""
    if z > like(z, 0):
        return like(z, SELU_SCALE) * z
    return like(z, SELU_SCALE * SELU_ALPHA) * math.expm1(z)


@scalar
def selu_grad(y, z, alpha):
    return like(y, SELU_SCALE) if y > like(y, 0) else y + like(y, SELU_SCALE * SELU_ALPHA)


@scalar
def softplus(z, alpha):
    """``log(1 + e^z)``, written so that neither branch overflows."""
    return max(z, like(z, 0)) + math.log1p(math.exp(-abs(z)))


@scalar
def softplus_grad(y, z, alpha):
    # sigmoid(z) = 1 - e^-y; expm1 keeps it accurate when y is tiny
    return -math.expm1(-y)


@scalar
def softsign(z, alpha):
    return z / (like(z, 1) + abs(z))


@scalar
def softsign_grad(y, z, alpha):
    # 1 / (1 + |z|)^2 with 1 / (1 + |z|) = 1 - |y|
    d = like(y, 1) - abs(y)
    return d * d


@scalar
def swish(z, alpha):
    """``z sigmoid(z)`` (Keras's swish, also called silu)."""
    return z * sigmoid(z, alpha)


@scalar
def swish_grad(y, z, alpha):
    s = sigmoid(z, alpha)
    return s * (like(z, 1) + z * (like(z, 1) - s))


@scalar
def relu6(z, alpha):
    return min(max(z, like(z, 0)), like(z, 6))


@scalar
def relu6_grad(y, z, alpha):
    return like(y, 1) if (y > like(y, 0) and y < like(y, 6)) else like(y, 0)


@scalar
def hard_sigmoid(z, alpha):
    """Keras 3's ``relu6(z + 3) / 6``: 0 below -3, 1 above 3, linear between."""
    return min(max(z + like(z, 3), like(z, 0)), like(z, 6)) / like(z, 6)


@scalar
def hard_sigmoid_grad(y, z, alpha):
    return like(y, 1) / like(y, 6) if (y > like(y, 0) and y < like(y, 1)) else like(y, 0)


@scalar
def mish(z, alpha):
    """``z tanh(softplus(z))`` (Misra 2019)."""
    return z * math.tanh(softplus(z, alpha))


@scalar
def mish_grad(y, z, alpha):
    t = math.tanh(softplus(z, alpha))
    return t + z * sigmoid(z, alpha) * (like(z, 1) - t * t)


@scalar
def exponential(z, alpha):
    return math.exp(z)


@scalar
def exponential_grad(y, z, alpha):
    return y


def activation_functions(act):
    """``(forward, derivative)`` scalar functions of activation code ``act``."""
    name = Act(act).math_name
    return globals()[name], globals()[name + "_grad"]


# ----------------------------------------------------------------------------
# Losses.  The batch loss is L = sum_i w_i l_i / M (Keras's sum over batch
# size).  Elementwise kinds: l_i is the mean (or, for LossKind.summed kinds,
# the sum) over the N outputs of f(p, t, param) -> (loss, dloss/dp, hit), and
# callers scale dloss/dp by gscale = w_i / (M N) (w_i / M when summed);
# param is the kind's one parameter (Huber's delta), else 0.  Row kinds (cross-entropies): the functions take the
# whole row i and write grad[i, :] scaled by gscale = w_i / M.  Sparse targets
# are read as target[i, 0] (an (M, 1) array of class indices).
# ----------------------------------------------------------------------------


@scalar
def loss_sigmoid_bce(p, t, param):
    """Binary cross-entropy of logit ``p``: ``max(p, 0) - p t + log(1 + e^-|p|)``."""
    zero, one = like(p, 0), like(p, 1)
    e = math.exp(-abs(p))
    s = one / (one + e) if p >= zero else e / (one + e)  # sigmoid(p), stable either side
    hit = one if (p > zero) == (t > like(p, 0.5)) else zero
    return max(p, zero) - p * t + math.log1p(e), s - t, hit


@scalar
def loss_bce(p, t, param):
    """Binary cross-entropy of probability ``p`` clipped to [eps, 1 - eps]; the clip's slope is 0 outside."""
    zero, one, half = like(p, 0), like(p, 1), like(p, 0.5)
    eps = like(p, EPSILON)
    high = one - eps
    pc = min(max(p, eps), high)
    g = zero
    if p > eps and p < high:
        g = (pc - t) / (pc * (one - pc))
    hit = one if (p > half) == (t > half) else zero
    return -(t * math.log(pc) + (one - t) * math.log(one - pc)), g, hit


@scalar
def loss_mse(p, t, param):
    d = p - t
    return d * d, like(p, 2) * d, like(p, 0)


@scalar
def loss_mae(p, t, param):
    d = p - t
    zero, one = like(p, 0), like(p, 1)
    return abs(d), one if d > zero else (-one if d < zero else zero), zero


@scalar
def loss_huber(p, t, param):
    """Huber with ``delta = param``: ``e^2 / 2`` for |e| <= delta, else ``delta (|e| - delta / 2)``; e = p - t."""
    e = p - t
    a = abs(e)
    quadratic = min(a, param)
    g = e if a <= param else (param if e > like(p, 0) else -param)
    return like(p, 0.5) * quadratic * quadratic + param * (a - quadratic), g, like(p, 0)


@scalar
def loss_log_cosh(p, t, param):
    """``log(cosh(e))`` written as ``e + softplus(-2 e) - log 2`` (no overflow); its slope is tanh(e)."""
    e = p - t
    x = like(p, -2) * e
    softplus_x = max(x, like(p, 0)) + math.log1p(math.exp(-abs(x)))
    return e + softplus_x - like(p, 0.6931471805599453), math.tanh(e), like(p, 0)


@scalar
def loss_poisson(p, t, param):
    """``p - t log(p + eps)``."""
    q = p + like(p, EPSILON)
    return p - t * math.log(q), like(p, 1) - t / q, like(p, 0)


@scalar
def loss_hinge(p, t, param):
    """``max(1 - t p, 0)`` for targets in {-1, 1}."""
    margin = like(p, 1) - t * p
    if margin > like(p, 0):
        return margin, -t, like(p, 0)
    return like(p, 0), like(p, 0), like(p, 0)


@scalar
def loss_squared_hinge(p, t, param):
    """``max(1 - t p, 0)^2`` for targets in {-1, 1}."""
    margin = max(like(p, 1) - t * p, like(p, 0))
    return margin * margin, like(p, -2) * t * margin, like(p, 0)


@scalar
def loss_mape(p, t, param):
    """``100 |t - p| / max(|t|, eps)``."""
    scale = like(p, 100) / max(abs(t), like(p, EPSILON))
    d = p - t
    sign = like(p, 1) if d > like(p, 0) else (-like(p, 1) if d < like(p, 0) else like(p, 0))
    return abs(d) * scale, sign * scale, like(p, 0)


@scalar
def loss_msle(p, t, param):
    """``(log(max(p, eps) + 1) - log(max(t, eps) + 1))^2``; no slope through the clip."""
    eps = like(p, EPSILON)
    d = math.log(max(p, eps) + like(p, 1)) - math.log(max(t, eps) + like(p, 1))
    g = like(p, 2) * d / (p + like(p, 1)) if p > eps else like(p, 0)
    return d * d, g, like(p, 0)


@scalar
def loss_kl_divergence(p, t, param):
    """``t log(t / p)`` with t and p clipped to [eps, 1]; summed over the outputs (LossKind.summed)."""
    eps, one = like(p, EPSILON), like(p, 1)
    tc = min(max(t, eps), one)
    pc = min(max(p, eps), one)
    g = -tc / pc if (p > eps and p < one) else like(p, 0)
    return tc * math.log(tc / pc), g, like(p, 0)


@scalar
def row_argmax(a, i):
    """(first index of the largest value in row i of ``a``, that value)."""
    best = 0
    top = a[i, 0]
    for j in range(1, a.shape[1]):
        if a[i, j] > top:
            top = a[i, j]
            best = j
    return best, top


@scalar
def row_class(target, i, sparse):
    """Row i's class: its integer label (sparse) or the first argmax of its target row."""
    if sparse:
        return int(target[i, 0])
    return row_argmax(target, i)[0]


@scalar
def target_at(target, i, j, label, sparse, ref):
    """Target probability of class j in row i (one-hot of ``label`` when sparse), in ``ref``'s type."""
    # No conditional expression here: ``sparse`` is a compile-time constant, and when Numba
    # prunes the branch it guards after inlining, the phi variable of a conditional expression
    # inside it is left out of the caller's scope (NumbaIRAssumptionWarning, on CPU and CUDA).
    if sparse:
        return like(ref, j == label)
    return like(ref, target[i, j])


@scalar
def loss_softmax_cce(pred, target, grad, i, gscale, sparse, has_grad):
    """Softmax cross-entropy of logits row i: ``l = lse(z) sum_j t_j - sum_j t_j (z_j - max z)``,
    with ``lse(z) = log S``, ``S = sum_j e_j``, ``e_j = exp(z_j - max z)``.

    Gradient ``(softmax(z)_j sum_k t_k - t_j) gscale`` with ``softmax(z)_j = e_j / S``;
    hit when argmax z is the class.  Each ``e_j`` is computed once: it is parked in
    ``grad[i, j]`` (when ``has_grad``) until S is known.  That stays correct if grad is
    pred itself, as element j of pred is not read again after e_j is stored.
    """
    n = pred.shape[1]
    best, zmax = row_argmax(pred, i)
    label = row_class(target, i, sparse)
    sumexp = like(zmax, 0)
    tsum = like(zmax, 0)
    tdot = like(zmax, 0)
    for j in range(n):
        shifted = pred[i, j] - zmax
        t = target_at(target, i, j, label, sparse, zmax)
        e = math.exp(shifted)
        if has_grad:
            grad[i, j] = e
        sumexp += e
        tsum += t
        tdot += t * shifted
    if has_grad:
        scale = tsum / sumexp
        for j in range(n):
            g = grad[i, j] * scale - target_at(target, i, j, label, sparse, zmax)
            grad[i, j] = g * gscale
    return math.log(sumexp) * tsum - tdot, like(zmax, 1) if best == label else like(zmax, 0)


@scalar
def loss_cce(pred, target, grad, i, gscale, sparse, has_grad):
    """Cross-entropy of probabilities row i, normalised by their sum s and clipped like Keras.

    ``l = -sum_j t_j log(clip(p_j / s))``; the gradient is taken through the
    normalisation, and is 0 through a clipped q_j = p_j / s.
    """
    n = pred.shape[1]
    best, top = row_argmax(pred, i)
    label = row_class(target, i, sparse)
    eps = like(top, EPSILON)
    high = like(top, 1) - eps
    s = like(top, 0)
    for j in range(n):
        s += pred[i, j]
    loss = like(top, 0)
    inside_t = like(top, 0)  # sum of t over the classes whose q is not clipped
    for j in range(n):
        t = target_at(target, i, j, label, sparse, top)
        q = pred[i, j] / s
        loss -= t * math.log(min(max(q, eps), high))
        if q > eps and q < high:
            inside_t += t
    if has_grad:
        common = inside_t / s
        for j in range(n):
            g = common
            q = pred[i, j] / s
            if q > eps and q < high:
                g -= target_at(target, i, j, label, sparse, top) / pred[i, j]
            grad[i, j] = g * gscale
    return loss, like(top, 1) if best == label else like(top, 0)


@scalar
def loss_categorical_hinge(pred, target, grad, i, gscale, sparse, has_grad):
    """``max(max_j (1 - t_j) p_j - sum_j t_j p_j + 1, 0)``; the gradient flows through the
    target's terms and the largest wrong-class term."""
    n = pred.shape[1]
    top = pred[i, 0]
    positive = like(top, 0)
    best = 0
    negative = (like(top, 1) - like(top, target[i, 0])) * top
    for j in range(n):
        t = like(top, target[i, j])
        positive += t * pred[i, j]
        candidate = (like(top, 1) - t) * pred[i, j]
        if candidate > negative:
            negative = candidate
            best = j
    loss = max(negative - positive + like(top, 1), like(top, 0))
    if has_grad:
        active = loss > like(top, 0)
        for j in range(n):
            t = like(top, target[i, j])
            g = like(top, 0)
            if active:
                g = -t
                if j == best:
                    g += like(top, 1) - t
            grad[i, j] = g * gscale
    return loss, like(top, 0)


@scalar
def loss_cosine_similarity(pred, target, grad, i, gscale, sparse, has_grad):
    """``-sum_j t_hat_j p_hat_j`` with x_hat = x / sqrt(max(sum x^2, 1e-12)) (Keras's l2_normalize)."""
    n = pred.shape[1]
    floor = like(pred[i, 0], 1e-12)
    pp = like(floor, 0)
    tt = like(floor, 0)
    tp = like(floor, 0)
    for j in range(n):
        p = pred[i, j]
        t = like(floor, target[i, j])
        pp += p * p
        tt += t * t
        tp += t * p
    p_norm = math.sqrt(max(pp, floor))
    t_norm = math.sqrt(max(tt, floor))
    cosine = tp / (t_norm * p_norm)
    if has_grad:
        # d/dp_j of -(t_hat . p) / |p| = -(t_hat_j - cos p_hat_j) / |p| (|p| not floored)
        floored = pp <= floor
        for j in range(n):
            t_hat = like(floor, target[i, j]) / t_norm
            g = -t_hat / p_norm
            if not floored:
                g += cosine * pred[i, j] / (p_norm * p_norm)
            grad[i, j] = g * gscale
    return -cosine, like(floor, 0)


def loss_function(kind):
    """The scalar (elementwise kinds) or row (cross-entropy kinds) function of loss ``kind``."""
    return globals()[LossKind(kind).function]


# ----------------------------------------------------------------------------
# Optimizers (Keras 3 update rules), one parameter element at a time:
# step(p, g, state, k, h) -> the new p, reading and writing element k of the
# optimizer's state rows state[s, k] (the slot order of the Optimizer class).
# h holds the step's scalars, computed on the host by the Optimizer class in
# the parameters' dtype; h[0] is always the decoupled weight decay factor
# 1 - lr * weight_decay, applied first as Keras applies weight decay before
# the update.  Flags in h are 1 or 0.
# ----------------------------------------------------------------------------

#: Length of the scalar tuple h every optimizer step receives (unused entries are 0).
OPTIMIZER_SCALARS = 8


@scalar
def sgd_step(p, g, state, k, h):
    """h = (decay, lr, momentum, use_momentum); state = (velocity,).
    Plain: ``p - lr g``.  Momentum: ``v = momentum v - lr g``, then ``p + v``."""
    p = p * h[0]
    if h[3] == like(p, 0):
        return p - h[1] * g
    v = h[2] * state[0, k] - h[1] * g
    state[0, k] = v
    return p + v


@scalar
def sgd_nesterov_step(p, g, state, k, h):
    """As :func:`sgd_step` with Nesterov momentum: ``p + (momentum v - lr g)``."""
    p = p * h[0]
    v = h[2] * state[0, k] - h[1] * g
    state[0, k] = v
    return p + (h[2] * v - h[1] * g)


@scalar
def adam_step(p, g, state, k, h):
    """h = (decay, lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), 1 - b1, 1 - b2, eps, amsgrad);
    state = (m, v[, v_hat]).  ``m += (g - m)(1 - b1)``; ``v += (g^2 - v)(1 - b2)``;
    AMSGrad: ``v_hat = max(v_hat, v)`` used for v; ``p -= m lr_t / (sqrt(v) + eps)``."""
    p = p * h[0]
    m = state[0, k] + (g - state[0, k]) * h[2]
    v = state[1, k] + (g * g - state[1, k]) * h[3]
    state[0, k] = m
    state[1, k] = v
    if h[5] != like(p, 0):
        v = max(state[2, k], v)
        state[2, k] = v
    return p - (m * h[1]) / (math.sqrt(v) + h[4])


@scalar
def rmsprop_step(p, g, state, k, h):
    """h = (decay, lr, rho, 1 - rho, momentum, eps, centered, use_momentum);
    state = (velocity, average_gradient, momentum).  ``v = rho v + (1 - rho) g^2``;
    centered: ``a = rho a + (1 - rho) g``, ``d = v - a^2``, else ``d = v``;
    ``inc = lr g / sqrt(d + eps)``; momentum: ``mb = momentum mb + inc; p -= mb``, else ``p -= inc``."""
    p = p * h[0]
    v = h[2] * state[0, k] + h[3] * g * g
    state[0, k] = v
    d = v
    if h[6] != like(p, 0):
        a = h[2] * state[1, k] + h[3] * g
        state[1, k] = a
        d = v - a * a
    inc = h[1] * g / math.sqrt(d + h[5])
    if h[7] != like(p, 0):
        mb = h[4] * state[2, k] + inc
        state[2, k] = mb
        return p - mb
    return p - inc


@scalar
def nadam_step(p, g, state, k, h):
    """h = (decay, lr, 1 - b1, 1 - b2, eps, u_{t+1} / (1 - U_{t+1}), (1 - u_t) / (1 - U_t), 1 - b2^t)
    with Keras's momentum schedule u_t = b1 (1 - 0.96^t / 2) and U_t = u_1 ... u_t; state = (m, v).
    ``m_hat = c1 m + c2 g``; ``p -= m_hat lr / (sqrt(v / (1 - b2^t)) + eps)``."""
    p = p * h[0]
    m = state[0, k] + (g - state[0, k]) * h[2]
    v = state[1, k] + (g * g - state[1, k]) * h[3]
    state[0, k] = m
    state[1, k] = v
    m_hat = h[5] * m + h[6] * g
    return p - (m_hat * h[1]) / (math.sqrt(v / h[7]) + h[4])


@scalar
def adagrad_step(p, g, state, k, h):
    """h = (decay, lr, eps); state = (accumulator,) starting at initial_accumulator_value.
    ``acc += g^2``; ``p -= lr g / sqrt(acc + eps)``."""
    p = p * h[0]
    acc = state[0, k] + g * g
    state[0, k] = acc
    return p - h[1] * g / math.sqrt(acc + h[2])


@scalar
def adadelta_step(p, g, state, k, h):
    """h = (decay, lr, rho, 1 - rho, eps); state = (accumulated_grad, accumulated_delta_var).
    ``ag = rho ag + (1 - rho) g^2``; ``delta = -sqrt(adv + eps) g / sqrt(ag + eps)``;
    ``adv = rho adv + (1 - rho) delta^2``; ``p += lr delta``."""
    p = p * h[0]
    ag = h[2] * state[0, k] + h[3] * g * g
    state[0, k] = ag
    delta = -math.sqrt(state[1, k] + h[4]) * g / math.sqrt(ag + h[4])
    state[1, k] = h[2] * state[1, k] + h[3] * delta * delta
    return p + h[1] * delta


@scalar
def adamax_step(p, g, state, k, h):
    """h = (decay, lr, 1 - b1, b2, eps, 1 - b1^t); state = (m, u).
    ``m += (g - m)(1 - b1)``; ``u = max(b2 u, |g|)``; ``p -= lr m / ((1 - b1^t)(u + eps))``."""
    p = p * h[0]
    m = state[0, k] + (g - state[0, k]) * h[2]
    u = max(h[3] * state[1, k], abs(g))
    state[0, k] = m
    state[1, k] = u
    return p - (h[1] * m) / (h[5] * (u + h[4]))


@scalar
def lion_step(p, g, state, k, h):
    """h = (decay, lr, b1, 1 - b1, b2, 1 - b2); state = (m,).
    ``p -= lr sign(b1 m + (1 - b1) g)``; then ``m = b2 m + (1 - b2) g``."""
    p = p * h[0]
    m = state[0, k]
    c = m * h[2] + g * h[3]
    step = like(p, 1) if c > like(p, 0) else (-like(p, 1) if c < like(p, 0) else like(p, 0))
    state[0, k] = m * h[4] + g * h[5]
    return p - h[1] * step


@scalar
def ftrl_step(p, g, state, k, h):
    """h = (decay, lr, -lr_power, l1, 2 l2 + beta / lr, 2 l2_shrinkage); state = (accumulator, linear).

    Keras 3's FTRL-proximal: ``n' = n + g^2``; ``z += g + 2 l2s p - (n'^-c - n^-c) / lr p``;
    ``p = (clip(z, -l1, l1) - z) / (n'^-c / lr + 2 l2 + beta / lr)``; ``n = n'`` with c = lr_power.
    """
    p = p * h[0]
    acc = state[0, k]
    new_acc = acc + g * g
    power_new = new_acc ** h[2]
    linear = state[1, k] + (g + h[5] * p) - (power_new - acc ** h[2]) / h[1] * p
    state[1, k] = linear
    state[0, k] = new_acc
    quadratic = power_new / h[1] + h[4]
    clipped = min(max(linear, -h[3]), h[3])
    return (clipped - linear) / quadratic


def optimizer_step(opt):
    """The scalar step function of optimizer code ``opt``."""
    return globals()[Opt(opt).step]


# ----------------------------------------------------------------------------
# Dropout masks: a counter-based generator, so a mask element is a pure
# function of (layer seed, training step, element index) -- the same on every
# backend, in any order, with nothing stored between steps.
#
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
# SC 2011; Random123's philox4x32_R with R = 10).  32-bit words are held in
# uint64 and masked after every operation: the code then runs unchanged as
# Python on NumPy uint64 scalars or arrays (the reference), under njit and in
# CUDA kernels (where the product of two masked words compiles to a
# 32 x 32 -> 64-bit multiply).
# ----------------------------------------------------------------------------

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SHIFT8 = np.uint64(8)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)
#: uint32 -> uniform in [0, 1): the top 24 bits times 2^-24 (exact in float32).
UNIFORM_BITS = 24


@scalar
def philox_round(c0, c1, c2, c3, k0, k1):
    """One Philox4x32 round: two 32 x 32 -> 64-bit products, their halves xored with the key."""
    p0 = _PHILOX_M0 * c0
    p1 = _PHILOX_M1 * c2
    return (
        (p1 >> _SHIFT32) ^ c1 ^ k0,
        p1 & _MASK32,
        (p0 >> _SHIFT32) ^ c3 ^ k1,
        p0 & _MASK32,
    )


@scalar
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): four uint32 words (in uint64)."""
    for _ in range(9):
        c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return philox_round(c0, c1, c2, c3, k0, k1)


@scalar
def dropout_bits(index, step, seed):
    """The top ``UNIFORM_BITS`` bits of Philox4x32-10's first word for dropout element ``index``.

    Counter = (index low, index high, step low, step high) 32-bit words, key =
    (seed low, seed high); all three are uint64.  ``index`` is the element's
    row-major position ``r * N + c`` in the layer's (M, N) output.  The
    element's uniform draw is ``bits * 2**-24`` (exact in float32).
    """
    word = philox4x32_10(index & _MASK32, index >> _SHIFT32, step & _MASK32, step >> _SHIFT32,
                         seed & _MASK32, seed >> _SHIFT32)[0]  # fmt: skip
    return word >> _SHIFT8


@scalar
def dropout_keep(index, step, seed, threshold):
    """Whether dropout keeps element ``index``: its uniform draw ``u >= rate``, i.e. (as
    ``u * 2**24`` is an integer) ``bits >= threshold = ceil(rate * 2**24)``.  uint64 arguments."""
    return dropout_bits(index, step, seed) >= threshold
