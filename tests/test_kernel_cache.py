"""The on-disk compiled-kernel cache (gpunn.kernel_cache and its Numba glue in gpunn._cuda).

Without a GPU everything but the final module load runs: keys, the entry
format, atomic writes, damaged entries, concurrent writers, and -- in fresh
processes with the real CUDA target (no simulator) -- a kernel compiled and
linked offline for sm_90 (nvJitLink), stored, and loaded by a second process's
dispatcher without compiling.  The GPU-only test checks that a second process
reaches its first training step without JIT.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from gpunn import kernel_cache
from gpunn.kernel_cache import KernelCache, KernelCacheWarning

BASE = dict(
    variant="linear.forward/float32/128x128/RELU/bias=True",
    argtypes=["array(float32, 2d, C)", "float32"],
    cc=(9, 0, "a"),
    options={"launch_bounds": 256},
    toolchain={"nvvm": "2.0"},
    versions={"gpunn": "1", "numba": "0.68", "numba-cuda": "0.30"},
    sources="abc",
)
CHANGES = dict(
    variant="linear.forward/float32/128x128/RELU/bias=False",
    argtypes=["array(float32, 2d, A)", "float32"],
    cc=(8, 0, ""),
    options={"launch_bounds": 64},
    toolchain={"nvvm": "2.1"},
    versions={"gpunn": "2", "numba": "0.68", "numba-cuda": "0.30"},
    sources="abd",
)


def _key(**overrides):
    return kernel_cache.entry_key(**{**BASE, **overrides})


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_key_changes_with_each_input(field):
    base, changed = _key(), _key(**{field: CHANGES[field]})
    assert base != changed
    assert kernel_cache.key_digest(base) != kernel_cache.key_digest(changed)
    assert kernel_cache.key_digest(base) == kernel_cache.key_digest(_key())  # deterministic


def test_package_versions_change_the_key():
    versions = kernel_cache.package_versions()
    assert {"gpunn", "numba", "numba-cuda", "cuda-bindings"} <= set(versions) and versions["numba"] != "absent"
    bumped = {**versions, "numba-cuda": versions["numba-cuda"] + ".post1"}
    assert _key(versions=versions) != _key(versions=bumped)


def test_source_digest_covers_kernels_and_shared_math(tmp_path):
    names = {p.name for p in kernel_cache.source_files()}
    assert {"linear.py", "loss.py", "optimizers.py", "activation.py", "opmath.py", "codes.py", "_cuda.py"} <= names
    copies = []
    for i, path in enumerate(kernel_cache.source_files()):
        copy = tmp_path / f"{i}_{path.name}"
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    before = kernel_cache.digest_files(copies)
    assert before == kernel_cache.digest_files(copies)
    opmath_copy = next(c for c in copies if c.name.endswith("opmath.py"))
    opmath_copy.write_bytes(opmath_copy.read_bytes() + b"\n# edited\n")
    assert kernel_cache.digest_files(copies) != before
    assert len(kernel_cache.source_digest()) == 64


def test_directory_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(kernel_cache.DIRECTORY_VARIABLE, raising=False)
    monkeypatch.delenv(kernel_cache.SWITCH_VARIABLE, raising=False)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    import platformdirs

    assert kernel_cache.directory() == kernel_cache.Path(platformdirs.user_cache_dir("gpunn")) / "kernels"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert kernel_cache.directory() == tmp_path / "numba" / "gpunn-kernels"
    monkeypatch.setenv(kernel_cache.DIRECTORY_VARIABLE, str(tmp_path / "mine"))
    assert kernel_cache.directory() == tmp_path / "mine"
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(kernel_cache.SWITCH_VARIABLE, off)
        assert kernel_cache.directory() is None and kernel_cache.open_cache() is None


def test_round_trip_is_atomic_and_leaves_no_temporaries(tmp_path):
    cache = KernelCache(tmp_path / "cache")
    key = _key()
    assert cache.load(key) is None  # absent: a plain miss, no warning
    payload = np.random.default_rng(0).bytes(5000)
    assert cache.store(key, {"entry_name": "k", "cc": [9, 0, "a"]}, payload)
    entry = cache.load(key)
    assert entry.payload == payload and entry.meta == {"entry_name": "k", "cc": [9, 0, "a"]}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [kernel_cache.key_digest(key) + ".kernel"]
    # a second key is a second file; the first is untouched
    other = _key(cc=(8, 6, ""))
    cache.store(other, {"entry_name": "k2"}, b"other")
    assert cache.load(key).payload == payload and cache.load(other).payload == b"other"


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 10])
    elif how == "flipped":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif how == "magic":
        path.write_bytes(b"X" + data[1:])
    elif how == "header":
        start = len(kernel_cache.MAGIC) + 8
        path.write_bytes(data[:start] + b"[" + data[start + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge_length":
        path.write_bytes(kernel_cache.MAGIC + (2**62).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize("how", ["truncated", "flipped", "magic", "header", "empty", "huge_length"])
def test_damaged_entry_is_ignored_with_a_warning_and_rebuilt(tmp_path, how):
    cache = KernelCache(tmp_path)
    key = _key()
    cache.store(key, {"entry_name": "k"}, b"\x7fELF" + bytes(range(256)) * 4)
    _damage(cache.path(key), how)
    corrupt_before = kernel_cache.stats.corrupt
    with pytest.warns(KernelCacheWarning, match="damaged entry"):
        assert cache.load(key) is None
    assert kernel_cache.stats.corrupt == corrupt_before + 1
    assert cache.store(key, {"entry_name": "k"}, b"fresh")  # the rebuilt kernel replaces it
    assert cache.load(key).payload == b"fresh"


def test_entry_under_another_key_is_refused(tmp_path):
    cache = KernelCache(tmp_path)
    key, other = _key(), _key(cc=(8, 0, ""))
    cache.store(other, {"entry_name": "k"}, b"cubin for sm_80")
    os.replace(cache.path(other), cache.path(key))  # e.g. a file copied by hand
    with pytest.warns(KernelCacheWarning, match="key differs"):
        assert cache.load(key) is None


def test_failed_write_keeps_the_previous_entry(tmp_path, monkeypatch):
    cache = KernelCache(tmp_path)
    key = _key()
    cache.store(key, {"entry_name": "k"}, b"old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kernel_cache.os, "fsync", failing_fsync)
    with pytest.warns(KernelCacheWarning, match="cannot write"):
        assert not cache.store(key, {"entry_name": "k"}, b"new")
    monkeypatch.undo()
    assert cache.load(key).payload == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path(key).name]


def test_unwritable_directory_warns_and_does_not_raise(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(KernelCacheWarning, match="cannot write"):
        assert not KernelCache(blocker / "cache").store(_key(), {}, b"x")


def _writer(root, key, payload, rounds):
    cache = KernelCache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(rounds):
            cache.store(key, {"writer": payload[:1].hex()}, payload)
            entry = cache.load(key)
            assert entry is not None and entry.payload[1:] == payload[1:]
    return True


def test_concurrent_writers_never_leave_a_partial_entry(tmp_path):
    key = _key()
    body = np.random.default_rng(1).bytes(200_000)  # large enough for interleaved writes
    payloads = [bytes([i]) + body for i in range(4)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(_writer, [tmp_path] * 4, [key] * 4, payloads, [25] * 4))
    assert done == [True] * 4
    entry = KernelCache(tmp_path).load(key)
    assert entry.payload in payloads and entry.meta["writer"] == entry.payload[:1].hex()
    assert [p.name for p in tmp_path.iterdir()] == [KernelCache(tmp_path).path(key).name]


# -- the Numba glue, offline: a real sm_90 cubin through the dispatcher's cache -----------------

_OFFLINE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from gpunn import _cuda, kernel_cache
    from gpunn.codes import Opt
    import gpunn.kernels.optimizers as optimizers

    with _cuda.record_launches((9, 0), 132) as launches:
        p = np.zeros(10, np.float32)
        optimizers.optimizer_update(Opt.ADAM, p, p.copy(), np.zeros((2, 10), np.float32), [0.1] * 8)
    launch = launches[0]
    out = {"variant": launch.dispatcher._cache.variant}
    if sys.argv[1] == "first":
        kernel = _cuda.compile_kernel(launch, (9, 0))
        with _cuda._compiling_for((9, 0)):  # what the dispatcher does after compiling on a GPU
            launch.dispatcher._cache.save_overload(launch.argtypes, kernel)
        out["cubin"] = bytes(kernel._codelibrary.get_cubin(cc=(9, 0, "a")).code).hex()
        out["entry"] = kernel.entry_name
    else:
        with _cuda._compiling_for((9, 0)):
            kernel = launch.dispatcher.compile(launch.argtypes)
        out["cubin"] = bytes(kernel._codelibrary.get_cubin(cc=(9, 0, "a")).code).hex()
        out["entry"] = kernel.entry_name
        out["installed"] = launch.dispatcher.overloads[launch.argtypes] is kernel
        out["signature"] = str(kernel.signature)
    out["stats"] = vars(kernel_cache.stats)
    print(json.dumps(out))
    """
)


