"""Model files: safetensors tensors plus JSON metadata -- data, never code.

A model file (suffix ``MODEL_SUFFIX``) holds the architecture, every weight,
the compile settings and the optimizer's state.  Loading parses JSON and raw
little-endian tensors only (no pickle anywhere), checks a SHA-256 over every
byte of the file (stored in the header, and computed with that field zeroed),
the format version, the architecture, and every tensor's name, shape and
dtype -- before allocating anything -- and names the file in any error
(:class:`ModelFileError`, a ``ValueError``).

Saving streams the tensors into a temporary file beside the target,
fsyncs it, then renames it over the target: a failure at any point leaves
the previous file intact.  A symlinked target is written through, the
replaced file's permission bits are kept, destinations that are not regular
files are refused, and temporary files of killed saves on this host are
removed by the next save into the directory (:func:`atomic_destination`).
Loading reads and checks the header before the rest of the file, opens only
regular files, and bounds what the metadata may declare (:data:`MAX_LAYERS`,
step counters within int64).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import struct
import warnings

import numpy as np
import safetensors.numpy

from gpunn import checks, distributed

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


#: temporary files are named ``.<target name>.<TMP_TAG>-<host>-<pid>-<random>.tmp``
_TMP_TAG = "gpunn-tmp"
_TMP_PATTERN = re.compile(r"^\..*\." + _TMP_TAG + r"-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{12}\.tmp$")


def _host_tag() -> str:
    """8 hex digits naming this machine, so a cleanup never touches another host's save in progress."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or an odd pid): leave its file alone
    return True


def _remove_stale_temporaries(directory: str) -> None:
    """Delete temporary files of saves on this host whose process no longer exists (killed mid-save)."""
    host = _host_tag()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        found = _TMP_PATTERN.match(name)
        if found is None or found["host"] != host or int(found["pid"]) == os.getpid():
            continue
        if not _process_alive(int(found["pid"])):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def resolve_destination(path, argument: str = "filepath") -> str:
    """The file a save to ``path`` really writes: symlinks are followed, so the link survives.

    Raises IsADirectoryError / FileNotFoundError / ValueError (naming ``argument``)
    for a directory, a missing parent directory, or an existing destination
    that is not a regular file (a FIFO, a device, a socket): replacing one of
    those with a file would silently change what other programs see there.
    """
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{argument}: expected an existing directory for {path!r}, got missing directory {directory!r}")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{argument}: expected a file path, got the directory {path!r}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{argument}: expected a regular file to write, got {_file_kind(st.st_mode)} at {path!r}")
    return target


def _file_kind(mode) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "a special file"


@contextlib.contextmanager
def atomic_destination(path, argument: str = "filepath"):
    """Yield a temporary path to write; on success it atomically replaces ``path``.

    The temporary file lives beside the destination (same filesystem, so the
    rename is atomic), is fsynced before the rename and removed on any error:
    the previous file, if any, is either fully replaced or left exactly as it
    was.  A symlink is written through (its target is replaced, the link
    kept); the replaced file's permission bits are kept (a new file gets the
    umask's); non-regular destinations are refused (see resolve_destination).
    Temporary files left by killed saves in the same directory are removed.
    """
    target = resolve_destination(path, argument)
    directory = os.path.dirname(os.path.abspath(target))
    _remove_stale_temporaries(directory)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    name = f".{os.path.basename(target)[:150]}.{_TMP_TAG}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}.tmp"
    tmp = os.path.join(directory, name)
    # os.open with 0o666 applies the umask, so a new file gets the usual permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode is None:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        yield tmp
        # the writer may have replaced the file (safetensors writes 0600 files): set the bits last
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
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


def atomic_write(path, data: bytes, argument: str = "filepath") -> None:
    """Write ``data`` to ``path`` atomically (see atomic_destination)."""
    with atomic_destination(path, argument) as tmp:
        with open(tmp, "wb") as f:
            _write_all(f, data)


def _write_all(f, data: bytes) -> None:
    f.write(data)


def _model_metadata(model, weights_only: bool, user_metadata=None) -> dict:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "weights" if weights_only else "model",
        "config": model.get_config(),
        "compile": None,
    }
    if user_metadata is not None:
        meta["user_metadata"] = user_metadata
    compile_config = None if weights_only else model.get_compile_config()
    if compile_config is not None:
        optimizer = model.optimizer
        meta["compile"] = {
            **compile_config,
            "iterations": optimizer.iterations,
            "slots": list(optimizer.slots) if optimizer.built else [],
        }
    return meta


