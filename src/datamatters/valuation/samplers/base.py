"""Sampler base: batches of subsets drawn from a stream keyed by (seed, batch id), with their probabilities.

Every sampler reports ``log_weight(n, k)``: the log-probability p(S | i) of drawing a given subset S of size k
of N \\ {i} for the index i being updated (pyDVL's convention, so a semivalue can be estimated from any sampler
with the importance weight w(n, k) / p(S | i)). Set samplers (MSR, least core) report p over subsets of N.

Randomness: batch ``b`` uses ``np.random.default_rng([seed, salt, b])`` only, so the subsets never depend on
how many workers evaluate them, and a continued fit picks up at the next batch id. The only other state is the
sequential index cursor, saved with the result (``state``/``set_state``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamatters.errors import UserError


@dataclass
class MarginalBatch:
    """Pairs (idx[j], S_j): ``masks`` (B, n) bool, S_j excludes idx[j]."""

    idx: np.ndarray
    masks: np.ndarray


@dataclass
class PermutationBatch:
    """``perms`` (B, n): each row a permutation of the player positions."""

    perms: np.ndarray


@dataclass
class SetBatch:
    """Plain subsets of N, ``masks`` (B, n) (MSR, least core)."""

    masks: np.ndarray


class Sampler:
    """Base class. ``batch_size`` None lets the valuation pick one that suits its utility and workers."""

    kind = "marginal"
    salt = 0
    supports_skip = False
    finite = False

    def __init__(self, *, batch_size: int | None = None, seed: int = 0):
        if batch_size is not None and int(batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = int(seed)

    def rng(self, batch_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.salt, int(batch_id)])

    def log_weight(self, n: int, k) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, n: int, batch_id: int, batch_size: int, active: np.ndarray | None = None):  # pragma: no cover
        """The ``batch_id``-th batch, or None when a finite sampler is exhausted."""
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass

    def reset(self) -> None:
        self.set_state({})

    def __str__(self) -> str:
        return type(self).__name__


class IndexIteration:
    """Which index each sample updates: ``sequential`` (round robin over active indices, cursor saved) or
    ``random`` (uniform over active indices)."""

    def __init__(self, mode: str = "sequential"):
        if mode not in ("sequential", "random"):
            raise UserError(f"index_iteration must be 'sequential' or 'random', got {mode!r}")
        self.mode, self.cursor = mode, 0

    def next(self, n: int, size: int, rng: np.random.Generator, active: np.ndarray | None) -> np.ndarray:
        pool = np.arange(n) if active is None else np.flatnonzero(active)
        if len(pool) == 0:
            pool = np.arange(n)
        if self.mode == "random":
            return rng.choice(pool, size=size)
        order = (self.cursor + np.arange(n)) % n
        order = order[np.isin(order, pool, assume_unique=True)]
        picked = np.resize(order, size)
        self.cursor = int((picked[-1] + 1) % n)
        return picked


def random_masks(rng: np.random.Generator, B: int, n: int, q) -> np.ndarray:
    """(B, n) masks with each entry included with probability q (scalar or (B,))."""
    q = np.broadcast_to(np.asarray(q, float), (B,))
    return rng.random((B, n)) < q[:, None]


def masks_of_size(rng: np.random.Generator, idx: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    """Uniformly random subsets of N \\ {idx[j]} of sizes ``sizes[j]`` (rank of random keys < size)."""
    B = len(idx)
    keys = rng.random((B, n))
    keys[np.arange(B), idx] = 2.0  # never among the smallest n-1
    ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
    return ranks < np.asarray(sizes)[:, None]


def exclude(masks: np.ndarray, idx: np.ndarray) -> np.ndarray:
    masks[np.arange(len(idx)), idx] = False
    return masks
