"""Training scenarios run by ``mpiexec -n 2`` jobs (tests/test_distributed.py) and, for the
single-process reference, in the test process itself.

    mpiexec -n 2 python tests/distributed_worker.py OUT_DIR SCENARIO[,SCENARIO...]
    mpiexec -n 2 python tests/distributed_worker.py OUT_DIR fail      # rank 1 raises mid-fit

Each rank writes ``OUT_DIR/<scenario>.rank<r>.npz`` (final weights, History) and the
files its callbacks and ``save`` write carry the rank in their names, so a test sees
which ranks wrote.  Tiny models and data: under the CUDA simulator every kernel
thread is Python.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import gpunn

ROWS = 50
FEATURES = 4


def _data(classes=1, seed=0, rows=ROWS):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    if classes == 1:
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    else:
        y = (np.abs(x[:, 0] * 2).astype(np.int64) % classes).astype(np.int64)
    weights = rng.uniform(0.2, 2.0, size=rows).astype(np.float32)
    return x, y, weights


def _model(optimizer, loss, outputs=1, activation="sigmoid", regularizer=None, metrics=("accuracy",)):
    gpunn.set_seed(7)
    model = gpunn.Sequential(
        [
            gpunn.Input(shape=(FEATURES,)),
            gpunn.layers.Dense(6, activation="tanh", kernel_regularizer=regularizer),
            gpunn.layers.Dense(outputs, activation=activation),
        ]
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return model


def sgd_momentum(out=None):
    """SGD with momentum, shuffled, 50 rows in global batches of 16 (16, 16, 16, 2); every
    rank writes its checkpoints, CSV log and saved model under names carrying its rank."""
    x, y, _ = _data()
    model = _model(gpunn.optimizers.SGD(learning_rate=0.1, momentum=0.9), "binary_crossentropy")
    callbacks = []
    if out is not None:
        tag = f"rank{gpunn.distributed.rank()}"
        callbacks = [
            gpunn.callbacks.ModelCheckpoint(os.path.join(out, f"ckpt_{tag}.gpunn"), monitor="loss"),
            gpunn.callbacks.CSVLogger(os.path.join(out, f"log_{tag}.csv")),
        ]
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=callbacks)
    if out is not None:
        model.save(os.path.join(out, f"saved_{tag}.gpunn"))
    extra = {"evaluate": model.evaluate(x, y, verbose=0, return_dict=True), "predict": model.predict(x[:5], verbose=0).tolist()}
    return model, history, extra


def adam_validation_split(out=None):
    """Adam, validation_split=0.2, global batch 7 (does not divide the 40 training rows)."""
    x, y, _ = _data(seed=1)
    model = _model("adam", "binary_crossentropy")
    history = model.fit(x, y, batch_size=7, epochs=3, verbose=0, validation_split=0.2)
    return model, history, {}


def rmsprop_weights_l2(out=None):
    """RMSprop, per-sample weights, an L2 kernel regularizer, global batch 9."""
    x, y, w = _data(seed=2)
    model = _model(gpunn.optimizers.RMSprop(learning_rate=0.01), "binary_crossentropy", regularizer=gpunn.regularizers.L2(0.01))
    history = model.fit(x, y, batch_size=9, epochs=3, verbose=0, sample_weight=w)
    return model, history, {}


def class_weights_tiny_batch(out=None):
    """Softmax with sparse labels, class weights, global batch 3: the last batch (2 rows) and
    with more ranks than rows some slices are empty."""
    x, y, _ = _data(classes=3, seed=3)
    # metrics whose states are (2, labels, thresholds) and (4, classes) arrays: summed across ranks too
    metrics = ("accuracy", gpunn.metrics.AUC(multi_label=True), gpunn.metrics.F1Score(average="macro"))
    model = _model("adam", "sparse_categorical_crossentropy", outputs=3, activation="softmax", metrics=metrics)
    history = model.fit(x, y, batch_size=3, epochs=2, verbose=0, class_weight={0: 1.0, 1: 2.0, 2: 0.5})
    return model, history, {}


def sharded(out=None):
    """Each rank passes its own (uneven) shard: rank 0 the first 30 rows, rank 1 the last 20."""
    x, y, w = _data(seed=4)
    model = _model("adam", "binary_crossentropy")
    r = gpunn.distributed.rank()
    rows = slice(0, 30) if r == 0 else slice(30, ROWS)
    with gpunn.distributed.sharded():
        history = model.fit(x[rows], y[rows], batch_size=10, epochs=2, verbose=0, shuffle=False, sample_weight=w[rows])
        evaluation = model.evaluate(x[rows], y[rows], verbose=0, return_dict=True)
    return model, history, {"evaluate": evaluation}


def sharded_reference():
    """The single-process equivalent of :func:`sharded`: each step trains on the union of
    the two ranks' slices (rank 0: 6 of its 30 rows per step, rank 1: 4 of its 20)."""
    x, y, w = _data(seed=4)
    model = _model("adam", "binary_crossentropy")
    losses = []
    for _epoch in range(2):
        for s in range(5):
            rows = np.r_[6 * s : 6 * (s + 1), 30 + 4 * s : 30 + 4 * (s + 1)]
            losses.append(model.train_on_batch(x[rows], y[rows], sample_weight=w[rows]))
    return model, model.evaluate(x, y, verbose=0, return_dict=True)


