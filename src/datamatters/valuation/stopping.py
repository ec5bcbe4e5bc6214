"""Composable stopping criteria with per-index convergence (pyDVL's ``stopping`` module, same definitions).

A criterion is called with the current ``ValuationResult`` after every batch and returns ``True`` to stop; its
``converged`` array says which indices are done, so a valuation can skip them (``skip_converged``). Criteria
compose with ``&``, ``|`` and ``~`` (checks, ``converged`` arrays and completions combine accordingly).

``guaranteed`` says whether a criterion is certain to fire eventually (count- and time-based ones are; error-,
rank- and history-based ones are not, and ``~`` never is). A valuation refuses to start an infinite sampler with a
criterion that is not guaranteed, instead of possibly running forever: combine it with ``| MaxUpdates(...)`` or
``| MaxTime(...)``.

Fixes over pyDVL 0.10: ``HistoryDeviation`` uses ``|v_t|`` in the relative difference (pyDVL divided by the signed
value, so negative values could fake convergence); ``RankCorrelation`` compares the indices that are both burnt in
and updated (pyDVL indexed the burnt-in subset with a mask of another length).
"""
from __future__ import annotations

import time

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.result import ValuationResult


class StoppingCriterion:
    """Base class: subclasses implement ``_check(result) -> bool`` and set ``self._converged``."""

    guaranteed = False

    def __init__(self):
        self._converged = np.zeros(0, bool)
        self._count = 0

    def _check(self, result: ValuationResult) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, result: ValuationResult) -> bool:
        self._tick(result)
        done = bool(self._check(result))
        if done:
            result.status = "converged"
        return done

    def _tick(self, result: ValuationResult) -> None:
        self._count += 1
        if self._converged.size != len(result):
            self._converged = np.zeros(len(result), bool)

    @property
    def count(self) -> int:
        """How many times the criterion has been checked."""
        return self._count

    @property
    def converged(self) -> np.ndarray:
        return self._converged

    def completion(self) -> float:
        return float(self._converged.mean()) if self._converged.size else 0.0

    def reset(self) -> "StoppingCriterion":
        self._converged = np.zeros(0, bool)
        self._count = 0
        return self

    def __and__(self, other: "StoppingCriterion") -> "StoppingCriterion":
        return _Combined("and", [self, other])

    def __or__(self, other: "StoppingCriterion") -> "StoppingCriterion":
        return _Combined("or", [self, other])

    def __invert__(self) -> "StoppingCriterion":
        return _Combined("not", [self])

    def __str__(self) -> str:
        return type(self).__name__


class _Combined(StoppingCriterion):
    """``&``, ``|`` and ``~`` of criteria: every leaf is checked once per call (no short-circuit), so rolling
    memories stay in step whatever the combination."""

    def __init__(self, op: str, parts: list[StoppingCriterion]):
        super().__init__()
        self.op, self.parts = op, parts

    @property
    def guaranteed(self) -> bool:  # type: ignore[override]
        g = [p.guaranteed for p in self.parts]
        return {"and": all(g), "or": any(g), "not": False}[self.op]

    def __call__(self, result: ValuationResult) -> bool:
        self._tick(result)
        flags = [p(result) for p in self.parts]
        convs = [p.converged for p in self.parts]
        if self.op == "and":
            done, self._converged = all(flags), np.logical_and.reduce(convs)
        elif self.op == "or":
            done, self._converged = any(flags), np.logical_or.reduce(convs)
        else:
            done, self._converged = not flags[0], ~convs[0]
        result.status = "converged" if done else "pending"
        return done

    def completion(self) -> float:
        c = [p.completion() for p in self.parts]
        return {"and": min(c), "or": max(c), "not": 1 - c[0]}[self.op]

    def reset(self):
        for p in self.parts:
            p.reset()
        return super().reset()

    def __str__(self) -> str:
        if self.op == "not":
            return f"~{self.parts[0]}"
        return f"({self.parts[0]} {'&' if self.op == 'and' else '|'} {self.parts[1]})"


