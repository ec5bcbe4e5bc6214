"""Offline selection-via-proxy (Coleman et al., ICLR 2020): a proxy model ranks the train split once and the target
trains on the kept fraction. Scores are pure functions of the proxy's predictions."""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError


def entropy_score(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1)


def least_confidence_score(probs: np.ndarray) -> np.ndarray:
    return 1.0 - probs.max(-1)


def forgetting_score(correct_history: np.ndarray) -> np.ndarray:
    """Forgetting events per example (Toneva et al. 2019) from a (epochs, n) bool history of correctness.

    An event is a transition correct -> incorrect between consecutive epochs; never-learned examples get
    the maximum possible count plus one, so they rank first.
    """
    h = np.asarray(correct_history, bool)
    events = (h[:-1] & ~h[1:]).sum(0).astype(float)
    never = ~h.any(0)
    events[never] = h.shape[0] + 1
    return events


def svp_scores(kind: str, probs: np.ndarray | None = None, correct_history: np.ndarray | None = None) -> np.ndarray:
    if kind == "entropy":
        return entropy_score(probs)
    if kind == "least_confidence":
        return least_confidence_score(probs)
    if kind == "forgetting":
        return forgetting_score(correct_history)
    raise UserError(f"unknown svp.score {kind!r}; use entropy, least_confidence or forgetting")


def keep_top(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Positions of the ``keep_fraction`` highest-scoring (most uncertain / most forgotten) examples, ties by position."""
    if not 0 < keep_fraction <= 1:
        raise UserError(f"svp.keep_fraction must be in (0, 1], got {keep_fraction}")
    k = max(1, int(round(keep_fraction * len(scores))))
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:k])
