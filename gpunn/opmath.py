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

from numba.extending import overload

from gpunn.codes import EPSILON, Act, LossKind

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
# size).  Elementwise kinds: l_i is the mean over the N outputs of
# f(p, t) -> (loss, dloss/dp, hit), and callers scale dloss/dp by
# gscale = w_i / (M N).  Row kinds (cross-entropies): the functions take the
# whole row i and write grad[i, :] scaled by gscale = w_i / M.  Sparse targets
# are read as target[i, 0] (an (M, 1) array of class indices).
# ----------------------------------------------------------------------------


@scalar
def loss_sigmoid_bce(p, t):
    """Binary cross-entropy of logit ``p``: ``max(p, 0) - p t + log(1 + e^-|p|)``."""
    zero, one = like(p, 0), like(p, 1)
    e = math.exp(-abs(p))
    s = one / (one + e) if p >= zero else e / (one + e)  # sigmoid(p), stable either side
    hit = one if (p > zero) == (t > like(p, 0.5)) else zero
    return max(p, zero) - p * t + math.log1p(e), s - t, hit


@scalar
def loss_bce(p, t):
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
def loss_mse(p, t):
    d = p - t
    return d * d, like(p, 2) * d, like(p, 0)


@scalar
def loss_mae(p, t):
    d = p - t
    zero, one = like(p, 0), like(p, 1)
    return abs(d), one if d > zero else (-one if d < zero else zero), zero


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
    if sparse:
        return like(ref, 1) if j == label else like(ref, 0)
    return like(ref, target[i, j])


@scalar
def loss_softmax_cce(pred, target, grad, i, gscale, sparse, has_grad):
    """Softmax cross-entropy of logits row i: ``l = lse(z) sum_j t_j - sum_j t_j (z_j - max z)``.

    Gradient ``(softmax(z)_j sum_k t_k - t_j) gscale``; hit when argmax z is the class.
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
        sumexp += math.exp(shifted)
        tsum += t
        tdot += t * shifted
    lse = math.log(sumexp)
    if has_grad:
        for j in range(n):
            g = math.exp(pred[i, j] - zmax - lse) * tsum - target_at(target, i, j, label, sparse, zmax)
            grad[i, j] = g * gscale
    return lse * tsum - tdot, like(zmax, 1) if best == label else like(zmax, 0)


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


def loss_function(kind):
    """The scalar (elementwise kinds) or row (cross-entropy kinds) function of loss ``kind``."""
    return globals()[LossKind(kind).function]


# ----------------------------------------------------------------------------
# Optimizers (Keras 3 update rules), one parameter element at a time.  The
# per-step scalars (learning rate, bias correction, ...) are computed on the
# host by the *_scalars helpers and passed in the parameters' dtype.
# ----------------------------------------------------------------------------


@scalar
def sgd_step(p, g, v, lr, momentum, use_momentum, nesterov):
    """-> (p, v).  Plain: ``p - lr g``.  Momentum: ``v = momentum v - lr g``, then
    ``p + v`` or, Nesterov, ``p + (momentum v - lr g)``."""
    if not use_momentum:
        return p - lr * g, v
    v = momentum * v - lr * g
    if nesterov:
        return p + (momentum * v - lr * g), v
    return p + v, v


def adam_scalars(lr, beta1, beta2, epsilon, step, weight_decay):
    """Host-side scalars of one Adam/AdamW step t = ``step`` (1-based):
    (decay = 1 - lr wd, lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), 1 - b1, 1 - b2, eps)."""
    lr_t = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    return 1 - lr * weight_decay, lr_t, 1 - beta1, 1 - beta2, epsilon


@scalar
def adam_step(p, g, m, v, decay, lr_t, one_m_beta1, one_m_beta2, eps):
    """-> (p, m, v).  ``m += (g - m)(1 - b1)``; ``v += (g^2 - v)(1 - b2)``;
    ``p = p decay - m / (sqrt(v) + eps) lr_t`` (decay = 1 - lr wd is AdamW's decoupled decay)."""
    m = m + (g - m) * one_m_beta1
    v = v + (g * g - v) * one_m_beta2
    return p * decay - m / (math.sqrt(v) + eps) * lr_t, m, v


@scalar
def rmsprop_step(p, g, v, a, mb, lr, rho, one_m_rho, momentum, eps, centered, use_momentum):
    """-> (p, v, a, mb).  ``v = rho v + (1 - rho) g^2``; centered: ``a = rho a + (1 - rho) g``,
    ``d = v - a^2``, else ``d = v``; ``inc = lr g / sqrt(d + eps)``; momentum:
    ``mb = momentum mb + inc; p -= mb``, else ``p -= inc``."""
    v = rho * v + one_m_rho * g * g
    d = v
    if centered:
        a = rho * a + one_m_rho * g
        d = v - a * a
    inc = lr * g / math.sqrt(d + eps)
    if use_momentum:
        mb = momentum * mb + inc
        return p - mb, v, a, mb
    return p - inc, v, a, mb
