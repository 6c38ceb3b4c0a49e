"""Model files are data: atomic saves, exact round trips, clean errors for bad files.

* A save interrupted midway (an error injected after part of the file is
  written) leaves the previous file intact and no temporary file behind;
  ModelCheckpoint saves the same way.
* A small model file truncated at every byte position, or with any byte
  flipped, is reported as ``gpunn.ModelFileError`` naming the file -- never
  another exception, never a silently different model.
* Foreign files (another program's safetensors, random bytes, a pickle, a
  future format version, valid checksums over malformed metadata) are
  reported cleanly; loading never executes code.
* Random architectures round-trip exactly (hypothesis), and a loaded model
  resumes training with its optimizer state.
"""

from __future__ import annotations

import json
import os
import pickle
import stat

import numpy as np
import pytest
import safetensors.numpy
from helpers import mlp, regression_data, rng, weights_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpunn
from gpunn import saving
from gpunn.callbacks import ModelCheckpoint
from gpunn.layers import Dense


def _small_model(seed=0, optimizer="adam"):
    gpunn.set_seed(seed)
    model = gpunn.Sequential([Dense(2, activation="tanh", input_dim=2), Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x, y = regression_data(seed, n=8, features=2)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    return model


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "small.gpunn"
    _small_model().save(path)
    return path


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------ atomic saving
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "m.gpunn"
    first = _small_model(0)
    first.save(path)
    original = path.read_bytes()
    second = _small_model(1)

    def half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        f.flush()
        raise error

    monkeypatch.setattr(saving, "_write_all", half_then_fail)
    with pytest.raises(type(error)):
        second.save(path)
    assert path.read_bytes() == original
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert weights_equal(gpunn.load_model(path).get_weights(), first.get_weights())
    second.save(path)
    assert weights_equal(gpunn.load_model(path).get_weights(), second.get_weights())


def test_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.gpunn"
    _small_model(0).save(path)
    original = path.read_bytes()

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(saving.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        _small_model(1).save(path)
    assert path.read_bytes() == original
    assert _leftovers(tmp_path) == []


def test_first_save_that_fails_leaves_nothing(tmp_path, monkeypatch):
    def fail(f, data):
        f.write(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(saving, "_write_all", fail)
    with pytest.raises(OSError):
        _small_model().save(tmp_path / "new.gpunn")
    assert list(tmp_path.iterdir()) == []


def test_model_checkpoint_saves_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.gpunn"
    model = _small_model()
    x, y = regression_data(3, n=8, features=2)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ModelCheckpoint(path, save_best_only=False)])
    original = path.read_bytes()
    calls = []

    def fail(f, data):
        calls.append(len(data))
        f.write(data[:100])
        raise OSError("disk full")

    monkeypatch.setattr(saving, "_write_all", fail)
    with pytest.raises(OSError, match="disk full"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ModelCheckpoint(path, save_best_only=False)])
    assert calls, "ModelCheckpoint did not go through saving.atomic_write"
    assert path.read_bytes() == original
    assert _leftovers(tmp_path) == []


def test_saved_file_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _small_model().save(tmp_path / "m.gpunn")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gpunn").stat().st_mode) == 0o644


def test_save_into_a_missing_directory_or_onto_a_directory(tmp_path):
    model = _small_model()
    with pytest.raises(FileNotFoundError, match="filepath: expected an existing directory"):
        model.save(tmp_path / "nope" / "m.gpunn")
    with pytest.raises(IsADirectoryError, match="filepath"):
        model.save(tmp_path)
    with pytest.raises(TypeError, match="filepath: expected a path"):
        model.save(3)


# ------------------------------------------------------------- bad files
def _expect_clean_error(path, blob=None):
    if blob is not None:
        path.write_bytes(blob)
    with pytest.raises(gpunn.ModelFileError) as info:
        gpunn.load_model(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_truncated_at_every_byte(small_file, tmp_path):
    blob = small_file.read_bytes()
    assert len(blob) < 4096  # keeps the exhaustive loops quick
    target = tmp_path / "cut.gpunn"
    for cut in range(len(blob)):
        _expect_clean_error(target, blob[:cut])


def test_every_byte_flipped(small_file, tmp_path):
    blob = small_file.read_bytes()
    target = tmp_path / "flip.gpunn"
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[i] ^= mask
            _expect_clean_error(target, bytes(damaged))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_is_reported(small_file, tmp_path, data):
    blob = bytearray(small_file.read_bytes())
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), min_size=1, max_size=6))
    for i, mask in edits:
        blob[i] ^= mask
    if data.draw(st.booleans()):
        extra = data.draw(st.binary(min_size=1, max_size=16))
        blob = blob + extra if data.draw(st.booleans()) else extra + blob
    if bytes(blob) == small_file.read_bytes():
        return
    _expect_clean_error(tmp_path / "damaged.gpunn", bytes(blob))


