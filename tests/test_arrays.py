"""Arrays users already have: pandas DataFrames/Series, DLPack objects, device arrays out of predict."""

import numpy as np
import pandas as pd
import pytest

import gpunn
from gpunn import checks as check
from gpunn._cuda import cuda_status


@pytest.fixture(autouse=True)
def numpy_backend():
    gpunn.set_backend("numpy")
    yield
    gpunn.set_backend("numpy")


def frame_data(seed=0, n=48):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"age": rng.normal(40, 9, n), "income": rng.normal(3, 1, n), "smoker": rng.random(n) > 0.5})
    y = pd.Series((frame["age"] > 40).astype(int), name="outcome")
    return frame, y


def compiled(n_inputs=None, seed=0):
    gpunn.set_seed(seed)
    layers = [gpunn.layers.Dense(4, activation="tanh"), gpunn.layers.Dense(1, activation="sigmoid")]
    model = gpunn.Sequential(([gpunn.Input(shape=(n_inputs,))] if n_inputs else []) + layers)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def test_dataframe_names_are_remembered_and_matched_in_any_order():
    frame, y = frame_data()
    model = compiled()
    model.fit(frame, y, epochs=2, batch_size=16, verbose=0, sample_weight=pd.Series(np.ones(len(y))))
    assert model.feature_names == ["age", "income", "smoker"]
    expected = model.predict(frame.to_numpy(dtype=np.float64), verbose=0)  # plain arrays still work, by position
    shuffled = frame[["smoker", "age", "income"]]
    assert np.array_equal(model.predict(shuffled, verbose=0), expected)
    assert model.evaluate(shuffled, y, verbose=0, return_dict=True) == model.evaluate(frame, y, verbose=0, return_dict=True)
    with pytest.raises(ValueError, match=r"x: .*missing column\(s\) \['smoker'\].*unexpected column\(s\) \['smokes'\]"):
        model.predict(frame.rename(columns={"smoker": "smokes"}), verbose=0)
    with pytest.raises(ValueError, match=r"validation_data x: .*missing column\(s\) \['income'\]"):
        model.fit(frame, y, epochs=1, verbose=0, validation_data=(frame.drop(columns="income"), y))


@pytest.mark.parametrize(
    "column, values, error",
    [
        ("colour", pd.Categorical(["red", "blue"] * 24), "column 'colour' has dtype category.*get_dummies"),
        ("colour", ["red", "blue"] * 24, "column 'colour' has dtype (object|str).*OneHotEncoder"),
        ("when", pd.date_range("2020-01-01", periods=48), "column 'when' has dtype datetime64"),
    ],
)
def test_non_numeric_columns_are_refused_naming_the_column(column, values, error):
    frame, y = frame_data()
    frame[column] = values
    with pytest.raises(TypeError, match=error):
        compiled().fit(frame, y, epochs=1, verbose=0)


def test_nullable_and_missing_values():
    frame, y = frame_data()
    frame["visits"] = pd.array(np.arange(48), dtype="Int64")  # nullable integers are numbers
    model = compiled()
    model.fit(frame, y, epochs=1, verbose=0)
    frame.loc[5, "visits"] = pd.NA
    with pytest.raises(ValueError, match=r"column 'visits' has a missing value \(NaN/NA\) at row 5"):
        model.predict(frame, verbose=0)
    labels = pd.Series(["yes", "no"] * 24, name="outcome")
    with pytest.raises(TypeError, match="y: column 'outcome' has dtype .*LabelEncoder"):
        compiled().fit(frame_data()[0], labels, epochs=1, verbose=0)


