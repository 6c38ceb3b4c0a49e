"""Dropout: the Philox mask generator, its statistics, and Dense -> Dropout folded into the fused call.

The mask is defined by ``gpunn.opmath.dropout_keep`` (Philox4x32-10 of the
element index, the training step and the layer seed); the generator is
checked against Random123's published known answers, and everything else
against that definition (``numpy_ops.dropout_keep``), never against gpunn's
own output alone.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from helpers import backend_params, make_backend, regression_data, weights_equal

import gpunn
from gpunn import layers, opmath
from gpunn._cuda import cuda_status
from gpunn.backend import numpy_ops
from gpunn.layers import Dense
from gpunn.random import DropoutSpec

U = np.uint64

# Random123 (D. E. Shaw Research), tests/kat_vectors, the three "philox4x32 10" lines:
# counter (4 words), key (2 words) -> output (4 words), all hex uint32.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@numba.njit
def _philox_njit(c0, c1, c2, c3, k0, k1):
    return opmath.philox4x32_10(c0, c1, c2, c3, k0, k1)


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox4x32_10_known_answers(counter, key, expected):
    args = [U(v) for v in counter + key]
    assert [int(w) for w in opmath.philox4x32_10(*args)] == list(expected)  # as Python (the simulator)
    assert [int(w) for w in _philox_njit(*args)] == list(expected)  # compiled (the CPU passes)
    # on whole uint64 arrays (the NumPy reference): every element its own answer
    arrays = [np.full(3, v, np.uint64) for v in counter + key]
    assert [w.tolist() for w in opmath.philox4x32_10(*arrays)] == [[v] * 3 for v in expected]


def test_uniform_draw_is_exact_in_float32_and_keep_means_u_at_least_rate():
    bits = opmath.dropout_bits(np.arange(20000, dtype=np.uint64), U(5), U(77))
    assert bits.max() < 2**24
    u64 = bits.astype(np.float64) * 2.0**-24
    u32 = bits.astype(np.float32) * np.float32(2.0**-24)
    np.testing.assert_array_equal(u32.astype(np.float64), u64)  # 24 bits: exact in float32
    for rate in (0.1, 0.3, 1 / 3, 0.5, 0.9):
        spec = DropoutSpec(rate, 77, np.array([5], np.int64))
        keep = opmath.dropout_keep(np.arange(20000, dtype=np.uint64), U(5), U(77), U(spec.threshold))
        np.testing.assert_array_equal(keep, u64 >= rate)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_kept_fraction_is_within_a_binomial_bound(rate):
    n = 200_000
    spec = DropoutSpec(rate, 2024, np.array([3], np.int64))
    kept = numpy_ops.dropout_keep(spec, (400, 500)).mean()
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(kept - (1 - rate)) < 5 * sigma, (kept, 1 - rate, sigma)


def test_masks_differ_across_steps_seeds_and_elements():
    base = numpy_ops.dropout_keep(DropoutSpec(0.5, 1, np.array([0], np.int64)), (64, 64))
    for other in (DropoutSpec(0.5, 1, np.array([1], np.int64)), DropoutSpec(0.5, 2, np.array([0], np.int64))):
        agree = (numpy_ops.dropout_keep(other, (64, 64)) == base).mean()
        assert 0.45 < agree < 0.55  # independent masks agree on about half the elements
    # neighbouring elements are not correlated
    flat = base.ravel().astype(float)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.05
    # the same spec twice: the same mask
    np.testing.assert_array_equal(numpy_ops.dropout_keep(DropoutSpec(0.5, 1, np.array([0], np.int64)), (64, 64)), base)


def test_dropout_spec_checks_its_fields():
    with pytest.raises(ValueError, match="rate"):
        DropoutSpec(1.0, 1, np.zeros(1, np.int64)).check()
    with pytest.raises(ValueError, match="seed"):
        DropoutSpec(0.5, -1, np.zeros(1, np.int64)).check()
    with pytest.raises(ValueError, match="step"):
        DropoutSpec(0.5, 1, np.zeros(2, np.int64)).check()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="first_row"):
            DropoutSpec(0.5, 1, np.zeros(1, np.int64), bad).check()


def test_a_row_shards_mask_is_those_rows_of_the_whole_batch_mask():
    """first_row: rows [lo, hi) of a batch drawn alone get the whole batch's mask rows, in the
    reference and in both CPU passes (the fused forward and Dropout on its own)."""
    from gpunn.backend.numpy_backend import NumpyBackend

    step = np.array([9], np.int64)
    whole = numpy_ops.dropout_keep(DropoutSpec(0.5, 77, step), (20, 13))
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((20, 6)), rng.standard_normal((6, 13)), rng.standard_normal(13)
    backend = NumpyBackend()
    y_whole, z_whole = np.empty((20, 13)), np.empty((20, 13))
    backend.linear_forward(x, w, b, gpunn.codes.Act.TANH, 0.0, y_whole, z_whole, dropout=DropoutSpec(0.5, 77, step))
    mask_whole, out_whole = np.empty((20, 6)), np.empty((20, 6))
    backend.dropout(x, out_whole, mask_whole, DropoutSpec(0.3, 5, step))
    for lo, hi in [(0, 7), (7, 20), (13, 14)]:
        spec = DropoutSpec(0.5, 77, step, lo)
        np.testing.assert_array_equal(numpy_ops.dropout_keep(spec, (hi - lo, 13)), whole[lo:hi])
        y, z = np.full((hi - lo, 13), np.nan), np.full((hi - lo, 13), np.nan)
        backend.linear_forward(x[lo:hi], w, b, gpunn.codes.Act.TANH, 0.0, y, z, dropout=spec)
        np.testing.assert_array_equal(y == 0, ~whole[lo:hi])
        np.testing.assert_allclose(y, y_whole[lo:hi], rtol=1e-12, atol=1e-15)  # one row: BLAS gemv rounds otherwise
        mask, out = np.full((hi - lo, 6), np.nan), np.full((hi - lo, 6), np.nan)
        backend.dropout(x[lo:hi], out, mask, DropoutSpec(0.3, 5, step, lo))
        np.testing.assert_array_equal(mask, mask_whole[lo:hi])
        np.testing.assert_array_equal(out, out_whole[lo:hi])
    assert not np.array_equal(numpy_ops.dropout_keep(DropoutSpec(0.5, 77, step, 7), (13, 13)), whole[:13])


@pytest.mark.simulator
def test_the_cuda_backend_refuses_a_row_shards_dropout():
    backend = make_backend("cuda")
    x = backend.asarray(np.ones((3, 2)))
    spec = DropoutSpec(0.5, 1, backend.asarray(np.zeros(1, np.int64)), 2)
    with pytest.raises(ValueError, match="first_row must be 0 on the CUDA backend"):
        backend.dropout(x, backend.empty((3, 2), np.float64), backend.empty((3, 2), np.float64), spec)


# ------------------------------------------------------------------ in a model


def _model(backend="numpy", rate=0.5, dtype="float64", act="tanh", seed=3, lr=0.05):
    with gpunn.use_backend(backend):
        gpunn.set_seed(seed)
        model = gpunn.Sequential(
            [
                gpunn.Input(shape=(5,)),
                layers.Dense(7, activation=act),
                layers.Dropout(rate, seed=11),
                layers.Dense(6, activation="relu"),
                layers.Dropout(rate / 2, seed=12),
                layers.Dense(1),
            ],
            dtype=dtype,
        )
        model.compile(optimizer=gpunn.optimizers.SGD(learning_rate=lr), loss="mse")
    return model


def _unfolded(monkeypatch):
    monkeypatch.setattr(Dense, "folds", lambda self, layer, activation: False)


def test_dense_dropout_pairs_are_folded_in_training():
    model = _model()
    x, y = regression_data(0, n=16, features=5)
    model.train_on_batch(x, y)
    trainer = model._trainer
    steps = trainer.steps(trainer.objective.train_activations)
    assert [(s.first, s.last, type(s.folded).__name__) for s in steps] == [(0, 1, "Dropout"), (2, 3, "Dropout"), (4, 4, "NoneType")]
    # the step the masks were keyed by reached the kernels through the step record (a device array)
    assert trainer.record.step.tolist() == [0] and model.optimizer.iterations == 1


def test_training_forward_applies_the_reference_mask_and_its_loss_and_gradient_match(monkeypatch):
    """float64: the folded model's training loss is the NumPy formula with the reference masks,
    and its gradient (fixed step, so fixed masks) matches central finite differences."""
    model = _model(rate=0.4)
    x, y = regression_data(1, n=12, features=5)
    (w1, b1, w2, b2, w3, b3) = model.get_weights()
    step = model.optimizer.iterations

    def masks(rate, seed, shape):
        return numpy_ops.dropout_mask(DropoutSpec(rate, seed, np.array([step], np.int64)), shape, np.float64)

    h1 = np.tanh(x @ w1 + b1) * masks(0.4, 11, (12, 7))
    h2 = np.maximum(h1 @ w2 + b2, 0) * masks(0.2, 12, (12, 6))
    expected = np.mean((h2 @ w3 + b3 - y) ** 2)

    def training_loss():
        kept = model.params.copy()
        model.optimizer.iterations = step  # the same step: the same masks
        loss = model.train_on_batch(x, y)  # the loss of the forward before the update
        model.params[...] = kept
        return loss

    assert training_loss() == pytest.approx(expected, rel=1e-12)
    params = model.params
    numeric = np.empty(params.shape[0])
    for i in range(params.shape[0]):
        keep = params[i]
        params[i] = keep + 1e-6
        up = training_loss()
        params[i] = keep - 1e-6
        down = training_loss()
        params[i] = keep
        numeric[i] = (up - down) / 2e-6
    model.optimizer.iterations = step
    before = params.copy()
    model.train_on_batch(x, y)
    analytic = (before - model.params) / 0.05
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", list(backend_params()))
def test_folded_and_unfolded_give_the_same_numbers(monkeypatch, backend):
    """rate 0.5 scales by 2 (exact): forward and backward are then bitwise equal folded or not;
    another rate rounds dy * (act' * m) and (dy * m) * act' differently, within an ulp or so."""
    x, y = regression_data(2, n=20, features=5)
    runs = {}
    for folded in (True, False):
        with monkeypatch.context() as m:
            if not folded:
                _unfolded(m)
            for rate in (0.5, 0.3):
                model = _model(backend, rate=rate, dtype="float32")
                model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
                trainer = model._trainer
                assert any(s.folded for s in trainer.steps(trainer.objective.train_activations)) == folded
                runs[folded, rate] = model.get_weights()
    assert weights_equal(runs[True, 0.5], runs[False, 0.5])
    for a, b in zip(runs[True, 0.3], runs[False, 0.3]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.simulator
def test_whole_model_training_agrees_across_backends():
    status = cuda_status()
    if not status.usable:
        pytest.skip(f"the CUDA backend cannot run here: {status.reason}")
    x, y = regression_data(3, n=20, features=5)
    weights = {}
    for backend in ("numpy", "cuda"):
        model = _model(backend, rate=0.3, act="gelu")
        model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        weights[backend] = model.get_weights()
    for a, b in zip(weights["numpy"], weights["cuda"]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_reproducible_under_set_seed_and_layer_seeds_matter():
    x, y = regression_data(4, n=24, features=5)

    def train(seed):
        model = _model(seed=seed)
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        return model.get_weights()

    assert weights_equal(train(5), train(5))
    # default layer seeds come from gpunn's generator
    gpunn.set_seed(9)
    a = layers.Dropout(0.5).seed
    gpunn.set_seed(9)
    assert layers.Dropout(0.5).seed == a


def test_inference_is_the_identity_for_dropout():
    model = _model()
    x, _ = regression_data(5, n=10, features=5)
    (w1, b1, w2, b2, w3, b3) = model.get_weights()
    expected = np.maximum(np.tanh(x @ w1 + b1) @ w2 + b2, 0) @ w3 + b3
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-12)


def test_save_load_resume_is_bit_exact_with_folded_dropout(tmp_path):
    x, y = regression_data(6, n=32, features=5)
    model = _model(rate=0.3)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    model.save(tmp_path / "m.gpunn")
    loaded = gpunn.load_model(tmp_path / "m.gpunn")
    assert loaded.optimizer.iterations == model.optimizer.iterations
    model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    loaded.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert weights_equal(loaded.get_weights(), model.get_weights())
    assert loaded._trainer.record.step.tolist() == [loaded.optimizer.iterations - 1]
