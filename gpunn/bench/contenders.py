"""The contenders a benchmark compares, and the reference MLP they all train.

Each contender builds a trainer for given layer sizes, optimizer, learning
rate and (optionally) initial weights; a trainer runs one ``epoch(x, y,
batch)``, predicts class labels and (gpunn, PyTorch) returns its weights in
Keras layout, so gpunn and PyTorch can start from the same weights and be
checked against each other.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass

import numpy as np

from gpunn.bench.machine import gpu_description, version_of

#: The reference MLP: input, hidden, hidden, classes.
REFERENCE_DIMS = (784, 256, 256, 10)

#: Row labels of the report.
GPUNN_NUMPY = "gpunn (numpy)"
GPUNN_CUDA = "gpunn (cuda)"
TORCH_CPU = "PyTorch CPU"
TORCH_CUDA = "PyTorch CUDA"
SKLEARN = "scikit-learn MLPClassifier"


def layer_shapes(dims=REFERENCE_DIMS):
    """(fan_in, fan_out) of each Dense layer."""
    return list(zip(dims[:-1], dims[1:]))


def forward_flops_per_sample(dims=REFERENCE_DIMS) -> int:
    """Multiply-adds of the linear layers, counted as 2 FLOPs each."""
    return sum(2 * k * n for k, n in layer_shapes(dims))


def train_flops_per_sample(dims=REFERENCE_DIMS) -> int:
    """Forward + weight gradient (every layer) + data gradient (all but the first layer)."""
    shapes = layer_shapes(dims)
    weight_grad = sum(2 * k * n for k, n in shapes)
    data_grad = sum(2 * k * n for k, n in shapes[1:])
    return forward_flops_per_sample(dims) + weight_grad + data_grad


def synthetic_data(n: int, dims=REFERENCE_DIMS, seed: int = 0):
    """MNIST-shaped data: pixels in [0, 1], labels from a fixed random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, dims[0]), dtype=np.float32)
    teacher = rng.standard_normal((dims[0], dims[-1])).astype(np.float32)
    y = np.argmax((x - 0.5) @ teacher, axis=1).astype(np.int64)
    return x, y


