"""Shared fixtures of the pytest-benchmark suites (``pytest benchmarks/ --benchmark-enable``).

The suites are outside ``testpaths`` and pyproject's addopts disable
benchmarking, so the normal test command never runs them.  The CUDA backend
is benchmarked only on a real GPU (never in Numba's simulator).
"""

import numpy as np
import pytest

from gpunn._cuda import cuda_status


def _backends():
    names = ["numpy"]
    status = cuda_status()
    if status.usable and not status.simulator:
        names.append("cuda")
    return names


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A gpunn Backend object, parametrised over the backends usable here."""
    from gpunn import backend as backends

    return backends.get(request.param)


@pytest.fixture(scope="session")
def mnist_like():
    """8,192 synthetic MNIST-shaped samples (784 features in [0, 1], 10 classes)."""
    from gpunn.bench.contenders import synthetic_data

    return synthetic_data(8192)


def synced(backend, fn):
    """``fn`` followed by a device synchronisation, so the benchmark times the work itself."""

    def run():
        fn()
        backend.synchronize()

    return run


def random_array(backend, shape, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return backend.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


@pytest.fixture(autouse=True)
def _name_the_machine(request):
    """Every figure names the CPU (and the GPU, for the cuda backend) it was measured on."""
    if "benchmark" not in request.fixturenames:
        return
    from gpunn.bench import machine

    extra = request.getfixturevalue("benchmark").extra_info
    extra["cpu"] = machine.cpu_label()
    params = getattr(request.node, "callspec", None)
    if params is not None and "cuda" in (params.params.get("backend"), params.params.get("backend_name")):
        extra["gpu"] = machine.gpu_description()[0]


def pytest_benchmark_update_machine_info(config, machine_info):
    """The saved run's machine record names the CPU and GPU as the report does."""
    from gpunn.bench import machine

    machine_info["gpunn_cpu"] = machine.cpu_label()
    machine_info["gpunn_gpu"] = machine.gpu_description()[0]
