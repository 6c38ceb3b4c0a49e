"""Model files: safetensors tensors plus JSON metadata -- data, never code.

A model file (suffix ``MODEL_SUFFIX``) holds the architecture, every weight,
the compile settings and the optimizer's state.  Loading parses JSON and raw
little-endian tensors only (no pickle anywhere), checks the format version,
a SHA-256 over the metadata and tensor bytes, the architecture, and every
shape and dtype, and names the file in any error.

Saving writes a temporary file beside the target, flushes and fsyncs it,
then renames it over the target: a failure at any point leaves the previous
file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

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


def _digest(meta_json: str, data: bytes) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode("utf-8"))
    h.update(data)
    return h.hexdigest()


def _data_section(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 + n :]


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"filepath: the directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
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
    if model.compiled and not weights_only:
        meta["compile"] = {
            "loss": model.loss.get_config(),
            "optimizer": model.optimizer.get_config(),
            "metrics": [m.name if hasattr(m, "update") else m for m in model._metric_specs],
            "iterations": model.optimizer.iterations,
            "slots": list(model.optimizer.slots) if model.optimizer.built else [],
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
    draft = safetensors.numpy.save(tensors, metadata={_META_KEY: meta_json, _HASH_KEY: "0" * 64})
    digest = _digest(meta_json, _data_section(draft))
    blob = safetensors.numpy.save(tensors, metadata={_META_KEY: meta_json, _HASH_KEY: digest})
    return blob


def save_model(model, filepath, weights_only: bool = False) -> None:
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    atomic_write(filepath, serialize(model, weights_only))


def _fail(path, why) -> ModelFileError:
    return ModelFileError(f"{path}: not a valid gpunn model file: {why}")


def parse(blob: bytes, path="<bytes>"):
    """(metadata dict, tensors dict) from model-file bytes, fully verified for integrity."""
    if len(blob) < 8:
        raise _fail(path, f"truncated ({len(blob)} bytes; the header alone needs at least 8)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(blob):
        raise _fail(path, f"truncated or corrupted header (declares {n} header bytes, file has {len(blob)})")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _fail(path, "no gpunn metadata (is this a safetensors file from another program?)")
    metadata = header["__metadata__"]
    meta_json, digest = metadata.get(_META_KEY), metadata.get(_HASH_KEY)
    if not isinstance(meta_json, str) or not isinstance(digest, str):
        raise _fail(path, "no gpunn metadata (is this a safetensors file from another program?)")
    if _digest(meta_json, blob[8 + n :]) != digest:
        raise _fail(path, "checksum mismatch: the file is corrupted or truncated")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"the metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise _fail(path, f"format version {version!r} is not supported (this gpunn reads versions 1..{FORMAT_VERSION}); upgrade gpunn")
    try:
        tensors = safetensors.numpy.load(blob)
    except Exception as exc:
        raise _fail(path, f"the tensor data is corrupted ({exc})") from None
    return meta, tensors


def _read(filepath):
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    path = os.fspath(filepath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"filepath: no such model file: {path!r}")
    with open(path, "rb") as f:
        blob = f.read()
    return path, blob


def _weights_from(meta, tensors, path):
    names = sorted(k for k in tensors if k.startswith("weight."))
    return [tensors[k] for k in names]


def _check_weights(model, weights, path):
    expected = [(w.shape, np.dtype(model.dtype)) for w in model.get_weights()]
    if len(weights) != len(expected):
        raise _fail(path, f"the architecture has {len(expected)} weight arrays but the file holds {len(weights)}")
    for i, (w, (shape, dtype)) in enumerate(zip(weights, expected)):
        if w.shape != shape:
            raise _fail(path, f"weight {i} has shape {w.shape}, the architecture expects {shape}")
        if w.dtype != dtype:
            raise _fail(path, f"weight {i} has dtype {w.dtype}, the model uses {dtype}")
        if not np.isfinite(w).all():
            raise _fail(path, f"weight {i} holds non-finite values")


def model_from_config(config, path="<config>"):
    from gpunn import layers as layers_mod
    from gpunn.models import Sequential

    try:
        layer_configs = config["layers"]
        if not isinstance(layer_configs, list) or not layer_configs:
            raise ValueError("no layers")
        model = Sequential(name=config.get("name"), dtype=config.get("dtype"))
        if config.get("input_dim") is not None:
            model.add(layers_mod.Input(shape=(config["input_dim"],)))
        for lc in layer_configs:
            if not isinstance(lc, dict):
                raise ValueError(f"layer config {lc!r} is not a mapping")
            model.add(layers_mod.from_config(lc))
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"invalid architecture ({exc})") from None
    return model


def load_model(filepath, compile=True):
    """Rebuild a saved model (on the active backend) with its weights and, by default, its training state."""
    path, blob = _read(filepath)
    meta, tensors = parse(blob, path)
    if meta.get("kind") != "model":
        raise _fail(path, "this file holds weights only; use model.load_weights(path) on a model of the same architecture")
    model = model_from_config(meta.get("config") or {}, path)
    if model.input_dim is None:
        raise _fail(path, "the architecture has no input size")
    model._allocate(initialize=False)
    weights = _weights_from(meta, tensors, path)
    _check_weights(model, weights, path)
    model.set_weights(weights)
    spec = meta.get("compile")
    if compile and spec:
        try:
            model.compile(optimizer=dict(spec["optimizer"]), loss=dict(spec["loss"]), metrics=list(spec["metrics"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(path, f"invalid compile settings ({exc})") from None
        slots = spec.get("slots") or []
        if slots:
            optimizer = model.optimizer
            if sorted(slots) != sorted(optimizer.slots):
                raise _fail(path, f"optimizer state {slots} does not match the optimizer's {sorted(optimizer.slots)}")
            for name in slots:
                key = f"optimizer.{name}"
                if key not in tensors:
                    raise _fail(path, f"missing optimizer state {name!r}")
                value = tensors[key]
                if value.shape != optimizer.slots[name].shape or value.dtype != model.dtype:
                    raise _fail(path, f"optimizer state {name!r} has shape {value.shape} and dtype {value.dtype}, expected {optimizer.slots[name].shape} {model.dtype}")
                optimizer.slots[name][...] = model.backend.asarray(value)
        iterations = spec.get("iterations", 0)
        if not isinstance(iterations, int) or iterations < 0:
            raise _fail(path, f"invalid optimizer iteration count {iterations!r}")
        model.optimizer.iterations = iterations
    return model


def load_weights(model, filepath):
    """Load weights saved by ``save``/``save_weights`` into a model of the same architecture."""
    path, blob = _read(filepath)
    meta, tensors = parse(blob, path)
    if not model.built:
        model.build()
    weights = _weights_from(meta, tensors, path)
    _check_weights(model, weights, path)
    model.set_weights(weights)
