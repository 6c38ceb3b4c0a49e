"""Fused CPU epilogues and updates, compiled with Numba (``njit``) for the NumPy backend.

Matrix products stay in BLAS (``np.matmul``); everything around them that
NumPy would do in several passes with temporaries is one compiled loop here:
bias + activation after the forward product; activation derivative + bias
gradient before the backward products; loss + gradient + accuracy count in
one row loop; and each optimizer update as a single pass over the flat
parameter buffer.  Each function has the same meaning as the function of the
same name in :mod:`gpunn.backend.numpy_ops`, which is the reference the tests
hold it to.

Compiled code is cached on disk (``cache=True``), so only the first run on
a machine pays the compilation.
"""

from __future__ import annotations

import math

import numba

from gpunn import codes

_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

# Codes copied into module globals: Numba freezes globals as compile-time constants.
LINEAR, RELU, LEAKY, SIGMOID, TANH, GELU = (
    codes.ACT_LINEAR,
    codes.ACT_RELU,
    codes.ACT_LEAKY_RELU,
    codes.ACT_SIGMOID,
    codes.ACT_TANH,
    codes.ACT_GELU,
)
L_SBCE, L_SCCE, L_SSPARSE, L_BCE, L_CCE, L_SPARSE, L_MSE, L_MAE = (
    codes.LOSS_SIGMOID_BCE,
    codes.LOSS_SOFTMAX_CCE,
    codes.LOSS_SOFTMAX_SPARSE_CCE,
    codes.LOSS_BCE,
    codes.LOSS_CCE,
    codes.LOSS_SPARSE_CCE,
    codes.LOSS_MSE,
    codes.LOSS_MAE,
)
EPS = codes.EPSILON


