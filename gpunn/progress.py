"""Per-epoch progress: a tqdm bar with loss, metrics and ETA on a terminal,
one plain line per epoch otherwise (logs and CI output stay readable)."""

from __future__ import annotations

import sys
import time

import numpy as np

from tqdm.auto import tqdm

from gpunn import checks, distributed

#: seconds between progress refreshes (each one reads the metrics back from the device)
REFRESH_SECONDS = 0.25


def format_logs(logs: dict) -> str:
    return " - ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in logs.items())


class EpochProgress:
    """Progress for one training run; ``verbose`` 0 silent, 1 bar, 2 one line per epoch."""

    def __init__(self, verbose, epochs: int, steps: int, file=None):
        self.file = file or sys.stdout
        self.verbose = checks.verbose(verbose)
        self.interactive = self.verbose == 1 and hasattr(self.file, "isatty") and self.file.isatty()
        self.epochs, self.steps = epochs, steps
        self._bar = None
        self._last = 0.0

    def epoch_begin(self, epoch: int):
        self._start = time.perf_counter()
        self._last = self._start
        if self.interactive:
            self._bar = tqdm(
                total=self.steps, desc=f"Epoch {epoch + 1}/{self.epochs}", unit="batch", file=self.file,
                leave=True, dynamic_ncols=True,
            )

    def due(self) -> bool:
        """Whether a refresh is due (only an interactive bar refreshes mid-epoch)."""
        if not self.interactive:
            return False
        now = time.perf_counter()
        if now - self._last >= REFRESH_SECONDS:
            self._last = now
            return True
        return False

    def update(self, step: int, logs: dict):
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(format_logs(logs), refresh=False)
            self._bar.refresh()

    def epoch_end(self, epoch: int, step: int, logs: dict):
        elapsed = time.perf_counter() - self._start
        if self._bar is not None:
            self.update(step, logs)
            self._bar.close()
            self._bar = None
        elif self.verbose:
            per_step = elapsed / max(step, 1)
            print(
                f"Epoch {epoch + 1}/{self.epochs} - {step}/{self.steps} - {elapsed:.2f}s - "
                f"{per_step * 1e3:.2f}ms/step - {format_logs(logs)}",
                file=self.file,
                flush=True,
            )


def summary_line(steps: int, elapsed: float, logs: dict, file=None) -> None:
    """Keras's one-line report of evaluate/predict: ``steps/steps - time - ms/step - logs``
    (printed by the main process of a distributed run only)."""
    if not distributed.is_main():
        return
    parts = [f"{steps}/{steps}", f"{elapsed:.2f}s", f"{elapsed / max(steps, 1) * 1e3:.2f}ms/step"]
    if logs:
        parts.append(format_logs(logs))
    print(" - ".join(parts), file=file or sys.stdout, flush=True)


def _layer_rows(model):
    """One summary row per layer, with the total and trainable parameter counts."""
    rows, total, trainable, dim = [], 0, 0, model.input_dim
    for layer in model.layers:
        specs = [] if dim is None else layer.weight_specs(dim)
        count = sum(spec.size for spec in specs)
        total += count
        trainable += sum(spec.size for spec in specs if spec.trainable) if layer.trainable else 0
        dim = layer.compute_output_dim(dim)
        kind = type(layer).__name__ + ("" if layer.trainable else ", frozen")
        shape = f"(None, {dim if dim is not None else '?'})"
        rows.append((f"{layer.name} ({kind})", shape, "?" if model.input_dim is None else f"{count:,}", layer.activation.name))
    return rows, total, trainable


def model_summary(model, backend_name: str, print_fn=print) -> None:
    """Keras's table of a model's layers, output shapes and parameter counts, with the
    trainable and non-trainable totals."""
    rows = [("Layer (type)", "Output Shape", "Param #", "Activation")]
    layer_rows, total, trainable = _layer_rows(model)
    rows += layer_rows
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(4)]
    line = "-" * sum(widths)
    print_fn(f'Model: "{model.name}"')
    print_fn(line)
    print_fn("".join(c.ljust(w) for c, w in zip(rows[0], widths)))
    print_fn("=" * sum(widths))
    for r in rows[1:]:
        print_fn("".join(c.ljust(w) for c, w in zip(r, widths)))
    print_fn("=" * sum(widths))
    size = model.dtype.itemsize
    if model.input_dim:
        print_fn(f"Total params: {total:,} ({total * size / 1024:.2f} KB)")
        print_fn(f"Trainable params: {trainable:,} ({trainable * size / 1024:.2f} KB)")
        print_fn(f"Non-trainable params: {total - trainable:,} ({(total - trainable) * size / 1024:.2f} KB)")
    else:
        print_fn("Total params: unknown (model not built)")
    print_fn(f"Input features: {model.input_dim}   Backend: {backend_name}   dtype: {model.dtype}")
    print_fn(line)