def test_foreign_files(tmp_path):
    foreign = safetensors.numpy.save({"weight": np.ones((2, 2), np.float32)})
    assert "another program" in _expect_clean_error(tmp_path / "foreign.safetensors", foreign)
    other_meta = safetensors.numpy.save({"w": np.ones(2, np.float32)}, metadata={"format": "pt"})
    assert "another program" in _expect_clean_error(tmp_path / "pt.safetensors", other_meta)
    _expect_clean_error(tmp_path / "random.gpunn", rng(0).integers(0, 256, 2000).astype(np.uint8).tobytes())
    _expect_clean_error(tmp_path / "empty.gpunn", b"")
    _expect_clean_error(tmp_path / "json.gpunn", json.dumps({"format": "gpunn-model"}).encode())
    _expect_clean_error(tmp_path / "text.gpunn", b"hello world, this is not a model file at all")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PICKLE_EXECUTED",))


def test_a_pickle_is_rejected_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blob = pickle.dumps({"model": _Boom(), "weights": [np.ones(3)]})
    _expect_clean_error(tmp_path / "model.pkl", blob)
    np.save(tmp_path / "weights.npy", np.array([_Boom()], dtype=object), allow_pickle=True)
    _expect_clean_error(tmp_path / "weights.npy")
    assert not (tmp_path / "PICKLE_EXECUTED").exists()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        gpunn.load_model(tmp_path / "missing.gpunn")
    with pytest.raises(IsADirectoryError, match="filepath"):
        gpunn.load_model(tmp_path)
    with pytest.raises(TypeError, match="filepath: expected a path"):
        gpunn.load_model(None)


# ---------------- files with a valid checksum over malformed or foreign content
def _signed(tensors, meta):
    """A file whose checksum is right but whose content is whatever ``meta``/``tensors`` say."""
    meta_json = json.dumps(meta, sort_keys=True)
    draft = safetensors.numpy.save(tensors, metadata={saving._META_KEY: meta_json, saving._HASH_KEY: saving._PLACEHOLDER})
    pos = saving._digest_position(draft, saving._PLACEHOLDER)
    return draft[:pos] + saving._whole_file_digest(draft, pos).encode() + draft[pos + 64 :]


def _parts(model):
    meta, tensors = saving.parse(saving.serialize(model))
    return meta, dict(tensors)


def test_signed_helper_reproduces_a_loadable_file(tmp_path):
    model = _small_model()
    meta, tensors = _parts(model)
    path = tmp_path / "ok.gpunn"
    path.write_bytes(_signed(tensors, meta))
    assert weights_equal(gpunn.load_model(path).get_weights(), model.get_weights())


