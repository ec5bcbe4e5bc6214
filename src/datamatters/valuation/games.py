"""Cooperative games with known values, used to test every method against closed forms (pyDVL's ``games``).

Each game is a ``Utility`` (vectorised over subset masks) with a matching ``Dataset`` of ``n`` players:
``game.data`` and ``game.utility`` (already bound) go straight into any valuation.
"""
from __future__ import annotations

import math

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.dataset import Dataset
from datamatters.valuation.utility import OK, Utility


class Game(Utility):
    """u(S) = ``score(masks)``; u(empty) = 0."""

    batches_models = True
    preferred_batch = 1024

    def __init__(self, n_players: int, **kw):
        super().__init__(None, default=0.0, **kw)
        self.n_players = int(n_players)
        self.data = Dataset(np.arange(self.n_players)[:, None].astype(float), np.zeros(self.n_players))

    @property
    def utility(self) -> "Game":
        return self

    def with_dataset(self, data):
        if len(data) != self.n_players:
            raise UserError(f"{self} has {self.n_players} players, the dataset has {len(data)}")
        return super().with_dataset(data)

    def score(self, masks: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute(self, masks):
        return self.score(np.asarray(masks, bool)).astype(float), np.full(len(masks), OK, np.int8)

    def __str__(self):
        return f"{type(self).__name__}(n={self.n_players})"


class SymmetricVotingGame(Game):
    """u(S) = 1 if |S| > n/2 else 0 (Castro et al. 2009), n even."""

    def __init__(self, n_players: int, **kw):
        if n_players % 2:
            raise UserError("the symmetric voting game needs an even number of players")
        super().__init__(n_players, **kw)

    def score(self, masks):
        return masks.sum(1) > self.n_players // 2

    def shapley_values(self):
        return np.full(self.n_players, 1.0 / self.n_players)

    def banzhaf_values(self):
        n = self.n_players
        return np.full(n, math.comb(n - 1, n // 2) / 2 ** (n - 1))


class ShoesGame(Game):
    """Players 0..left-1 hold a left shoe, the rest a right one; u(S) = min(#left, #right) in S."""

    def __init__(self, left: int, right: int, **kw):
        self.left, self.right = int(left), int(right)
        super().__init__(self.left + self.right, **kw)

    def score(self, masks):
        return np.minimum(masks[:, :self.left].sum(1), masks[:, self.left:].sum(1))

    @staticmethod
    def _n_pivotal(n_same: int, n_other: int, size: int | None = None) -> int:
        """Subsets of (n_same others of my kind, n_other of the other kind) with fewer of mine than of theirs."""
        return sum(math.comb(n_same, i) * math.comb(n_other, j) for i in range(n_same + 1)
                   for j in range(i + 1, n_other + 1) if size is None or i + j == size)

    def shapley_values(self):
        m = self.n_players - 1
        lv = sum(self._n_pivotal(self.left - 1, self.right, k) / math.comb(m, k) for k in range(m + 1))
        rv = sum(self._n_pivotal(self.right - 1, self.left, k) / math.comb(m, k) for k in range(m + 1))
        return np.array([lv] * self.left + [rv] * self.right) / self.n_players

    def banzhaf_values(self):
        m = self.n_players - 1
        lv = self._n_pivotal(self.left - 1, self.right) / 2**m
        rv = self._n_pivotal(self.right - 1, self.left) / 2**m
        return np.array([lv] * self.left + [rv] * self.right)

    def least_core_values(self) -> tuple[np.ndarray, float]:
        if self.left == self.right:  # pyDVL says -0.5 for every such game; that holds only for (1, 1)
            return np.full(self.n_players, 0.5), -0.5 if self.left == 1 else 0.0
        if self.left < self.right:
            return np.array([1.0] * self.left + [0.0] * self.right), 0.0
        return np.array([0.0] * self.left + [1.0] * self.right), 0.0


class MinerGame(Game):
    """Two miners carry one gold bar: u(S) = floor(|S| / 2). The core is {1/2 each} for even n; for odd n the
    least core gives (n-1)/(2n) to each with subsidy (n-1)/(2n)."""

    def __init__(self, n_players: int, **kw):
        if n_players <= 2:
            raise UserError("the miner game needs more than 2 players")
        super().__init__(n_players, **kw)

    def score(self, masks):
        return masks.sum(1) // 2

    def least_core_values(self) -> tuple[np.ndarray, float]:
        n = self.n_players
        if n % 2 == 0:
            return np.full(n, 0.5), 0.0
        return np.full(n, (n - 1) / (2 * n)), (n - 1) / (2 * n)


class AdditiveGame(Game):
    """u(S) = sum of the weights in S: every semivalue and LOO equal the weights."""

    def __init__(self, weights, **kw):
        self.weights = np.asarray(weights, float)
        super().__init__(len(self.weights), **kw)

    def score(self, masks):
        return masks.astype(float) @ self.weights

    def shapley_values(self):
        return self.weights.copy()

    banzhaf_values = loo_values = shapley_values
