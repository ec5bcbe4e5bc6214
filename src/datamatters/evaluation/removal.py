"""Point removal (OpenDataVal's / Ghorbani & Zou's evaluation of data values) and the valuation plots.

Remove the highest- (or lowest-) valued training points in steps of ``step`` (5% by default), retrain, and
record test accuracy; random removal is the baseline. Good values make accuracy fall fast when the highest are
removed and hold (or rise, with noisy labels) when the lowest are removed. All retrainings of a curve are
handed to ``score_subsets(masks (F, n) bool) -> (F,)`` in one call, so a batched trainer (or a pool of workers)
does them together; the engine-agnostic callable keeps this module free of any engine import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def removal_order(values: np.ndarray, highest_first: bool = True) -> np.ndarray:
    """Positions in removal order; NaN values count as the lowest; ties keep position order."""
    v = np.nan_to_num(np.asarray(values, float), nan=-np.inf)
    order = np.argsort(-v if highest_first else v, kind="stable")
    return order


def fractions_grid(step: float = 0.05, max_fraction: float = 0.5) -> np.ndarray:
    k = int(np.floor(max_fraction / step + 1e-9))
    return np.round(np.arange(k + 1) * step, 10)


def removal_masks(order: np.ndarray, n: int, fractions: np.ndarray) -> np.ndarray:
    """Keep-masks (F, n): for fraction f the first round(f n) points of ``order`` are removed."""
    masks = np.ones((len(fractions), n), bool)
    for r, f in enumerate(fractions):
        masks[r, order[: int(round(f * n))]] = False
    return masks


def point_removal_curves(values: np.ndarray, score_subsets: Callable[[np.ndarray], np.ndarray],
                         step: float = 0.05, max_fraction: float = 0.5, n_random: int = 3, seed: int = 0) -> dict:
    """Accuracy after removing the highest-, lowest- and random-valued points, for each fraction."""
    values = np.asarray(values, float)
    n = len(values)
    fr = fractions_grid(step, max_fraction)
    blocks = [removal_masks(removal_order(values, True), n, fr), removal_masks(removal_order(values, False), n, fr)]
    rng = np.random.default_rng([seed, 0x5E40])
    blocks += [removal_masks(rng.permutation(n), n, fr) for _ in range(n_random)]
    scores = np.asarray(score_subsets(np.concatenate(blocks)), float).reshape(len(blocks), len(fr))
    rand = scores[2:] if n_random else np.full((1, len(fr)), np.nan)
    return {"fraction": fr, "high": scores[0], "low": scores[1], "random": rand.mean(0), "random_std": rand.std(0)}


def removal_summary(curves: dict, prefix: str = "removal") -> dict:
    """Mean accuracy along each curve (lower for ``high`` and higher for ``low`` than ``random`` is better)."""
    return {f"{prefix}/{k}_mean_acc": float(np.mean(curves[k])) for k in ("high", "low", "random")}


def detection_curve(values: np.ndarray, is_corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of corrupted points found when inspecting points from the lowest value up."""
    y = np.asarray(is_corrupted, bool)[removal_order(values, highest_first=False)]
    inspected = np.arange(1, len(y) + 1) / len(y)
    return inspected, np.cumsum(y) / max(1, y.sum())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_removal(curves: dict, path: str | Path, title: str = "point removal") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = 100 * np.asarray(curves["fraction"])
    ax.plot(x, curves["high"], "o-", label="highest values removed")
    ax.plot(x, curves["low"], "s-", label="lowest values removed")
    ax.plot(x, curves["random"], "--", color="gray", label="random removal")
    ax.fill_between(x, curves["random"] - curves["random_std"], curves["random"] + curves["random_std"],
                    color="gray", alpha=0.2)
    ax.set(xlabel="% of training points removed", ylabel="test accuracy", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_noisy_detection(values: np.ndarray, is_corrupted: np.ndarray, path: str | Path,
                         title: str = "noisy-label detection") -> Path:
    """Left: value histograms of clean and flipped points. Right: flipped points found vs points inspected."""
    plt = _pyplot()
    values, y = np.asarray(values, float), np.asarray(is_corrupted, bool)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    finite = np.isfinite(values)
    bins = np.histogram_bin_edges(values[finite], bins=30) if finite.any() else 10
    a.hist(values[finite & ~y], bins=bins, alpha=0.6, label="clean")
    a.hist(values[finite & y], bins=bins, alpha=0.6, label="flipped label")
    a.set(xlabel="value", ylabel="points", title=title)
    a.legend(fontsize=8)
    x, found = detection_curve(values, y)
    b.plot(100 * x, 100 * found, label="lowest values first")
    b.plot([0, 100], [0, 100], "--", color="gray", label="random")
    b.set(xlabel="% of points inspected", ylabel="% of flipped labels found")
    b.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
