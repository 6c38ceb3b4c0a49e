"""The specification of gpunn's backend operations, in vectorised NumPy.

Every compiled CPU pass (:mod:`gpunn.backend.cpu_fused`) and every CUDA
kernel (:mod:`gpunn.kernels`) is tested against the function of the same
name here.  The code is deliberately independent of :mod:`gpunn.opmath`
(whole-array NumPy/SciPy expressions, not the shared scalar functions), so
that a slip in the shared math cannot hide in both the implementation and
its reference -- except the dropout mask, which *is* defined as opmath's
Philox4x32-10 draw (checked against Random123's known answers instead); it is written for clarity, not speed, and no training step
runs it.  All arrays share one floating dtype (float32 or float64); outputs
are preallocated by the caller and written in place.

Shapes: ``M`` is the batch, ``K`` the input features, ``N`` the output
features of a layer (or the number of outputs of the model for losses).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from gpunn import codes
from gpunn.codes import Act


# --------------------------------------------------------------------------
# Activations: forward in place on the pre-activation, derivative from what
# the forward pass kept (the output ``y``; the pre-activation ``z`` for GELU).
# --------------------------------------------------------------------------

# SELU's constants as Keras defines them (Klambauer et al. 2017)
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _sigmoid(z):
    return special.expit(z)


def _softplus(z):
    return np.logaddexp(z, 0).astype(z.dtype, copy=False)


def _forward_values(z, act, alpha):
    """act(z) as a new array (Keras 3's definitions)."""
    T = z.dtype.type
    if act == Act.LINEAR:
        return z.copy()
    if act == Act.RELU:
        return np.maximum(z, 0)
    if act == Act.LEAKY_RELU:
        return np.where(z > 0, z, z * T(alpha))
    if act == Act.SIGMOID:
        return _sigmoid(z)
    if act == Act.TANH:
        return np.tanh(z)
    if act == Act.GELU:
        return z * (0.5 * (1 + special.erf(z / np.sqrt(T(2))))).astype(z.dtype)
    if act == Act.ELU:
        return np.where(z > 0, z, T(alpha) * np.expm1(np.minimum(z, 0)))
    if act == Act.SELU:
        return T(_SELU_SCALE) * np.where(z > 0, z, T(_SELU_ALPHA) * np.expm1(np.minimum(z, 0)))
    if act == Act.SOFTPLUS:
        return _softplus(z)
    if act == Act.SOFTSIGN:
        return z / (1 + np.abs(z))
    if act == Act.SWISH:
        return z * _sigmoid(z)
    if act == Act.RELU6:
        return np.clip(z, 0, 6)
    if act == Act.HARD_SIGMOID:
        return np.clip(z + 3, 0, 6) / T(6)
    if act == Act.MISH:
        return z * np.tanh(_softplus(z))
    if act == Act.EXPONENTIAL:
        return np.exp(z)
    raise ValueError(f"unknown activation code {act!r}")


def apply_activation(z, act, alpha, y):
    """``y = act(z)`` elementwise; ``y`` may be ``z`` itself (in place)."""
    with np.errstate(over="ignore"):
        np.copyto(y, _forward_values(z, codes.activation(act), alpha).astype(y.dtype, copy=False))
    return y


def _derivative_from_z(z, act, alpha):
    T = z.dtype.type
    if act == Act.LINEAR:
        return np.ones_like(z)
    if act in (Act.RELU, Act.LEAKY_RELU):
        return np.where(z > 0, T(1), T(alpha if act == Act.LEAKY_RELU else 0))
    if act in (Act.SIGMOID, Act.SWISH):
        s = _sigmoid(z)
        return s * (1 - s) if act == Act.SIGMOID else s + z * s * (1 - s)
    if act == Act.TANH:
        return 1 - np.tanh(z) ** 2
    if act == Act.GELU:
        cdf = 0.5 * (1 + special.erf(z / np.sqrt(T(2))))
        return cdf + z * np.exp(-0.5 * z * z) / np.sqrt(T(2 * np.pi))
    if act in (Act.ELU, Act.SELU):
        scale, a = (1, alpha) if act == Act.ELU else (_SELU_SCALE, _SELU_ALPHA)
        return T(scale) * np.where(z > 0, T(1), T(a) * np.exp(np.minimum(z, 0)))
    if act == Act.SOFTPLUS:
        return _sigmoid(z)
    if act == Act.SOFTSIGN:
        return 1 / (1 + np.abs(z)) ** 2
    if act == Act.RELU6:
        return ((z > 0) & (z < 6)).astype(z.dtype)
    if act == Act.HARD_SIGMOID:
        return np.where((z > -3) & (z < 3), T(1) / T(6), T(0))
    if act == Act.MISH:
        t = np.tanh(_softplus(z))
        return t + z * _sigmoid(z) * (1 - t * t)
    if act == Act.EXPONENTIAL:
        return np.exp(z)
    raise ValueError(f"unknown activation code {act!r}")


def activation_derivative(y, z, act, alpha):
    """act'(z) as a new array of y's dtype.

    From the pre-activation ``z`` whenever it is given (so it checks, rather
    than repeats, the shortcuts through ``y`` that the compiled code takes,
    such as ELU's ``y + alpha``); without ``z`` from the output ``y``, which
    only activations without ``Act.needs_preactivation`` allow.
    """
    act = codes.activation(act)
    if z is not None:
        with np.errstate(over="ignore"):
            return _derivative_from_z(z, act, alpha).astype(y.dtype, copy=False)
    if act.needs_preactivation:
        raise ValueError(f"z: the derivative of {act.name.lower()} needs the pre-activation, got None")
    T = y.dtype.type
    if act == Act.LINEAR:
        return np.ones_like(y)
    if act in (Act.RELU, Act.LEAKY_RELU, Act.ELU, Act.SELU):
        positive = T(_SELU_SCALE) if act == Act.SELU else T(1)
        negative = {
            Act.RELU: np.zeros_like(y),
            Act.LEAKY_RELU: np.full_like(y, alpha),
            Act.ELU: y + T(alpha),
            Act.SELU: y + T(_SELU_SCALE * _SELU_ALPHA),
        }[act]
        return np.where(y > 0, positive, negative)
    if act == Act.SIGMOID:
        return y * (1 - y)
    if act == Act.TANH:
        return 1 - y * y
    if act == Act.SOFTPLUS:
        return -np.expm1(-y)
    if act == Act.SOFTSIGN:
        return (1 - np.abs(y)) ** 2
    if act == Act.RELU6:
        return ((y > 0) & (y < 6)).astype(y.dtype)
    if act == Act.HARD_SIGMOID:
        return np.where((y > 0) & (y < 1), T(1) / T(6), T(0))
    if act == Act.EXPONENTIAL:
        return y.copy()
    raise ValueError(f"unknown activation code {act!r}")


def activation_backward(dy, y, z, act, alpha, dx):
    """``dx = dy * act'(.)`` elementwise over (M, N): the reference of ``kernels.activation_backward``.

    As the kernel does, the derivative comes from the pre-activation ``z`` for the activations
    with ``Act.needs_preactivation`` and from the output ``y`` otherwise (``z`` is then not read:
    callers pass ``y`` for it).  Returns ``dx``.
    """
    act = codes.activation(act)
    derivative = activation_derivative(y, z if act.needs_preactivation else None, act, alpha)
    np.multiply(dy, derivative.astype(dx.dtype, copy=False), out=dx)
    return dx


def multiply_activation_grad(g, y, z, act, alpha):
    """``g *= act'(.)`` in place, where ``g`` is dL/dy of shape (M, N)."""
    if codes.activation(act) != Act.LINEAR:
        g *= activation_derivative(y, z, act, alpha).astype(g.dtype, copy=False)
    return g


# --------------------------------------------------------------------------
# Fused linear layer
# --------------------------------------------------------------------------


def dropout_keep(spec, shape):
    """Boolean (M, N) mask of the elements :class:`gpunn.random.DropoutSpec` ``spec`` keeps.

    The one place this module uses :mod:`gpunn.opmath`: the mask is defined
    as the output of the shared Philox4x32-10 (an integer function, checked
    word for word against Random123's published answers), evaluated here on
    whole uint64 arrays.  ``spec.step`` is read on the host.
    """
    from gpunn import opmath

    m, n = shape
    index = np.arange(m * n, dtype=np.uint64) + np.uint64(int(spec.first_row) * n)
    step = np.uint64(int(np.asarray(spec.step).reshape(-1)[0]))
    keep = opmath.dropout_keep(index, step, np.uint64(spec.seed), np.uint64(spec.threshold))
    return np.asarray(keep, dtype=bool).reshape(m, n)


def dropout_mask(spec, shape, dtype):
    """(M, N) array of ``1 / (1 - rate)`` where ``spec`` keeps an element, 0 where it drops it."""
    scale = spec.scale(dtype)
    return np.where(dropout_keep(spec, shape), scale, np.dtype(dtype).type(0))


def dropout(x, y, mask, dropout):
    """Dropout on its own: ``mask`` = :func:`dropout_mask`, ``y = x * 1/(1 - rate)`` where kept, else 0.

    x, y, mask: (M, N); dropout: a :class:`gpunn.random.DropoutSpec`.
    """
    keep = dropout_keep(dropout, x.shape)
    np.copyto(mask, np.where(keep, dropout.scale(x.dtype), x.dtype.type(0)))
    np.copyto(y, np.where(keep, x * dropout.scale(x.dtype), x.dtype.type(0)))
    return y


def _requires_z(act, z, dropout):
    if z is None and (act in codes.ACT_NEEDS_PREACTIVATION or dropout is not None):
        why = "dropout" if dropout is not None else "this activation"
        raise ValueError(f"z: {why} needs the pre-activation buffer, got None")


def linear_forward(x, w, b, act, alpha, y, z=None, dropout=None):
    """``z = x @ w + b``; ``y = act(z)``, times the dropout mask when ``dropout`` is given.

    x: (M, K), w: (K, N), b: (N,) or None, y: (M, N) output.
    z: (M, N) output (the pre-activation), required when ``act`` is in
    ``codes.ACT_NEEDS_PREACTIVATION`` or ``dropout`` is given; else None.
    dropout: None or a :class:`gpunn.random.DropoutSpec`: ``y = act(z) *
    1/(1 - rate)`` where its mask keeps an element, 0 where it drops it.
    """
    _requires_z(act, z, dropout)
    pre = z if z is not None else y
    np.matmul(x, w, out=pre)
    if b is not None:
        pre += b
    apply_activation(pre, act, alpha, y)
    if dropout is not None:
        keep = dropout_keep(dropout, y.shape)
        np.copyto(y, np.where(keep, y * dropout.scale(y.dtype), y.dtype.type(0)))
    return y


def _linear_grad(dy, y, z, act, alpha, dropout):
    """``g = dy * act'(z)``, or ``dy * (act'(z) * mask)`` with dropout (z the pre-activation)."""
    if dropout is None:
        return multiply_activation_grad(dy.copy(), y, z, act, alpha)
    _requires_z(act, z, dropout)
    derivative = activation_derivative(y, z, act, alpha)
    return dy * (derivative * dropout_mask(dropout, dy.shape, dy.dtype))


def linear_backward_data(dy, w, y, z, act, alpha, dx, dropout=None):
    """``dx = (dy * act'(.)) @ w.T``; ``dy`` (M, N) is left unchanged.

    w: (K, N), y: (M, N) forward output, z: (M, N) pre-activation or None,
    dx: (M, K) output; dropout: the forward's :class:`gpunn.random.DropoutSpec`
    or None (then ``g = dy * (act'(z) * mask)``).
    """
    np.matmul(_linear_grad(dy, y, z, act, alpha, dropout), w.T, out=dx)
    return dx


def linear_backward_weight(x, dy, y, z, act, alpha, dw, db, dropout=None):
    """``g = dy * act'(.)``; ``dw = x.T @ g``; ``db = sum_batch g``.

    x: (M, K), dy/y/z: (M, N), dw: (K, N) output, db: (N,) output or None;
    dropout as in :func:`linear_backward_data`.  ``dy`` is left unchanged.
    """
    g = _linear_grad(dy, y, z, act, alpha, dropout)
    np.matmul(x.T, g, out=dw)
    if db is not None:
        np.sum(g, axis=0, out=db)
    return dw


def linear_backward(x, w, dy, y, z, act, alpha, dx, dw, db, dropout=None):
    """Both gradients of the fused layer at once (the Backend contract); ``dy`` is left unchanged.

    g = dy * act'(.) (times the dropout mask when ``dropout`` is given); dx =
    g @ w.T (skipped when dx is None, e.g. the first layer); dw = x.T @ g;
    db = sum_batch g (skipped when db is None).
    """
    g = _linear_grad(dy, y, z, act, alpha, dropout)
    np.matmul(x.T, g, out=dw)
    if db is not None:
        np.sum(g, axis=0, out=db)
    if dx is not None:
        np.matmul(g, w.T, out=dx)


def softmax(z, out):
    """Row-wise softmax of z (M, N) into out (may be z)."""
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def softmax_backward(g, y):
    """In place: ``g = y * (g - sum_j g*y)`` (softmax's Jacobian-vector product)."""
    s = np.einsum("ij,ij->i", g, y)[:, None]
    g -= s
    g *= y
    return g


# --------------------------------------------------------------------------
# Fused losses
# --------------------------------------------------------------------------


def _row_weights(weight, m, dtype):
    if weight is None:
        return np.ones(m, dtype=dtype)
    return weight


def _mse(p, t, param, eps):
    return (p - t) ** 2, 2 * (p - t)


def _mae(p, t, param, eps):
    return np.abs(p - t), np.sign(p - t)


def _huber(p, t, delta, eps):
    e = p - t
    quadratic = np.minimum(np.abs(e), delta)
    return 0.5 * quadratic**2 + delta * (np.abs(e) - quadratic), np.where(np.abs(e) <= delta, e, delta * np.sign(e))


def _log_cosh(p, t, param, eps):
    e = (p - t).astype(np.float64)
    return np.log(np.cosh(e)).astype(p.dtype), np.tanh(e).astype(p.dtype)


def _poisson(p, t, param, eps):
    return p - t * np.log(p + eps), 1 - t / (p + eps)


def _hinge(p, t, param, eps):
    margin = 1 - t * p
    return np.maximum(margin, 0), np.where(margin > 0, -t, 0).astype(p.dtype)


def _squared_hinge(p, t, param, eps):
    margin = np.maximum(1 - t * p, 0)
    return margin**2, -2 * t * margin


def _mape(p, t, param, eps):
    scale = 100 / np.maximum(np.abs(t), eps)
    return np.abs(t - p) * scale, np.sign(p - t) * scale


def _msle(p, t, param, eps):
    d = np.log(np.maximum(p, eps) + 1) - np.log(np.maximum(t, eps) + 1)
    return d**2, np.where(p > eps, 2 * d / (p + 1), 0).astype(p.dtype)


def _kl_divergence(p, t, param, eps):
    tc, pc = np.clip(t, eps, 1), np.clip(p, eps, 1)
    return tc * np.log(tc / pc), np.where((p > eps) & (p < 1), -tc / pc, 0).astype(p.dtype)


def _categorical_hinge(p, t, param, eps):
    """Row losses in column 0 (the rest 0) and the gradient, as (M, N) arrays."""
    positive = (t * p).sum(axis=1)
    wrong = (1 - t) * p
    best = wrong.argmax(axis=1)
    loss = np.maximum(wrong.max(axis=1) - positive + 1, 0)
    slope = -t.copy()
    slope[np.arange(p.shape[0]), best] += 1 - t[np.arange(p.shape[0]), best]
    slope *= (loss > 0)[:, None]
    values = np.zeros_like(p)
    values[:, 0] = loss
    return values, slope


def _cosine_similarity(p, t, param, eps):
    """Row losses in column 0 and the gradient of ``-t_hat . p_hat`` (x_hat = x / sqrt(max(|x|^2, 1e-12)))."""
    p64, t64 = p.astype(np.float64), t.astype(np.float64)
    p_norm = np.sqrt(np.maximum((p64 * p64).sum(axis=1, keepdims=True), 1e-12))
    t_hat = t64 / np.sqrt(np.maximum((t64 * t64).sum(axis=1, keepdims=True), 1e-12))
    cosine = (t_hat * p64).sum(axis=1, keepdims=True) / p_norm
    floored = (p64 * p64).sum(axis=1, keepdims=True) <= 1e-12
    slope = -t_hat / p_norm + np.where(floored, 0, cosine * p64 / p_norm**2)
    values = np.zeros_like(p64)
    values[:, :1] = -cosine
    return values.astype(p.dtype), slope.astype(p.dtype)


#: Keras 3's losses other than the cross-entropies: (values, d values / d pred).
_KERAS_LOSSES = {
    codes.LossKind.MSE: _mse,
    codes.LossKind.MAE: _mae,
    codes.LossKind.HUBER: _huber,
    codes.LossKind.LOG_COSH: _log_cosh,
    codes.LossKind.POISSON: _poisson,
    codes.LossKind.HINGE: _hinge,
    codes.LossKind.SQUARED_HINGE: _squared_hinge,
    codes.LossKind.MAPE: _mape,
    codes.LossKind.MSLE: _msle,
    codes.LossKind.KL_DIVERGENCE: _kl_divergence,
    codes.LossKind.CATEGORICAL_HINGE: _categorical_hinge,
    codes.LossKind.COSINE_SIMILARITY: _cosine_similarity,
}


def gather_rows(src, order, offset, out):
    """``out[i] = src[order[offset[0] + i]]`` for every row ``i`` of out (a batch gather at an offset
    held in a (1,) integer array).  Rows whose position ``offset[0] + i`` falls outside ``order``,
    or whose index falls outside ``src``, are NaN.  Returns ``out``."""
    start = int(offset[0])
    positions = start + np.arange(out.shape[0])
    inside = (positions >= 0) & (positions < order.shape[0])
    rows = np.full(out.shape[0], -1, dtype=np.int64)
    rows[inside] = order[positions[inside]]
    valid = (rows >= 0) & (rows < src.shape[0])
    out[...] = np.nan
    out[valid] = src[rows[valid]]
    return out


def loss_grad(kind, pred, target, weight, grad, sums, param=0.0):
    """Loss and its gradient in one pass.

    pred: (M, N) logits (kinds ``LOSS_SIGMOID_BCE``/``LOSS_SOFTMAX_*``) or
    model outputs (the rest). target: (M, N) floats, or (M,) integer class
    indices for the sparse kinds. weight: (M,) sample weights or None (ones).

    With l_i the loss of row i (the mean over the N outputs for the
    elementwise kinds, the sum for KL divergence; the row's value for
    cross-entropies, categorical hinge and cosine similarity), the batch loss
    is ``L = sum_i w_i l_i / M`` (Keras's sum-over-batch-size reduction).
    param: the kind's parameter (Huber's delta).

    grad: (M, N) output ``dL/dpred``, or None to skip it.
    sums: array of 2 accumulated in place: ``sums[0] += sum_i w_i l_i`` and,
    for classification kinds, ``sums[1] += sum_i c_i`` (unweighted, as Keras
    3's plain ``metrics`` ignore sample weights) with c_i the row's accuracy (the fraction of outputs on the right side of the
    threshold for binary kinds; argmax agreement for categorical kinds).
    """
    m, n = pred.shape
    dt = pred.dtype
    w = _row_weights(weight, m, dt)
    eps = dt.type(codes.EPSILON)
    correct = None
    if kind == codes.LOSS_SIGMOID_BCE:
        t = target
        per_el = np.maximum(pred, 0) - pred * t + np.log1p(np.exp(-np.abs(pred)))
        rows = per_el.mean(axis=1)
        if grad is not None:
            special.expit(pred, out=grad)
            grad -= t
            grad *= (w / dt.type(m * n))[:, None]
        correct = ((pred > 0) == (t > 0.5)).mean(axis=1)
    elif kind in (codes.LOSS_SOFTMAX_CCE, codes.LOSS_SOFTMAX_SPARSE_CCE):
        zmax = pred.max(axis=1, keepdims=True)
        shifted = pred - zmax
        lse = np.log(np.exp(shifted).sum(axis=1))
        if kind == codes.LOSS_SOFTMAX_SPARSE_CCE:
            labels = target.astype(np.intp, copy=False)
            rows = lse - shifted[np.arange(m), labels]
            correct = pred.argmax(axis=1) == labels
        else:
            t = target
            tsum = t.sum(axis=1)
            rows = lse * tsum - np.einsum("ij,ij->i", t, shifted)
            correct = pred.argmax(axis=1) == t.argmax(axis=1)
        if grad is not None:
            np.subtract(shifted, lse[:, None], out=grad)
            np.exp(grad, out=grad)
            if kind == codes.LOSS_SOFTMAX_SPARSE_CCE:
                grad[np.arange(m), labels] -= 1
            else:
                grad *= tsum[:, None]
                grad -= t
            grad *= (w / dt.type(m))[:, None]
    elif kind == codes.LOSS_BCE:
        t = target
        pc = np.clip(pred, eps, 1 - eps)
        rows = -(t * np.log(pc) + (1 - t) * np.log(1 - pc)).mean(axis=1)
        if grad is not None:
            inside = (pred > eps) & (pred < 1 - eps)
            np.divide(pc - t, pc * (1 - pc), out=grad)
            grad *= inside
            grad *= (w / dt.type(m * n))[:, None]
        correct = ((pred > 0.5) == (t > 0.5)).mean(axis=1)
    elif kind in (codes.LOSS_CCE, codes.LOSS_SPARSE_CCE):
        if kind == codes.LOSS_SPARSE_CCE:
            labels = target.astype(np.intp, copy=False)
            t = np.zeros_like(pred)
            t[np.arange(m), labels] = 1
        else:
            t = target
        s = pred.sum(axis=1, keepdims=True)
        q = pred / s
        qc = np.clip(q, eps, 1 - eps)
        rows = -(t * np.log(qc)).sum(axis=1)
        if grad is not None:
            inside = (q > eps) & (q < 1 - eps)
            tm = t * inside
            # d/dp_k of -sum_j t_j log(p_j / s) = -t_k/p_k + sum_j t_j / s
            np.divide(-tm, np.where(inside, pred, 1), out=grad)
            grad += tm.sum(axis=1, keepdims=True) / s
            grad *= (w / dt.type(m))[:, None]
        correct = pred.argmax(axis=1) == t.argmax(axis=1)
    elif kind in _KERAS_LOSSES:
        values, slope = _KERAS_LOSSES[kind](pred, target.astype(dt, copy=False), dt.type(param), eps)
        summed = codes.loss_kind(kind).summed or not codes.loss_kind(kind).elementwise
        rows = values.sum(axis=1) if summed else values.mean(axis=1)
        if grad is not None:
            np.multiply(slope, (w / dt.type(m if summed else m * n))[:, None], out=grad)
    else:
        raise ValueError(f"unknown loss code {kind!r}")
    sums[0] += np.dot(w, rows.astype(dt, copy=False))
    if correct is not None:
        sums[1] += correct.astype(dt, copy=False).sum()
    return sums


# --------------------------------------------------------------------------
# Optimizers on one flat parameter buffer (Keras 3 update rules)
# --------------------------------------------------------------------------


def sgd_update(params, grads, velocity, lr, momentum, nesterov):
    """SGD in place on flat (P,) arrays.

    momentum == 0: ``p -= lr * g`` (velocity may be None).
    Otherwise ``v = momentum * v - lr * g``; then ``p += v``, or with
    Nesterov ``p += momentum * v - lr * g``.
    """
    dt = params.dtype.type
    if momentum == 0:
        params -= dt(lr) * grads
        return
    velocity *= dt(momentum)
    velocity -= dt(lr) * grads
    if nesterov:
        params += dt(momentum) * velocity
        params -= dt(lr) * grads
    else:
        params += velocity


def adam_update(params, grads, m, v, lr, beta1, beta2, epsilon, step, weight_decay):
    """Adam (and AdamW when ``weight_decay > 0``) in place on flat (P,) arrays.

    step is the 1-based update count t.
    ``p -= lr * weight_decay * p`` (decoupled decay, AdamW); then
    ``m += (g - m)(1 - b1)``; ``v += (g^2 - v)(1 - b2)``;
    ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.
    """
    dt = params.dtype.type
    if weight_decay:
        params *= dt(1 - lr * weight_decay)
    lr_t = lr * np.sqrt(1 - beta2**step) / (1 - beta1**step)
    m += (grads - m) * dt(1 - beta1)
    v += (grads * grads - v) * dt(1 - beta2)
    denom = np.sqrt(v)
    denom += dt(epsilon)
    np.divide(m, denom, out=denom)
    denom *= dt(lr_t)
    params -= denom


def rmsprop_update(params, grads, velocity, average_grad, momentum_buf, lr, rho, momentum, epsilon):
    """RMSprop in place on flat (P,) arrays (Keras 3 rule, epsilon inside the root).

    ``v = rho v + (1 - rho) g^2``; centered (``average_grad`` not None):
    ``a = rho a + (1 - rho) g`` and ``d = v - a^2 + eps``, else ``d = v + eps``;
    ``inc = lr g / sqrt(d)``; with momentum ``mb = momentum mb + inc; p -= mb``,
    else ``p -= inc``.
    """
    dt = params.dtype.type
    velocity *= dt(rho)
    velocity += dt(1 - rho) * grads * grads
    if average_grad is not None:
        average_grad *= dt(rho)
        average_grad += dt(1 - rho) * grads
        denom = velocity - average_grad * average_grad
    else:
        denom = velocity.copy()
    denom += dt(epsilon)
    np.sqrt(denom, out=denom)
    np.divide(grads, denom, out=denom)
    denom *= dt(lr)
    if momentum_buf is not None and momentum > 0:
        momentum_buf *= dt(momentum)
        momentum_buf += denom
        params -= momentum_buf
    else:
        params -= denom


def optimizer_step(name, params, grads, slots, lr, t, config):
    """One step of optimizer ``name`` in place, from its Keras config (the reference for every optimizer).

    params, grads: flat (P,) arrays; slots: the state arrays by Keras slot
    name (updated in place); lr: this step's learning rate; t: the 1-based
    step count; config: ``Optimizer.get_config()``.  Written from Keras 3's
    update rules in whole-array NumPy, independently of gpunn.opmath.
    Weight decay, when set, is applied first: ``p -= p * wd * lr``.
    """
    dt = params.dtype.type
    c = {k: v for k, v in config.items() if not isinstance(v, dict)}
    g = grads.astype(params.dtype)
    if c.get("weight_decay"):
        params -= params * dt(c["weight_decay"]) * dt(lr)
    lr = dt(lr)
    if name == "sgd":
        if c["momentum"] == 0:
            params -= lr * g
            return
        v = slots["velocity"]
        v[...] = -g * lr + v * dt(c["momentum"])
        params += (-g * lr + v * dt(c["momentum"])) if c["nesterov"] else v
    elif name in ("adam", "adamw"):
        b1, b2 = dt(c["beta_1"]), dt(c["beta_2"])
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        m, v = slots["m"], slots["v"]
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        if c["amsgrad"]:
            np.maximum(slots["v_hat"], v, out=slots["v_hat"])
            v = slots["v_hat"]
        params -= m * alpha / (np.sqrt(v) + dt(c["epsilon"]))
    elif name == "rmsprop":
        rho = dt(c["rho"])
        vel = slots["velocity"]
        vel[...] = rho * vel + (1 - rho) * g * g
        denominator = vel + dt(c["epsilon"])
        if c["centered"]:
            avg = slots["average_gradient"]
            avg[...] = rho * avg + (1 - rho) * g
            denominator = vel - avg * avg + dt(c["epsilon"])
        increment = lr * g / np.sqrt(denominator)
        if c["momentum"] > 0:
            mom = slots["momentum"]
            mom[...] = dt(c["momentum"]) * mom + increment
            params -= mom
        else:
            params -= increment
    elif name == "nadam":
        b1, b2 = float(c["beta_1"]), float(c["beta_2"])
        u = [b1 * (1 - 0.5 * 0.96**s) for s in range(1, t + 2)]
        u_product = float(np.prod(u[:t]))
        m, v = slots["m"], slots["v"]
        m += (g - m) * dt(1 - b1)
        v += (g * g - v) * dt(1 - b2)
        m_hat = dt(u[t]) * m / dt(1 - u_product * u[t]) + dt(1 - u[t - 1]) * g / dt(1 - u_product)
        v_hat = v / dt(1 - b2**t)
        params -= m_hat * lr / (np.sqrt(v_hat) + dt(c["epsilon"]))
    elif name == "adagrad":
        acc = slots["accumulator"]
        acc += g * g
        params -= lr * g / np.sqrt(acc + dt(c["epsilon"]))
    elif name == "adadelta":
        rho, eps = dt(c["rho"]), dt(c["epsilon"])
        ag, adv = slots["accumulated_grad"], slots["accumulated_delta_var"]
        ag[...] = rho * ag + (1 - rho) * g * g
        delta = -np.sqrt(adv + eps) * g / np.sqrt(ag + eps)
        adv[...] = rho * adv + (1 - rho) * delta * delta
        params += lr * delta
    elif name == "adamax":
        b1, b2 = dt(c["beta_1"]), dt(c["beta_2"])
        m, u = slots["m"], slots["u"]
        m += (g - m) * (1 - b1)
        np.maximum(b2 * u, np.abs(g), out=u)
        params -= lr * m / ((1 - b1**t) * (u + dt(c["epsilon"])))
    elif name == "lion":
        b1, b2 = dt(c["beta_1"]), dt(c["beta_2"])
        m = slots["m"]
        params -= lr * np.sign(m * b1 + g * (1 - b1))
        m[...] = m * b2 + g * (1 - b2)
    elif name == "ftrl":
        power = dt(c["learning_rate_power"])
        l1 = dt(c["l1_regularization_strength"])
        l2 = dt(c["l2_regularization_strength"]) + dt(c["beta"]) / (2 * lr)
        acc, linear = slots["accumulator"], slots["linear"]
        g_shrunk = g + 2 * dt(c["l2_shrinkage_regularization_strength"]) * params
        new_acc = acc + g * g
        linear += g_shrunk - (new_acc ** (-power) - acc ** (-power)) / lr * params
        quadratic = new_acc ** (-power) / lr + 2 * l2
        params[...] = (np.clip(linear, -l1, l1) - linear) / quadratic
        acc[...] = new_acc
    else:
        raise ValueError(f"unknown optimizer {name!r}")
