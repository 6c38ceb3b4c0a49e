"""Per-epoch progress: a tqdm bar with loss, metrics and ETA on a terminal,
one plain line per epoch otherwise (logs and CI output stay readable)."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

#: seconds between progress refreshes (each one reads the metrics back from the device)
REFRESH_SECONDS = 0.25


def format_logs(logs: dict) -> str:
    return " - ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in logs.items())


def resolve_verbose(verbose) -> int:
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose: expected 'auto', 0, 1 or 2, got {verbose!r}")
    return int(verbose)


class EpochProgress:
    """Progress for one training run; ``verbose`` 0 silent, 1 bar, 2 one line per epoch."""

    def __init__(self, verbose, epochs: int, steps: int, file=None):
        self.file = file or sys.stdout
        self.verbose = resolve_verbose(verbose)
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
    """Keras's one-line report of evaluate/predict: ``steps/steps - time - ms/step - logs``."""
    parts = [f"{steps}/{steps}", f"{elapsed:.2f}s", f"{elapsed / max(steps, 1) * 1e3:.2f}ms/step"]
    if logs:
        parts.append(format_logs(logs))
    print(" - ".join(parts), file=file or sys.stdout, flush=True)
