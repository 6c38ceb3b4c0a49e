"""Issue 9, files: writes that respect what they replace, temporary files of killed saves cleaned up,
model files read header first, forged metadata rejected at load, saving without copies of the model."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

import gpunn
from gpunn import saving
from gpunn.cli import main
from gpunn.layers import Dense


@pytest.fixture(autouse=True)
def numpy_backend():
    gpunn.set_backend("numpy")
    yield
    gpunn.set_backend("numpy")


def small_model(seed=0, units=3):
    gpunn.set_seed(seed)
    model = gpunn.Sequential([Dense(units, activation="tanh", input_dim=2), Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), epochs=1, verbose=0)
    return model


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def training_csv(path, n=60):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    rows = "\n".join(f"{a:.4f},{b:.4f},{int(a + b > 0)}" for a, b in x)
    path.write_text("a,b,y\n" + rows + "\n")
    return path


# ------------------------------------------------------------ what a write replaces
def test_saving_through_a_symlink_keeps_the_link_and_updates_its_target(tmp_path):
    real = tmp_path / "models" / "v1.gpunn"
    real.parent.mkdir()
    small_model(0).save(real)
    link = tmp_path / "current.gpunn"
    link.symlink_to(real)
    second = small_model(1)
    second.save(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert np.array_equal(gpunn.load_model(real).get_weights()[0], second.get_weights()[0])


def test_the_replaced_files_permissions_are_kept(tmp_path):
    path = tmp_path / "m.gpunn"
    small_model(0).save(path)
    path.chmod(0o600)
    small_model(1).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = tmp_path / "preds.csv"
    out.write_text("old\n")
    out.chmod(0o640)
    data = training_csv(tmp_path / "d.csv")
    model = tmp_path / "clf.gpunn"
    assert invoke("train", "--data", data, "--target", "y", "--epochs", "1", "--verbose", "0", "--save", model).exit_code == 0
    assert invoke("predict", model, data, "--out", out).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_text().startswith("prediction")


def test_the_training_input_is_never_overwritten(tmp_path):
    data = training_csv(tmp_path / "d.csv")
    before = data.read_bytes()
    link = tmp_path / "alias.csv"
    link.symlink_to(data)
    for target in (data, link):
        result = invoke("train", "--data", data, "--target", "y", "--epochs", "1", "--save", target)
        assert result.exit_code == 2 and "--save" in result.output and "training data" in result.output, result.output
        assert "Epoch" not in result.output  # refused before training
    model = tmp_path / "m.gpunn"
    assert invoke("train", "--data", data, "--target", "y", "--epochs", "1", "--verbose", "0", "--save", model).exit_code == 0
    for target, what in ((data, "input file"), (model, "model file")):
        result = invoke("predict", model, data, "--out", target)
        assert result.exit_code == 2 and "--out" in result.output and what in result.output, result.output
    assert data.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_non_regular_destinations_are_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"filepath: expected a regular file to write, got a named pipe \(FIFO\)"):
        small_model().save(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(ValueError, match="regular file"):
        gpunn.callbacks.ModelCheckpoint(fifo).on_train_begin()
    data = training_csv(tmp_path / "d.csv")
    result = invoke("train", "--data", data, "--target", "y", "--epochs", "1", "--save", fifo)
    assert result.exit_code == 2 and "--save" in result.output and "named pipe" in result.output, result.output
    model = tmp_path / "m.gpunn"
    assert invoke("train", "--data", data, "--target", "y", "--epochs", "1", "--verbose", "0", "--save", model).exit_code == 0
    result = invoke("predict", model, data, "--out", fifo)
    assert result.exit_code == 2 and "--out" in result.output and "named pipe" in result.output, result.output
    if os.path.exists("/dev/null"):
        result = invoke("predict", model, data, "--out", "/dev/null")
        assert result.exit_code == 2 and "character device" in result.output, result.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "m.gpunn"
    small_model(0).save(path)
    original = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        import gpunn
        from gpunn import saving
        gpunn.set_backend("numpy")
        model = gpunn.Sequential([gpunn.layers.Dense(3, input_dim=2), gpunn.layers.Dense(1)])
        model.build()
        def killed(f, data):
            f.write(data[:10]); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        saving._write_all = killed
        model.save({str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    left = [p.name for p in tmp_path.iterdir() if p.name != "m.gpunn"]
    assert len(left) == 1 and left[0].endswith(".tmp"), left
    assert path.read_bytes() == original
    small_model(1).save(tmp_path / "other.gpunn")  # any later save into the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gpunn", "other.gpunn"]


def test_a_save_in_progress_elsewhere_is_not_cleaned_up(tmp_path):
    """Only temporaries of dead processes on this host are removed: a live save keeps its file."""
    live = tmp_path / f".x.gpunn.{saving._TMP_TAG}-{saving._host_tag()}-{os.getppid()}-{'a' * 12}.tmp"
    other_host = tmp_path / f".y.gpunn.{saving._TMP_TAG}-{'0' * 8}-999999999-{'b' * 12}.tmp"
    live.write_bytes(b"x")
    other_host.write_bytes(b"y")
    small_model().save(tmp_path / "m.gpunn")
    assert live.exists() and other_host.exists()


# ------------------------------------------------------------ reading model files
def test_a_large_foreign_file_fails_after_reading_its_header(tmp_path):
    path = tmp_path / "big.gpunn"
    with open(path, "wb") as f:
        f.write((1000).to_bytes(8, "little") + json.dumps({"not": "a model"}).ljust(1000).encode())
        f.truncate(256 * 2**20)  # sparse: 256 MiB that take no disk
    tracemalloc.start()
    try:
        with pytest.raises(gpunn.ModelFileError, match="no gpunn metadata"):
            gpunn.load_model(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"read {peak:,} bytes of a file it should have rejected from its header"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_loading_a_fifo_fails_instead_of_blocking(tmp_path):
    fifo = tmp_path / "model.gpunn"
    os.mkfifo(fifo)
    errors = []

    def load():
        try:
            gpunn.load_model(fifo)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    blocked = thread.is_alive()
    if blocked:  # unblock the reader so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert not blocked, "load_model blocked on a FIFO"
    assert isinstance(errors[0], gpunn.ModelFileError) and "named pipe" in str(errors[0])


def _forged(tmp_path, edit):
    """A model file with a valid checksum over metadata changed by ``edit``."""
    import safetensors.numpy

    model = small_model()
    meta, tensors = saving.parse(saving.serialize(model))
    edit(meta)
    draft = safetensors.numpy.save(
        dict(tensors), metadata={saving._META_KEY: json.dumps(meta), saving._HASH_KEY: saving._PLACEHOLDER}
    )
    pos = saving._digest_position(draft, saving._PLACEHOLDER)
    path = tmp_path / "forged.gpunn"
    path.write_bytes(draft[:pos] + saving._whole_file_digest(draft, pos).encode() + draft[pos + 64 :])
    return path


def test_absurd_step_counters_are_rejected_at_load(tmp_path):
    path = _forged(tmp_path, lambda meta: meta["compile"].update(iterations=10**400))
    with pytest.raises(gpunn.ModelFileError, match=r"iteration count .*401 characters"):
        gpunn.load_model(path)


def test_absurd_layer_counts_are_rejected_before_building_layers(tmp_path, monkeypatch):
    built = []
    real = gpunn.layers.from_config
    monkeypatch.setattr(gpunn.layers, "from_config", lambda c: built.append(1) or real(c))

    def many_layers(meta):
        layer = meta["config"]["layers"][1]
        meta["config"]["layers"] = [dict(layer, name=f"d{i}") for i in range(50_000)]

    path = _forged(tmp_path, many_layers)
    with pytest.raises(gpunn.ModelFileError, match="declares 50000 layers"):
        gpunn.load_model(path)
    assert built == []


def test_user_metadata_round_trips_and_must_be_a_mapping(tmp_path):
    model = small_model()
    path = tmp_path / "m.gpunn"
    saving.save_model(model, path, user_metadata={"note": "hello", "values": [1.5, 2]})
    loaded, meta = saving.load_model_with_metadata(path, gpunn.Sequential)
    assert meta == {"note": "hello", "values": [1.5, 2]}
    assert np.array_equal(loaded.get_weights()[0], model.get_weights()[0])
    with pytest.raises(gpunn.ModelFileError, match="user metadata"):
        gpunn.load_model(_forged(tmp_path, lambda m: m.update(user_metadata=[1])))


# ------------------------------------------------------------ memory
def test_saving_needs_no_copies_of_the_file_in_memory(tmp_path):
    gpunn.set_seed(0)
    model = gpunn.Sequential([Dense(1024, input_dim=1024), Dense(1)])  # 1.05M float32 parameters, 4.2 MB
    model.compile(optimizer="sgd", loss="mse")
    model.build()
    size = model.count_params() * 4
    tracemalloc.start()
    try:
        model.save(tmp_path / "m.gpunn")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the weights are copied to host arrays once (get_weights); the file itself is streamed
    assert peak < 1.5 * size, f"saving a {size:,}-byte model peaked at {peak:,} bytes"
    assert np.array_equal(gpunn.load_model(tmp_path / "m.gpunn").get_weights()[0], model.get_weights()[0])


# ------------------------------------------------------------ checkpoint path templates
def test_checkpoint_template_with_a_missing_key_fails_before_training(tmp_path):
    m = small_model()
    before = [w.copy() for w in m.get_weights()]
    x, y = np.random.default_rng(0).normal(size=(20, 2)), np.ones((20, 1))
    ckpt = gpunn.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch:02d}-{val_los:.3f}.gpunn"))
    with pytest.raises(ValueError, match=r"'val_los'.*available keys are: epoch, loss, val_loss, learning_rate"):
        m.fit(x, y, epochs=2, verbose=0, validation_split=0.2, callbacks=[ckpt])
    assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), before))  # not one step taken
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="malformed template"):
        gpunn.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch.gpunn"))
    with pytest.raises(ValueError, match="must be named"):
        gpunn.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{}.gpunn"))
    good = gpunn.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch:02d}-{val_loss:.3f}.gpunn"))
    m.fit(x, y, epochs=2, verbose=0, validation_split=0.2, callbacks=[good])
    assert len(list(tmp_path.glob("ckpt-02-*.gpunn"))) == 1
