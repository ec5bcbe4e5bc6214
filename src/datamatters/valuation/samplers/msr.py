"""Set samplers: MSR (Wang & Jia 2023) and plain uniform subsets of N for least core.

MSR draws S uniformly from all 2^n subsets of N and uses one utility evaluation to update every index: those in
S in the "in" running mean, the others in the "out" one. Conditioned on i in S (or not), S \\ {i} is uniform
over N \\ {i}, so p(S | i) = 2^-(n-1) as for the uniform sampler.
"""
from __future__ import annotations

import numpy as np

from datamatters.valuation.samplers.base import Sampler, SetBatch, random_masks
from datamatters.valuation.samplers.powerset import all_subsets


class MSRSampler(Sampler):
    kind = "msr"
    salt = 0x21

    def log_weight(self, n, k):
        return np.full(np.shape(k), -(n - 1) * np.log(2.0))

    def batch(self, n, batch_id, batch_size, active=None):
        return SetBatch(random_masks(self.rng(batch_id), batch_size, n, 0.5))


class UniformSetSampler(Sampler):
    """Uniform subsets of N (p = 2^-n), for Monte Carlo least core."""

    kind = "sets"
    salt = 0x22

    def log_weight(self, n, k):
        return np.full(np.shape(k), -n * np.log(2.0))

    def batch(self, n, batch_id, batch_size, active=None):
        return SetBatch(random_masks(self.rng(batch_id), batch_size, n, 0.5))


class AllSetsSampler(Sampler):
    """Every subset of N once, in binary order (exact least core)."""

    kind = "sets"
    finite = True

    def log_weight(self, n, k):
        return np.full(np.shape(k), -n * np.log(2.0))

    def batch(self, n, batch_id, batch_size, active=None):
        start = batch_id * batch_size
        if start >= (1 << n):
            return None
        return SetBatch(all_subsets(n, start, min(start + batch_size, 1 << n)))
