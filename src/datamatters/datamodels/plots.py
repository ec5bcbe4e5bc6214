"""Plots: a few targets with their most positively and negatively weighted training examples; the LDS curve."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img, title: str, color: str = "black") -> None:
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    if a.ndim == 1:
        ax.plot(a, lw=0.8)
    else:
        lo, hi = float(a.min()), float(a.max())
        ax.imshow((a - lo) / (hi - lo + 1e-12), cmap="gray" if a.ndim == 2 else None)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_top_examples(W: np.ndarray, train_x: np.ndarray, target_x: np.ndarray, targets: Sequence[int],
                      path: str | Path, k: int = 5, train_y: np.ndarray | None = None,
                      target_y: np.ndarray | None = None) -> Path:
    """One row per target: the target, its ``k`` most positive (helpful) and ``k`` most negative training points
    with their weights. Images (C, H, W) / (H, W) are shown as images, 1-D inputs as line plots."""
    plt = _mpl()
    fig, axes = plt.subplots(len(targets), 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.3 * len(targets)), squeeze=False)
    for r, t in enumerate(targets):
        w = W[:, t]
        lab = f" y={int(target_y[t])}" if target_y is not None else ""
        _show(axes[r, 0], target_x[t], f"target {t}{lab}")
        pos = np.argsort(-w, kind="stable")[:k]
        neg = np.argsort(w, kind="stable")[:k]
        for j, i in enumerate(pos):
            lab = f" y={int(train_y[i])}" if train_y is not None else ""
            _show(axes[r, 1 + j], train_x[i], f"+{w[i]:.3f}{lab}", "green")
        for j, i in enumerate(neg):
            lab = f" y={int(train_y[i])}" if train_y is not None else ""
            _show(axes[r, 1 + k + j], train_x[i], f"{w[i]:.3f}{lab}", "red")
    fig.suptitle("datamodels: target | top positive | top negative training examples", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lds_curve(curve: Sequence[dict], path: str | Path) -> Path:
    """LDS (with bootstrap CI) against the number of training models."""
    plt = _mpl()
    n = [c["n_models"] for c in curve]
    m = np.array([c["lds"] for c in curve])
    lo = np.array([c["ci_low"] for c in curve])
    hi = np.array([c["ci_high"] for c in curve])
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(n, m, marker="o")
    ax.fill_between(n, lo, hi, alpha=0.3)
    ax.set_xscale("log")
    ax.set_xlabel("training models")
    ax.set_ylabel("LDS (held-out models)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