def _offline(mode, cache_dir):
    # cwd outside the checkout: `python -c` puts the working directory first on sys.path, where
    # the source gpunn/ (no kernels/ inside) would shadow a non-editable install
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env[kernel_cache.DIRECTORY_VARIABLE] = str(cache_dir)
    env.pop(kernel_cache.SWITCH_VARIABLE, None)
    run = subprocess.run([sys.executable, "-c", _OFFLINE, mode], env=env, capture_output=True, text=True, timeout=300, cwd=cache_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_offline_compiled_kernel_without_compiling(tmp_path):
    first = _offline("first", tmp_path)
    assert first["variant"] == "optimizer/float32/ADAM"
    assert first["stats"]["compiled"] == 1 and first["stats"]["stored"] == 1
    assert bytes.fromhex(first["cubin"])[:4] == b"\x7fELF"
    entries = list(tmp_path.glob("*.kernel"))
    assert len(entries) == 1

    second = _offline("second", tmp_path)
    assert second["stats"] == {"hits": 1, "misses": 0, "corrupt": 0, "compiled": 0, "stored": 0}
    assert second["installed"] and second["entry"] == first["entry"] and second["cubin"] == first["cubin"]
    assert second["signature"].startswith("(Array(float32, 1, 'C'")

    # a damaged entry: the second process warns, misses, and (on a GPU) would compile and rewrite
    entries[0].write_bytes(entries[0].read_bytes()[:-100])
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env[kernel_cache.DIRECTORY_VARIABLE] = str(tmp_path)
    probe = _OFFLINE.replace("kernel = launch.dispatcher.compile(launch.argtypes)", "kernel = None; print(json.dumps({'loaded': launch.dispatcher._cache.load_overload(launch.argtypes) is not None, 'stats': vars(kernel_cache.stats)})); sys.exit(0)")
    run = subprocess.run([sys.executable, "-W", "always", "-c", probe, "second"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"loaded": False, "stats": {"hits": 0, "misses": 0, "corrupt": 1, "compiled": 0, "stored": 0}}
    assert "KernelCacheWarning" in run.stderr and "damaged entry" in run.stderr


# -- on a GPU: the second process runs its first step without JIT ------------------------------

_STEP = textwrap.dedent(
    """
    import json, time
    import numpy as np
    import gpunn
    from gpunn import kernel_cache

    start = time.perf_counter()
    gpunn.utils.set_random_seed(0)
    with gpunn.use_backend("cuda"):
        model = gpunn.Sequential([gpunn.layers.Input((8,)), gpunn.layers.Dense(32, activation="relu"), gpunn.layers.Dense(3)])
        model.compile(optimizer="adam", loss=gpunn.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
        y = np.arange(64) % 3
        model.train_on_batch(x, y)
        model.backend.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - start, "stats": vars(kernel_cache.stats)}))
    """
)


@pytest.mark.gpu
def test_second_process_reaches_its_first_step_without_jit(tmp_path):
    from numba import cuda

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") or not cuda.is_available():
        pytest.skip("needs a CUDA GPU (numba.cuda.is_available() is false or the simulator is on): the cached cubins are loaded by the driver")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env[kernel_cache.DIRECTORY_VARIABLE] = str(tmp_path)
    runs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _STEP], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["stats"]["compiled"] > 0 and cold["stats"]["stored"] == cold["stats"]["compiled"]
    assert warm["stats"]["compiled"] == 0 and warm["stats"]["hits"] == cold["stats"]["compiled"]


def test_a_kernel_that_cannot_be_rebuilt_is_compiled_instead(tmp_path, monkeypatch):
    """If numba-cuda's internals change under the cache, loading warns and falls back to compiling."""
    from gpunn import _cuda

    monkeypatch.setenv(kernel_cache.DIRECTORY_VARIABLE, str(tmp_path))
    cache = _cuda.DiskKernelCache("optimizer/float32/ADAM", {"launch_bounds": 256})
    key = cache.key(["array(float32, 1d, C)"], (9, 0, "a"))
    KernelCache(tmp_path).store(key, {"entry_name": "k", "cc": [9, 0, "a"]}, b"not a cubin")
    monkeypatch.setattr(_cuda, "target_cc", lambda cc=None: (9, 0, "a"))
    monkeypatch.setattr(_cuda, "rebuild_kernel", lambda *a: (_ for _ in ()).throw(TypeError("_rebuild() got an unexpected keyword")))
    monkeypatch.setattr(cache, "key", lambda argtypes, cc: key)
    with pytest.warns(KernelCacheWarning, match="cannot rebuild a kernel .*TypeError.*compiling instead"):
        assert cache.load_overload(()) is None
