"""Evaluation metrics used by datamodels, influence, valuation and RHO-LOSS reports.

LDS (linear datamodeling score, Park et al. 2023): for held-out subset models, the Spearman correlation, per
target, between the predicted output (e.g. ``mask @ W + b`` or the sum of attribution scores over the subset) and
the actual output, averaged over targets.

One NaN convention: an undefined correlation (a constant column) is NaN and the aggregates (mean, bootstrap CI) skip
it; a point without a value (NaN) ranks lowest, as in the removal curves (``evaluation/removal.py``).
scipy and scikit-learn are imported where used: every job imports this module, few need them.
"""
from __future__ import annotations

import numpy as np


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share their mean rank), as Spearman requires."""
    from scipy import stats

    return stats.rankdata(a, axis=0, method="average")


def spearman_per_column(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching columns of two (models, targets) arrays; NaN for constant columns."""
    pred, actual = np.asarray(pred, float), np.asarray(actual, float)
    if pred.shape != actual.shape:
        raise ValueError(f"pred {pred.shape} and actual {actual.shape} differ in shape")
    if pred.ndim == 1:
        pred, actual = pred[:, None], actual[:, None]
    rp, ra = _rank(pred), _rank(actual)
    rp -= rp.mean(0)
    ra -= ra.mean(0)
    denom = np.sqrt((rp**2).sum(0) * (ra**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rp * ra).sum(0) / denom, np.nan)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (NaNs dropped)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def lds(pred: np.ndarray, actual: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Linear datamodeling score: mean over targets of the per-target Spearman correlation, with a bootstrap CI.

    ``pred`` and ``actual`` are (held-out models, targets). Returns ``{"mean", "ci_low", "ci_high", "per_target"}``.
    """
    per_target = spearman_per_column(pred, actual)
    lo, hi = bootstrap_ci(per_target, n_boot=n_boot, seed=seed)
    defined = per_target[np.isfinite(per_target)]
    mean = float(defined.mean()) if len(defined) else float("nan")
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "per_target": per_target}


def lds_from_scores(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, **kw) -> dict:
    """LDS of an attribution matrix ``scores`` (targets, train points): the prediction for a subset model is the
    sum of the scores of the points in its mask, ``masks @ scores.T``."""
    pred = np.asarray(masks, float) @ np.asarray(scores, float).T
    return lds(pred, actual, **kw)


def noisy_label_detection(values: np.ndarray, is_corrupted: np.ndarray, low_is_noisy: bool = True) -> dict:
    """How well low values flag corrupted labels: ROC AUC, and F1 when the lowest ``k`` (k = #corrupted) are flagged.

    This is OpenDataVal's noisy-label task; self-influence and RHO-LOSS scores use ``low_is_noisy=False``.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    values = np.asarray(values, float)
    y = np.asarray(is_corrupted, bool)
    if y.all() or not y.any():
        raise ValueError("noisy-label detection needs both corrupted and clean points")
    known = values[~np.isnan(values)]
    values = np.where(np.isnan(values), known.min() - 1.0 if len(known) else 0.0, values)  # missing ranks lowest
    score = -values if low_is_noisy else values
    auc = roc_auc_score(y, score)
    k = int(y.sum())
    flagged = np.zeros_like(y)
    flagged[np.argsort(-score, kind="stable")[:k]] = True
    return {"auc": float(auc), "f1": float(f1_score(y, flagged))}
