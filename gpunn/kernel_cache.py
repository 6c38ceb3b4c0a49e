"""On-disk cache of compiled CUDA kernels, shared by every process of a user.

Numba compiles each kernel specialisation (a variant such as "forward
float32 128x128 relu with bias" for one set of argument types) the first time
it is launched, which costs seconds per process.  gpunn keeps what Numba
compiled -- the cubin of each specialisation -- in one file per entry, so a
later process loads it instead of compiling (see ``gpunn._cuda.kernel_jit``).
Numba's own ``cache=True`` cannot be used: gpunn's kernels are closures over
generated device functions (their code is not in a source file Numba could
stamp), and a change to the shared math in ``gpunn/opmath.py`` must invalidate
them.

Where: ``GPUNN_KERNEL_CACHE_DIR`` when set, else ``$NUMBA_CACHE_DIR/gpunn-kernels``
when ``NUMBA_CACHE_DIR`` is set, else ``platformdirs.user_cache_dir("gpunn")/kernels``
(``~/.cache/gpunn/kernels`` on Linux).  ``GPUNN_KERNEL_CACHE=0`` switches
the cache off.  Deleting the directory is always safe.

Key: the variant name, the Numba argument types, the target compute
capability, the compile options, the gpunn / numba / numba-cuda / NVVM
versions (and those of the CUDA compiler wheels, when installed) and a SHA-256 of the kernel sources (``gpunn/kernels/*.py``,
``opmath.py``, ``codes.py``, ``_cuda.py``, this file).  Any change gives a new
entry; stale entries are never read.

Files: ``<sha256 of the key>.kernel`` = a magic line, an 8-byte header length,
a JSON header (the full key, the payload's SHA-256 and length, entry metadata)
and the payload bytes.  Entries are written to a temporary file in the same
directory and renamed over the entry (atomic on POSIX and Windows), so a
failed or concurrent write never leaves a partial entry; an entry that does
not check out (bad magic, truncated, checksum or key mismatch) is ignored with
a :class:`KernelCacheWarning` and rebuilt.  Nothing in an entry is executed or
unpickled: the payload is GPU machine code handed to the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import struct
import tempfile
import threading
import warnings
from pathlib import Path

#: First bytes of every entry file (the format's version is part of it).
MAGIC = b"GPUNN-KERNEL-CACHE/1\n"
#: Entry file suffix.
SUFFIX = ".kernel"
#: Environment variable naming the cache directory.
DIRECTORY_VARIABLE = "GPUNN_KERNEL_CACHE_DIR"
#: Environment variable switching the cache off ("0", "false", "no", "off").
SWITCH_VARIABLE = "GPUNN_KERNEL_CACHE"
#: Largest header accepted (a corrupt length must not make us read gigabytes).
MAX_HEADER_BYTES = 1 << 20
_LENGTH = struct.Struct("<Q")


class KernelCacheWarning(UserWarning):
    """A cache entry could not be read or written; the kernel is compiled instead."""


def enabled() -> bool:
    return os.environ.get(SWITCH_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def directory() -> Path | None:
    """The cache directory this process uses now, or None when the cache is switched off."""
    if not enabled():
        return None
    chosen = os.environ.get(DIRECTORY_VARIABLE)
    if chosen:
        return Path(chosen)
    numba_dir = os.environ.get("NUMBA_CACHE_DIR")
    if numba_dir:
        return Path(numba_dir) / "gpunn-kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpunn")) / "kernels"


def source_files() -> list[Path]:
    """The files whose contents decide what a kernel compiles to (hashed into every key)."""
    gpunn_dir = Path(importlib.util.find_spec("gpunn").submodule_search_locations[0])
    kernels_dir = Path(importlib.util.find_spec("gpunn.kernels").submodule_search_locations[0])
    files = sorted(kernels_dir.glob("*.py"))
    files += [gpunn_dir / name for name in ("opmath.py", "codes.py", "_cuda.py", "kernel_cache.py")]
    return files


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over the names and contents of :func:`source_files` (computed once per process)."""
    return digest_files(source_files())