class DLPackOnly:
    """An array known only through the DLPack protocol (as a JAX or PyTorch CPU array is)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

    def __len__(self):
        return len(self._array)


def test_dlpack_host_memory_is_taken_without_a_copy():
    data = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    taken = check.features(DLPackOnly(data), np.float32)
    assert np.shares_memory(taken, data)
    model = compiled(3)
    model.fit(DLPackOnly(data), DLPackOnly(np.arange(10.0) % 2), epochs=1, verbose=0)
    assert np.array_equal(model.predict(DLPackOnly(data), verbose=0), model.predict(data, verbose=0))


def test_torch_tensors_including_ones_that_require_grad():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (an optional check of DLPack input)")
    data = torch.randn(12, 3)
    assert np.shares_memory(check.features(data, np.float32), data.numpy())  # CPU tensor: no copy
    grad = data.clone().requires_grad_(True)
    model = compiled(3)
    model.fit(grad, torch.arange(12) % 2, epochs=1, verbose=0)
    assert np.array_equal(model.predict(grad, verbose=0), model.predict(data.numpy(), verbose=0))
    assert grad.requires_grad  # the caller's tensor is left as it was


def test_device_checks_report_like_the_host_ones():
    """The device-side feature checks (run here with NumPy as the array module) say what the host ones say."""
    good = np.arange(6, dtype=np.float64).reshape(3, 2)
    assert check._device_features(good, np.float32, 2, "x", np).dtype == np.float32
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="x: expected finite values, found NaN at row 2, column 1"):
        check._device_features(bad, np.float32, 2, "x", np)
    bad[2, 1] = 1e300
    with pytest.raises(ValueError, match="representable in float32, got 1e\\+300 at row 2, column 1"):
        check._device_features(bad, np.float32, 2, "x", np)
    with pytest.raises(ValueError, match="the model expects 3 features"):
        check._device_features(good, np.float32, 3, "x", np)


def test_predict_can_return_the_backends_own_array():
    model = compiled(3)
    x = np.random.default_rng(2).normal(size=(5, 3))
    native = model.predict(x, verbose=0, return_device_array=True)
    assert isinstance(native, model.backend.xp.ndarray)
    assert np.array_equal(native, model.predict(x, verbose=0))


_REAL_GPU = cuda_status().usable and not cuda_status().simulator


@pytest.mark.gpu
@pytest.mark.skipif(not _REAL_GPU, reason="needs a real CUDA GPU (numba.cuda.is_available() is False / simulator on)")
def test_gpu_arrays_stay_on_the_device():
    gpunn.set_backend("cuda")
    model = compiled(3)
    xp = model.backend.xp
    x = xp.asarray(np.random.default_rng(3).normal(size=(40, 3)), dtype=xp.float32)
    assert check.features(x, np.float32, 3, "x", xp=xp).data.ptr == x.data.ptr  # no copy
    model.fit(x, xp.arange(40) % 2, epochs=1, verbose=0)
    native = model.predict(x, verbose=0, return_device_array=True)
    assert isinstance(native, xp.ndarray)
    assert np.allclose(xp.asnumpy(native), model.predict(xp.asnumpy(x), verbose=0))
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        tensor = torch.randn(8, 3, device="cuda", requires_grad=True)
        assert np.allclose(model.predict(tensor, verbose=0), model.predict(tensor.detach().cpu().numpy(), verbose=0), atol=1e-6)


def test_names_are_remembered_only_from_data_that_passed_the_checks():
    frame, y = frame_data()
    model = compiled()
    frame["colour"] = ["red", "blue"] * 24
    with pytest.raises(TypeError, match="colour"):
        model.fit(frame, y, epochs=1, verbose=0)
    assert model.feature_names is None
    model.fit(frame.drop(columns="colour"), y, epochs=1, verbose=0)
    assert model.feature_names == ["age", "income", "smoker"]


class DeviceOnly(DLPackOnly):
    """GPU-resident data as a CPU backend sees it: NumPy cannot read it in place."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kwargs):
        raise BufferError("cannot export CUDA memory to this consumer")


class CupyLike(DeviceOnly):
    def get(self):  # CuPy's explicit copy to the host
        return self._array.copy()


def test_gpu_data_on_the_cpu_backend_is_copied_or_refused_clearly():
    data = np.random.default_rng(4).normal(size=(6, 3))
    copied = check.features(CupyLike(data), np.float64)
    assert np.array_equal(copied, data) and not np.shares_memory(copied, data)
    with pytest.raises(TypeError, match=r"x: a DeviceOnly in CUDA memory cannot be copied to the host here .*tensor.cpu\(\)"):
        check.features(DeviceOnly(data), np.float64)
