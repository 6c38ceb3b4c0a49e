"""Fused linear-layer kernels: forward, backward-data and backward-weight.

All three are one tiled matrix product ``C = A @ B`` (``A``: rows x red,
``B``: red x cols) with a different operand layout and epilogue:

* forward          ``y = act(x @ w + b)``         A = x,  B = w
* backward data    ``dx = g @ w.T``                A = g,  B = w.T
* backward weight  ``dw = x.T @ g``, ``db = sum g``  A = x.T, B = g

where ``g = dy * act'(.)`` is formed while ``dy`` is loaded into shared memory
(never written back to global memory).

Tiling: a block of ``THREADS`` threads computes a ``BM x BN`` tile of C and
walks the reduction in ``BK``-deep slices staged in shared memory; each
thread keeps a ``TM x TN`` register tile.  Thread (ty, tx) owns rows
``ty + TY*i`` and columns ``tx + TX*j``: with that strided ownership the
threads of a warp read consecutive shared-memory words of the B tile and
store consecutive global columns of C.

The batch M is on ``blockIdx.x`` (the only grid dimension that can exceed
65535), so batch 65536 and beyond launch fine.  The weight gradient reduces
over the batch, which leaves few output tiles for a 64x64 layer; its grid
therefore splits the batch over ``blockIdx.z`` ("split-K") and the blocks
add into a zeroed ``dw``/``db`` with atomics.
"""

from __future__ import annotations

import functools

import numpy as np

from gpunn import codes
from gpunn._cuda import cuda

from ._device import activation, device, numba_type
from ._launch import ceil_div, check, check_act, float_dtype, matrix_shape