def digits_data(seed: int = 0):
    """The embedded digits data set, split 70/30 (stratified) and standardised on the training part."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from gpunn import datasets

    digits = datasets.load("digits")
    x_tr, x_te, y_tr, y_te = train_test_split(digits.X, digits.y, test_size=0.3, random_state=seed, stratify=digits.y)
    scaler = StandardScaler().fit(x_tr)
    return scaler.transform(x_tr).astype(np.float32), y_tr, scaler.transform(x_te).astype(np.float32), y_te


class GpunnTrainer:
    """A compiled gpunn ``Sequential`` of ``dims`` (ReLU hidden layers, softmax output) on one backend."""

    def __init__(self, backend_name, dims, optimizer, lr, weights=None):
        import gpunn

        self.backend_name = backend_name
        with gpunn.use_backend(backend_name):
            layers = [gpunn.layers.Dense(n, activation="relu") for n in dims[1:-1]]
            layers.append(gpunn.layers.Dense(dims[-1], activation="softmax"))
            self.model = gpunn.Sequential([gpunn.Input(shape=(dims[0],)), *layers], dtype="float32")
            opt = gpunn.optimizers.SGD(learning_rate=lr) if optimizer == "sgd" else gpunn.optimizers.Adam(learning_rate=lr)
            self.model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
            self.model.build()
        if weights is not None:
            self.model.set_weights(weights)

    def epoch(self, x, y, batch):
        self.model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
        self.model.backend.synchronize()

    def predict(self, x):
        return np.argmax(self.model.predict(x, batch_size=1024, verbose=0), axis=1)

    def weights(self):
        return self.model.get_weights()


class TorchTrainer:
    """An idiomatic PyTorch loop: nn.Sequential, CrossEntropyLoss, torch.optim, index-gathered batches.

    ``orders``: an optional np.random.Generator replaying gpunn's shuffles, so
    both see the very same batches; else ``torch.randperm``.
    """

    def __init__(self, device, dims, optimizer, lr, weights=None, orders=None):
        import torch
        from torch import nn

        self.torch, self.device = torch, torch.device(device)
        mods = []
        for i, (k, n) in enumerate(layer_shapes(dims)):
            mods.append(nn.Linear(k, n))
            if i < len(dims) - 2:
                mods.append(nn.ReLU())
        self.model = nn.Sequential(*mods).to(self.device)
        if weights is not None:
            linears = [m for m in self.model if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for lin, (kernel, bias) in zip(linears, zip(weights[::2], weights[1::2])):
                    lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
                    lin.bias.copy_(torch.from_numpy(bias))
        params = self.model.parameters()
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr)
        else:
            self.opt = torch.optim.Adam(params, lr=lr, eps=1e-7)
        self.loss_fn = nn.CrossEntropyLoss()
        self.orders = orders
        self._data = None

    def _tensors(self, x, y):
        if self._data is None or self._data[0] is not x:
            t = self.torch
            self._data = (x, t.from_numpy(x).to(self.device), t.from_numpy(y).to(self.device))
        return self._data[1], self._data[2]

    def epoch(self, x, y, batch):
        torch = self.torch
        X, Y = self._tensors(x, y)
        n = X.shape[0]
        if self.orders is not None:
            perm = torch.from_numpy(self.orders.permutation(n)).to(self.device)
        else:
            perm = torch.randperm(n, device=self.device)
        self.model.train()
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(X[idx]), Y[idx])
            loss.backward()
            self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def predict(self, x):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.from_numpy(x).to(self.device))
        return out.argmax(dim=1).cpu().numpy()

    def weights(self):
        out = []
        for m in self.model:
            if hasattr(m, "weight"):
                out += [m.weight.detach().cpu().numpy().T, m.bias.detach().cpu().numpy()]
        return out


class SklearnTrainer:
    """``MLPClassifier``; one ``partial_fit`` is one epoch (its own initial weights)."""

    def __init__(self, dims, optimizer, lr, batch=32, seed=0):
        from sklearn.neural_network import MLPClassifier

        self.dims = dims
        self.clf = MLPClassifier(
            hidden_layer_sizes=tuple(dims[1:-1]),
            activation="relu",
            solver=optimizer,
            alpha=0.0,
            batch_size=batch,
            learning_rate_init=lr,
            momentum=0.0,
            epsilon=1e-7,
            shuffle=True,
            random_state=seed,
        )
        self.classes = np.arange(dims[-1])

    def epoch(self, x, y, batch):
        self.clf.batch_size = batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.clf.partial_fit(x, y, classes=self.classes)

    def predict(self, x):
        return self.clf.predict(x)


@dataclass
class Contender:
    name: str
    make: object  # (dims, optimizer, lr, weights, orders) -> trainer
    device: str = "cpu"  # where it computes: its figures name that device and use its ceiling


def contenders(include_cuda=True):
    """(present contenders, {absent name: reason})."""
    present, absent = [], {}
    present.append(Contender(GPUNN_NUMPY, lambda d, o, lr, w, r: GpunnTrainer("numpy", d, o, lr, w)))
    desc, cuda_ok = gpu_description()
    if cuda_ok and include_cuda:
        present.append(Contender(GPUNN_CUDA, lambda d, o, lr, w, r: GpunnTrainer("cuda", d, o, lr, w), "gpu"))
    else:
        reason = desc[len("none (") : -1] if desc.startswith("none (") and desc.endswith(")") else desc
        absent[GPUNN_CUDA] = reason if not cuda_ok else "skipped"
    torch_version = version_of("torch")
    if torch_version and not torch_version.startswith("import failed"):
        present.append(Contender(TORCH_CPU, lambda d, o, lr, w, r: TorchTrainer("cpu", d, o, lr, w, r)))
        import torch

        if torch.cuda.is_available() and include_cuda:
            present.append(Contender(TORCH_CUDA, lambda d, o, lr, w, r: TorchTrainer("cuda", d, o, lr, w, r), "gpu"))
        else:
            absent[TORCH_CUDA] = "torch.cuda.is_available() is False"
    else:
        reason = torch_version or "not installed"
        absent[TORCH_CPU] = reason
        absent[TORCH_CUDA] = reason
    sk_version = version_of("sklearn")
    if sk_version and not sk_version.startswith("import failed"):
        present.append(Contender(SKLEARN, lambda d, o, lr, w, r: SklearnTrainer(d, o, lr)))
    else:
        absent[SKLEARN] = sk_version or "not installed"
    return present, absent


@contextlib.contextmanager
def torch_threads(n):
    """Give PyTorch the same intra-op thread count as NumPy's BLAS, restored afterwards."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
