"""Fused CPU passes, compiled with Numba (``njit``) for the NumPy backend.

Matrix products stay in BLAS (``np.matmul``); everything around them that
NumPy would do in several passes with temporaries is one compiled loop here:
bias + activation after the forward product; activation derivative + bias
gradient before the backward products; loss + gradient + accuracy count in
one row loop; and each optimizer update as a single pass over the flat
parameter buffer.  The arithmetic inside every loop is a scalar function of
:mod:`gpunn.opmath`, the same one the CUDA kernels inline; this module only
says how to loop.  :mod:`gpunn.backend.numpy_ops` is the reference the tests
hold each pass to.

Each pass takes its op code (activation, loss kind) as a compile-time
constant (``numba.literally``), so Numba compiles one straight-line loop per
op that LLVM can vectorise, and caches it on disk (``cache=True``): only the
first run on a machine pays the compilation.  :class:`_Specialised` calls
those versions without Numba's per-call retry for literal arguments.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import types
from numba._dispatcher import compute_fingerprint as _fingerprint
from numba.core import caching
from numba.extending import overload

from gpunn import codes, opmath
from gpunn.codes import Act, LossKind

_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")


# ------------------------------------------------------------ on-disk cache
# Numba invalidates a cached function when *its* source file changes; the
# passes here inline the math of opmath.py and the tables of codes.py, so
# their cache entries are stamped with those files as well.

_INLINED_SOURCES = (opmath.__file__, codes.__file__)


def _with_inlined_sources(locator_class):
    class Locator(locator_class):
        def get_source_stamp(self):
            stamps = [super().get_source_stamp()]
            for path in _INLINED_SOURCES:
                st = os.stat(path)
                stamps.append((os.path.basename(path), st.st_mtime, st.st_size))
            return tuple(stamps)

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.abspath(py_file) != os.path.abspath(__file__):
                return None
            return super().from_function(py_func, py_file)

    Locator.__name__ = f"CpuFused{locator_class.__name__}"
    return Locator


for _base in (caching.UserWideCacheLocator, caching.InTreeCacheLocator, caching.UserProvidedCacheLocator):
    caching.CacheImpl._locator_classes.insert(0, _with_inlined_sources(_base))


# ----------------------------------------------------------------- op dispatch
# Stubs resolved at compile time to the scalar function of a literal code; in
# Python they are never called (the passes are always compiled).


def _literal_code(code, what):
    if not isinstance(code, types.IntegerLiteral):
        raise numba.errors.TypingError(f"{what}: the code must be a compile-time literal (numba.literally)")
    return code.literal_value


def act_forward(act, z, alpha):
    """``act(z)`` for a literal activation code (compiled code only)."""
    raise NotImplementedError("compiled code only")


def act_derivative(act, y, z, alpha):
    """``act'(z)`` from ``y = act(z)`` (and ``z``) for a literal activation code (compiled code only)."""
    raise NotImplementedError("compiled code only")


def needs_preactivation(act):
    """Whether a literal activation's derivative needs ``z`` (a compile-time constant)."""
    raise NotImplementedError("compiled code only")


def loss_element(kind, p, t, param):
    """``(loss, dloss/dp, hit)`` of an elementwise loss kind (compiled code only)."""
    raise NotImplementedError("compiled code only")