#: Output tile of one block (rows x cols of C).
BM = 64
BN = 64
#: Reduction depth staged in shared memory per step.
BK = 16
#: Register tile of one thread.
TM = 4
TN = 4
TY = BM // TM  # threads along the rows
TX = BN // TN  # threads along the columns
THREADS = TX * TY  # 256 threads per block
#: One pad column per shared tile so that the transposed stores of the
#: row-major operands (consecutive threads write consecutive tile rows)
#: fall into different banks.
PAD = 1
#: Shared tile width (a named constant: shared array shapes must be literals).
TILE_COLS = BM + PAD
# Static shared memory per block: two tiles of BK x (64 + PAD) elements:
#   2 * 16 * 65 * 4 B =  8,320 B in float32
#   2 * 16 * 65 * 8 B = 16,640 B in float64      (limit: 48 KB static)
# Limits: BM == BN (one loader shape serves both operands); THREADS must be
# divisible by BK and by BM, and BM, BK by the matching thread strides.
assert BM == BN and THREADS % BK == 0 and THREADS % BM == 0
assert BM % (THREADS // BK) == 0 and BK % (THREADS // BM) == 0
SHARED_ELEMENTS = 2 * BK * TILE_COLS

#: Weight gradient: fewest batch rows one split covers, and the number of
#: blocks the split aims at (several waves over an H200's 132 SMs).
SPLIT_MIN_ROWS = 256
SPLIT_TARGET_BLOCKS = 1024

ZERO_THREADS = 256


@functools.lru_cache(maxsize=None)
def _tile_loader(dtype, act, transposed, apply_grad):
    """Device function staging one ``BK x BM`` operand slice into shared memory.

    ``load(S, src, y, z, alpha, outer0, k0, t)`` fills ``S[kk, o]`` with the
    operand element at reduction index ``k0 + kk`` and outer index
    ``outer0 + o``; out-of-range elements become 0 so they add nothing.
    ``transposed``: ``src`` is (outer, red) (x in forward, g and w in
    backward data), else (red, outer).  Either way the thread's fast index
    runs along ``src``'s contiguous axis, so global reads coalesce.
    ``apply_grad``: ``src`` is dy and the element is multiplied by
    ``act'`` taken from ``y`` (or ``z`` for GELU).
    """
    T = np.dtype(dtype).type
    ZERO = T(0)
    _, derivative = activation(dtype, act)
    needs_z = act in codes.ACT_NEEDS_PREACTIVATION
    if transposed:
        fast_n = BK
    else:
        fast_n = BM
    slow_step = THREADS // fast_n
    passes = (BM if transposed else BK) // slow_step

    def load(S, src, y, z, alpha, outer0, k0, t):
        rows, cols = src.shape
        fast = t % fast_n
        slow = t // fast_n
        for p in range(passes):
            s = slow + p * slow_step
            if transposed:
                i = outer0 + s
                j = k0 + fast
            else:
                i = k0 + s
                j = outer0 + fast
            v = ZERO
            if i < rows and j < cols:
                v = src[i, j]
                if apply_grad:
                    zz = ZERO
                    if needs_z:
                        zz = z[i, j]
                    v = v * derivative(y[i, j], zz, alpha)
            if transposed:
                S[fast, s] = v
            else:
                S[s, fast] = v

    return device(load)


@functools.lru_cache(maxsize=None)
def _mainloop(dtype, act, a_layout, b_layout, with_db):
    """Device function running the shared-memory/register-tiled product.

    ``a_layout``/``b_layout`` are ``(transposed, apply_grad)`` pairs for
    :func:`_tile_loader`.  Accumulates the block's ``A[rows, k] @ B[k, cols]`` (rows
    from ``blockIdx.x``, columns from ``blockIdx.y``) for the
    reduction tiles ``kt0 <= kt < kt1`` into the register tile ``acc`` (which
    it zeroes first, as it does ``dbacc``); with
    ``with_db`` the threads given ``do_db`` also add the staged B tile's
    columns into ``dbacc`` (B is g in backward-weight, so that is db).
    """
    T = np.dtype(dtype).type
    nbt = numba_type(dtype)
    load_a = _tile_loader(dtype, act, *a_layout)
    load_b = _tile_loader(dtype, act, *b_layout)

    def mainloop(acc, dbacc, a, ay, az, b, by, bz, alpha, kt0, kt1, do_db):
        t = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * BM
        col0 = cuda.blockIdx.y * BN
        As = cuda.shared.array((BK, TILE_COLS), nbt)
        Bs = cuda.shared.array((BK, TILE_COLS), nbt)
        ra = cuda.local.array(TM, nbt)
        rb = cuda.local.array(TN, nbt)
        ty = t // TX
        tx = t % TX
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = T(0)
        for j in range(TN):
            dbacc[j] = T(0)
        for kt in range(kt0, kt1):
            k0 = kt * BK
            load_a(As, a, ay, az, alpha, row0, k0, t)
            load_b(Bs, b, by, bz, alpha, col0, k0, t)
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    ra[i] = As[kk, ty + i * TY]
                for j in range(TN):
                    rb[j] = Bs[kk, tx + j * TX]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += ra[i] * rb[j]
            if with_db and do_db:
                for j in range(TN):
                    s = dbacc[j]
                    for kk in range(BK):
                        s += Bs[kk, tx + j * TX]
                    dbacc[j] = s
            # the next iteration overwrites the tiles other threads may still read
            cuda.syncthreads()

    return device(mainloop)


@device
def k_tiles(k):
    """Reduction tiles covering a reduction of length k: ceil(k / BK)."""
    return (k + BK - 1) // BK


@device
def out_index(i, j):
    """(row, col) of C held in this thread's register ``acc[i, j]``."""
    t = cuda.threadIdx.x
    return cuda.blockIdx.x * BM + t // TX + i * TY, cuda.blockIdx.y * BN + t % TX + j * TX


@functools.lru_cache(maxsize=None)
def _forward_kernel(dtype, act, has_bias):
    nbt = numba_type(dtype)
    forward, _ = activation(dtype, act)
    needs_z = act in codes.ACT_NEEDS_PREACTIVATION
    # A = x (M, K) is (outer, red); B = w (K, N) is (red, outer)
    mainloop = _mainloop(dtype, act, (True, False), (False, False), False)

    def kernel(x, w, b, y, z, alpha):
        acc = cuda.local.array((TM, TN), nbt)
        dbacc = cuda.local.array(TN, nbt)
        mainloop(acc, dbacc, x, x, x, w, w, w, alpha, 0, k_tiles(x.shape[1]), False)
        for i in range(TM):
            for j in range(TN):
                r, c = out_index(i, j)
                if r < y.shape[0] and c < y.shape[1]:
                    v = acc[i, j]
                    if has_bias:
                        v += b[c]
                    if needs_z:
                        z[r, c] = v
                    y[r, c] = forward(v, alpha)

    return cuda.jit(kernel)


@functools.lru_cache(maxsize=None)
def _backward_data_kernel(dtype, act):
    nbt = numba_type(dtype)
    # A = g (M, N) and B = w.T, read from w (K, N): both are (outer, red)
    mainloop = _mainloop(dtype, act, (True, True), (True, False), False)

    def kernel(dy, y, z, w, dx, alpha):
        acc = cuda.local.array((TM, TN), nbt)
        dbacc = cuda.local.array(TN, nbt)
        mainloop(acc, dbacc, dy, y, z, w, w, w, alpha, 0, k_tiles(dy.shape[1]), False)
        for i in range(TM):
            for j in range(TN):
                r, c = out_index(i, j)
                if r < dx.shape[0] and c < dx.shape[1]:
                    dx[r, c] = acc[i, j]

    return cuda.jit(kernel)


@functools.lru_cache(maxsize=None)
def _backward_weight_kernel(dtype, act, has_db):
    nbt = numba_type(dtype)
    # A = x.T, read from x (M, K), and B = g (M, N): both are (red, outer)
    mainloop = _mainloop(dtype, act, (False, False), (False, True), has_db)

    def kernel(x, dy, y, z, dw, db, alpha, tiles_per_split):
        acc = cuda.local.array((TM, TN), nbt)
        dbacc = cuda.local.array(TN, nbt)
        kt0 = cuda.blockIdx.z * tiles_per_split
        kt1 = min(kt0 + tiles_per_split, k_tiles(x.shape[0]))
        # one row of threads in the first row of blocks sums g for db
        do_db = has_db and cuda.blockIdx.x == 0 and cuda.threadIdx.x < TX
        mainloop(acc, dbacc, x, x, x, dy, y, z, alpha, kt0, kt1, do_db)
        split = cuda.gridDim.z > 1
        for i in range(TM):
            for j in range(TN):
                r, c = out_index(i, j)
                if r < dw.shape[0] and c < dw.shape[1]:
                    if split:
                        cuda.atomic.add(dw, (r, c), acc[i, j])
                    else:
                        dw[r, c] = acc[i, j]
        if do_db:
            for j in range(TN):
                c = out_index(0, j)[1]
                if c < db.shape[0]:
                    if split:
                        cuda.atomic.add(db, c, dbacc[j])
                    else:
                        db[c] = dbacc[j]

    return cuda.jit(kernel)


@functools.lru_cache(maxsize=None)
def _zero_kernel(dtype):
    T = np.dtype(dtype).type

    def kernel(a, v):
        """a (R, C) and v (n,) = 0, grid-stride."""
        rows, cols = a.shape
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for idx in range(start, rows * cols, stride):
            a[idx // cols, idx % cols] = T(0)
        for idx in range(start, v.shape[0], stride):
            v[idx] = T(0)

    return cuda.jit(kernel)


def _launch(kernel, grid, stream, *args):
    if all(g > 0 for g in grid):
        kernel[grid, THREADS, stream](*args)


def _check_y_z(act, y, z, shape, dt, stand_in):
    """z checked when the activation needs it, else ``stand_in`` for it.

    Kernels specialised on an absent optional array never touch the array
    passed in its place; it is always one of the *inputs* (never an output):
    a launch on host NumPy arrays copies every argument back afterwards, so
    an output passed twice would be overwritten by its stale twin.
    """
    check("y", y, shape, dt)
    if act in codes.ACT_NEEDS_PREACTIVATION:
        check("z", z, shape, dt)
        return z
    return stand_in


def linear_forward(x, w, b, act, alpha, y, z=None, stream=0):
    """``z = x @ w + b``; ``y = act(z)`` in one kernel.

    x: (M, K), w: (K, N), b: (N,) or None, y: (M, N) output; z: (M, N)
    output, required (and written) only for activations in
    ``codes.ACT_NEEDS_PREACTIVATION``.  All arrays float32 or all float64.
    """
    M, K = matrix_shape("x", x)
    dt = float_dtype("x", x)
    N = matrix_shape("w", w)[1]
    check("w", w, (K, N), dt)
    if b is not None:
        check("b", b, (N,), dt)
    act = check_act(act)
    z = _check_y_z(act, y, z, (M, N), dt, x)
    kernel = _forward_kernel(dt, act, b is not None)
    grid = (ceil_div(M, BM), ceil_div(N, BN))
    _launch(kernel, grid, stream, x, w, w[0] if b is None else b, y, z, dt.type(alpha))
    return y


def linear_backward_data(dy, w, y, z, act, alpha, dx, stream=0):
    """``dx = (dy * act'(.)) @ w.T``; dy is left unchanged.

    dy, y: (M, N); z: (M, N) pre-activation (GELU) or None; w: (K, N);
    dx: (M, K) output.
    """
    M, N = matrix_shape("dy", dy)
    dt = float_dtype("dy", dy)
    K = matrix_shape("w", w)[0]
    check("w", w, (K, N), dt)
    act = check_act(act)
    z = _check_y_z(act, y, z, (M, N), dt, dy)
    check("dx", dx, (M, K), dt)
    grid = (ceil_div(M, BM), ceil_div(K, BN))
    _launch(_backward_data_kernel(dt, act), grid, stream, dy, y, z, w, dx, dt.type(alpha))
    return dx


def _weight_splits(M, out_tiles):
    """(splits, reduction tiles per split) for the weight gradient over batch M."""
    ktiles = max(1, ceil_div(M, BK))
    splits = max(1, min(ceil_div(M, SPLIT_MIN_ROWS), SPLIT_TARGET_BLOCKS // max(out_tiles, 1)))
    per = ceil_div(ktiles, splits)
    return ceil_div(ktiles, per), per


def linear_backward_weight(x, dy, y, z, act, alpha, dw, db, stream=0):
    """``g = dy * act'(.)``; ``dw = x.T @ g``; ``db = sum_batch g`` in one kernel.

    x: (M, K); dy, y: (M, N); z: (M, N) pre-activation (GELU) or None;
    dw: (K, N) output; db: (N,) output or None (skipped).  dy is unchanged.
    Large batches are split over blocks that add into dw/db atomically, so
    the result's last bits may vary from run to run.
    """
    M, K = matrix_shape("x", x)
    dt = float_dtype("x", x)
    N = matrix_shape("dy", dy)[1]
    check("dy", dy, (M, N), dt)
    act = check_act(act)
    z = _check_y_z(act, y, z, (M, N), dt, dy)
    check("dw", dw, (K, N), dt)
    if db is not None:
        check("db", db, (N,), dt)
    db_arg = dy[0] if db is None else db
    out_tiles = ceil_div(K, BM) * ceil_div(N, BN)
    splits, per = _weight_splits(M, out_tiles)
    if splits > 1 and out_tiles > 0:
        zero = _zero_kernel(dt)
        blocks = min(ceil_div(K * N, ZERO_THREADS), 1024)
        # without db, dw's own first row stands in (it is zeroed either way)
        zero[blocks, ZERO_THREADS, stream](dw, dw[0] if db is None else db)
    grid = (ceil_div(K, BM), ceil_div(N, BN), splits)
    _launch(_backward_weight_kernel(dt, act, db is not None), grid, stream, x, dy, y, z, dw, db_arg, dt.type(alpha), per)
    return dw
