"""How good is an influence matrix? LDS on held-out subset models, noisy-label AUC from self-influence, and
agreement with an exact reference.

Sign: influence here is pyDVL's ``g_test^T H^-1 g_train``, positive when training on the point *lowers* the test
loss, i.e. raises the test margin. So the attribution score of train point i for test point j is the influence
itself, and the LDS prediction for a subset model is ``mask @ influence.T`` (the sum of the scores of the points it
was trained on), compared by Spearman correlation with the model's actual margin on each test point.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from datamatters.errors import UserError
from datamatters.evaluation.metrics import lds_from_scores, noisy_label_detection


def attribution_scores(influences) -> np.ndarray:
    """(test, train) scores where larger means "raises the test margin": the influences as they are."""
    return np.asarray(torch.as_tensor(influences).detach().cpu().numpy() if torch.is_tensor(influences)
                      else influences, dtype=np.float64)


def lds_of(influences, masks, margins, **kw) -> dict:
    """LDS of a (test, train) influence matrix on held-out subset models ``masks`` (models, train) with actual
    test ``margins`` (models, test)."""
    scores = attribution_scores(influences)
    masks, margins = np.asarray(masks), np.asarray(margins)
    if masks.ndim != 2 or margins.ndim != 2 or masks.shape[0] != margins.shape[0]:
        raise UserError(f"masks {masks.shape} and margins {margins.shape} must be (models, train) and (models, test)")
    if scores.shape != (margins.shape[1], masks.shape[1]):
        raise UserError(f"influence matrix {scores.shape} does not match {margins.shape[1]} test points x "
                        f"{masks.shape[1]} train points of the held-out models")
    return lds_from_scores(scores, masks, margins, **kw)


def self_influence_auc(self_influence, is_corrupted) -> dict:
    """Noisy-label detection: mislabelled points have *high* self-influence."""
    return noisy_label_detection(np.asarray(self_influence, float), np.asarray(is_corrupted, bool), low_is_noisy=False)


def agreement(approx, exact) -> dict:
    """Pearson and Spearman correlation (all entries) and relative Frobenius error of ``approx`` vs ``exact``."""
    from scipy import stats

    a = attribution_scores(approx).ravel()
    b = attribution_scores(exact).ravel()
    if a.shape != b.shape:
        raise UserError(f"cannot compare influence matrices of shapes {np.shape(approx)} and {np.shape(exact)}")
    return {"pearson": float(np.corrcoef(a, b)[0, 1]), "spearman": float(stats.spearmanr(a, b)[0]),
            "rel_error": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))}


def heldout_margins(model: nn.Module, X_train, y_train, X_test, y_test, *, num_models: int, alpha: float,
                    seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float = 0.0,
                    optimizer: str = "adam", start: int = 0, chunk: int | None = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Train ``num_models`` copies of ``model`` on random ``alpha``-subsets (the datamodels helpers) and return
    ``(masks (models, train), margins (models, test))``."""
    from datamatters.training.ensemble import margins, predict_ensemble, train_ensemble
    from datamatters.training.subsets import subset_masks

    masks = subset_masks(len(y_train), num_models, alpha, seed, start=start)
    params = train_ensemble(model, torch.as_tensor(X_train), torch.as_tensor(y_train), masks, epochs=epochs,
                            batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer, seed=seed,
                            chunk=chunk, model_ids=np.arange(start, start + num_models), progress=progress)
    logits = predict_ensemble(model, params, torch.as_tensor(X_test))
    return masks, margins(logits, torch.as_tensor(y_test)).cpu().numpy()


def margins_from_store(path: str | Path, n_train: int, n_test: int,
                       expect: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(masks, margins)`` of the completed rows of a datamodels store (e.g. its ``eval_store``), so influence, TRAK
    and datamodels are scored on the same held-out models. The store's train points must be this run's train split
    (``n_train`` columns) and its targets must start with this run's ``n_test`` test points; ``expect`` entries
    (dataset, split checksums...) must match the store's metadata where it records them."""
    from datamatters.datamodels import open_store

    st = open_store(path, mode="r")
    for key in ("masks", "margins"):
        if key not in st.spec.schema:
            raise UserError(f"datamodel store {path} has no {key!r} key; it needs masks and margins for LDS")
    for key, want in (expect or {}).items():
        have = st.spec.meta.get(key)
        if have is not None and str(have) != str(want):
            raise UserError(f"datamodel store {path} was made for {key}={have!r}, this run has {want!r} (same data, "
                            "split, label noise and seed are needed to share held-out models)")
    rows = st.completed_rows()
    if len(rows) < 2:
        raise UserError(f"datamodel store {path} has {len(rows)} completed models; LDS needs at least 2")
    masks, margins = np.asarray(st["masks"][rows]), np.asarray(st["margins"][rows])
    if masks.shape[1] != n_train or margins.shape[1] < n_test:
        raise UserError(f"datamodel store {path} is for {masks.shape[1]} train points and {margins.shape[1]} targets, "
                        f"but this run has {n_train} train and {n_test} test points")
    return masks.astype(bool), margins[:, :n_test].astype(np.float64)
