"""Fused linear-layer kernels: forward, backward-data and backward-weight.

All three are one tiled matrix product ``C = A @ B`` (``A``: rows x red,
``B``: red x cols) with a different operand layout and epilogue:

* forward          ``y = act(x @ w + b)``           A = x,   B = w
* backward data    ``dx = g @ w.T``                 A = g,   B = w.T
* backward weight  ``dw = x.T @ g``, ``db = sum g``  A = x.T, B = g

where ``g = dy * act'(.)`` is formed while ``dy`` is loaded (never written
back to global memory).

What the forward leaves in ``z`` for backward (``z`` is private to this
pair of kernels): nothing for activations whose derivative is cheap from
``y`` (ReLU, leaky ReLU, sigmoid, tanh, softsign, exponential), which
backward evaluates per loaded ``dy`` element; ``d = act'(z)`` for the
activations of ``codes.ACT_KEEPS_Z`` (GELU, swish, mish, softplus:
exp/erf/tanh per element would cost the backward main loop a third of its
issue slots; ELU, SELU, relu6, hard_sigmoid: an add or a second compare
per element kept the 64x64 loop just under a 0.70 FMA share); and with dropout ``d =
act'(z) * m`` for every activation, where ``m`` is the dropout scale or 0.
Then backward forms ``g = dy * d`` with one multiply.  Dropout's mask is
generated in the forward epilogue from ``opmath.dropout_keep`` (Philox, a
pure function of seed, step and element index) and never stored apart.

Main loop (one per :class:`Tile`): a block of ``threads`` threads computes a
``BM x BN`` tile of C, walking the reduction in ``BK``-deep slices.  Each
slice is staged in shared memory as ``As[k, m]`` and ``Bs[k, n]`` (reduction
index first), and each thread keeps a ``TM x TN`` register tile.  Per slice a
thread:

1. loads its share of the *next* slice from global memory into registers
   (prefetch; unchecked on interior tiles, bounds-checked on edge tiles and
   the last, partial slice),
2. multiplies the current slice out of shared memory: ``BK * TM * TN`` FMAs
   for ``BK * (TM + TN)`` shared loads, which the compiler merges into
   16-byte loads because each thread's rows (and columns) come in runs of
   ``VEC`` consecutive, 16-byte aligned elements,
3. stores the prefetched registers into the other shared buffer, then
   passes the slice's only barrier.

Thread (ty, tx) owns rows ``g * BM / (TM / VEC) + ty * VEC + v`` for group
``g`` and ``v < VEC`` (the same for columns with tx): a warp's 16-byte loads
cover consecutive shared words (no bank conflicts) and its global stores
cover runs of consecutive columns.

Which tile a launch uses, and how far the reduction is split over
``blockIdx.z`` for the two gradient products, is :func:`plan`'s pure
function of the shape and the GPU's multiprocessor count: small batches get
smaller tiles and split reductions so that every SM has work.  The batch M
is on ``blockIdx.x`` (the only grid dimension that can exceed 65535).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from gpunn import codes, opmath
from gpunn._cuda import cuda, inlined_device_function, kernel_jit, multiprocessor_count, simulator_enabled

from ._device import activation, numba_type
from ._launch import ceil_div, check, check_act, float_dtype, matrix_shape, variant

#: Bytes one vectorised shared-memory load moves (LDS.128).
VECTOR_BYTES = 16
#: Static shared memory allowed per block (the CUDA limit for static arrays).
STATIC_SHARED_LIMIT = 48 * 1024


@dataclasses.dataclass(frozen=True)
class Tile:
    """One main-loop shape: a ``bm x bn`` block tile, ``bk``-deep slices, ``tm x tn`` per thread.

    ``efficiency`` is the relative FMA throughput of a block of this shape
    (its main loop's FMA share in the offline report, rounded), used by
    :func:`plan` to trade wasted edge work against idle SMs.
    """

    name: str
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int
    efficiency: float

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    def vec(self, dtype) -> int:
        """Consecutive elements a thread owns per row/column group (one 16-byte load)."""
        return min(self.tm, self.tn, VECTOR_BYTES // np.dtype(dtype).itemsize)

    def row_stride(self, dtype, outer) -> int:
        """Shared tile row length: ``outer`` plus a pad of one vector.

        The pad keeps rows 16-byte aligned and shifts each k-row by ``vec``
        banks, so the transposed stores (consecutive threads walking k) of
        the row-major operands do not collide in a bank.
        """
        return outer + self.vec(dtype)

    def shared_bytes(self, dtype) -> int:
        """Two buffers of each operand's ``bk x (outer + pad)`` slice."""
        size = np.dtype(dtype).itemsize
        return 2 * self.bk * (self.row_stride(dtype, self.bm) + self.row_stride(dtype, self.bn)) * size


# Tiles, largest first.  Every float32 tile keeps an 8x8 register tile: a
# block loads (bm + bn) * bk elements per slice for bm * bn * bk FMAs, so a
# 32x32 tile (16 FMAs per load) cannot keep the main loop's FMA share above
# 0.7 whatever its thread shape; the 64x64 tile uses 64 threads instead of
# 256, and small products get split reductions (see plan).  float64 halves
# the register budget per element: 4x4 per thread (8x8 needs ~250 registers
# and spills).  Limits (checked below): threads a multiple of bk and >= bm,
# bn (one loader pass covers a full k-row or outer column); bm*bk and bn*bk
# multiples of threads; tm, tn multiples of the vector length; bn / tn a
# power of two; static shared memory <= 48 KB (largest: 128x128 float32,
# 16.5 KB).
TILES_F32 = (
    Tile("128x128", 128, 128, 8, 8, 8, efficiency=1.0),
    Tile("64x64", 64, 64, 8, 8, 8, efficiency=0.9),
)
TILES_F64 = (
    Tile("64x64-f64", 64, 64, 8, 4, 4, efficiency=1.0),
    Tile("32x32-f64", 32, 32, 8, 4, 4, efficiency=0.9),
)
TILES = {np.dtype(np.float32): TILES_F32, np.dtype(np.float64): TILES_F64}
for _dt, _tiles in TILES.items():
    for _t in _tiles:
        _v = _t.vec(_dt)
        assert _t.threads % _t.bk == 0 and _t.threads >= max(_t.bm, _t.bn), _t
        assert (_t.bm * _t.bk) % _t.threads == 0 and (_t.bn * _t.bk) % _t.threads == 0, _t
        assert _t.tm % _v == 0 and _t.tn % _v == 0, _t
        assert _t.shared_bytes(_dt) <= STATIC_SHARED_LIMIT, _t
        assert (_t.bn // _t.tn) & (_t.bn // _t.tn - 1) == 0, _t
        # db's epilogue reuses As[0] as a (threads / bn) x bn scratch
        assert _t.bm >= _t.bn and _t.threads // _t.bn <= _t.bk, _t

#: A split of the reduction covers at least this many slices (fewer would
#: spend more on the atomic epilogue than on the products).
SPLIT_MIN_SLICES = 16
#: Split until the grid has this many blocks per multiprocessor.
SPLIT_BLOCKS_PER_SM = 2

ZERO_THREADS = 256

# How a loader forms g from the dy it reads (the loaders' ``apply_grad``).
GRAD_NONE = 0  # the operand is not dy
GRAD_DERIVATIVE = 1  # g = dy * act'(.) evaluated from y (and z)
GRAD_STORED = 2  # g = dy * z, the derivative the forward stored in z


def stores_derivative(act, dropout) -> bool:
    """Whether the forward kernel stores ``act'(z)`` (times the dropout scale) in ``z``."""
    return dropout is not None or act in codes.ACT_KEEPS_Z


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one product is launched: the tile and the number of reduction splits."""

    tile: Tile
    splits: int
    slices_per_split: int


def _tile_cost(tile, rows, cols, sm_count):
    """Waves of blocks times the work of one block, over the tile's efficiency."""
    blocks = ceil_div(rows, tile.bm) * ceil_div(cols, tile.bn)
    return ceil_div(blocks, sm_count) * tile.bm * tile.bn / tile.efficiency


def plan(rows, cols, red, sm_count, splittable, dtype=np.float32, tile=None):
    """Launch plan for ``C (rows x cols) = A (rows x red) @ B`` on ``sm_count`` SMs.

    The tile minimises (waves of blocks) x (block work / efficiency), ties
    going to the larger tile; so a 64-wide layer does not pay for a
    128-wide tile, and a small batch gets small tiles that spread over more
    SMs.  When ``splittable`` (the gradient products, whose results can be
    added atomically) and the grid still has fewer than
    ``SPLIT_BLOCKS_PER_SM * sm_count`` blocks, the reduction is split over
    ``blockIdx.z`` into parts of at least ``SPLIT_MIN_SLICES`` slices.
    Tiles come from ``TILES[dtype]``; ``tile`` (one of their names) forces
    the tile.  Pure.
    """
    if sm_count < 1:
        raise ValueError(f"sm_count: expected a positive multiprocessor count, got {sm_count}")
    tiles = TILES[np.dtype(dtype)]
    if tile is None:
        chosen = min(tiles, key=lambda t: _tile_cost(t, rows, cols, sm_count))
    else:
        by_name = {t.name: t for t in tiles}
        if tile not in by_name:
            raise ValueError(f"tile: expected one of {sorted(by_name)} for {np.dtype(dtype)}, got {tile!r}")
        chosen = by_name[tile]
    slices = max(1, ceil_div(red, chosen.bk))
    splits = 1
    if splittable:
        blocks = ceil_div(rows, chosen.bm) * ceil_div(cols, chosen.bn)
        wanted = ceil_div(SPLIT_BLOCKS_PER_SM * sm_count, max(blocks, 1))
        splits = max(1, min(wanted, slices // SPLIT_MIN_SLICES))
    per = ceil_div(slices, splits)
    return Plan(chosen, ceil_div(slices, per), per)


# --------------------------------------------------------------------------
# device code
# --------------------------------------------------------------------------


def _owned(tile_outer, per_thread, vec, lane, i):
    """Index within the block tile of a thread's ``i``-th row (or column).

    ``lane`` is ty (or tx); runs of ``vec`` consecutive indices, one run per
    group of ``tile_outer / (per_thread / vec)`` indices.
    """
    groups = per_thread // vec
    return (i // vec) * (tile_outer // groups) + lane * vec + i % vec


owned = inlined_device_function(_owned)


@functools.lru_cache(maxsize=None)
def _loader(dtype, tile, outer, transposed, act, apply_grad, checked):
    """Device functions moving one operand slice: global -> registers -> shared.

    ``fetch(regs, src, y, z, alpha, outer0, k0, t)`` reads this thread's
    ``outer * bk / threads`` elements of the slice at reduction offset
    ``k0`` and outer offset ``outer0``; ``put(S, buf, regs, t)`` stores
    them into ``S[buf, k, o]``.  ``transposed``: ``src`` is (outer, red)
    (x in forward, g and w in backward data), else (red, outer); either way
    the fast thread index runs along ``src``'s contiguous axis, so global
    reads coalesce.  ``apply_grad``: GRAD_NONE, or ``src`` is dy, multiplied
    by ``act'`` from ``y`` (and ``z``) (GRAD_DERIVATIVE) or by the stored
    ``z`` (GRAD_STORED).  ``checked``: out-of-range elements read as 0
    (edge tiles and the last slice); else every element is in range.
    """
    T = np.dtype(dtype).type
    ZERO = T(0)
    _, derivative = activation(dtype, act)
    needs_z = act in codes.ACT_NEEDS_PREACTIVATION
    threads = tile.threads
    fast_n = tile.bk if transposed else outer
    slow_step = threads // fast_n
    loads = outer * tile.bk // threads

    def fetch(regs, src, y, z, alpha, outer0, k0, t):
        rows, cols = src.shape
        fast = t % fast_n
        slow = t // fast_n
        for p in range(loads):
            s = slow + p * slow_step
            if transposed:
                i = outer0 + s
                j = k0 + fast
            else:
                i = k0 + s
                j = outer0 + fast
            v = ZERO
            if not checked or (i < rows and j < cols):
                # unsigned indices: Numba adds no negative-index wraparound
                # (two instructions and a select per load otherwise)
                ui = np.uint64(i)
                uj = np.uint64(j)
                v = src[ui, uj]
                if apply_grad == GRAD_STORED:
                    v = v * z[ui, uj]
                elif apply_grad == GRAD_DERIVATIVE:
                    zz = ZERO
                    if needs_z:
                        zz = z[ui, uj]
                    v = v * derivative(y[ui, uj], zz, alpha)
            regs[p] = v

    def put(S, buf, regs, t):
        fast = t % fast_n
        slow = t // fast_n
        for p in range(loads):
            s = slow + p * slow_step
            if transposed:
                S[buf, fast, s] = regs[p]
            else:
                S[buf, s, fast] = regs[p]

    return inlined_device_function(fetch), inlined_device_function(put)


@functools.lru_cache(maxsize=None)
def _slice_product(dtype, tile):
    """Device function ``product(acc, As, Bs, buf, a_lane, b_lane)``: one slice, fully unrolled.

    ``acc[i, j] += As[buf, k, row_i] * Bs[buf, k, col_j]`` for every ``k <
    bk``, with ``row_i = a_lane + offset_i`` (see :func:`_owned`).  Numba
    leaves a ``for k in range(bk)`` loop rolled (paying index arithmetic and
    a branch per 64 FMAs), so the body is generated as straight-line code:
    every shared index is then ``lane + constant``, which lets the compiler
    fold the constants into the load instructions and merge runs of ``vec``
    aligned loads into one 16-byte load.
    """
    vec = tile.vec(dtype)
    lines = ["def product(acc, As, Bs, buf, a_lane, b_lane):"]
    for k in range(tile.bk):
        for i in range(tile.tm):
            lines.append(f"    a{i} = As[buf, {k}, a_lane + {_owned(tile.bm, tile.tm, vec, 0, i)}]")
        for j in range(tile.tn):
            lines.append(f"    b{j} = Bs[buf, {k}, b_lane + {_owned(tile.bn, tile.tn, vec, 0, j)}]")
        for i in range(tile.tm):
            for j in range(tile.tn):
                lines.append(f"    acc[{i}, {j}] += a{i} * b{j}")
    namespace = {}
    exec(compile("\n".join(lines), f"<gpunn.kernels.linear product {tile.name} {np.dtype(dtype)}>", "exec"), namespace)
    return inlined_device_function(namespace["product"])


@functools.lru_cache(maxsize=None)
def _mainloop(dtype, tile, act, a_layout, b_layout, sum_b):
    """Device function accumulating the block's ``A[rows, k] @ B[k, cols]``.

    ``a_layout``/``b_layout``: ``(transposed, apply_grad)`` of each operand
    (see :func:`_loader`).  ``mainloop(acc, bsum, As, Bs, a, ay, az, b, by,
    bz, alpha, row0, col0, kt0, kt1)`` zeroes the register tile ``acc`` and
    adds the slices ``kt0 <= kt < kt1``; with ``sum_b`` each thread also adds
    the B elements it loaded into ``bsum[0]`` (B is g in backward-weight, so
    the block's threads together hold db's column sums).
    """
    T = np.dtype(dtype).type
    nbt = numba_type(dtype)
    BK, TM, TN = tile.bk, tile.tm, tile.tn
    VEC = tile.vec(dtype)
    TX = tile.bn // TN
    TX_SHIFT = TX.bit_length() - 1
    assert TX == 1 << TX_SHIFT, "threads per tile row must be a power of two"
    a_loads = tile.bm * BK // tile.threads
    b_loads = tile.bn * BK // tile.threads
    fetch_a, put_a = _loader(dtype, tile, tile.bm, a_layout[0], act, a_layout[1], False)
    fetch_a_checked, _ = _loader(dtype, tile, tile.bm, a_layout[0], act, a_layout[1], True)
    fetch_b, put_b = _loader(dtype, tile, tile.bn, b_layout[0], act, b_layout[1], False)
    fetch_b_checked, _ = _loader(dtype, tile, tile.bn, b_layout[0], act, b_layout[1], True)
    BM, BN = tile.bm, tile.bn
    a_outer_dim = 0 if a_layout[0] else 1
    b_outer_dim = 0 if b_layout[0] else 1

    product = _slice_product(dtype, tile)

    def mainloop(acc, bsum, As, Bs, a, ay, az, b, by, bz, alpha, row0, col0, kt0, kt1):
        t = cuda.threadIdx.x
        # first shared index of the thread's rows / columns (see _owned);
        # shifts and masks keep them provably non-negative, so every shared
        # index folds to lane + constant (no negative-index wraparound)
        a_lane = (t >> TX_SHIFT) * VEC
        b_lane = (t & (TX - 1)) * VEC
        pa = cuda.local.array(a_loads, nbt)
        pb = cuda.local.array(b_loads, nbt)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = T(0)
        bsum[0] = T(0)
        red = a.shape[1 - a_outer_dim]
        # interior block: every row and column of the tile exists
        interior = row0 + BM <= a.shape[a_outer_dim] and col0 + BN <= b.shape[b_outer_dim]
        full_slices = red // BK
        if kt0 < kt1:
            k0 = kt0 * BK
            if interior and kt0 < full_slices:
                fetch_a(pa, a, ay, az, alpha, row0, k0, t)
                fetch_b(pb, b, by, bz, alpha, col0, k0, t)
            else:
                fetch_a_checked(pa, a, ay, az, alpha, row0, k0, t)
                fetch_b_checked(pb, b, by, bz, alpha, col0, k0, t)
            if sum_b:
                for p in range(b_loads):
                    bsum[0] += pb[p]
            put_a(As, 0, pa, t)
            put_b(Bs, 0, pb, t)
        cuda.syncthreads()
        # interior fast path: while the next slice is full and inside the
        # tile, its loads need no bounds checks (a loop of its own, so the
        # hot loop holds no checked code at all)
        kt_fast = kt0
        if interior:
            kt_fast = max(kt0, min(kt1, full_slices) - 1)
        for kt in range(kt0, kt_fast):
            cur = (kt - kt0) & 1
            k0 = (kt + 1) * BK
            fetch_a(pa, a, ay, az, alpha, row0, k0, t)
            fetch_b(pb, b, by, bz, alpha, col0, k0, t)
            product(acc, As, Bs, cur, a_lane, b_lane)
            if sum_b:
                for p in range(b_loads):
                    bsum[0] += pb[p]
            put_a(As, 1 - cur, pa, t)
            put_b(Bs, 1 - cur, pb, t)
            # the only barrier of the slice: the next slice's buffer is
            # complete, and nobody reads this one before it is overwritten
            cuda.syncthreads()
        for kt in range(kt_fast, kt1):
            cur = (kt - kt0) & 1
            nxt = kt + 1
            if nxt < kt1:
                fetch_a_checked(pa, a, ay, az, alpha, row0, nxt * BK, t)
                fetch_b_checked(pb, b, by, bz, alpha, col0, nxt * BK, t)
            product(acc, As, Bs, cur, a_lane, b_lane)
            if nxt < kt1:
                if sum_b:
                    for p in range(b_loads):
                        bsum[0] += pb[p]
                put_a(As, 1 - cur, pa, t)
                put_b(Bs, 1 - cur, pb, t)
            cuda.syncthreads()

    return inlined_device_function(mainloop)


@functools.lru_cache(maxsize=None)
def _epilogue_index(dtype, tile):
    """``index(i, j, row0, col0) -> (row, col)`` of C held in ``acc[i, j]``."""
    VEC = tile.vec(dtype)
    TX = tile.bn // tile.tn
    BM, BN, TM, TN = tile.bm, tile.bn, tile.tm, tile.tn

    def index(i, j, row0, col0):
        t = cuda.threadIdx.x
        return row0 + owned(BM, TM, VEC, t // TX, i), col0 + owned(BN, TN, VEC, t % TX, j)

    return inlined_device_function(index)


def _shared_shapes(dtype, tile):
    """Shapes of the double-buffered operand tiles ``As``, ``Bs`` and their alignment.

    16-byte alignment lets the compiler merge each thread's ``vec``-element
    runs into one load; the simulator rejects an explicit alignment.
    """
    align = None if simulator_enabled() else VECTOR_BYTES
    return (2, tile.bk, tile.row_stride(dtype, tile.bm)), (2, tile.bk, tile.row_stride(dtype, tile.bn)), align


def _unrolled_over_tile(tile, element):
    """Device function ``each(acc, y, z, b, alpha, row0, col0, seed, step, threshold, scale)``
    calling ``element(acc[i, j], i, j, y, z, b, alpha, row0, col0, seed, step,
    threshold, scale)`` for every entry of the register tile, as straight-line code.

    A loop over ``acc`` whose body is too large for the compiler to unroll
    (an activation with transcendental functions) indexes ``acc``
    dynamically, which moves the whole register tile to local memory.
    """
    args = "y, z, b, alpha, row0, col0, seed, step, threshold, scale"
    lines = [f"def each(acc, {args}):"]
    for i in range(tile.tm):
        for j in range(tile.tn):
            lines.append(f"    element(acc[{i}, {j}], {i}, {j}, {args})")
    namespace = {"element": element}
    exec(compile("\n".join(lines), f"<gpunn.kernels.linear epilogue {tile.name}>", "exec"), namespace)
    return inlined_device_function(namespace["each"])


def _read_step(dropout):
    """Device function ``read(step) -> uint64``: the training step (0 without dropout, whose
    kernels are passed an unrelated stand-in array and must not read it)."""
    if dropout:
        return inlined_device_function(lambda step: np.uint64(step[0]))
    return inlined_device_function(lambda step: np.uint64(0))


@functools.lru_cache(maxsize=None)
def _forward_kernel(dtype, tile, act, has_bias, dropout):
    """``y = act(x @ w + b)`` (times the dropout mask); z receives what backward needs (module doc)."""
    nbt = numba_type(dtype)
    T = np.dtype(dtype).type
    ZERO = T(0)
    forward, derivative = activation(dtype, act)
    store = stores_derivative(act, True if dropout else None)
    TM, TN, BM, BN, BK = tile.tm, tile.tn, tile.bm, tile.bn, tile.bk
    # A = x (M, K) is (outer, red); B = w (K, N) is (red, outer)
    mainloop = _mainloop(dtype, tile, act, (True, GRAD_NONE), (False, GRAD_NONE), False)
    index = _epilogue_index(dtype, tile)
    a_shape, b_shape, align = _shared_shapes(dtype, tile)
    read_step = _read_step(dropout)
    keep_element = opmath.dropout_keep

    def element(v, i, j, y, z, b, alpha, row0, col0, seed, step, threshold, scale):
        r, c = index(i, j, row0, col0)
        if r < y.shape[0] and c < y.shape[1]:
            if has_bias:
                v += b[c]
            # the output's own type: as compiled code does, and as the simulator does not
            # (math.tanh of a float32 is a Python float there)
            a = T(forward(v, alpha))
            if dropout:
                flat = np.uint64(r) * np.uint64(y.shape[1]) + np.uint64(c)
                if keep_element(flat, step, seed, threshold):
                    y[r, c] = a * scale
                    z[r, c] = derivative(a, v, alpha) * scale
                else:
                    y[r, c] = ZERO
                    z[r, c] = ZERO
            else:
                if store:
                    z[r, c] = derivative(a, v, alpha)
                y[r, c] = a

    epilogue = _unrolled_over_tile(tile, inlined_device_function(element))

    def kernel(x, w, b, y, z, alpha, seed, step, threshold, scale):
        As = cuda.shared.array(a_shape, nbt, alignment=align)
        Bs = cuda.shared.array(b_shape, nbt, alignment=align)
        acc = cuda.local.array((TM, TN), nbt)
        bsum = cuda.local.array(1, nbt)
        row0 = cuda.blockIdx.x * BM
        col0 = cuda.blockIdx.y * BN
        mainloop(acc, bsum, As, Bs, x, x, x, w, w, w, alpha, row0, col0, 0, (x.shape[1] + BK - 1) // BK)
        epilogue(acc, y, z, b, alpha, row0, col0, seed, read_step(step), threshold, scale)

    return kernel_jit(kernel, tile.threads, variant("linear.forward", dtype, tile, act, f"bias={has_bias}"))


@functools.lru_cache(maxsize=None)
def _backward_data_kernel(dtype, tile, act, grad):
    nbt = numba_type(dtype)
    TM, TN, BM, BN, BK = tile.tm, tile.tn, tile.bm, tile.bn, tile.bk
    # A = g (M, N) and B = w.T, read from w (K, N): both are (outer, red)
    mainloop = _mainloop(dtype, tile, act, (True, grad), (True, GRAD_NONE), False)
    index = _epilogue_index(dtype, tile)
    a_shape, b_shape, align = _shared_shapes(dtype, tile)

    def kernel(dy, y, z, w, dx, alpha, slices_per_split):
        As = cuda.shared.array(a_shape, nbt, alignment=align)
        Bs = cuda.shared.array(b_shape, nbt, alignment=align)
        acc = cuda.local.array((TM, TN), nbt)
        bsum = cuda.local.array(1, nbt)
        row0 = cuda.blockIdx.x * BM
        col0 = cuda.blockIdx.y * BN
        kt0 = cuda.blockIdx.z * slices_per_split
        kt1 = min(kt0 + slices_per_split, (dy.shape[1] + BK - 1) // BK)
        mainloop(acc, bsum, As, Bs, dy, y, z, w, w, w, alpha, row0, col0, kt0, kt1)
        split = cuda.gridDim.z > 1
        for i in range(TM):
            for j in range(TN):
                r, c = index(i, j, row0, col0)
                if r < dx.shape[0] and c < dx.shape[1]:
                    if split:
                        cuda.atomic.add(dx, (r, c), acc[i, j])
                    else:
                        dx[r, c] = acc[i, j]

    return kernel_jit(kernel, tile.threads, variant("linear.backward_data", dtype, tile, act))


@functools.lru_cache(maxsize=None)
def _backward_weight_kernel(dtype, tile, act, grad, has_db):
    nbt = numba_type(dtype)
    TM, TN, BM, BN, BK = tile.tm, tile.tn, tile.bm, tile.bn, tile.bk
    threads = tile.threads
    # A = x.T, read from x (M, K), and B = g (M, N): both are (red, outer)
    mainloop = _mainloop(dtype, tile, act, (False, GRAD_NONE), (False, grad), has_db)
    index = _epilogue_index(dtype, tile)
    a_shape, b_shape, align = _shared_shapes(dtype, tile)
    # B's loader gives thread t column t % BN and rows t // BN + p * k_rows
    k_rows = threads // BN

    def kernel(x, dy, y, z, dw, db, alpha, slices_per_split):
        As = cuda.shared.array(a_shape, nbt, alignment=align)
        Bs = cuda.shared.array(b_shape, nbt, alignment=align)
        acc = cuda.local.array((TM, TN), nbt)
        bsum = cuda.local.array(1, nbt)
        row0 = cuda.blockIdx.x * BM
        col0 = cuda.blockIdx.y * BN
        kt0 = cuda.blockIdx.z * slices_per_split
        kt1 = min(kt0 + slices_per_split, (x.shape[0] + BK - 1) // BK)
        mainloop(acc, bsum, As, Bs, x, x, x, dy, y, z, alpha, row0, col0, kt0, kt1)
        split = cuda.gridDim.z > 1
        for i in range(TM):
            for j in range(TN):
                r, c = index(i, j, row0, col0)
                if r < dw.shape[0] and c < dw.shape[1]:
                    if split:
                        cuda.atomic.add(dw, (r, c), acc[i, j])
                    else:
                        dw[r, c] = acc[i, j]
        if has_db and cuda.blockIdx.x == 0:
            # db: the k_rows threads sharing a column add their sums (the
            # main loop's last barrier has released As)
            t = cuda.threadIdx.x
            As[0, t // BN, t % BN] = bsum[0]
            cuda.syncthreads()
            c = col0 + t
            if t < BN and c < db.shape[0]:
                s = As[0, 0, t]
                for r in range(1, k_rows):
                    s += As[0, r, t]
                if split:
                    cuda.atomic.add(db, c, s)
                else:
                    db[c] = s

    return kernel_jit(kernel, threads, variant("linear.backward_weight", dtype, tile, act, f"db={has_db}"))


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

    return kernel_jit(kernel, ZERO_THREADS, variant("linear.zero", dtype))


# --------------------------------------------------------------------------
# launch wrappers
# --------------------------------------------------------------------------


def _launch(kernel, grid, threads, stream, *args):
    if all(g > 0 for g in grid):
        kernel[grid, threads, stream](*args)


def _zero(dt, a, v, stream):
    """a (R, C) and v (n,) = 0 before blocks add into them."""
    blocks = max(1, min(ceil_div(a.shape[0] * a.shape[1], ZERO_THREADS), 1024))
    _zero_kernel(dt)[blocks, ZERO_THREADS, stream](a, v)


def _check_y_z(act, y, z, shape, dt, stand_in, dropout=None):
    """z checked when the kernels use it, else ``stand_in`` for it.

    The kernels use z when the activation's derivative needs the
    pre-activation or is stored (``codes.ACT_KEEPS_Z``), and with dropout.
    Kernels specialised on an absent optional array never touch the array
    passed in its place; it is always one of the *inputs* (never an output):
    a launch on host NumPy arrays copies every argument back afterwards, so
    an output passed twice would be overwritten by its stale twin.
    """
    check("y", y, shape, dt)
    if act in codes.ACT_KEEPS_Z or dropout is not None:
        if z is None:
            why = "dropout" if dropout is not None else f"activation {act.name.lower()}"
            raise ValueError(f"z: {why} needs the z buffer of shape {tuple(shape)}, got None")
        check("z", z, shape, dt)
        return z
    return stand_in


def _dropout_args(dropout, dt, stand_in):
    """``(seed, step, threshold, scale)`` kernel arguments of a DropoutSpec (or zeros and the stand-in)."""
    if dropout is None:
        return np.uint64(0), stand_in, np.uint64(0), dt.type(0)
    dropout.check()
    return np.uint64(dropout.seed), dropout.step, np.uint64(dropout.threshold), dropout.scale(dt)


def linear_forward(x, w, b, act, alpha, y, z=None, dropout=None, stream=0, *, tile=None):
    """``y = act(x @ w + b)`` in one kernel, times the dropout mask when ``dropout`` is given.

    x: (M, K), w: (K, N), b: (N,) or None, y: (M, N) output.  z: (M, N)
    output, private to :func:`linear_backward_data`/:func:`linear_backward_weight`
    (see the module doc), required for activations in ``codes.ACT_KEEPS_Z``
    and with dropout.  dropout: None or a :class:`gpunn.random.DropoutSpec`
    whose ``step`` is a device int64 array of shape (1,), read by the kernel.
    All float arrays float32 or all float64.  ``tile`` (a tile name in
    ``TILES[dtype]``) overrides :func:`plan`'s choice.
    """
    M, K = matrix_shape("x", x)
    dt = float_dtype("x", x)
    N = matrix_shape("w", w)[1]
    check("w", w, (K, N), dt)
    if b is not None:
        check("b", b, (N,), dt)
    act = check_act(act)
    z = _check_y_z(act, y, z, (M, N), dt, x, dropout)
    seed, step, threshold, scale = _dropout_args(dropout, dt, x)
    p = plan(M, N, K, multiprocessor_count(), splittable=False, dtype=dt, tile=tile)
    kernel = _forward_kernel(dt, p.tile, act, b is not None, dropout is not None)
    grid = (ceil_div(M, p.tile.bm), ceil_div(N, p.tile.bn))
    bias = w[0] if b is None else b
    _launch(kernel, grid, p.tile.threads, stream, x, w, bias, y, z, dt.type(alpha), seed, step, threshold, scale)
    return y


def _grad_mode(act, dropout):
    """(GRAD_STORED or GRAD_DERIVATIVE, the activation the kernel is specialised on)."""
    if stores_derivative(act, dropout):
        return GRAD_STORED, codes.Act.LINEAR  # one kernel whatever the activation
    return GRAD_DERIVATIVE, act


def linear_backward_data(dy, w, y, z, act, alpha, dx, dropout=None, stream=0, *, tile=None):
    """``dx = (dy * act'(.)) @ w.T``; dy is left unchanged.

    dy, y: (M, N); z: (M, N), what :func:`linear_forward` left there, or
    None when it needs none; w: (K, N); dx: (M, K) output; dropout: the
    forward's DropoutSpec or None.  When :func:`plan` splits the reduction, dx
    is zeroed and the blocks add into it atomically (the last bits may then
    vary from run to run).
    """
    M, N = matrix_shape("dy", dy)
    dt = float_dtype("dy", dy)
    K = matrix_shape("w", w)[0]
    check("w", w, (K, N), dt)
    act = check_act(act)
    z = _check_y_z(act, y, z, (M, N), dt, dy, dropout)
    check("dx", dx, (M, K), dt)
    grad, kernel_act = _grad_mode(act, dropout)
    p = plan(M, K, N, multiprocessor_count(), splittable=True, dtype=dt, tile=tile)
    grid = (ceil_div(M, p.tile.bm), ceil_div(K, p.tile.bn), p.splits)
    if p.splits > 1 and M * K > 0:
        _zero(dt, dx, dx[0], stream)  # dx's first row stands in for the vector
    kernel = _backward_data_kernel(dt, p.tile, kernel_act, grad)
    _launch(kernel, grid, p.tile.threads, stream, dy, y, z, w, dx, dt.type(alpha), p.slices_per_split)
    return dx


def linear_backward_weight(x, dy, y, z, act, alpha, dw, db, dropout=None, stream=0, *, tile=None):
    """``g = dy * act'(.)``; ``dw = x.T @ g``; ``db = sum_batch g`` in one kernel.

    x: (M, K); dy, y: (M, N); z: (M, N) as in :func:`linear_backward_data`;
    dw: (K, N) output; db: (N,) output or None (skipped); dropout: the
    forward's DropoutSpec or None.  dy is unchanged.  Large batches are split
    over blocks that add into dw/db atomically, so the result's last bits
    may vary from run to run.
    """
    M, K = matrix_shape("x", x)
    dt = float_dtype("x", x)
    N = matrix_shape("dy", dy)[1]
    check("dy", dy, (M, N), dt)
    act = check_act(act)
    z = _check_y_z(act, y, z, (M, N), dt, dy, dropout)
    check("dw", dw, (K, N), dt)
    if db is not None:
        check("db", db, (N,), dt)
    grad, kernel_act = _grad_mode(act, dropout)
    db_arg = dy[0] if db is None else db
    p = plan(K, N, M, multiprocessor_count(), splittable=True, dtype=dt, tile=tile)
    if p.splits > 1 and K * N > 0:
        # without db, dw's own first row stands in (it is zeroed either way)
        _zero(dt, dw, dw[0] if db is None else db, stream)
    grid = (ceil_div(K, p.tile.bm), ceil_div(N, p.tile.bn), p.splits)
    kernel = _backward_weight_kernel(dt, p.tile, kernel_act, grad, db is not None)
    _launch(kernel, grid, p.tile.threads, stream, x, dy, y, z, dw, db_arg, dt.type(alpha), p.slices_per_split)
    return dw
