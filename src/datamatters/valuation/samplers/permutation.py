"""Permutation samplers and truncation policies (Ghorbani & Zou 2019's TMC).

A permutation gives, for every position j, the marginal of sigma_j to its prefix, so one permutation updates all
n indices from n + 1 utilities. p(S | i) for the prefix S of size k before i is 1 / (n C(n-1, k)) (pyDVL), which
makes the importance weight 1 for Shapley.

Truncation (checked after each prefix utility, count = prefix length, as in pyDVL): ``FixedTruncation(fraction)``
stops after ``fraction * n`` prefixes; ``RelativeTruncation(rtol, burn_in_fraction)`` stops once
``|u(prefix) - u(N)| <= 1e-8 + rtol |u(N)|`` after the burn-in. Later marginals are 0 and still counted. A policy
answers for one prefix at a time (``fires``, plain floats: pyDVL's ``_check`` too), which costs the permutation
loop far less per step than array calls on a handful of values.
Prefixes are evaluated in blocks across all running permutations at once (see ``semivalue.permutation_marginals``);
positions that cannot truncate (the burn-in) go in one block, so batching never costs extra evaluations there.
"""
from __future__ import annotations

import math
from itertools import permutations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.coefficients import logcomb
from datamatters.valuation.samplers.base import PermutationBatch, Sampler


class TruncationPolicy:
    needs_total = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "check" in vars(cls) and cls.fires is TruncationPolicy.fires:  # the array API this replaced
            raise UserError(f"{cls.__name__} defines check(count, u, n, total) on arrays; a truncation policy now "
                            "answers for one prefix: implement fires(count, u, n, total) -> bool")

    def first_possible(self, n: int) -> int:
        """Smallest prefix length at which the policy may fire (n + 1: never)."""
        return n + 1

    def fires(self, count: int, u: float, n: int, total: float | None) -> bool:
        """Whether the permutation stops after its prefix of ``count`` players, whose utility is ``u``."""
        return False

    def __str__(self):
        return type(self).__name__


class NoTruncation(TruncationPolicy):
    pass


class FixedTruncation(TruncationPolicy):
    def __init__(self, fraction: float):
        if not 0 < fraction <= 1:
            raise UserError(f"FixedTruncation fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def first_possible(self, n):
        return max(1, math.ceil(self.fraction * n - 1e-12))

    def fires(self, count, u, n, total):
        return count >= self.fraction * n

    def __str__(self):
        return f"FixedTruncation({self.fraction:g})"


class RelativeTruncation(TruncationPolicy):
    needs_total = True

    def __init__(self, rtol: float, burn_in_fraction: float = 0.0):
        if not rtol >= 0 or not 0 <= burn_in_fraction <= 1:
            raise UserError(f"RelativeTruncation needs rtol >= 0 and burn_in_fraction in [0, 1], "
                            f"got {rtol}, {burn_in_fraction}")
        self.rtol, self.burn_in = float(rtol), float(burn_in_fraction)

    def first_possible(self, n):
        return max(1, math.ceil(self.burn_in * n - 1e-12))

    def fires(self, count, u, n, total):
        return count >= self.burn_in * n and abs(u - total) <= 1e-8 + self.rtol * abs(total)

    def __str__(self):
        return f"RelativeTruncation(rtol={self.rtol:g}, burn_in={self.burn_in:g})"


class PermutationSampler(Sampler):
    kind = "permutation"
    salt = 0x51

    def __init__(self, truncation: TruncationPolicy | None = None, *, batch_size: int | None = None, seed: int = 0,
                 prefix_block: int | None = None):
        """``prefix_block``: prefix positions evaluated per step for each running permutation after the burn-in
        (None: enough to fill the utility's preferred batch; 1 never wastes an evaluation)."""
        super().__init__(batch_size=batch_size, seed=seed)
        self.truncation = truncation or NoTruncation()
        self.prefix_block = prefix_block

    def log_weight(self, n, k):
        return -np.log(n) - logcomb(n - 1, k)

    def batch(self, n, batch_id, batch_size, active=None):
        return PermutationBatch(np.argsort(self.rng(batch_id).random((batch_size, n)), axis=1))


class AntitheticPermutationSampler(PermutationSampler):
    """Each permutation is followed by its reverse (Mitchell et al. 2022)."""

    salt = 0x52

    def batch(self, n, batch_id, batch_size, active=None):
        half = (batch_size + 1) // 2
        p = np.argsort(self.rng(batch_id).random((half, n)), axis=1)
        out = np.empty((2 * half, n), np.int64)
        out[0::2], out[1::2] = p, p[:, ::-1]
        return PermutationBatch(out)


class DeterministicPermutationSampler(PermutationSampler):
    """All n! permutations once (n <= 9)."""

    finite = True

    def batch(self, n, batch_id, batch_size, active=None):
        if n > 9:
            raise UserError(f"enumerating all permutations needs n <= 9, got {n}")
        start = batch_id * batch_size
        if start >= math.factorial(n):
            return None
        perms = list(permutations(range(n)))[start:start + batch_size]
        return PermutationBatch(np.asarray(perms, np.int64))