@numba.njit(inline="always", **_JIT)
def _sigmoid(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


# The epilogues branch on the activation once, outside the loops, so that each
# loop body is straight-line code LLVM can vectorise (a per-element dispatch
# made them ~10x slower than the BLAS product they follow).


@numba.njit(**_JIT)
def bias_activation(z, b, act, alpha, y):
    """``y = act(z + b)`` over rows, b (N,) (zeros for no bias); ``z += b`` too for GELU.

    ``y`` may be ``z`` itself, except for GELU, whose derivative needs the
    pre-activation kept apart.
    """
    m, n = z.shape
    zero = z.dtype.type(0)
    one = z.dtype.type(1)
    half = z.dtype.type(0.5)
    slope = z.dtype.type(alpha)
    if act == RELU:
        for i in range(m):
            for j in range(n):
                v = z[i, j] + b[j]
                y[i, j] = v if v > zero else zero
    elif act == LEAKY:
        for i in range(m):
            for j in range(n):
                v = z[i, j] + b[j]
                y[i, j] = v if v > zero else slope * v
    elif act == SIGMOID:
        for i in range(m):
            for j in range(n):
                y[i, j] = _sigmoid(z[i, j] + b[j])
    elif act == TANH:
        for i in range(m):
            for j in range(n):
                y[i, j] = math.tanh(z[i, j] + b[j])
    elif act == GELU:
        root_half = z.dtype.type(_SQRT_HALF)
        for i in range(m):
            for j in range(n):
                v = z[i, j] + b[j]
                z[i, j] = v
                y[i, j] = half * v * (one + math.erf(v * root_half))
    else:
        for i in range(m):
            for j in range(n):
                y[i, j] = z[i, j] + b[j]


@numba.njit(**_JIT)
def activation_grad(g, y, z, act, alpha):
    """In place: ``g *= act'(.)``, from the output ``y`` (or ``z`` for GELU)."""
    m, n = g.shape
    zero = g.dtype.type(0)
    one = g.dtype.type(1)
    slope = g.dtype.type(alpha)
    if act == RELU:
        for i in range(m):
            for j in range(n):
                g[i, j] = g[i, j] if y[i, j] > zero else zero
    elif act == LEAKY:
        for i in range(m):
            for j in range(n):
                g[i, j] = g[i, j] if y[i, j] > zero else g[i, j] * slope
    elif act == SIGMOID:
        for i in range(m):
            for j in range(n):
                s = y[i, j]
                g[i, j] = g[i, j] * s * (one - s)
    elif act == TANH:
        for i in range(m):
            for j in range(n):
                t = y[i, j]
                g[i, j] = g[i, j] * (one - t * t)
    elif act == GELU:
        half = g.dtype.type(0.5)
        root_half = g.dtype.type(_SQRT_HALF)
        inv_root_2pi = g.dtype.type(_INV_SQRT_2PI)
        for i in range(m):
            for j in range(n):
                x = z[i, j]
                g[i, j] = g[i, j] * (half * (one + math.erf(x * root_half)) + x * math.exp(-half * x * x) * inv_root_2pi)


@numba.njit(**_JIT)
def column_sums(g, out):
    """``out[j] = sum_i g[i, j]`` (the bias gradient), accumulated row by row."""
    m, n = g.shape
    for j in range(n):
        out[j] = 0
    for i in range(m):
        for j in range(n):
            out[j] += g[i, j]


@numba.njit(**_JIT)
def loss_grad(kind, pred, target, weight, has_weight, grad, has_grad, sums):
    """One row loop: loss sum, gradient and accuracy count (see numpy_ops.loss_grad)."""
    m, n = pred.shape
    loss_total = 0.0
    correct_total = 0.0
    for i in range(m):
        w = weight[i] if has_weight else 1.0
        row = 0.0
        c = 0.0
        if kind == L_SBCE or kind == L_BCE or kind == L_MSE or kind == L_MAE:
            scale = w / (m * n)
            for j in range(n):
                p = pred[i, j]
                t = target[i, j]
                if kind == L_SBCE:
                    row += max(p, 0.0) - p * t + math.log1p(math.exp(-abs(p)))
                    d = _sigmoid(p) - t
                    if (p > 0) == (t > 0.5):
                        c += 1.0
                elif kind == L_BCE:
                    pc = min(max(p, EPS), 1.0 - EPS)
                    row -= t * math.log(pc) + (1.0 - t) * math.log(1.0 - pc)
                    d = (pc - t) / (pc * (1.0 - pc)) if (p > EPS and p < 1.0 - EPS) else 0.0
                    if (p > 0.5) == (t > 0.5):
                        c += 1.0
                elif kind == L_MSE:
                    diff = p - t
                    row += diff * diff
                    d = 2.0 * diff
                else:
                    diff = p - t
                    row += abs(diff)
                    d = 1.0 if diff > 0 else (-1.0 if diff < 0 else 0.0)
                if has_grad:
                    grad[i, j] = d * scale
            row /= n
            c /= n
        else:
            sparse = kind == L_SSPARSE or kind == L_SPARSE
            label = int(target[i, 0]) if sparse else -1
            best = 0
            for j in range(1, n):
                if pred[i, j] > pred[i, best]:
                    best = j
            if sparse:
                truth = label
                tsum = 1.0
            else:
                truth = 0
                tsum = 0.0
                for j in range(n):
                    tsum += target[i, j]
                    if target[i, j] > target[i, truth]:
                        truth = j
            c = 1.0 if best == truth else 0.0
            scale = w / m
            if kind == L_SCCE or kind == L_SSPARSE:
                zmax = pred[i, best]
                s = 0.0
                for j in range(n):
                    s += math.exp(pred[i, j] - zmax)
                lse = math.log(s)
                for j in range(n):
                    t = (1.0 if j == label else 0.0) if sparse else target[i, j]
                    shifted = pred[i, j] - zmax
                    row += t * (lse - shifted) if not sparse else 0.0
                    if has_grad:
                        grad[i, j] = (math.exp(shifted - lse) * tsum - t) * scale
                if sparse:
                    row = lse - (pred[i, label] - zmax)
            else:  # probabilities, normalised per row
                s = 0.0
                for j in range(n):
                    s += pred[i, j]
                tm_sum = 0.0
                for j in range(n):
                    t = (1.0 if j == label else 0.0) if sparse else target[i, j]
                    q = pred[i, j] / s
                    qc = min(max(q, EPS), 1.0 - EPS)
                    row -= t * math.log(qc)
                    if q > EPS and q < 1.0 - EPS:
                        tm_sum += t
                if has_grad:
                    for j in range(n):
                        t = (1.0 if j == label else 0.0) if sparse else target[i, j]
                        q = pred[i, j] / s
                        inside = q > EPS and q < 1.0 - EPS
                        d = -t / pred[i, j] if (inside and t != 0.0) else 0.0
                        grad[i, j] = (d + tm_sum / s) * scale
        loss_total += w * row
        correct_total += c
    sums[0] += loss_total
    if kind != L_MSE and kind != L_MAE:
        sums[1] += correct_total


# --------------------------------------------------------------------------- optimizers

# Serial loops on purpose: Numba's thread pool and OpenBLAS's spinning threads
# fight over the cores when both are active in one training step (measured
# 6x slower on 2 cores); the update is a single memory-bound pass anyway.


def _sgd(params, grads, velocity, lr, momentum, nesterov):
    T = params.dtype.type
    rate, mom = T(lr), T(momentum)
    if momentum == 0:
        for k in range(params.shape[0]):
            params[k] -= rate * grads[k]
    elif nesterov:
        for k in range(params.shape[0]):
            v = mom * velocity[k] - rate * grads[k]
            velocity[k] = v
            params[k] += mom * v - rate * grads[k]
    else:
        for k in range(params.shape[0]):
            v = mom * velocity[k] - rate * grads[k]
            velocity[k] = v
            params[k] += v


def _adam(params, grads, m, v, lr, lr_t, beta1, beta2, epsilon, weight_decay):
    # scalars in the buffers' dtype: float32 math runs twice as wide as float64
    T = params.dtype.type
    decay = T(1.0 - lr * weight_decay)
    step = T(lr_t)
    keep1, keep2 = T(1.0 - beta1), T(1.0 - beta2)
    eps = T(epsilon)
    for k in range(params.shape[0]):
        g = grads[k]
        mk = m[k] + (g - m[k]) * keep1
        vk = v[k] + (g * g - v[k]) * keep2
        m[k] = mk
        v[k] = vk
        params[k] = params[k] * decay - step * mk / (math.sqrt(vk) + eps)


def _rmsprop(params, grads, velocity, average_grad, centered, momentum_buf, use_momentum, lr, rho, momentum, epsilon):
    T = params.dtype.type
    rate, r, keep, mom, eps = T(lr), T(rho), T(1.0 - rho), T(momentum), T(epsilon)
    for k in range(params.shape[0]):
        g = grads[k]
        vk = r * velocity[k] + keep * g * g
        velocity[k] = vk
        if centered:
            a = r * average_grad[k] + keep * g
            average_grad[k] = a
            denom = vk - a * a + eps
        else:
            denom = vk + eps
        inc = rate * g / math.sqrt(denom)
        if use_momentum:
            mb = mom * momentum_buf[k] + inc
            momentum_buf[k] = mb
            params[k] -= mb
        else:
            params[k] -= inc


sgd_update = numba.njit(**_JIT)(_sgd)
adam_update = numba.njit(**_JIT)(_adam)
rmsprop_update = numba.njit(**_JIT)(_rmsprop)
