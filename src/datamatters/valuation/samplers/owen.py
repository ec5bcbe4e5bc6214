"""Owen sampling (Okhrati & Lipani 2021): for index i pick a probability q, then include every other point with
probability q. Averaging marginals over q in [0, 1] integrates the multilinear extension, i.e. gives Shapley.

Outer strategies: ``grid`` (q on ``linspace(0, q_stop, n_samples_outer)``, the paper's choice and pyDVL's default)
or ``uniform`` (q ~ U(0, q_stop)). The antithetic variant uses q_stop = 1/2 and follows each subset with its
complement in N \\ {i}.

p(S | i), with m = n - 1 and k = |S|: for ``uniform`` it is exactly 1 / ((m + 1) C(m, k)) (pyDVL's formula). For
``grid`` we use the exact mixture (1/N) sum_j q_j^k (1 - q_j)^(m-k) (plus the mirrored terms for the antithetic
sampler); pyDVL uses the continuum formula for the grid too, which overweights the q = 0 and q = 1 end points
(empty and full sets) by up to 2x for small grids. With the exact p(S) the estimate is unbiased for any grid.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, xlogy

from datamatters.errors import UserError
from datamatters.valuation.coefficients import logcomb
from datamatters.valuation.samplers.base import MarginalBatch, exclude, random_masks
from datamatters.valuation.samplers.powerset import PowersetSampler


class OwenSampler(PowersetSampler):
    """``finite=True`` (pyDVL's default, FiniteSequentialIndexIteration) visits every index once with
    ``n_samples_outer * n_samples_inner`` subsets; ``finite=False`` cycles through indices forever."""

    salt = 0x31
    antithetic = False

    def __init__(self, n_samples_outer: int = 200, n_samples_inner: int = 2, outer: str = "grid",
                 finite: bool = True, index_iteration: str = "sequential", *, batch_size: int | None = None,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed, index_iteration=index_iteration)
        if outer not in ("grid", "uniform"):
            raise UserError(f"Owen outer strategy must be 'grid' or 'uniform', got {outer!r}")
        if int(n_samples_outer) < 1 or int(n_samples_inner) < 1:
            raise UserError("n_samples_outer and n_samples_inner must be >= 1")
        self.n_outer, self.n_inner, self.outer = int(n_samples_outer), int(n_samples_inner), outer
        self.finite = bool(finite)
        self.supports_skip = not self.finite
        self.q_stop = 0.5 if self.antithetic else 1.0

    @property
    def grid(self) -> np.ndarray:
        return np.linspace(0.0, self.q_stop, self.n_outer)

    def _draw_q(self, rng, item: np.ndarray) -> np.ndarray:
        if self.outer == "uniform":
            return rng.uniform(0.0, self.q_stop, size=len(item))
        if self.finite:
            return self.grid[(item % (self.n_outer * self.n_inner)) // self.n_inner]
        return self.grid[rng.integers(0, self.n_outer, size=len(item))]

    def batch(self, n, batch_id, batch_size, active=None):
        rng = self.rng(batch_id)
        per_draw = 2 if self.antithetic else 1
        size = (batch_size + per_draw - 1) // per_draw
        if self.finite:
            per_index = self.n_outer * self.n_inner
            start, stop = batch_id * size, min((batch_id + 1) * size, n * per_index)
            if start >= stop:
                return None
            item = np.arange(start, stop)
            idx = item // per_index
        else:
            item = np.arange(size)
            idx = self.index_iteration.next(n, size, rng, active)
        q = self._draw_q(rng, item)
        masks = exclude(random_masks(rng, len(idx), n, q), idx)
        if not self.antithetic:
            return MarginalBatch(idx, masks)
        both = np.empty((2 * len(idx), n), bool)
        both[0::2], both[1::2] = masks, exclude(~masks, idx)
        return MarginalBatch(np.repeat(idx, 2), both)

    def log_weight(self, n, k):
        m, k = n - 1, np.asarray(k, float)
        if self.outer == "uniform":
            return -np.log(m + 1) - logcomb(m, k)
        q = self.grid
        terms = xlogy(k[..., None], q) + xlogy(m - k[..., None], 1 - q)
        if self.antithetic:
            mirror = xlogy(k[..., None], 1 - q) + xlogy(m - k[..., None], q)
            terms = np.concatenate([terms, mirror], axis=-1)
        return logsumexp(terms, axis=-1) - np.log(terms.shape[-1])


class AntitheticOwenSampler(OwenSampler):
    salt = 0x32
    antithetic = True