def _positive_int(name: str, v) -> int:
    if v is None or int(v) != v or int(v) < 1:
        raise UserError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class MaxUpdates(StoppingCriterion):
    """Stop when the most-updated index has at least ``n_updates`` updates (pyDVL: permutations for permutation
    samplers, subsets per index for powerset samplers)."""

    guaranteed = True

    def __init__(self, n_updates: int):
        super().__init__()
        self.n_updates = _positive_int("n_updates", n_updates)
        self._last = 0

    def _check(self, r):
        self._converged = r.counts >= self.n_updates
        self._last = int(r.counts.max()) if len(r) else 0
        return self._last >= self.n_updates

    def completion(self):
        return min(1.0, self._last / self.n_updates)

    def __str__(self):
        return f"MaxUpdates({self.n_updates})"


class MinUpdates(StoppingCriterion):
    """Stop when every index has at least ``n_updates`` updates."""

    guaranteed = True

    def __init__(self, n_updates: int):
        super().__init__()
        self.n_updates = _positive_int("n_updates", n_updates)

    def _check(self, r):
        self._converged = r.counts >= self.n_updates
        self._progress = float(np.mean(np.minimum(r.counts, self.n_updates)) / self.n_updates) if len(r) else 0.0
        return bool(len(r)) and int(r.counts.min()) >= self.n_updates

    def completion(self):
        return getattr(self, "_progress", 0.0)

    def __str__(self):
        return f"MinUpdates({self.n_updates})"


class MaxChecks(StoppingCriterion):
    """Stop after ``n_checks`` calls (one per batch)."""

    guaranteed = True

    def __init__(self, n_checks: int):
        super().__init__()
        self.n_checks = _positive_int("n_checks", n_checks)

    def _check(self, r):
        done = self._count >= self.n_checks
        if done:
            self._converged[:] = True
        return done

    def completion(self):
        return min(1.0, self._count / self.n_checks)

    def __str__(self):
        return f"MaxChecks({self.n_checks})"


