"""Deterministic index splits (functions of the seed only)."""
from __future__ import annotations

import numpy as np


def even_odd(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's CIFAR split: even positions are target-train, odd positions the holdout."""
    indices = np.asarray(indices, dtype=np.int64)
    return indices[0::2], indices[1::2]


def carve(indices: np.ndarray, fraction: float, seed: int, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, carved) where ``carved`` is a seeded random ``fraction`` (sorted, disjoint)."""
    indices = np.asarray(indices, dtype=np.int64)
    k = int(round(fraction * len(indices)))
    perm = np.random.default_rng([int(seed), 0x5F, salt]).permutation(len(indices))
    return np.sort(indices[perm[k:]]), np.sort(indices[perm[:k]])