def loss_row(kind, pred, target, grad, i, gscale, has_grad):
    """``(loss_i, hit_i)`` of a row-wise (cross-entropy) loss kind (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(act_forward, inline="always")
def _act_forward(act, z, alpha):
    forward, _ = opmath.activation_functions(_literal_code(act, "act"))
    return lambda act, z, alpha: forward(z, alpha)


@overload(act_derivative, inline="always")
def _act_derivative(act, y, z, alpha):
    _, derivative = opmath.activation_functions(_literal_code(act, "act"))
    return lambda act, y, z, alpha: derivative(y, z, alpha)


@overload(needs_preactivation, inline="always")
def _needs_preactivation(act):
    flag = Act(_literal_code(act, "act")).needs_preactivation
    return lambda act: flag


@overload(loss_element, inline="always")
def _loss_element(kind, p, t, param):
    element = opmath.loss_function(_literal_code(kind, "kind"))
    return lambda kind, p, t, param: element(p, t, param)


@overload(loss_row, inline="always")
def _loss_row(kind, pred, target, grad, i, gscale, has_grad):
    code = LossKind(_literal_code(kind, "kind"))
    row, sparse = opmath.loss_function(code), code.sparse
    return lambda kind, pred, target, grad, i, gscale, has_grad: row(pred, target, grad, i, gscale, sparse, has_grad)


class _Specialised:
    """Calls a pass compiled for literal op codes, without Numba's per-call retry.

    ``numba.literally`` makes the dispatcher compile (and cache on disk) one
    version per code; but every call through the dispatcher first tries the
    non-literal types and retries, which costs milliseconds.  So the compiled
    entry point of each (codes, argument types) version is looked up once and
    called directly.  The argument types are keyed by Numba's own type
    fingerprint (dtype, dimensions, layout, read-only; one C call for all
    arguments), which costs about a fifth of building a key in Python; this
    matters for small batches, where a step makes a dozen such calls.
    """

    def __init__(self, dispatcher, literal_positions):
        self.dispatcher = dispatcher
        self.positions = tuple(literal_positions)
        self.entries = {}
        self.lock = threading.Lock()
        self.__doc__ = dispatcher.__doc__
        self.__name__ = dispatcher.__name__

    def _key(self, args):
        """(codes, fingerprint of the argument types), or None for an argument Numba cannot fingerprint."""
        plain = list(args)
        for p in self.positions:
            plain[p] = int(plain[p])
        try:
            return tuple(plain[p] for p in self.positions), _fingerprint(tuple(plain))
        except (NotImplementedError, ValueError, TypeError):
            return None

    def __call__(self, *args):
        key = self._key(args)
        entry = self.entries.get(key)
        if entry is not None:
            return entry(*args)
        args = tuple(int(a) if i in self.positions else a for i, a in enumerate(args))
        with self.lock:  # compile once even when threads race here
            result = self.dispatcher(*args)
            signature = tuple(
                types.literal(a) if i in self.positions else self.dispatcher.typeof_pyval(a) for i, a in enumerate(args)
            )
            compiled = self.dispatcher.overloads.get(signature)
            if compiled is not None and key is not None:
                self.entries[key] = compiled.entry_point
        return result


def _specialised(*literal_positions):
    def wrap(fn):
        return _Specialised(numba.njit(**_JIT)(fn), literal_positions)

    return wrap


# ----------------------------------------------------------------- activations


@_specialised(2)
def bias_activation(z, b, act, alpha, y):
    """``z += b`` over rows (b (N,), zeros for no bias), then ``y = act(z)``.

    z, y: (M, N); ``y`` may be ``z`` itself unless the activation needs the
    pre-activation kept (``Act.needs_preactivation``).
    """
    numba.literally(act)
    m, n = z.shape
    for i in range(m):
        for j in range(n):
            v = z[i, j] + b[j]
            z[i, j] = v
            y[i, j] = act_forward(act, v, alpha)


@_specialised(2)
def bias_activation_inplace(z, b, act, alpha):
    """``z = act(z + b)`` over rows (b (N,)), in place.

    :func:`bias_activation` with ``y`` being ``z``, written with one store per
    element: two stores to possibly aliased arrays keep LLVM from vectorising
    the loop (about 4x slower).
    """
    numba.literally(act)
    m, n = z.shape
    for i in range(m):
        for j in range(n):
            z[i, j] = act_forward(act, z[i, j] + b[j], alpha)


@_specialised(1)
def apply_activation(z, act, alpha, y):
    """``y = act(z)`` elementwise over (M, N); ``y`` may be ``z``."""
    numba.literally(act)
    m, n = z.shape
    for i in range(m):
        for j in range(n):
            y[i, j] = act_forward(act, z[i, j], alpha)


@_specialised(4)
def activation_grad(g, dy, y, z, act, alpha, db, has_db):
    """``g = dy * act'(.)`` over (M, N) (``g`` may be ``dy``); with ``has_db`` also
    ``db[j] = sum_i g[i, j]``, the bias gradient, in the same pass.

    The derivative reads ``y`` (and ``z`` where the activation needs it).
    """
    numba.literally(act)
    m, n = g.shape
    if has_db:
        for j in range(n):
            db[j] = 0
    for i in range(m):
        for j in range(n):
            gij = dy[i, j] * act_derivative(act, y[i, j], z[i, j], alpha)
            g[i, j] = gij
            if has_db:
                db[j] += gij


@_specialised(2)
def bias_activation_dropout(z, b, act, alpha, y, seed, step, threshold, scale, base):
    """Fused forward epilogue with dropout: for ``v = z + b`` (z holds x @ w on entry),
    ``y = act(v) * m`` and ``z = act'(v) * m``, where ``m`` is ``scale`` if
    ``opmath.dropout_keep(base + i * N + j, step, seed, threshold)`` else 0 (uint64
    seed, step, threshold, base: the index of the first element, ``first_row * N``).
    z then holds what :func:`stored_grad` needs.
    """
    numba.literally(act)
    m, n = z.shape
    zero = z.dtype.type(0)
    for i in range(m):
        for j in range(n):
            v = z[i, j] + b[j]
            a = act_forward(act, v, alpha)
            if opmath.dropout_keep(base + np.uint64(i * n + j), step, seed, threshold):
                y[i, j] = a * scale
                z[i, j] = act_derivative(act, a, v, alpha) * scale
            else:
                y[i, j] = zero
                z[i, j] = zero


@numba.njit(**_JIT)
def stored_grad(g, dy, d, db, has_db):
    """``g = dy * d`` over (M, N), d the derivative the forward stored; with ``has_db``
    also ``db[j] = sum_i g[i, j]`` in the same pass."""
    m, n = g.shape
    if has_db:
        for j in range(n):
            db[j] = 0
    for i in range(m):
        for j in range(n):
            gij = dy[i, j] * d[i, j]
            g[i, j] = gij
            if has_db:
                db[j] += gij


@numba.njit(**_JIT)
def dropout_apply(x, y, mask, seed, step, threshold, scale, base):
    """Dropout on its own: ``mask = scale`` where kept, else 0, and ``y = x * scale`` or 0,
    over (M, N), with the mask of :func:`bias_activation_dropout` (same ``base``)."""
    m, n = x.shape
    zero = x.dtype.type(0)
    for i in range(m):
        for j in range(n):
            if opmath.dropout_keep(base + np.uint64(i * n + j), step, seed, threshold):
                y[i, j] = x[i, j] * scale
                mask[i, j] = scale
            else:
                y[i, j] = zero
                mask[i, j] = zero


@numba.njit(**_JIT)
def column_sums(g, out):
    """``out[j] = sum_i g[i, j]`` (the bias gradient), accumulated row by row."""
    m, n = g.shape
    for j in range(n):
        out[j] = 0
    for i in range(m):
        for j in range(n):
            out[j] += g[i, j]


# ----------------------------------------------------------------------- losses
# Loss and hit totals accumulate in float64: a float32 running sum over a
# large batch would lose the small rows' contributions.


@_specialised(0)
def loss_grad_elementwise(kind, pred, target, weight, has_weight, grad, has_grad, sums, param, divisor):
    """Elementwise loss kinds (see numpy_ops.loss_grad): one pass over (M, N).

    The row loss is the sum of the elements over ``divisor`` (N for the kinds
    that average over outputs, 1 for those that sum); ``param`` is the kind's
    parameter in pred's dtype.
    """
    numba.literally(kind)
    m, n = pred.shape
    one = pred.dtype.type(1)
    per_row = pred.dtype.type(m * divisor)
    loss_total = 0.0
    hit_total = 0.0
    for i in range(m):
        w = weight[i] if has_weight else one
        gscale = w / per_row
        row = 0.0
        hits = 0.0
        for j in range(n):
            loss, dloss, hit = loss_element(kind, pred[i, j], target[i, j], param)
            row += loss
            hits += hit
            if has_grad:
                grad[i, j] = dloss * gscale
        loss_total += w * (row / divisor)
        hit_total += hits / n
    sums[0] += loss_total
    sums[1] += hit_total


@_specialised(0)
def loss_grad_rows(kind, pred, target, weight, has_weight, grad, has_grad, sums):
    """Row-wise (cross-entropy) kinds (see numpy_ops.loss_grad); sparse targets as (M, 1)."""
    numba.literally(kind)
    m = pred.shape[0]
    one = pred.dtype.type(1)
    rows = pred.dtype.type(m)
    loss_total = 0.0
    hit_total = 0.0
    for i in range(m):
        w = weight[i] if has_weight else one
        loss, hit = loss_row(kind, pred, target, grad, i, w / rows, has_grad)
        loss_total += w * loss
        hit_total += hit
    sums[0] += loss_total
    sums[1] += hit_total


def loss_grad(kind, pred, target, weight, has_weight, grad, has_grad, sums, param=0.0):
    """Loss + gradient + hit count of one batch; target (M, N), or (M, 1) labels for sparse kinds."""
    kind = LossKind(kind)
    if kind.elementwise:
        divisor = 1 if kind.summed else pred.shape[1]
        args = (kind, pred, target, weight, has_weight, grad, has_grad, sums, pred.dtype.type(param), divisor)
        loss_grad_elementwise(*args)
    else:
        loss_grad_rows(kind, pred, target, weight, has_weight, grad, has_grad, sums)


# ------------------------------------------------------------------- optimizers
# A serial loop on purpose: Numba's thread pool and OpenBLAS's spinning threads
# fight over the cores when both are active in one training step (measured
# 6x slower on 2 cores); the update is a single memory-bound pass anyway.


def optimizer_step(opt, p, g, state, k, h):
    """One element's update for a literal optimizer code (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(optimizer_step, inline="always")
def _optimizer_step(opt, p, g, state, k, h):
    step = opmath.optimizer_step(_literal_code(opt, "opt"))
    return lambda opt, p, g, state, k, h: step(p, g, state, k, h)


@_specialised(0)
def optimizer_update(opt, params, grads, state, h):
    """``params[k] = step(params[k], grads[k], state, k, h)`` over flat (P,) buffers; state (S, P)
    is updated in place; h is the step's scalars in the parameters' dtype (see ``opmath``)."""
    numba.literally(opt)
    for k in range(params.shape[0]):
        params[k] = optimizer_step(opt, params[k], grads[k], state, k, h)