def _mutations():
    def set_path(meta, keys, value):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    def m(keys, value, expect):
        return (lambda meta, t: set_path(meta, keys, value), expect)

    def t(fn, expect):
        return (lambda meta, tensors: fn(tensors), expect)

    return {
        "future_version": m(["format_version"], saving.FORMAT_VERSION + 1, "format version 2 is not supported"),
        "version_zero": m(["format_version"], 0, "format version 0"),
        "version_text": m(["format_version"], "1", "format version '1'"),
        "other_format": m(["format"], "keras", "unknown format 'keras'"),
        "unknown_kind": m(["kind"], "script", "unknown kind"),
        "config_list": m(["config"], [1, 2], "config"),
        "no_layers": m(["config", "layers"], [], "invalid architecture"),
        "bad_layer_class": m(["config", "layers", 0, "class_name"], "Lambda", "Lambda"),
        "unknown_layer_arg": m(["config", "layers", 0, "code"], "import os", "invalid architecture"),
        "bad_activation": m(["config", "layers", 0, "activation"], "__import__", "invalid architecture"),
        "huge_units": m(["config", "layers", 0, "units"], 10**12, "shape"),
        "wrong_input_dim": m(["config", "input_dim"], 5, "weight 0 has shape (2, 2), the architecture expects (5, 2)"),
        "bad_dtype": m(["config", "dtype"], "float16", "invalid architecture"),
        "other_dtype": m(["config", "dtype"], "float64", "dtype float32"),
        "compile_list": m(["compile"], [1], "invalid compile settings"),
        "bad_loss": m(["compile", "loss", "name"], "hinge", "invalid compile settings"),
        "bad_optimizer_arg": m(["compile", "optimizer", "exec"], 1, "invalid compile settings"),
        "negative_iterations": m(["compile", "iterations"], -1, "iteration count"),
        "bool_iterations": m(["compile", "iterations"], True, "iteration count"),
        "wrong_slots": m(["compile", "slots"], ["velocity"], "unexpected tensors ['optimizer.m', 'optimizer.v']"),
        "slot_names_numbers": m(["compile", "slots"], [1], "slot names"),
        "metrics_text": m(["compile", "metrics"], "accuracy", "'metrics' should be a list"),
        "extra_tensor": t(lambda ts: ts.update({"payload": np.zeros(3, np.float32)}), "unexpected tensors ['payload']"),
        "missing_weight": t(lambda ts: ts.pop("weight.0003"), "weight arrays"),
        "renamed_weight": t(lambda ts: ts.update({"weight.0007": ts.pop("weight.0003")}), "unexpected weight names"),
        "missing_slot": t(lambda ts: ts.pop("optimizer.m"), "missing tensors"),
        "weight_shape": t(lambda ts: ts.update({"weight.0000": np.zeros((2, 3), np.float32)}), "weight 0 has shape (2, 3)"),
        "weight_dtype": t(lambda ts: ts.update({"weight.0001": np.zeros(2, np.float64)}), "weight 1 has dtype float64"),
        "weight_int": t(lambda ts: ts.update({"weight.0001": np.zeros(2, np.int32)}), "weight 1 has dtype int32"),
        "slot_shape": t(lambda ts: ts.update({"optimizer.v": np.zeros(4, np.float32)}), "optimizer state 'v'"),
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checksummed_but_malformed_files(tmp_path, name):
    mutate, expect = MUTATIONS[name]
    meta, tensors = _parts(_small_model())
    tensors = {k: v.copy() for k, v in tensors.items()}
    mutate(meta, tensors)
    message = _expect_clean_error(tmp_path / f"{name}.gpunn", _signed(tensors, meta))
    assert expect in message, message


def test_non_finite_weights_load_with_a_warning(tmp_path):
    """A checkpoint written after training diverged is still data: it loads, and says so."""
    meta, tensors = _parts(_small_model())
    tensors = {k: v.copy() for k, v in tensors.items()}
    tensors["weight.0002"][0, 0] = np.nan
    path = tmp_path / "nan.gpunn"
    path.write_bytes(_signed(tensors, meta))
    with pytest.warns(RuntimeWarning, match="nan.gpunn: weight 2 holds NaN"):
        model = gpunn.load_model(path)
    assert np.isnan(model.get_weights()[2][0, 0])


def test_weights_only_file_is_not_a_model(tmp_path):
    path = tmp_path / "w.gpunn"
    model = _small_model()
    model.save_weights(path)
    assert "weights only" in _expect_clean_error(path)
    other = gpunn.Sequential([Dense(2, activation="tanh", input_dim=2), Dense(1)])
    other.load_weights(path)
    assert weights_equal(other.get_weights(), model.get_weights())
    wrong = gpunn.Sequential([Dense(3, input_dim=2), Dense(1)])
    with pytest.raises(gpunn.ModelFileError, match=r"w.gpunn.*weight 0 has shape \(2, 2\), the architecture expects \(2, 3\)"):
        wrong.load_weights(path)


def test_no_pickle_anywhere_in_gpunn():
    root = os.path.dirname(gpunn.__file__)
    offenders = []
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                text = open(path, encoding="utf-8").read()
                for needle in ("import pickle", "from pickle", "pickle.load", "allow_pickle=True", "import dill", "import joblib", "cloudpickle"):
                    if needle in text:
                        offenders.append(f"{os.path.relpath(path, root)}: {needle}")
    assert offenders == []


# ----------------------------------------------------------- round trips
_ACTS = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "linear", "softmax", {"name": "leaky_relu", "alpha": 0.05}]
_INITS = ["glorot_uniform", "he_normal", "lecun_uniform", "orthogonal", "random_normal", "ones"]