class MaxTime(StoppingCriterion):
    """Stop once ``seconds`` have passed since the first check after ``reset`` (fits call ``reset``)."""

    guaranteed = True

    def __init__(self, seconds: float):
        super().__init__()
        if seconds is None or not float(seconds) > 0:
            raise UserError(f"MaxTime needs seconds > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def _check(self, r):
        done = time.monotonic() - self.start >= self.seconds
        if done:
            self._converged[:] = True
        return done

    def completion(self):
        return float(np.clip((time.monotonic() - self.start) / self.seconds, 0, 1))

    def reset(self):
        self.start = time.monotonic()
        return super().reset()

    def __str__(self):
        return f"MaxTime({self.seconds:g}s)"


class AbsoluteStandardError(StoppingCriterion):
    """Index i has converged when its standard error is below ``threshold`` and it has more than ``burn_in``
    updates; stop when a ``fraction`` of indices has converged."""

    def __init__(self, threshold: float, fraction: float = 1.0, burn_in: int = 4):
        super().__init__()
        if not threshold > 0:
            raise UserError(f"AbsoluteStandardError needs threshold > 0, got {threshold}")
        if not 0 < fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        self.threshold, self.fraction, self.burn_in = float(threshold), float(fraction), int(burn_in)

    def _check(self, r):
        self._converged = (r.stderr < self.threshold) & (r.counts > self.burn_in)
        return float(np.mean(self._converged)) >= self.fraction

    def __str__(self):
        return f"AbsoluteStandardError({self.threshold:g}, fraction={self.fraction:g}, burn_in={self.burn_in})"


class RankCorrelation(StoppingCriterion):
    """Stop when the Spearman correlation between the values at successive checks is stable: the correlation of
    this check with the last one is within ``rtol`` of the previous correlation (Wang & Jia 2023). Only indices
    with more than ``burn_in`` updates that changed since the last check take part, and at least ``fraction`` of
    all indices must."""

    def __init__(self, rtol: float, burn_in: int, fraction: float = 1.0):
        super().__init__()
        if not 0 <= rtol <= 1:
            raise UserError(f"rtol must be in [0, 1], got {rtol}")
        self.rtol, self.burn_in, self.fraction = float(rtol), int(burn_in), float(fraction)
        self._prev_values = self._prev_counts = None
        self._corr = np.nan

    def _check(self, r):
        prev_v, prev_c = self._prev_values, self._prev_counts
        self._prev_values, self._prev_counts = r.values.copy(), r.counts.copy()
        if prev_v is None:
            return False
        valid = (r.counts > self.burn_in) & (r.counts > prev_c)
        if valid.sum() < max(2, self.fraction * len(r)):
            return False
        with np.errstate(invalid="ignore"):
            from scipy.stats import spearmanr  # lazy: scipy.stats costs seconds to import (workers too)

            corr = float(spearmanr(prev_v[valid], r.values[valid])[0])
        done = bool(np.isfinite(corr) and np.isfinite(self._corr) and np.isclose(corr, self._corr, rtol=self.rtol))
        self._corr = corr
        if done:
            self._converged[:] = True
        return done

    def reset(self):
        self._prev_values = self._prev_counts = None
        self._corr = np.nan
        return super().reset()

    def __str__(self):
        return f"RankCorrelation(rtol={self.rtol:g}, burn_in={self.burn_in})"


class HistoryDeviation(StoppingCriterion):
    """Ghorbani & Zou's rule: compare values with those ``n_steps`` checks ago; the indices updated more than
    ``n_steps`` times converge together when the mean of ``|v_t - v_{t-n}| / |v_t|`` over them is below ``rtol``.
    With ``pin_converged`` an index stays converged once it has; stop when all have."""

    def __init__(self, n_steps: int, rtol: float, pin_converged: bool = True):
        super().__init__()
        self.n_steps = _positive_int("n_steps", n_steps)
        if not 0 <= rtol <= 1:
            raise UserError(f"rtol must be in [0, 1], got {rtol}")
        self.rtol, self.pin = float(rtol), bool(pin_converged)
        self._memory: list[np.ndarray] = []

    def _check(self, r):
        self._memory.append(r.values.copy())
        if len(self._memory) > self.n_steps + 1:
            self._memory.pop(0)
        if len(self._memory) < self.n_steps + 1:
            return False
        ii = r.counts > self.n_steps + 1
        if not ii.any():
            return False
        curr, saved = self._memory[-1][ii], self._memory[0][ii]
        diffs = np.abs(curr - saved)
        quots = np.divide(diffs, np.abs(curr), out=diffs.copy(), where=curr != 0)
        now = r.counts > self.n_steps + 1
        if np.mean(quots) < self.rtol:
            self._converged = (self._converged | now) if self.pin else now
        elif not self.pin:
            self._converged = np.zeros(len(r), bool)
        return bool(self._converged.all())

    def reset(self):
        self._memory = []
        return super().reset()

    def __str__(self):
        return f"HistoryDeviation(n_steps={self.n_steps}, rtol={self.rtol:g})"


class NoStopping(StoppingCriterion):
    """Never stops by itself: for finite samplers (exact methods), which end when the sampler is exhausted."""

    def _check(self, r):
        return False

    def __str__(self):
        return "NoStopping"


def check_terminates(is_done: StoppingCriterion, sampler_finite: bool) -> None:
    """Refuse a run that might never end: an infinite sampler needs a criterion that is certain to fire."""
    if not sampler_finite and not is_done.guaranteed:
        raise UserError(
            f"stopping rule {is_done} is not certain to fire with an infinite sampler, so the run could never end. "
            "Combine it with a bound, e.g. `is_done | MaxUpdates(1000)` or `| MaxTime(600)`.")
