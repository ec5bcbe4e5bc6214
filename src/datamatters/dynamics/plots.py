"""Figures of a dynamics analysis (matplotlib, Agg, PNG): model-selection curves, the training map, loss curves coloured
by latent state, and transition feature importance. The map is drawn with matplotlib (no graphviz binary needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def state_colors(k: int) -> list:
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def plot_selection(by_k: pd.DataFrame, k_bic: int, path: Path, title: str = "") -> Path:
    """Held-out log-likelihood (mean +- std over restarts, left) and AIC/BIC (right) against K, as the reference."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(by_k["k"], by_k["eval_ll_mean"], yerr=by_k["eval_ll_std"], color="C0", marker="o",
                label="held-out log-likelihood (left)")
    ax.set_xlabel("number of HMM states K")
    ax.set_ylabel("log-likelihood")
    ax2 = ax.twinx()
    ax2.plot(by_k["k"], by_k["aic_mean"], color="C1", marker="s", label="AIC (right)")
    ax2.plot(by_k["k"], by_k["bic_mean"], color="C2", marker="^", label="BIC (right)")
    ax2.axvline(k_bic, color="C2", ls="--", alpha=0.6)
    ax2.set_ylabel("AIC / BIC")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(title or f"model selection (BIC picks K={k_bic})")
    return _save(fig, path)


def plot_training_map(transmat: np.ndarray, counts: np.ndarray, occupancy: np.ndarray, first_visit: np.ndarray,
                      path: Path, detour: Sequence[int] = (), title: str = "training map") -> Path:
    """States as nodes (left to right by mean first visit, size = occupancy), observed switches i -> j as arrows
    labelled with the HMM's transition probability; detour states in red."""
    k = len(occupancy)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * k), 3.6))
    order = np.argsort(np.where(np.isfinite(first_visit), first_visit, np.inf), kind="stable")
    x = np.empty(k)
    x[order] = np.arange(k)
    y = np.where(np.arange(k) % 2 == 0, 0.0, 0.6)[np.argsort(order)]
    colors = state_colors(k)
    for i in range(k):
        for j in range(k):
            if i != j and counts[i, j] > 0:
                arrow = FancyArrowPatch((x[i], y[i]), (x[j], y[j]), arrowstyle="-|>", mutation_scale=14,
                                        connectionstyle="arc3,rad=0.25", color="0.35", shrinkA=18, shrinkB=18, lw=1.2)
                ax.add_patch(arrow)
                mx, my = (x[i] + x[j]) / 2, (y[i] + y[j]) / 2 + 0.18 * np.sign(x[j] - x[i] + 1e-9)
                ax.text(mx, my, f"{transmat[i, j]:.3f}", fontsize=8, ha="center", va="center", color="0.2")
    for i in range(k):
        ax.scatter(x[i], y[i], s=300 + 3000 * occupancy[i], color=colors[i], zorder=3,
                   edgecolor="red" if i in set(detour) else "k", linewidth=3 if i in set(detour) else 1)
        ax.text(x[i], y[i], str(i), ha="center", va="center", fontsize=11, zorder=4, weight="bold")
        ax.text(x[i], y[i] - 0.32, f"{100 * occupancy[i]:.0f}%", ha="center", fontsize=8)
    ax.set_xlim(-0.8, k - 0.2)
    ax.set_ylim(-0.6, 1.1)
    ax.axis("off")
    ax.set_title(title + ("  (red: detour states)" if len(detour) else ""))
    return _save(fig, path)


def plot_curves_by_state(tables: Sequence[pd.DataFrame], paths: Sequence[np.ndarray], k: int, path: Path,
                         metrics: Sequence[str] = ("train_loss", "val_loss", "val_acc"), max_runs: int = 12,
                         step_offset: int = 0) -> Path | None:
    """Each metric against step, one line per run, points coloured by the run's Viterbi state."""
    metrics = [m for m in metrics if any(m in t.columns and t[m].notna().any() for t in tables)]
    if not metrics:
        return None
    colors = state_colors(k)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for t, p in list(zip(tables, paths))[:max_runs]:
            steps = t["step"].to_numpy()[step_offset:]
            vals = t[m].to_numpy(float)[step_offset:]
            ax.plot(steps, vals, color="0.8", lw=0.8, zorder=1)
            ax.scatter(steps, vals, c=[colors[s] for s in p], s=8, zorder=2)
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        if "loss" in m and all((t[m].dropna() > 0).all() for t in tables if m in t):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[s], label=f"state {s}") for s in range(k)]
    axes[0, -1].legend(handles=handles, fontsize=7, loc="best")
    return _save(fig, path)


def plot_transition_importance(imp: pd.DataFrame, path: Path, top: int = 6, max_transitions: int = 6) -> Path | None:
    """Mean d log p(s = j | z) / dz per feature, for the most frequent transitions."""
    if imp.empty:
        return None
    pairs = (imp[["from", "to", "count"]].drop_duplicates().sort_values("count", ascending=False)
             .head(max_transitions).itertuples(index=False))
    pairs = list(pairs)
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.2), squeeze=False)
    for ax, (i, j, n) in zip(axes[0], pairs):
        g = imp[(imp["from"] == i) & (imp["to"] == j)].sort_values("rank").head(top)[::-1]
        ax.barh(g["feature"], g["importance"], color=["C3" if v < 0 else "C0" for v in g["importance"]])
        ax.set_title(f"{i} -> {j}  (n={n})", fontsize=9)
        ax.axvline(0, color="k", lw=0.6)
        ax.tick_params(labelsize=7)
    fig.suptitle("feature importance: d log p(s_t = to | z_1:t) / dz_t", fontsize=9)
    return _save(fig, path)