def _metadata_json(model, weights_only, user_metadata) -> str:
    if user_metadata is not None and not isinstance(user_metadata, dict):
        raise TypeError(f"user_metadata: expected a dict (JSON object) or None, got {type(user_metadata).__name__}")
    try:  # allow_nan=False: the metadata stays valid JSON (no NaN or Infinity)
        return json.dumps(_model_metadata(model, weights_only, user_metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"user_metadata: expected JSON data with finite numbers only ({exc})") from None


def _tensors(model, weights_only):
    if not model.built:
        raise ValueError("save: the model is not built yet (no weights); call build(), fit or predict first")
    # np.asarray(order="C"), not ascontiguousarray: that would turn a 0-d weight (a count) into 1-d
    tensors = {f"weight.{i:04d}": np.asarray(w, order="C") for i, w in enumerate(model.get_weights())}
    if not weights_only and model.compiled and model.optimizer.built:
        for name, slot in model.optimizer.slots.items():
            tensors[f"optimizer.{name}"] = np.ascontiguousarray(model.backend.to_numpy(slot))
    return tensors


#: safetensors' names for the dtypes gpunn stores
_SAFETENSORS_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64"}


def _model_file_parts(model, weights_only, user_metadata):
    """(header bytes with the checksum filled in, the tensors' raw bytes): a model file, in order.

    The safetensors layout (8-byte little-endian header length, JSON header
    padded with spaces to a multiple of 8, then the tensors back to back) is
    produced here rather than by ``safetensors.numpy.save`` so that the
    tensors can be streamed to disk from the model's own host arrays: no
    in-memory copy of the file.  Loading still goes through the safetensors
    library, which validates every offset.  The checksum is the SHA-256 of the
    whole file with the digest field zeroed, hashed from the same buffers.
    """
    tensors = {name: arr.astype(arr.dtype.newbyteorder("<"), copy=False) for name, arr in _tensors(model, weights_only).items()}
    header = {"__metadata__": {_META_KEY: _metadata_json(model, weights_only, user_metadata), _HASH_KEY: _PLACEHOLDER}}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    position = _digest_position(head, _PLACEHOLDER)
    if position < 0:  # pragma: no cover - the placeholder is written once, and JSON escapes quotes elsewhere
        raise RuntimeError("save: could not locate the checksum field in the model file header")
    data = [memoryview(np.ascontiguousarray(arr)).cast("B") for arr in tensors.values()]
    digest = hashlib.sha256(head)
    for chunk in data:
        digest.update(chunk)
    return head[:position] + digest.hexdigest().encode("ascii") + head[position + 64 :], data


def serialize(model, weights_only: bool = False, user_metadata=None) -> bytes:
    """The bytes of a model file for ``model`` (which must be built)."""
    head, data = _model_file_parts(model, weights_only, user_metadata)
    return b"".join([head, *data])


def save_model(model, filepath, weights_only: bool = False, user_metadata=None) -> None:
    """Write ``model`` to ``filepath`` atomically, streaming the tensors (no in-memory copy of the file).

    ``user_metadata``, a JSON object, is stored in the file's checksummed
    metadata (``gpunn train --save`` keeps the preprocessing there).
    """
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    if not distributed.is_main():
        return  # in a distributed run rank 0 alone writes files (its weights are every rank's)
    head, data = _model_file_parts(model, weights_only, user_metadata)
    with atomic_destination(filepath) as tmp:
        with open(tmp, "wb") as f:
            _write_all(f, head)
            for chunk in data:
                _write_all(f, chunk)


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
    header, meta_json, digest = _header_metadata(blob[8 : 8 + n], path)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _fail(path, "checksum mismatch: the file is corrupted (malformed checksum field)")
    position = _digest_position(blob, digest)
    if position < 0 or _whole_file_digest(blob, position) != digest:
        raise _fail(path, "checksum mismatch: the file is corrupted or truncated")
    try:
        meta = json.loads(meta_json)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers beyond Python's digit limit
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


#: more layers than this is not a file gpunn wrote for an MLP (bounds the work a forged file can ask for)
MAX_LAYERS = 10_000
#: optimizer step counters are int64 on every backend
_MAX_ITERATIONS = 2**63 - 1


def _check_schema(meta, path):
    """Types and bounds of every metadata field that loading reads (a file is data: nothing is trusted).

    The layer list is bounded by :data:`MAX_LAYERS` before any layer is built
    (not by the weight tensors: Dropout, Activation, Flatten... own none, so a
    valid model may have more layers than tensors).
    """
    if meta.get("kind") not in ("model", "weights"):
        raise _fail(path, f"unknown kind {meta.get('kind')!r} (expected 'model' or 'weights')")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise _fail(path, "the architecture (config) is missing or not a mapping")
    layers = config.get("layers")
    if isinstance(layers, list):
        if len(layers) > MAX_LAYERS:
            raise _fail(path, f"the architecture declares {len(layers)} layers, more than the {MAX_LAYERS} gpunn loads")
    if "user_metadata" in meta and not isinstance(meta["user_metadata"], dict):
        raise _fail(path, "user metadata should be a mapping")
    spec = meta.get("compile")
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise _fail(path, f"invalid compile settings {spec!r}")
    for key, kind in (("loss", dict), ("optimizer", dict), ("metrics", list), ("slots", list)):
        if not isinstance(spec.get(key), kind):
            raise _fail(path, f"invalid compile settings: {key!r} should be a {kind.__name__}, got {spec.get(key)!r}"[:300])
    _check_metric_and_slot_lists(spec, path)
    iterations = spec.get("iterations")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 0 <= iterations <= _MAX_ITERATIONS:
        shown = repr(iterations)
        shown = shown if len(shown) <= 40 else f"{shown[:20]}... ({len(shown)} characters)"
        raise _fail(path, f"invalid optimizer iteration count {shown} (expected an integer in 0..2**63-1)")


def _check_metric_and_slot_lists(spec, path):
    """Metrics are names or metric configs (mappings); slots are names."""
    weighted = spec.get("weighted_metrics") or []
    if not isinstance(weighted, list):
        raise _fail(path, f"invalid compile settings: 'weighted_metrics' should be a list, got {weighted!r}"[:300])
    if not all(isinstance(m, (str, dict)) for m in spec["metrics"] + weighted):
        raise _fail(path, "invalid compile settings: metrics should be metric names or metric configs")
    if not all(isinstance(k, str) for k in spec["slots"]):
        raise _fail(path, "invalid compile settings: optimizer slot names should be strings")


def _read(filepath):
    """(path, bytes) of a model file, reading the whole file only after its header looks like one.

    Only regular files are opened (a FIFO or a device would block or never
    end), and the 8-byte length plus the JSON header are checked first, so a
    large file of some other kind fails after reading a few bytes.
    """
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath: expected a path (str or os.PathLike), got {type(filepath).__name__}")
    path = os.fspath(filepath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"filepath: no such model file: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"filepath: expected a model file, got the directory {path!r}")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _fail(path, f"it is {_file_kind(mode)}, not a regular file")
    # O_NONBLOCK: should the path turn into a FIFO after the check, opening it does not hang
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _fail(path, "not a regular file")
        head = f.read(8)
        _refuse_other_formats(head, path)
        if len(head) < 8:
            raise _fail(path, f"truncated ({len(head)} bytes; the header alone needs at least 8)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(path, f"truncated or corrupted header (declares {n} header bytes, file has {size})")
        _header_metadata(f.read(n), path)  # a foreign file stops here, before the tensor data is read
        f.seek(0)
        blob = f.read()  # one buffer (concatenating the parts would briefly hold the file twice)
    return path, blob


#: the first bytes of the files other tools write that users may hand to load_model (as a gpunn
#: file's header length both would exceed _MAX_HEADER_BYTES, so no gpunn file starts with them)
_OTHER_FORMATS = (
    (b"PK\x03\x04", "a zip archive, as Keras 3 writes .keras files"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file, as Keras writes .h5 models and weights"),
)


def _refuse_other_formats(head: bytes, path):
    """A clear ModelFileError for a Keras (zip / HDF5) or pickle file instead of a header complaint."""
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise _fail(
                path,
                f"it is {what}; gpunn reads only files written by gpunn's model.save / save_weights. To move a Keras "
                "model over, build the same layers in gpunn and copy the weights: gpunn_model.set_weights(keras_model.get_weights())",
            )


def _header_metadata(header: bytes, path):
    """The safetensors header's gpunn metadata strings (metadata JSON, checksum); ModelFileError if absent."""
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("__metadata__"), dict):
        raise _fail(path, "no gpunn metadata (is this a safetensors file from another program?)")
    metadata = parsed["__metadata__"]
    meta_json, digest = metadata.get(_META_KEY), metadata.get(_HASH_KEY)
    if not isinstance(meta_json, str) or not isinstance(digest, str):
        raise _fail(path, "no gpunn metadata (is this a safetensors file from another program?)")
    return parsed, meta_json, digest


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
        model = model_class.from_config(config, build=False)  # allocated only after the weights are checked
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


#: the class ``load_model`` rebuilds models as when not told: gpunn.models sets it to Sequential
#: (models imports this module, so this one cannot import models)
default_model_class = None


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True, *, model_class=None):
    """Rebuild a model saved by ``save`` as a ``model_class`` (default ``gpunn.Sequential``), on the
    active backend, with its weights and, by default, its training state.

    Keras's signature: ``custom_objects`` and ``safe_mode`` are accepted for scripts that pass
    them; a gpunn model file is data only (it never names code to run), so neither changes anything.

    Only the model's public API is used: ``from_config``, ``build``,
    ``set_weights``, ``compile_from_config`` and the optimizer's state.
    """
    if model_class is None:
        model_class = default_model_class
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise TypeError(f"custom_objects: expected a dict of names to objects, got {type(custom_objects).__name__}")
    return load_model_with_metadata(filepath, model_class, compile)[0]


def load_model_with_metadata(filepath, model_class, compile=True):
    """(model, user_metadata) from one read of the file, as :func:`load_model`; user_metadata is the
    JSON object given to ``save_model(..., user_metadata=...)``, or None."""
    compile = checks.boolean(compile, "compile")
    path, blob = _read(filepath)
    meta, tensors = parse(blob, path)
    del blob  # the tensors are copies: let the file's bytes go before the model is allocated
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
    return model, meta.get("user_metadata")


def load_weights(model, filepath):
    """Load weights saved by ``save``/``save_weights`` into a model of the same architecture."""
    path, blob = _read(filepath)
    meta, tensors = parse(blob, path)
    weights = _check_tensor_names(tensors, meta, path)
    if not model.built:
        model.build()
    _check_weights(model, weights, path)
    model.set_weights(weights)
