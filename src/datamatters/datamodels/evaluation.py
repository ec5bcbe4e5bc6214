"""Evaluating datamodels: LDS on held-out models, LDS vs number of training models, counterfactual removal.

LDS (Park et al., 2023): held-out subset models (from a separate seed range, so neither their masks nor their
inits were seen by the regression) predict ``mask @ W + b`` per target; Spearman correlation with the actual
outputs per target, mean over targets with a bootstrap CI (``datamatters.evaluation.metrics.lds``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from datamatters.datamodels.regression import DatamodelFit, fit_datamodels
from datamatters.errors import UserError
from datamatters.evaluation.metrics import lds


def _weights(fit) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(fit, DatamodelFit):
        return fit.W, fit.b
    W, b = fit
    return np.asarray(W, np.float32), np.asarray(b, np.float32)


def evaluate_lds(fit, masks, outputs, rows: Sequence[int] | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """LDS of datamodels ``fit`` (a ``DatamodelFit`` or ``(W, b)``) on held-out ``masks`` (M, n) and actual
    ``outputs`` (M, T) (already sliced to the fit's targets, or full width: then the fit's start:end is used)."""
    W, b = _weights(fit)
    rows = np.arange(masks.shape[0]) if rows is None else np.asarray(list(rows), dtype=np.int64)
    if len(rows) < 3:
        raise UserError(f"LDS needs at least 3 held-out models, got {len(rows)}")
    X = np.asarray(masks[rows], dtype=np.float32)
    Y = np.asarray(outputs[rows], dtype=np.float64)
    if Y.shape[1] != W.shape[1] and isinstance(fit, DatamodelFit):
        Y = Y[:, fit.meta["start"]:fit.meta["end"]]
    if X.shape[1] != W.shape[0] or Y.shape[1] != W.shape[1]:
        raise UserError(f"held-out masks {X.shape} / outputs {Y.shape} do not match datamodels W {W.shape}")
    out = lds(X @ W + b, Y, n_boot=n_boot, seed=seed)
    out["n_models"] = int(len(rows))
    return out


def lds_curve(masks, outputs, train_rows: Sequence[int], eval_masks, eval_outputs, sizes: Sequence[int], *,
              eval_rows: Sequence[int] | None = None, n_boot: int = 200, **fit_kw) -> list[dict]:
    """LDS vs number of training models: fit on the first ``m`` of ``train_rows`` for each ``m`` in ``sizes``."""
    train_rows = np.asarray(list(train_rows), dtype=np.int64)
    curve = []
    for m in sorted({int(s) for s in sizes}):
        if m > len(train_rows):
            raise UserError(f"LDS curve size {m} exceeds the {len(train_rows)} available training models")
        fit = fit_datamodels(masks, outputs, train_rows[:m], **fit_kw)
        res = evaluate_lds(fit, eval_masks, eval_outputs, eval_rows, n_boot=n_boot)
        curve.append({"n_models": m, "lds": res["mean"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                      "fit_seconds": fit.meta["seconds"]})
    return curve


def counterfactual(fit, train_fn: Callable[[np.ndarray, Sequence[int]], np.ndarray], targets: Sequence[int],
                   base_masks: np.ndarray, model_ids: Sequence[int], k: int = 10) -> dict:
    """Remove each target's ``k`` most positively weighted training points, retrain, compare margin drops.

    ``base_masks`` (S, n) are the subsets the models train on (e.g. fresh alpha-subsets from an unused seed range,
    in distribution for the datamodel, or all-ones for the full training set); for target t every base mask is
    retrained without t's top-k points, with the same ``model_ids`` (seeds) so inits and batch orders match.
    ``train_fn(masks (M, n), ids) -> outputs (M, T_fit)`` trains models and returns the fitted outputs.
    Predicted drop = sum of the removed points' weights that were in the mask; actual drop = mean over seeds.
    """
    W, _ = _weights(fit)
    base_masks = np.asarray(base_masks, dtype=bool)
    S = base_masks.shape[0]
    if len(model_ids) != S:
        raise UserError(f"counterfactual: {S} base masks but {len(model_ids)} model ids")
    base_out = np.asarray(train_fn(base_masks, list(model_ids)))
    removed_masks, pred = [], []
    for t in targets:
        top = np.argsort(-W[:, t], kind="stable")[:k]
        top = top[W[top, t] > 0]
        m = base_masks.copy()
        m[:, top] = False
        removed_masks.append(m)
        pred.append((base_masks[:, top] * W[top, t]).sum(1).mean())
    new_out = np.asarray(train_fn(np.concatenate(removed_masks), list(model_ids) * len(targets)))
    rows = []
    for j, t in enumerate(targets):
        after = new_out[j * S:(j + 1) * S, t]
        drop = base_out[:, t] - after
        rows.append({"target": int(t), "predicted_drop": float(pred[j]), "actual_drop": float(drop.mean()),
                     "actual_drop_std": float(drop.std(ddof=1)) if S > 1 else 0.0})
    p = np.array([r["predicted_drop"] for r in rows])
    a = np.array([r["actual_drop"] for r in rows])
    corr = float(np.corrcoef(p, a)[0, 1]) if len(rows) > 2 and p.std() > 0 and a.std() > 0 else float("nan")
    return {"per_target": rows, "k": int(k), "seeds": int(S), "pearson": corr,
            "mean_predicted_drop": float(p.mean()), "mean_actual_drop": float(a.mean())}
