"""The PNG plots of the benchmark report (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import os

import numpy as np

from gpunn.bench.contenders import REFERENCE_DIMS, train_flops_per_sample


def _save(plt, fig, out_dir, files, key, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    files[key] = name


def _mark_unreliable(ax, res, name, batches, values):
    """Hollow red rings around the points of unreliable figures."""
    bad = [(b, v) for b, v in zip(batches, values) if not res.timings[(name, b)].reliable]
    if bad:
        ax.scatter(*zip(*bad), s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=5)


def plot_all(res, out_dir) -> dict:
    """Write the report's plots to ``out_dir``; returns {key: file name}."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    files = {}
    batches = res.settings.batches
    dims = "-".join(map(str, REFERENCE_DIMS))
    cpu = res.cpu
    any_unreliable = any(not t.reliable for t in res.timings.values())
    ring = " (red ring: unreliable)" if any_unreliable else ""

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for c in res.present:
        values = [res.throughput[(c.name, b)] for b in batches]
        ax.plot(batches, values, marker="o", label=c.name)
        _mark_unreliable(ax, res, c.name, batches, values)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("training samples / s")
    ax.set_title(f"Reference MLP {dims}, SGD{ring}\n{cpu}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out_dir, files, "throughput", "throughput.png")

    flops = train_flops_per_sample()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for c in res.present:
        values = [res.throughput[(c.name, b)] * flops / 1e9 for b in batches]
        ax.plot(batches, values, marker="o", label=c.name)
        _mark_unreliable(ax, res, c.name, batches, values)
    ax.axhline(res.ceiling, color="k", linestyle="--", label=f"CPU float32 matmul ceiling ({res.ceiling:,.0f})")
    if res.gpu_ceiling:
        ax.axhline(res.gpu_ceiling, color="gray", linestyle=":", label=f"GPU SGEMM ceiling ({res.gpu_ceiling:,.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Achieved GFLOP/s against the matrix-product ceiling{ring}\n{cpu}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out_dir, files, "gflops", "gflops.png")

    if res.split:
        keys = list(res.split)
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(keys) + 2), 4.8))
        bottom = np.zeros(len(keys))
        for phase in next(iter(res.split.values())):
            share = np.array([res.split[k][phase] / sum(res.split[k].values()) * 100 for k in keys])
            ax.bar(range(len(keys)), share, bottom=bottom, label=phase)
            bottom += share
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{n.split('(')[-1].rstrip(')')}\nb={b}" for n, b in keys], fontsize=8)
        ax.set_ylabel("% of a training step")
        ax.set_title(f"Where gpunn's training step spends its time\n{cpu}", fontsize=9)
        ax.legend(fontsize=8)
        _save(plt, fig, out_dir, files, "split", "time_split.png")

    if res.accuracy:
        fig, ax = plt.subplots(figsize=(7.5, 3.5))
        labels = list(res.accuracy)
        ax.barh(labels, [res.accuracy[k][0] * 100 for k in labels])
        ax.set_xlabel("held-out accuracy (%)")
        ax.set_xlim(0, 100)
        ax.set_title("Same data, same epochs (digits, Adam)", fontsize=9)
        _save(plt, fig, out_dir, files, "accuracy", "accuracy.png")
    return files