def diverges(out=None):
    """SGD with a huge learning rate on a regression: the loss turns non-finite in the first
    epoch; every rank must raise NonFiniteLossError and roll back to the same state."""
    x, y, _ = _data(seed=6)
    model = _model(gpunn.optimizers.SGD(learning_rate=1e4), "mse", activation="linear", metrics=())
    try:
        model.fit(x, y * 1e3, batch_size=10, epochs=3, verbose=0)
    except gpunn.NonFiniteLossError as exc:
        return model, gpunn.callbacks.History(), {"error": str(exc)}
    raise AssertionError("fit did not diverge")


def small_mixed(out=None):
    """For the CUDA simulator (slow): Adam, sample weights, L2, validation_split=0.25 of 16
    rows, global batch 11 over the 12 training rows (11, then 1: rank 0's slice is empty)."""
    x, y, w = _data(seed=5, rows=16)
    model = _model("adam", "binary_crossentropy", regularizer=gpunn.regularizers.L2(0.01))
    history = model.fit(x, y, batch_size=11, epochs=2, verbose=0, sample_weight=w, validation_split=0.25)
    return model, history, {}


SCENARIOS = {
    f.__name__: f
    for f in (sgd_momentum, adam_validation_split, rmsprop_weights_l2, class_weights_tiny_batch, sharded, diverges, small_mixed)
}


def fail(out):
    """Rank 1 raises from a callback in its second epoch, while rank 0 trains on."""

    class Boom(gpunn.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1 and gpunn.distributed.rank() == 1:
                raise RuntimeError("boom on rank 1")

    x, y, _ = _data()
    model = _model("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=8, epochs=50, verbose=0, callbacks=[Boom()])


def fail_outside_fit(out):
    """Rank 1 raises (uncaught) before fit, while rank 0 enters fit and waits for it."""
    if gpunn.distributed.rank() == 1:
        raise RuntimeError("boom on rank 1")
    x, y, _ = _data()
    _model("adam", "binary_crossentropy").fit(x, y, batch_size=8, epochs=50, verbose=0)


def main(out, names):
    gpunn.distributed.init()
    if names in ("fail", "fail_outside_fit"):
        {"fail": fail, "fail_outside_fit": fail_outside_fit}[names](out)
        return
    r = gpunn.distributed.rank()
    for name in names.split(","):
        model, history, extra = SCENARIOS[name](out)
        arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
        meta = {"history": history.history, "size": gpunn.distributed.size(), "nccl": gpunn.distributed.nccl_enabled(), **extra}
        np.savez(os.path.join(out, f"{name}.rank{r}.npz"), meta=json.dumps(meta), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
