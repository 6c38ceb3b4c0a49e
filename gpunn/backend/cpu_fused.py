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
import numpy as np

from gpunn import codes

_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")

# Below this many parameters a threaded update costs more in wake-ups than it saves.
PARALLEL_MIN_PARAMS = 1 << 16

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


@numba.njit(**_JIT)
def bias_activation(z, b, has_bias, act, alpha, y):
    """In place over rows: ``y = act(z + b)``; also ``z += b`` when y is not z (GELU keeps z)."""
    m, n = z.shape
    for i in range(m):
        for j in range(n):
            v = z[i, j]
            if has_bias:
                v += b[j]
                z[i, j] = v
            if act == RELU:
                r = v if v > 0 else 0.0
            elif act == LEAKY:
                r = v if v > 0 else alpha * v
            elif act == SIGMOID:
                r = _sigmoid(v)
            elif act == TANH:
                r = math.tanh(v)
            elif act == GELU:
                r = 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))
            else:
                r = v
            y[i, j] = r


@numba.njit(**_JIT)
def activation_grad(g, y, z, act, alpha, db, want_db):
    """In place: ``g *= act'(.)`` (from y, or z for GELU); ``db = sum_rows g`` when want_db."""
    m, n = g.shape
    if want_db:
        for j in range(n):
            db[j] = 0
    for i in range(m):
        for j in range(n):
            v = g[i, j]
            if act == RELU:
                if y[i, j] <= 0:
                    v = 0.0
            elif act == LEAKY:
                if y[i, j] <= 0:
                    v = v * alpha
            elif act == SIGMOID:
                s = y[i, j]
                v = v * s * (1.0 - s)
            elif act == TANH:
                t = y[i, j]
                v = v * (1.0 - t * t)
            elif act == GELU:
                x = z[i, j]
                v = v * (0.5 * (1.0 + math.erf(x * _SQRT_HALF)) + x * math.exp(-0.5 * x * x) * _INV_SQRT_2PI)
            g[i, j] = v
            if want_db:
                db[j] += v


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

# Written with prange, compiled twice: serial (cached on disk) for small buffers and
# threaded for large ones.  The threaded build is not disk-cached because Numba's
# cache index does not tell the two builds of one function apart.


def _sgd(params, grads, velocity, lr, momentum, nesterov):
    if momentum == 0:
        for k in numba.prange(params.shape[0]):
            params[k] -= lr * grads[k]
    elif nesterov:
        for k in numba.prange(params.shape[0]):
            v = momentum * velocity[k] - lr * grads[k]
            velocity[k] = v
            params[k] += momentum * v - lr * grads[k]
    else:
        for k in numba.prange(params.shape[0]):
            v = momentum * velocity[k] - lr * grads[k]
            velocity[k] = v
            params[k] += v


def _adam(params, grads, m, v, lr, lr_t, beta1, beta2, epsilon, weight_decay):
    decay = 1.0 - lr * weight_decay
    for k in numba.prange(params.shape[0]):
        g = grads[k]
        mk = m[k] + (g - m[k]) * (1.0 - beta1)
        vk = v[k] + (g * g - v[k]) * (1.0 - beta2)
        m[k] = mk
        v[k] = vk
        params[k] = params[k] * decay - lr_t * mk / (math.sqrt(vk) + epsilon)


def _rmsprop(params, grads, velocity, average_grad, centered, momentum_buf, use_momentum, lr, rho, momentum, epsilon):
    for k in numba.prange(params.shape[0]):
        g = grads[k]
        vk = rho * velocity[k] + (1.0 - rho) * g * g
        velocity[k] = vk
        if centered:
            a = rho * average_grad[k] + (1.0 - rho) * g
            average_grad[k] = a
            denom = vk - a * a + epsilon
        else:
            denom = vk + epsilon
        inc = lr * g / math.sqrt(denom)
        if use_momentum:
            mb = momentum * momentum_buf[k] + inc
            momentum_buf[k] = mb
            params[k] -= mb
        else:
            params[k] -= inc


_SERIAL = tuple(numba.njit(**_JIT)(f) for f in (_sgd, _adam, _rmsprop))
_PARALLEL = None


def updates_for(size):
    """(sgd, adam, rmsprop) compiled serial, or threaded for large buffers."""
    global _PARALLEL
    if size < PARALLEL_MIN_PARAMS:
        return _SERIAL
    if _PARALLEL is None:
        threaded = {**_JIT, "cache": False, "parallel": True}
        _PARALLEL = tuple(numba.njit(**threaded)(f) for f in (_sgd, _adam, _rmsprop))
    return _PARALLEL
