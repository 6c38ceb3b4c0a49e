"""Model files: safetensors tensors plus JSON metadata -- data, never code.

A model file (suffix ``MODEL_SUFFIX``) holds the architecture, every weight,
the compile settings and the optimizer's state.  Loading parses JSON and raw
little-endian tensors only (no pickle anywhere), checks a SHA-256 over every
byte of the file (stored in the header, and computed with that field zeroed),
the format version, the architecture, and every tensor's name, shape and
dtype -- before allocating anything -- and names the file in any error
(:class:`ModelFileError`, a ``ValueError``).

Saving writes a temporary file beside the target, flushes and fsyncs it,
then renames it over the target: a failure at any point leaves the previous
file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import warnings

import numpy as np
import safetensors.numpy

MODEL_SUFFIX = ".gpunn"
FORMAT = "gpunn-model"
FORMAT_VERSION = 1
_META_KEY = "gpunn"
_HASH_KEY = "gpunn_sha256"
#: a header larger than this is not one gpunn wrote (guards against absurd lengths)
_MAX_HEADER_BYTES = 64 * 1024 * 1024


class ModelFileError(ValueError):
    """A file that is truncated, corrupted, foreign, or inconsistent with its architecture."""


_PLACEHOLDER = "0" * 64


def _digest_position(blob: bytes, digest: str) -> int:
    """Offset of the quoted ``digest`` in the JSON header; -1 unless it occurs exactly once."""
    (n,) = struct.unpack("<Q", blob[:8])
    needle = b'"' + digest.encode("ascii") + b'"'
    header = blob[8 : 8 + n]
    at = header.find(needle)
    if at < 0 or header.find(needle, at + 1) >= 0:
        return -1
    return 8 + at + 1


def _whole_file_digest(blob: bytes, position: int) -> str:
    """SHA-256 of the file with the 64 hex digits at ``position`` replaced by zeros."""
    h = hashlib.sha256()
    h.update(blob[:position])
    h.update(_PLACEHOLDER.encode("ascii"))
    h.update(blob[position + 64 :])
    return h.hexdigest()


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename.

    The temporary file lives beside ``path`` (same filesystem, so the rename
    is atomic) and is removed on any error: the previous ``path``, if any, is
    either fully replaced or left exactly as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"filepath: expected an existing directory for {path!r}, got missing directory {directory!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"filepath: expected a file path, got the directory {path!r}")
    tmp = os.path.join(directory, f".{os.path.basename(path)[:200]}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 applies the umask, so the file gets the usual permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_all(f, data: bytes) -> None:
    f.write(data)


def _model_metadata(model, weights_only: bool) -> dict:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "weights" if weights_only else "model",
        "config": model.get_config(),
        "compile": None,
    }
    compile_config = None if weights_only else model.get_compile_config()
    if compile_config is not None:
        optimizer = model.optimizer
        meta["compile"] = {
            **compile_config,
            "iterations": optimizer.iterations,
            "slots": list(optimizer.slots) if optimizer.built else [],
        }
    return meta


def serialize(model, weights_only: bool = False) -> bytes:
    """The bytes of a model file for ``model`` (which must be built)."""
    if not model.built:
        raise ValueError("save: the model is not built yet (no weights); call build(), fit or predict first")
    tensors = {f"weight.{i:04d}": np.ascontiguousarray(w) for i, w in enumerate(model.get_weights())}
    if not weights_only and model.compiled and model.optimizer.built:
        for name, slot in model.optimizer.slots.items():
            tensors[f"optimizer.{name}"] = np.ascontiguousarray(model.backend.to_numpy(slot))
    meta_json = json.dumps(_model_metadata(model, weights_only), sort_keys=True)
    draft = safetensors.numpy.save(tensors, metadata={_META_KEY: meta_json, _HASH_KEY: _PLACEHOLDER})
    position = _digest_position(draft, _PLACEHOLDER)
    if position < 0:  # pragma: no cover - safetensors always writes the metadata verbatim
        raise RuntimeError("save: could not locate the checksum field in the safetensors header")
    digest = _whole_file_digest(draft, position)
    return draft[:position] + digest.encode("ascii") + draft[position + 64 :]


def save_model(model, filepath, weights_only: bool = False) -> None:
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    atomic_write(filepath, serialize(model, weights_only))


def _fail(path, why) -> ModelFileError:
    return ModelFileError(f"{path}: not a valid gpunn model file: {why}")


def parse(blob: bytes, path="<bytes>"):
    """(metadata dict, tensors dict) from model-file bytes, fully verified for integrity.

    Every failure -- truncation, any flipped byte, a foreign or future file --
    is a :class:`ModelFileError` naming ``path``.
    """
    if len(blob) < 8:
        raise _fail(path, f"truncated ({len(blob)} bytes; the header alone needs at least 8)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(blob):
        raise _fail(path, f"truncated or corrupted header (declares {n} header bytes, file has {len(blob)})")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _fail(path, "no gpunn metadata (is this a safetensors file from another program?)")
    metadata = header["__metadata__"]
    meta_json, digest = metadata.get(_META_KEY), metadata.get(_HASH_KEY)
    if not isinstance(meta_json, str) or not isinstance(digest, str):
        raise _fail(path, "no gpunn metadata (is this a safetensors file from another program?)")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _fail(path, "checksum mismatch: the file is corrupted (malformed checksum field)")
    position = _digest_position(blob, digest)
    if position < 0 or _whole_file_digest(blob, position) != digest:
        raise _fail(path, "checksum mismatch: the file is corrupted or truncated")
    try:
        meta = json.loads(meta_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"the metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise _fail(path, f"format version {version!r} is not supported (this gpunn reads versions 1..{FORMAT_VERSION}); upgrade gpunn")
    _check_schema(meta, path)
    try:
        tensors = safetensors.numpy.load(blob)
    except Exception as exc:  # safetensors' own error type; the checksum makes this near-impossible
        raise _fail(path, f"the tensor data is corrupted ({exc})") from None
    return meta, tensors


def _check_schema(meta, path):
    """Types of every metadata field that loading reads (a file is data: nothing is trusted)."""
    if meta.get("kind") not in ("model", "weights"):
        raise _fail(path, f"unknown kind {meta.get('kind')!r} (expected 'model' or 'weights')")
    if not isinstance(meta.get("config"), dict):
        raise _fail(path, "the architecture (config) is missing or not a mapping")
    spec = meta.get("compile")
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise _fail(path, f"invalid compile settings {spec!r}")
    for key, kind in (("loss", dict), ("optimizer", dict), ("metrics", list), ("slots", list)):
        if not isinstance(spec.get(key), kind):
            raise _fail(path, f"invalid compile settings: {key!r} should be a {kind.__name__}, got {spec.get(key)!r}")
    if not all(isinstance(m, str) for m in spec["metrics"]) or not all(isinstance(k, str) for k in spec["slots"]):
        raise _fail(path, "invalid compile settings: metric and slot names should be strings")
    iterations = spec.get("iterations")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise _fail(path, f"invalid optimizer iteration count {iterations!r}")


def _read(filepath):
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    path = os.fspath(filepath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"filepath: no such model file: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"filepath: expected a model file, got the directory {path!r}")
    with open(path, "rb") as f:
        blob = f.read()
    return path, blob


def _weight_names(count):
    return [f"weight.{i:04d}" for i in range(count)]


def _check_tensor_names(tensors, meta, path):
    """The file holds exactly weight.0000..weight.N-1 and the listed optimizer slots."""
    weights = sorted(k for k in tensors if k.startswith("weight."))
    if weights != _weight_names(len(weights)):
        raise _fail(path, f"unexpected weight names {weights[:8]}")
    spec = meta.get("compile") or {}
    expected = set(weights) | {f"optimizer.{name}" for name in spec.get("slots", [])}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise _fail(path, f"unexpected tensors {extra}" if extra else f"missing tensors {missing}")
    return [tensors[k] for k in weights]


def _check_weights(model, weights, path):
    dtype = model.dtype
    expected = model.weight_shapes()  # from the architecture: nothing allocated yet
    if len(weights) != len(expected):
        raise _fail(path, f"the architecture has {len(expected)} weight arrays but the file holds {len(weights)}")
    for i, (w, shape) in enumerate(zip(weights, expected)):
        if w.shape != shape:
            raise _fail(path, f"weight {i} has shape {w.shape}, the architecture expects {shape}")
        if w.dtype != dtype:
            raise _fail(path, f"weight {i} has dtype {w.dtype}, the model uses {dtype}")
        if not np.isfinite(w).all():
            # still data: a checkpoint written after training diverged loads, with a warning
            warnings.warn(f"{path}: weight {i} holds NaN or infinite values (saved after training diverged?)", RuntimeWarning, stacklevel=3)


def model_from_config(model_class, config, path="<config>"):
    """An unbuilt model from ``model_class.from_config(config)``; ModelFileError if it is malformed."""
    try:
        model = model_class.from_config(config)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise _fail(path, f"invalid architecture ({exc})") from None
    if model.input_dim is None:
        raise _fail(path, "the architecture has no input size")
    return model


def _restore_training_state(model, spec, tensors, path):
    """Compile ``model`` from the file's compile settings and load the optimizer's state."""
    try:
        model.compile_from_config(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"invalid compile settings ({exc})") from None
    optimizer = model.optimizer
    slots = spec["slots"]
    if slots and sorted(slots) != sorted(optimizer.slots):
        raise _fail(path, f"optimizer state {sorted(slots)} does not match the optimizer's {sorted(optimizer.slots)}")
    for name in slots:
        value = tensors[f"optimizer.{name}"]
        if value.shape != optimizer.slots[name].shape or value.dtype != model.dtype:
            raise _fail(
                path,
                f"optimizer state {name!r} has shape {value.shape} and dtype {value.dtype}, "
                f"expected {optimizer.slots[name].shape} {model.dtype}",
            )
        optimizer.slots[name][...] = model.backend.asarray(value)
    optimizer.iterations = spec["iterations"]


def load_model(filepath, model_class, compile=True):
    """Rebuild a model saved by ``save`` as a ``model_class`` (``gpunn.Sequential``), on the
    active backend, with its weights and, by default, its training state.

    Only the model's public API is used: ``from_config``, ``build``,
    ``set_weights``, ``compile_from_config`` and the optimizer's state.
    """
    path, blob = _read(filepath)
    meta, tensors = parse(blob, path)
    if meta["kind"] != "model":
        raise _fail(path, "this file holds weights only; use model.load_weights(path) on a model of the same architecture")
    model = model_from_config(model_class, meta["config"], path)
    weights = _check_tensor_names(tensors, meta, path)
    _check_weights(model, weights, path)  # before allocating anything
    model.build(initialize=False)
    model.set_weights(weights)
    spec = meta.get("compile")
    if compile and spec:
        _restore_training_state(model, spec, tensors, path)
    return model


def load_weights(model, filepath):
    """Load weights saved by ``save``/``save_weights`` into a model of the same architecture."""
    path, blob = _read(filepath)
    meta, tensors = parse(blob, path)
    weights = _check_tensor_names(tensors, meta, path)
    if not model.built:
        model.build()
    _check_weights(model, weights, path)
    model.set_weights(weights)