def digest_files(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        data = Path(path).read_bytes()
        h.update(Path(path).name.encode() + b"\0" + _LENGTH.pack(len(data)) + data)
    return h.hexdigest()


def package_versions() -> dict:
    """Versions of the packages whose code generation a cached kernel depends on."""
    found = {}
    # the CUDA compiler (libNVVM, nvJitLink) comes from the nvidia wheels when installed that way
    for name in ("gpunn", "numba", "numba-cuda", "cuda-bindings", "nvidia-cuda-nvcc-cu12", "nvidia-nvjitlink-cu12", "nvidia-cuda-nvcc"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def entry_key(variant, argtypes, cc, options=None, toolchain=None, versions=None, sources=None) -> dict:
    """The full key of one kernel specialisation (JSON-compatible; see the module docstring).

    variant: the kernel's name with its compile-time parameters; argtypes:
    the Numba argument types (their strings); cc: the target, e.g. ``(9, 0, "a")``;
    options: Numba compile options (launch bounds, fastmath); toolchain: e.g.
    the NVVM version.  ``versions`` and ``sources`` default to this install's.
    """
    return {
        "variant": str(variant),
        "argtypes": [str(t) for t in argtypes],
        "cc": [str(c) if isinstance(c, str) else int(c) for c in cc],
        "options": {str(k): repr(v) for k, v in sorted((options or {}).items())},
        "toolchain": dict(toolchain or {}),
        "versions": package_versions() if versions is None else dict(versions),
        "sources": source_digest() if sources is None else str(sources),
    }


def key_digest(key: dict) -> str:
    """File name stem of an entry: SHA-256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cache entry read back: the metadata stored with it and its payload bytes."""

    meta: dict
    payload: bytes


@dataclasses.dataclass
class Stats:
    """What this process's kernel cache did: entries loaded, missing, rejected as corrupt,
    and kernels compiled (and offered to the cache)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    compiled: int = 0
    stored: int = 0


#: Counters for this process (read by tests and benchmarks/gpu_check.py).
stats = Stats()
_stats_lock = threading.Lock()


def count(field: str) -> None:
    with _stats_lock:
        setattr(stats, field, getattr(stats, field) + 1)


def encode(key: dict, meta: dict, payload: bytes) -> bytes:
    """The bytes of an entry file."""
    header = json.dumps(
        {"key": key, "meta": meta, "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload)},
        sort_keys=True,
    ).encode()
    return MAGIC + _LENGTH.pack(len(header)) + header + bytes(payload)


def decode(data: bytes, key: dict) -> Entry:
    """Check and split an entry file's bytes; ValueError saying what is wrong."""
    if not data.startswith(MAGIC):
        raise ValueError("not a gpunn kernel cache entry (bad magic)")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise ValueError("truncated header length")
    (header_bytes,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_bytes > MAX_HEADER_BYTES or len(data) < start + header_bytes:
        raise ValueError(f"truncated or oversized header ({header_bytes} bytes)")
    try:
        header = json.loads(data[start : start + header_bytes].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("key") != key:
        raise ValueError("the entry's key differs from the requested one")
    payload = data[start + header_bytes :]
    if len(payload) != header.get("payload_bytes") or hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise ValueError("payload length or checksum mismatch (truncated or damaged file)")
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise ValueError("entry metadata missing")
    return Entry(meta, payload)


class KernelCache:
    """A directory of entries: :meth:`load` and :meth:`store` by key (thread- and process-safe)."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, key: dict) -> Path:
        return self.root / (key_digest(key) + SUFFIX)

    def load(self, key: dict) -> Entry | None:
        """The entry for ``key``, or None when absent or unusable (a damaged entry warns)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            count("misses")
            return None
        except OSError as exc:
            warnings.warn(f"gpunn kernel cache: cannot read {path} ({exc}); compiling instead", KernelCacheWarning, stacklevel=2)
            count("misses")
            return None
        try:
            entry = decode(data, key)
        except ValueError as exc:
            warnings.warn(
                f"gpunn kernel cache: ignoring damaged entry {path} ({exc}); the kernel is compiled and the entry rewritten",
                KernelCacheWarning,
                stacklevel=2,
            )
            count("corrupt")
            return None
        count("hits")
        return entry

    def store(self, key: dict, meta: dict, payload: bytes) -> bool:
        """Write the entry atomically (temporary file + rename); False, with a warning, on failure."""
        data = encode(key, meta, payload)
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=self.root)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
            tmp = None
        except OSError as exc:
            warnings.warn(f"gpunn kernel cache: cannot write to {self.root} ({exc}); continuing without caching", KernelCacheWarning, stacklevel=2)
            return False
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        count("stored")
        return True


def open_cache() -> KernelCache | None:
    """The cache at :func:`directory` now, or None when switched off."""
    root = directory()
    return None if root is None else KernelCache(root)
