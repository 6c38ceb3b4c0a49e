"""Model-level benchmarks: one training epoch of the reference MLP 784-256-256-10.

    pytest benchmarks/test_bench_model.py --benchmark-enable

Softmax cross-entropy on 8,192 synthetic MNIST-shaped samples, per backend,
batch size and optimizer; PyTorch CPU runs the same epoch as a peer where it
is installed.  ``extra_info`` records samples/s.
"""

import importlib.util

import pytest

from conftest import BACKENDS
from gpunn.bench import contenders as bench
from gpunn.bench import machine

BATCHES = [32, 128, 1024, 4096]


def _epoch(benchmark, trainer, data, batch):
    x, y = data
    trainer.epoch(x, y, batch)  # warm-up: workspaces, compiled kernels
    benchmark.group = f"epoch batch {batch}"
    benchmark.extra_info["samples"] = len(x)
    result = benchmark.pedantic(trainer.epoch, args=(x, y, batch), rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["samples_per_s"] = len(x) / stats.stats.min
    return result


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gpunn_epoch(benchmark, mnist_like, backend_name, batch, optimizer):
    lr = 0.01 if optimizer == "sgd" else 1e-3
    trainer = bench.GpunnTrainer(backend_name, bench.REFERENCE_DIMS, optimizer, lr)
    _epoch(benchmark, trainer, mnist_like, batch)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch", BATCHES)
def test_torch_cpu_epoch(benchmark, mnist_like, batch, optimizer):
    lr = 0.01 if optimizer == "sgd" else 1e-3
    with bench.torch_threads(machine.blas_threads()):
        trainer = bench.TorchTrainer("cpu", bench.REFERENCE_DIMS, optimizer, lr)
        _epoch(benchmark, trainer, mnist_like, batch)
