"""Op-level benchmarks: the fused linear layer forward and backward, per backend.

    pytest benchmarks/test_bench_ops.py --benchmark-enable

Shapes are those of the reference MLP 784-256-256-10 (and a square 256x256
hidden layer at a large batch).  ``extra_info`` records GFLOP/s.
"""

import pytest

from conftest import random_array, synced
from gpunn import codes

SHAPES = [  # (batch M, fan-in K, fan-out N)
    (128, 784, 256),
    (1024, 784, 256),
    (1024, 256, 256),
    (8192, 256, 256),
    (8192, 256, 10),
]


def _ids(shape):
    return "M{}xK{}xN{}".format(*shape)


def _layer(backend, m, k, n):
    x = random_array(backend, (m, k), seed=1)
    w = random_array(backend, (k, n), scale=(2.0 / k) ** 0.5, seed=2)
    b = random_array(backend, (n,), scale=0.1, seed=3)
    y = backend.empty((m, n), w.dtype)
    return x, w, b, y


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_linear_forward(benchmark, backend, shape):
    m, k, n = shape
    x, w, b, y = _layer(backend, m, k, n)
    benchmark.group = f"linear_forward {_ids(shape)}"
    benchmark.extra_info["gflop"] = 2 * m * k * n / 1e9
    benchmark(synced(backend, lambda: backend.linear_forward(x, w, b, codes.ACT_RELU, 0.0, y)))


@pytest.mark.parametrize("first_layer", [False, True], ids=["with_dx", "first_layer"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_linear_backward(benchmark, backend, shape, first_layer):
    m, k, n = shape
    x, w, b, y = _layer(backend, m, k, n)
    backend.linear_forward(x, w, b, codes.ACT_RELU, 0.0, y)
    dy = random_array(backend, (m, n), seed=4)
    dx = None if first_layer else backend.empty((m, k), w.dtype)
    dw = backend.empty((k, n), w.dtype)
    db = backend.empty((n,), w.dtype)
    benchmark.group = f"linear_backward {_ids(shape)}"
    benchmark.extra_info["gflop"] = (2 if first_layer else 4) * m * k * n / 1e9
    # dy is overwritten with dy * relu'(y) on the first call; later calls multiply by the same 0/1 mask
    benchmark(synced(backend, lambda: backend.linear_backward(x, w, dy, y, None, codes.ACT_RELU, 0.0, dx, dw, db)))


@pytest.mark.parametrize("m", [128, 8192])
def test_softmax_cross_entropy(benchmark, backend, m):
    import numpy as np

    logits = random_array(backend, (m, 10), seed=5)
    labels = backend.asarray(np.random.default_rng(6).integers(0, 10, m).astype(np.float32))
    grad = backend.empty((m, 10), logits.dtype)
    sums = backend.zeros((2,), logits.dtype)
    benchmark.group = f"loss M{m}"
    benchmark(synced(backend, lambda: backend.loss_grad(codes.LOSS_SOFTMAX_SPARSE_CCE, logits, labels, None, grad, sums)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_update(benchmark, backend, optimizer):
    from gpunn import optimizers
    from gpunn.bench.contenders import REFERENCE_DIMS, layer_shapes

    size = sum(k * n + n for k, n in layer_shapes(REFERENCE_DIMS))
    p = random_array(backend, (size,), seed=7)
    g = random_array(backend, (size,), scale=1e-3, seed=8)
    opt = optimizers.get(optimizer)
    opt.build(backend, size, p.dtype)
    benchmark.group = "optimizer (reference MLP parameters)"
    benchmark(synced(backend, lambda: backend.optimizer_update(opt.code, p, g, opt.state, opt.step_scalars())))
