"""Powerset samplers: pairs (i, S) with S drawn from the subsets of N \\ {i}.

* ``UniformSampler``: S uniform over the 2^(n-1) subsets, p(S | i) = 2^-(n-1).
* ``AntitheticSampler``: each S is followed by its complement in N \\ {i} (same p(S | i)).
* ``DeterministicUniformSampler``: every index, every subset, once (exact methods, n <= 24).
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.samplers.base import IndexIteration, MarginalBatch, Sampler, exclude, random_masks

MAX_EXACT_N = 24


class PowersetSampler(Sampler):
    kind = "marginal"
    supports_skip = True

    def __init__(self, *, batch_size: int | None = None, seed: int = 0, index_iteration: str = "sequential"):
        super().__init__(batch_size=batch_size, seed=seed)
        self.index_iteration = IndexIteration(index_iteration)

    def log_weight(self, n, k):
        return np.full(np.shape(k), -(n - 1) * np.log(2.0))

    def state(self):
        return {"cursor": self.index_iteration.cursor}

    def set_state(self, state):
        self.index_iteration.cursor = int(state.get("cursor", 0))


class UniformSampler(PowersetSampler):
    salt = 0x11

    def batch(self, n, batch_id, batch_size, active=None):
        rng = self.rng(batch_id)
        idx = self.index_iteration.next(n, batch_size, rng, active)
        return MarginalBatch(idx, exclude(random_masks(rng, batch_size, n, 0.5), idx))


class AntitheticSampler(PowersetSampler):
    """Draws ceil(B/2) subsets and returns each followed by its complement within N \\ {i}."""

    salt = 0x12

    def batch(self, n, batch_id, batch_size, active=None):
        rng = self.rng(batch_id)
        half = (batch_size + 1) // 2
        idx = self.index_iteration.next(n, half, rng, active)
        m = exclude(random_masks(rng, half, n, 0.5), idx)
        comp = exclude(~m, idx)
        masks = np.empty((2 * half, n), bool)
        masks[0::2], masks[1::2] = m, comp
        return MarginalBatch(np.repeat(idx, 2), masks)


class DeterministicUniformSampler(PowersetSampler):
    """All n * 2^(n-1) pairs, index by index, subsets in binary order; finite, no randomness."""

    finite = True
    supports_skip = False

    def __init__(self, *, batch_size: int | None = None):
        super().__init__(batch_size=batch_size)

    def batch(self, n, batch_id, batch_size, active=None):
        if n > MAX_EXACT_N:
            raise UserError(f"exact enumeration of subsets needs n <= {MAX_EXACT_N} players, got {n}; "
                            "use a Monte Carlo sampler")
        per = 1 << (n - 1)
        start, stop = batch_id * batch_size, min((batch_id + 1) * batch_size, n * per)
        if start >= stop:
            return None
        items = np.arange(start, stop, dtype=np.int64)
        idx, code = items // per, items % per
        bitpos = np.arange(n)[None, :] - (np.arange(n)[None, :] > idx[:, None])
        masks = ((code[:, None] >> bitpos) & 1).astype(bool)
        return MarginalBatch(idx, exclude(masks, idx))


def all_subsets(n: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Masks of subsets ``start..stop-1`` of N in binary order (bit j = player j)."""
    if n > MAX_EXACT_N:
        raise UserError(f"exact enumeration of subsets needs n <= {MAX_EXACT_N} players, got {n}")
    stop = (1 << n) if stop is None else stop
    codes = np.arange(start, stop, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
