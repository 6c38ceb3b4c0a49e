"""Timed windows, interleaved, and how far to trust the figure they give.

A benchmark figure is the fastest of several timed windows: on a shared
machine, the fastest window is the one least disturbed by other work.  That
is only trustworthy when it can be reproduced, so a figure counts as
*reliable* when its ``quorum`` fastest windows agree within ``margin``
(relative to the fastest).  When some figure of a group is not reliable, the
whole group (every contender, interleaved again, so that ratios stay fair) is
given ``retry_windows`` more windows, up to ``retries`` times, before the
figure is reported as unreliable.

Nothing here reads a clock except through the callables it is given, so the
logic is tested with fake timings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """How many windows a figure gets and when it is believed.

    windows: timed windows per figure in the first round (>= quorum).
    quorum: how many of the fastest windows must agree.
    margin: how far (relative to the fastest) they may disagree.
    retry_windows: windows added to every figure of a group per retry.
    retries: retry rounds before an unreliable figure is given up on.
    """

    windows: int
    quorum: int
    margin: float
    retry_windows: int
    retries: int

    def __post_init__(self):
        if self.quorum < 1 or self.windows < self.quorum:
            raise ValueError(f"Policy: need 1 <= quorum <= windows, got quorum={self.quorum}, windows={self.windows}")
        if not self.margin > 0:
            raise ValueError(f"Policy: margin must be > 0, got {self.margin}")
        if self.retries < 0 or (self.retries and self.retry_windows < 1):
            raise ValueError(f"Policy: retries={self.retries} needs retry_windows >= 1, got {self.retry_windows}")

    def describe(self) -> str:
        return (
            f"fastest of at least {self.windows} windows; reliable when the {self.quorum} fastest agree within "
            f"{self.margin:.0%}, else up to {self.retries} retries of {self.retry_windows} more windows each"
        )


def spread(seconds, quorum: int) -> float:
    """Relative gap between the fastest window and the ``quorum``-th fastest (inf with fewer windows)."""
    ordered = sorted(seconds)
    if len(ordered) < quorum or not ordered:
        return math.inf
    fastest = ordered[0]
    if fastest <= 0:
        return math.inf
    return ordered[quorum - 1] / fastest - 1.0


@dataclass(frozen=True)
class Timing:
    """The windows behind one figure and the verdict on them (``best`` is the figure, in seconds)."""

    seconds: tuple
    spread: float
    reliable: bool
    retries: int = 0

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def windows(self) -> int:
        return len(self.seconds)


def judge(seconds, policy: Policy, retries: int = 0) -> Timing:
    s = spread(seconds, policy.quorum)
    return Timing(tuple(seconds), s, s <= policy.margin, retries)


def measure(runners: dict[str, Callable[[], float]], policy: Policy, on_retry=None) -> dict[str, Timing]:
    """Time every runner in interleaved windows; retry the group while a figure is unreliable.

    ``runners`` maps a name to a callable that runs one window and returns
    its seconds.  Windows alternate the order (A, B, C, then C, B, A, ...) so
    that no contender always runs right after the same one.  ``on_retry(n,
    unreliable_names)`` is told before each retry round.  Returns the
    ``Timing`` of each name, with all of its windows.
    """
    names = list(runners)
    seconds = {name: [] for name in names}
    rounds = 0

    def run_windows(count):
        nonlocal rounds
        for _ in range(count):
            order = names if rounds % 2 == 0 else names[::-1]
            for name in order:
                seconds[name].append(float(runners[name]()))
            rounds += 1

    run_windows(policy.windows)
    retries = 0
    while retries < policy.retries:
        doubtful = [n for n in names if spread(seconds[n], policy.quorum) > policy.margin]
        if not doubtful:
            break
        retries += 1
        if on_retry is not None:
            on_retry(retries, doubtful)
        run_windows(policy.retry_windows)
    return {name: judge(seconds[name], policy, retries) for name in names}


def epoch_window(trainer, x, y, batch):
    """A runner for :func:`measure`: one ``trainer.epoch(x, y, batch)``, returning its seconds."""

    def run():
        t0 = time.perf_counter()
        trainer.epoch(x, y, batch)
        return time.perf_counter() - t0

    return run


def ratio_reliable(*timings: Timing) -> bool:
    """A ratio of figures is only as reliable as the least reliable of them."""
    return all(t.reliable for t in timings)
