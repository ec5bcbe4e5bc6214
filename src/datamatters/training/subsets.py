"""Reproducible training-subset masks for datamodels and subset-based valuation.

Row ``i`` of a mask block is a function of ``(seed, start + i)`` only, so a job that trains models 500..549 gets
exactly the rows a single job training 0..9999 would have given them: chunking a sweep never changes the data
(the reference drew masks once up front and shipped them around; here any worker can regenerate its rows).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from datamatters.errors import UserError

MODES = ("bernoulli", "fixed")
_SALT = 0x5B5E7  # separates mask streams from other (seed, index)-keyed streams in the project


def subset_size(n: int, alpha: float) -> int:
    """Size of a ``fixed``-mode subset: ``round(alpha * n)``, at least 1."""
    return max(1, int(round(alpha * n)))


def _check(n: int, num_models: int, alpha: float, start: int, mode: str) -> None:
    if int(n) < 1:
        raise UserError(f"subset masks need n >= 1 training points, got n={n}")
    if int(num_models) < 0 or int(start) < 0:
        raise UserError(f"num_models and start must be >= 0, got num_models={num_models}, start={start}")
    if not (0.0 < float(alpha) <= 1.0):
        raise UserError(f"alpha (the fraction of training points per subset) must be in (0, 1], got {alpha}")
    if mode not in MODES:
        raise UserError(f"mask mode must be one of {MODES}, got {mode!r}")


def mask_row(n: int, alpha: float, seed: int, index: int, mode: str = "bernoulli") -> np.ndarray:
    """The mask of model ``index``: Bernoulli(alpha) per point, or exactly ``round(alpha*n)`` points."""
    rng = np.random.default_rng([_SALT, int(seed), int(index)])
    if mode == "bernoulli":
        return rng.random(n) < alpha
    row = np.zeros(n, dtype=bool)
    row[rng.choice(n, size=subset_size(n, alpha), replace=False)] = True
    return row


def subset_masks(n: int, num_models: int, alpha: float, seed: int, start: int = 0,
                 mode: Literal["bernoulli", "fixed"] = "bernoulli") -> np.ndarray:
    """Boolean masks (num_models, n); row ``i`` depends only on ``(seed, start + i)``."""
    _check(n, num_models, alpha, start, mode)
    out = np.empty((int(num_models), int(n)), dtype=bool)
    for i in range(int(num_models)):
        out[i] = mask_row(int(n), float(alpha), seed, int(start) + i, mode)
    return out