@st.composite
def _architectures(draw):
    depth = draw(st.integers(1, 4))
    layers = []
    for i in range(depth):
        reg = draw(st.sampled_from([None, "l1", "l2", {"l1": 0.001, "l2": 0.003}]))
        layers.append(
            dict(
                units=draw(st.integers(1, 6)),
                activation=draw(st.sampled_from(_ACTS)),
                use_bias=draw(st.booleans()),
                kernel_initializer=draw(st.sampled_from(_INITS)),
                kernel_regularizer=reg,
                name=f"layer_{i}_{draw(st.integers(0, 99))}",
            )
        )
    optimizer = draw(
        st.sampled_from(
            [
                None,
                "sgd",
                {"name": "sgd", "learning_rate": 0.02, "momentum": 0.9, "nesterov": True},
                "adam",
                {"name": "adamw", "learning_rate": 0.003, "clipnorm": 1.0},
                "rmsprop",
                {"name": "rmsprop", "centered": True, "momentum": 0.5, "clipvalue": 0.5},
            ]
        )
    )
    return dict(
        input_dim=draw(st.integers(1, 5)),
        layers=layers,
        dtype=draw(st.sampled_from(["float32", "float64"])),
        optimizer=optimizer,
        loss=draw(st.sampled_from(["mse", "mae"])),
        metrics=draw(st.sampled_from([[], ["mae"], ["mse", "mae"]])),
        train_steps=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=_architectures())
def test_random_architectures_round_trip_exactly(tmp_path, arch):
    gpunn.set_seed(arch["seed"])
    model = gpunn.Sequential(
        [gpunn.Input(shape=(arch["input_dim"],))] + [Dense(**spec) for spec in arch["layers"]], dtype=arch["dtype"]
    )
    model.build()
    x = rng(arch["seed"]).normal(size=(6, arch["input_dim"]))
    y = rng(arch["seed"] + 1).normal(size=(6, model.output_dim))
    if arch["optimizer"] is not None:
        model.compile(optimizer=arch["optimizer"], loss=arch["loss"], metrics=arch["metrics"])
        for _ in range(arch["train_steps"]):
            model.train_on_batch(x, y)
    path = tmp_path / "m.gpunn"
    model.save(path)
    loaded = gpunn.load_model(path)
    assert loaded.get_config() == model.get_config()
    assert [w.dtype for w in loaded.get_weights()] == [np.dtype(arch["dtype"])] * len(model.get_weights())
    assert weights_equal(loaded.get_weights(), model.get_weights())
    assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.compiled == model.compiled
    if model.compiled:
        assert loaded.optimizer.get_config() == model.optimizer.get_config()
        assert loaded.optimizer.iterations == model.optimizer.iterations
        assert loaded.loss.get_config() == model.loss.get_config()
        assert loaded.metrics_names == model.metrics_names
        assert sorted(loaded.optimizer.slots) == sorted(model.optimizer.slots)
        for k, v in model.optimizer.slots.items():
            assert np.array_equal(loaded.optimizer.slots[k], v)
        # and both continue identically
        assert loaded.train_on_batch(x, y) == model.train_on_batch(x, y)
        assert weights_equal(loaded.get_weights(), model.get_weights())
    # saving the loaded model again gives the same content (safetensors' header key order may vary)
    if not model.compiled:
        path2 = tmp_path / "m2.gpunn"
        loaded.save(path2)
        (meta1, t1), (meta2, t2) = saving.parse(path.read_bytes()), saving.parse(path2.read_bytes())
        assert meta1 == meta2 and sorted(t1) == sorted(t2)
        assert all(np.array_equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)


@pytest.mark.parametrize("optimizer", ["adam", {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}, "rmsprop"])
def test_resume_from_a_checkpoint_matches_uninterrupted_training(tmp_path, optimizer):
    x, y = regression_data(7, n=40, features=4)

    def fresh():
        gpunn.set_seed(11)
        model = mlp([5, 1], activation="tanh", input_dim=4, dtype="float64")
        model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
        return model

    straight = fresh()
    straight.fit(x, y, epochs=5, batch_size=8, shuffle=False, verbose=0)
    continued = fresh()  # the same model object, never saved
    continued.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    continued.fit(x, y, epochs=5, initial_epoch=3, batch_size=8, shuffle=False, verbose=0)

    interrupted = fresh()
    pattern = str(tmp_path / "ckpt-{epoch:02d}.gpunn")
    interrupted.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=[ModelCheckpoint(pattern, monitor="loss")])
    resumed = gpunn.load_model(tmp_path / "ckpt-03.gpunn")
    assert resumed.optimizer.iterations == 15
    history = resumed.fit(x, y, epochs=5, initial_epoch=3, batch_size=8, shuffle=False, verbose=0)
    assert history.epoch == [3, 4]
    # save + load changes nothing: bit-identical to continuing in memory
    assert weights_equal(resumed.get_weights(), continued.get_weights())
    for name, slot in continued.optimizer.slots.items():
        assert np.array_equal(resumed.optimizer.slots[name], slot)
    assert resumed.optimizer.iterations == straight.optimizer.iterations == 25
    # and matches uninterrupted training bit for bit
    assert weights_equal(resumed.get_weights(), straight.get_weights())
