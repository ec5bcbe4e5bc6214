r"""Semivalue coefficients, in log space and vectorised over subset sizes.

A semivalue is :math:`v_i = \sum_{S \subseteq N \setminus \{i\}} w(n, |S|)\,[u(S \cup \{i\}) - u(S)]`. As in
pyDVL 0.10 the factor 1/n is folded into ``w``, so that :math:`\sum_{k=0}^{n-1} \binom{n-1}{k} w(n, k) = 1`
(checked in the tests for n = 10 and 100). A sampler drawing S with probability p(S | i) then gives the unbiased
estimate ``marginal * w(n, |S|) / p(S | i)`` for any coefficient (importance sampling).
"""
from __future__ import annotations

import numpy as np
from scipy.special import betaln, gammaln

from datamatters.errors import UserError


def logcomb(n, k):
    """log C(n, k), vectorised."""
    n, k = np.asarray(n, float), np.asarray(k, float)
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


class Coefficient:
    name = "coefficient"

    def log(self, n: int, k) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, n: int, k) -> np.ndarray:
        return np.exp(self.log(n, k))

    def __str__(self) -> str:
        return self.name


class ShapleyCoefficient(Coefficient):
    """w(n, k) = 1 / (n C(n-1, k))."""

    name = "shapley"

    def log(self, n, k):
        return -np.log(n) - logcomb(n - 1, k)


class BanzhafCoefficient(Coefficient):
    """w(n, k) = 1 / 2^(n-1)."""

    name = "banzhaf"

    def log(self, n, k):
        return np.full(np.shape(k), -(n - 1) * np.log(2.0))


class BetaCoefficient(Coefficient):
    """Beta(alpha, beta)-Shapley (Kwon & Zou 2022): w(n, k) = B(k + beta, n - k - 1 + alpha) / B(alpha, beta),
    i.e. the Beta-binomial weights; (1, 1) is Shapley, (16, 1) favours small subsets."""

    def __init__(self, alpha: float, beta: float):
        if not (alpha > 0 and beta > 0):
            raise UserError(f"Beta-Shapley needs alpha > 0 and beta > 0, got ({alpha}, {beta})")
        self.alpha, self.beta = float(alpha), float(beta)
        self.name = f"beta({self.alpha:g},{self.beta:g})"

    def log(self, n, k):
        k = np.asarray(k, float)
        return betaln(k + self.beta, n - k - 1 + self.alpha) - betaln(self.alpha, self.beta)


def total_weight(coefficient: Coefficient, n: int) -> float:
    """sum_k C(n-1, k) w(n, k): 1 for every semivalue."""
    k = np.arange(n)
    return float(np.exp(logcomb(n - 1, k) + coefficient.log(n, k)).sum())
