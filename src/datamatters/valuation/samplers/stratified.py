"""Samplers stratified by subset size: pick k from a size distribution, then S uniform among the size-k subsets
of N \\ {i}, so p(S | i) = p_k / C(n-1, k).

Size strategies give f(k) on [lower_bound, upper_bound] (pyDVL's): ``ConstantSampleSize`` f = 1,
``HarmonicSampleSize`` f = 1 / (1 + k) (VRDS, Wu et al. 2023), ``PowerLawSampleSize`` f = (1 + k)^a.
``size_iteration="random"`` draws k ~ p_k for every sample (infinite); ``"deterministic"`` gives each index
exactly m_k subsets of each size with sum_k m_k = ``n_samples_per_index`` (finite; rounding as in pyDVL).
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.coefficients import logcomb
from datamatters.valuation.samplers.base import MarginalBatch, masks_of_size
from datamatters.valuation.samplers.powerset import PowersetSampler


class SampleSizeStrategy:
    def __init__(self, lower_bound: int | None = None, upper_bound: int | None = None):
        self.lower_bound, self.upper_bound = lower_bound, upper_bound

    def fun(self, m: int, k: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def probs(self, m: int) -> np.ndarray:
        """p_k for k = 0..m (subsets of a set of size m)."""
        lo = min(0 if self.lower_bound is None else int(self.lower_bound), m)
        hi = min(m if self.upper_bound is None else int(self.upper_bound), m)
        if hi < lo:
            raise UserError(f"empty size range [{lo}, {hi}] for subsets of {m} points")
        f = np.zeros(m + 1)
        k = np.arange(lo, hi + 1)
        f[k] = self.fun(m, k)
        if not f.sum() > 0:
            raise UserError(f"{type(self).__name__} gives zero weight to every subset size")
        return f / f.sum()

    def counts(self, m: int, n_samples: int) -> np.ndarray:
        """Integer m_k summing to ``n_samples``: floors, then the remainder to the largest fractional parts."""
        v = self.probs(m) * n_samples
        out = np.floor(v).astype(np.int64)
        rest = int(n_samples - out.sum())
        out[np.argsort(-(v - out), kind="stable")[:rest]] += 1
        return out

    def __str__(self):
        return type(self).__name__


class ConstantSampleSize(SampleSizeStrategy):
    def fun(self, m, k):
        return np.ones(len(k))


class HarmonicSampleSize(SampleSizeStrategy):
    def fun(self, m, k):
        return 1.0 / (1.0 + k)


class PowerLawSampleSize(SampleSizeStrategy):
    def __init__(self, exponent: float, lower_bound=None, upper_bound=None):
        super().__init__(lower_bound, upper_bound)
        self.exponent = float(exponent)

    def fun(self, m, k):
        return (1.0 + k) ** self.exponent


class StratifiedSampler(PowersetSampler):
    salt = 0x41

    def __init__(self, sample_sizes: SampleSizeStrategy | None = None, size_iteration: str = "random",
                 n_samples_per_index: int | None = None, index_iteration: str = "sequential",
                 *, batch_size: int | None = None, seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed, index_iteration=index_iteration)
        self.sizes = sample_sizes or ConstantSampleSize()
        if size_iteration not in ("random", "deterministic"):
            raise UserError(f"size_iteration must be 'random' or 'deterministic', got {size_iteration!r}")
        if size_iteration == "deterministic" and not n_samples_per_index:
            raise UserError("deterministic size iteration needs n_samples_per_index (a positive integer)")
        self.size_iteration, self.n_per_index = size_iteration, n_samples_per_index
        self.finite = size_iteration == "deterministic"
        self.supports_skip = not self.finite

    def batch(self, n, batch_id, batch_size, active=None):
        rng = self.rng(batch_id)
        m = n - 1
        if self.finite:
            sizes_list = np.repeat(np.arange(m + 1), self.sizes.counts(m, int(self.n_per_index)))
            per = len(sizes_list)
            start, stop = batch_id * batch_size, min((batch_id + 1) * batch_size, n * per)
            if start >= stop:
                return None
            item = np.arange(start, stop)
            idx, k = item // per, sizes_list[item % per]
        else:
            idx = self.index_iteration.next(n, batch_size, rng, active)
            k = rng.choice(m + 1, size=batch_size, p=self.sizes.probs(m))
        return MarginalBatch(idx, masks_of_size(rng, idx, k, n))

    def log_weight(self, n, k):
        m = n - 1
        p = self.sizes.probs(m)[np.asarray(k, np.int64)]
        with np.errstate(divide="ignore"):
            return np.log(p) - logcomb(m, k)
