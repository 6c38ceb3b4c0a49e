"""Compile every kernel variant gpunn can launch to PTX, without a GPU or driver.

    python -m gpunn.kernels.ptx --cc 9.0 --out DIR [--sms 132]

writes ``DIR/<variant>.ptx`` and ``DIR/index.json``, a list of
``{"name", "file", "role", "dtype", "threads_per_block"}``.  ``role`` is
``forward``, ``backward_data`` or ``backward_weight`` for the three
matrix-product kernels, and ``activation``, ``loss``, ``optimizer``,
``gather`` or ``fill`` for the others.

The variants are not listed by hand: the package's own launch wrappers are
called on small NumPy arrays while :func:`gpunn._cuda.record_launches`
captures each launch (kernel, argument types, block size) instead of running
it, for every float dtype, every activation, loss kind and optimizer code in
:mod:`gpunn.codes`, every optional-argument combination and every matrix
tile.  A code added to ``gpunn.codes`` therefore shows up here by itself.

Must run without ``NUMBA_ENABLE_CUDASIM`` (the simulator has no PTX).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import enum
import itertools
import json
import multiprocessing
import os
import re
import sys

import numpy as np

from gpunn import codes, opmath
from gpunn._cuda import compile_ptx, record_launches, simulator_enabled

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Rows of the arrays handed to the wrappers: enough for split reductions.
_ROWS = 4096
_ALPHA = 0.1
#: Rows of optimizer state handed to ``optimizer_update`` (any optimizer's slots fit).
OPTIMIZER_STATE_ROWS = 4


def _code_members(prefix, *enum_names):
    """{name: code} for ``codes.<prefix>*`` ints and the members of any named IntEnum."""
    found = {}
    for attr, value in vars(codes).items():
        if attr.startswith(prefix) and isinstance(value, int) and not isinstance(value, bool):
            found.setdefault(int(value), attr[len(prefix) :].lower())
    for enum_name in enum_names:
        kind = getattr(codes, enum_name, None)
        if isinstance(kind, type) and issubclass(kind, enum.IntEnum):
            for member in kind:
                found[int(member)] = member.name.lower()
    return {name: code for code, name in sorted(found.items())}


def activations():
    return _code_members("ACT_", "Act", "Activation")


def loss_kinds():
    return _code_members("LOSS_", "LossKind", "Loss")


def optimizers():
    return _code_members("OPT_", "Opt", "Optimizer", "OptimizerKind")


def _dtype_tag(dt):
    return "f32" if dt == np.float32 else "f64"


def _linear_calls(k, dt):
    """(name, role, call) for every fused linear variant: activation x optional args x tile."""
    from gpunn.kernels import linear

    tag = _dtype_tag(dt)
    M, K, N = _ROWS, 96, 80

    def arr(*shape):
        return np.ones(shape, dt)

    from gpunn.random import DropoutSpec

    dropout = DropoutSpec(0.25, 7, np.zeros(1, np.int64))
    for act_name, act in activations().items():
        z = arr(M, N) if act in codes.ACT_KEEPS_Z else None
        for tile in linear.TILES[dt]:
            base = f"{tag}-{act_name}-{tile.name}"
            for bias in (True, False):
                yield (
                    f"linear_forward-{base}-{'bias' if bias else 'nobias'}",
                    "forward",
                    lambda b=bias, t=tile.name, act=act, z=z: k.linear_forward(
                        arr(M, K), arr(K, N), arr(N) if b else None, act, _ALPHA, arr(M, N), z, tile=t
                    ),
                )
                yield (
                    f"linear_forward-{base}-{'bias' if bias else 'nobias'}-dropout",
                    "forward",
                    lambda b=bias, t=tile.name, act=act: k.linear_forward(
                        arr(M, K), arr(K, N), arr(N) if b else None, act, _ALPHA, arr(M, N), arr(M, N), dropout, tile=t
                    ),
                )
                if act in codes.ACT_KEEPS_Z:
                    continue  # backward multiplies by the stored derivative: the "stored" kernels below
                yield (
                    f"linear_backward_weight-{base}-{'db' if bias else 'nodb'}",
                    "backward_weight",
                    lambda b=bias, t=tile.name, act=act, z=z: k.linear_backward_weight(
                        arr(M, K), arr(M, N), arr(M, N), z, act, _ALPHA, arr(K, N), arr(N) if b else None, tile=t
                    ),
                )
            if act in codes.ACT_KEEPS_Z:
                continue
            yield (
                f"linear_backward_data-{base}",
                "backward_data",
                lambda t=tile.name, act=act, z=z: k.linear_backward_data(
                    arr(M, N), arr(K, N), arr(M, N), z, act, _ALPHA, arr(M, K), tile=t
                ),
            )
    # with dropout, and for the activations of ACT_KEEPS_Z, backward multiplies dy by the
    # derivative the forward stored in z: one kernel per tile and role, whatever the activation
    for tile in linear.TILES[dt]:
        for bias in (True, False):
            yield (
                f"linear_backward_weight-{tag}-stored-{tile.name}-{'db' if bias else 'nodb'}",
                "backward_weight",
                lambda b=bias, t=tile.name: k.linear_backward_weight(
                    arr(M, K), arr(M, N), arr(M, N), arr(M, N), codes.Act.RELU, _ALPHA, arr(K, N),
                    arr(N) if b else None, dropout, tile=t,
                ),
            )
        yield (
            f"linear_backward_data-{tag}-stored-{tile.name}",
            "backward_data",
            lambda t=tile.name: k.linear_backward_data(
                arr(M, N), arr(K, N), arr(M, N), arr(M, N), codes.Act.RELU, _ALPHA, arr(M, K), dropout, tile=t
            ),
        )


def _other_calls(k, dt):
    """(name, role, call) for the activation, loss and optimizer kernels."""
    tag = _dtype_tag(dt)
    M, N = 64, 5

    def arr(*shape):
        return np.ones(shape, dt)

    for act_name, act in activations().items():
        yield f"activation-{tag}-{act_name}", "activation", lambda a=act: k.apply_activation(
            arr(M, N), a, _ALPHA, arr(M, N)
        )
        yield f"activation-{tag}-{act_name}-inplace", "activation", lambda a=act: k.apply_activation(
            (buf := arr(M, N)), a, _ALPHA, buf
        )
    for kind_name, kind in loss_kinds().items():
        target_shape = (M,) if kind in codes.SPARSE_LOSSES else (M, N)
        for weighted in (False, True):
            for with_grad in (True, False):
                name = f"loss-{tag}-{kind_name}-{'weighted' if weighted else 'unweighted'}-{'grad' if with_grad else 'nograd'}"
                yield name, "loss", lambda kd=kind, ts=target_shape, w=weighted, g=with_grad: k.loss_grad(
                    kd, arr(M, N), arr(*ts), arr(M) if w else None, arr(M, N) if g else None, arr(2)
                )
    for opt_name, opt in optimizers().items():
        yield f"optimizer-{tag}-{opt_name}", "optimizer", lambda o=opt: k.optimizer_update(
            o, arr(1000), arr(1000), arr(OPTIMIZER_STATE_ROWS, 1000), (0.01,) * opmath.OPTIMIZER_SCALARS
        )
        # the same update reading its scalars from the training step's device record
        yield f"optimizer-{tag}-{opt_name}-record", "optimizer", lambda o=opt: k.optimizer_update(
            o, arr(1000), arr(1000), arr(OPTIMIZER_STATE_ROWS, 1000), arr(opmath.OPTIMIZER_SCALARS)
        )
    yield f"gather-{tag}", "gather", lambda: k.gather_rows(arr(M, N), np.arange(M), np.zeros(1, np.int64), arr(M, N))


def record_variants(cc, multiprocessors):
    """[(name, role, dtype, RecordedLaunch)] of every distinct kernel the wrappers launch."""
    from gpunn import kernels

    variants = []
    seen = set()
    with record_launches(cc, multiprocessors) as launches:
        for dt in DTYPES:
            for name, role, call in itertools.chain(_linear_calls(kernels, dt), _other_calls(kernels, dt)):
                start = len(launches)
                call()
                if len(launches) == start:
                    raise RuntimeError(f"{name}: the wrapper launched no kernel")
                for launch in launches[start:]:
                    key = (id(launch.dispatcher), launch.argtypes)
                    if key in seen:
                        continue
                    seen.add(key)
                    if launch is launches[-1]:
                        variants.append((name, role, dt, launch))
                    else:  # a helper launched first (the zeroing before split products)
                        variants.append((f"fill-{_dtype_tag(dt)}", "fill", dt, launch))
    return variants


def _compile_into(out_dir, cc, multiprocessors, names):
    """Compile the variants called ``names`` into ``out_dir``; their index entries."""
    wanted = set(names)
    entries = {}
    for name, role, dt, launch in record_variants(cc, multiprocessors):
        if name not in wanted:
            continue
        file = f"{name}.ptx"
        with open(os.path.join(out_dir, file), "w") as f:
            f.write(compile_ptx(launch, cc))
        entries[name] = {
            "name": name, "file": file, "role": role, "dtype": str(dt), "threads_per_block": launch.threads_per_block
        }  # fmt: skip
    return entries


def variant_names(cc, multiprocessors, select=None):
    pattern = re.compile(select) if select else None
    return [v[0] for v in record_variants(cc, multiprocessors) if pattern is None or pattern.search(v[0])]


def write_ptx(out_dir, cc, multiprocessors, select=None, jobs=1):
    """Compile the variants (those whose name matches regex ``select``, or all) into ``out_dir``.

    ``jobs`` > 1 compiles in that many worker processes (each records the
    variants again: compiled kernels cannot be sent between processes).
    Returns the index written to ``out_dir/index.json``, in variant order.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = variant_names(cc, multiprocessors, select)
    if jobs > 1 and len(names) > 1:
        # contiguous chunks: neighbouring variants share device functions,
        # which each process compiles once
        chunks = [names[len(names) * j // jobs : len(names) * (j + 1) // jobs] for j in range(jobs)]
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            parts = pool.map(_compile_into, *zip(*[(out_dir, cc, multiprocessors, c) for c in chunks]))
            entries = {k: v for part in parts for k, v in part.items()}
    else:
        entries = _compile_into(out_dir, cc, multiprocessors, names)
    index = [entries[name] for name in names]
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


def _compute_capability(text):
    match = re.fullmatch(r"(\d+)\.(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a compute capability such as 9.0, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpunn.kernels.ptx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", type=_compute_capability, required=True, help="target compute capability, e.g. 9.0")
    parser.add_argument("--out", help="output directory (required unless --list)")
    parser.add_argument(
        "--sms", type=int, default=132, help="multiprocessors of the target (sizes split reductions; H100/H200: 132)"
    )
    parser.add_argument("--select", default=None, help="only variants whose name matches this regular expression")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--list", action="store_true", help="print the variant names and compile nothing")
    args = parser.parse_args(argv)
    if simulator_enabled():
        parser.error("NUMBA_ENABLE_CUDASIM is set: the simulator cannot compile PTX; run without it")
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive number of processes, got {args.jobs}")
    if not args.list and not args.out:
        parser.error("--out is required (or --list)")
    if args.list:
        print("\n".join(variant_names(args.cc, args.sms, args.select)))
        return 0
    index = write_ptx(args.out, args.cc, args.sms, args.select, args.jobs)
    print(f"wrote {len(index)} PTX files and index.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
