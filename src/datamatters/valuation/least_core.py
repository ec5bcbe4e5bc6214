r"""Least core (exact and Monte Carlo, Yan & Procaccia 2021), solved with scipy (HiGHS LP, then SLSQP).

Step 1 (linear program): minimise the subsidy e subject to sum_i x_i = u(N) and x(S) + e >= u(S) for the
subsets S considered (all 2^n, or a uniform sample). Step 2 (pyDVL's "egalitarian" tie-break): among the
solutions with that minimal e, take the one of least Euclidean norm. As in pyDVL, duplicate subsets are removed,
the full set becomes the equality constraint and the empty set is dropped (``non_negative_subsidy`` adds e >= 0).
pyDVL solves both steps with cvxpy/SCS (an approximate first-order solver); here the LP uses HiGHS and the
minimum-norm step an exact primal active-set method started from the LP's solution (``min_norm_point``).
Infeasible or unbounded problems give NaN values and status "failed".
"""
from __future__ import annotations

import warnings

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.base import Valuation
from datamatters.valuation.dataset import Dataset
from datamatters.valuation.result import ValuationResult
from datamatters.valuation.samplers import AllSetsSampler, Sampler, UniformSetSampler
from datamatters.valuation.samplers.powerset import MAX_EXACT_N
from datamatters.valuation.utility import Utility


def independent_rows(M: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Positions of a maximal linearly independent set of rows of ``M`` (QR with column pivoting)."""
    from scipy.linalg import qr

    if len(M) == 0:
        return np.zeros(0, np.int64)
    _, R, piv = qr(M.T, mode="economic", pivoting=True)
    d = np.abs(np.diag(R))
    return np.sort(piv[: int((d > tol * max(1.0, d.max())).sum())])


def min_norm_point(G: np.ndarray, g: np.ndarray, Eq: np.ndarray, f: np.ndarray, x0: np.ndarray,
                   tol: float = 1e-9, max_iter: int | None = None) -> tuple[np.ndarray, bool]:
    """Primal active-set method for min ||x||^2 s.t. Eq x = f (independent rows), G x >= g, from a feasible
    ``x0``. Each step projects onto the working equalities (least squares), walks until an inequality blocks,
    and at a stationary point drops the inequality with the most negative multiplier. Returns (x, converged)."""
    x, W, k = np.asarray(x0, float).copy(), [], len(Eq)
    if np.linalg.matrix_rank(Eq) >= len(x):  # the equalities pin x down: nothing to minimise
        return np.linalg.lstsq(Eq, f, rcond=None)[0], True
    for _ in range(max_iter or 20 * len(x) + 100):
        E = np.vstack([Eq, G[W]]) if W else Eq
        lam = np.linalg.lstsq(E.T, x, rcond=None)[0]
        p = E.T @ lam - x
        if np.linalg.norm(p) <= tol * (1.0 + np.linalg.norm(x)):
            mu = lam[k:]
            if not W or mu.min() >= -tol:
                return x, True
            W.pop(int(np.argmin(mu)))
            continue
        Gp, slack = G @ p, np.maximum(G @ x - g, 0.0)
        block = Gp < -tol
        if W:
            block[W] = False
        ratios = np.where(block, slack / np.where(block, -Gp, 1.0), np.inf)
        j = int(np.argmin(ratios))
        alpha = min(1.0, float(ratios[j]))
        x = x + alpha * p
        if alpha < 1.0:
            W.append(j)
    return x, False


def solve_least_core(A: np.ndarray, b: np.ndarray, total: float, non_negative_subsidy: bool = False,
                     tol: float = 1e-9) -> tuple[np.ndarray | None, float | None, str]:
    """Egalitarian least core for constraints ``A x + e >= b`` and ``sum x = total``; returns (x, e, message).

    By complementary slackness every constraint with a positive LP multiplier is tight on the whole optimal
    face, so those rows become equalities of the minimum-norm step; often they fix x, and the step is free."""
    A = np.asarray(A, float)
    n, m = A.shape[1], len(A)
    c = np.zeros(n + 1)
    c[-1] = 1.0
    bounds = [(None, None)] * n + [(0.0 if non_negative_subsidy else None, None)]
    from scipy.optimize import linprog  # lazy: keeps `import datamatters.valuation` light for workers

    lp = linprog(c, A_ub=np.hstack([-A, -np.ones((m, 1))]) if m else None, b_ub=-b if m else None,
                 A_eq=np.hstack([np.ones((1, n)), np.zeros((1, 1))]), b_eq=[total], bounds=bounds, method="highs")
    if lp.status != 0:
        return None, None, f"linear program failed: {lp.message}"
    x0, e = lp.x[:n], float(lp.x[-1])
    if m == 0:
        return np.full(n, total / n), e, "no constraints"
    tight = np.flatnonzero(np.abs(lp.ineqlin.marginals) > tol)
    Eq = np.vstack([np.ones((1, n)), A[tight]])
    f = np.concatenate([[total], b[tight] - e])
    keep = independent_rows(Eq)  # a dropped row is implied by the kept ones
    x, ok = min_norm_point(A, b - e - tol, Eq[keep], f[keep], x0)
    if not ok or np.min(A @ x - (b - e)) < -1e-6 or abs(x.sum() - total) > 1e-6:
        warnings.warn("the minimum-norm step did not converge; returning the linear program's solution",
                      RuntimeWarning, stacklevel=2)
        return x0, e, "lp solution"
    return x, e, "ok"


class LeastCoreValuation(Valuation):
    """Least core from the subsets ``sampler`` gives: ``AllSetsSampler`` (exact) or ``UniformSetSampler``
    (Monte Carlo, ``n_samples`` subsets)."""

    algorithm_name = "least_core"

    def __init__(self, utility: Utility, sampler: Sampler, n_samples: int | None = None,
                 non_negative_subsidy: bool = False, *, batch_size: int | None = None):
        super().__init__()
        if sampler.kind != "sets":
            raise UserError("least core needs a set sampler (AllSetsSampler or UniformSetSampler)")
        if not sampler.finite and not n_samples:
            raise UserError("Monte Carlo least core needs n_samples (a positive number of subsets)")
        self.utility, self.sampler, self.n_samples = utility, sampler, n_samples
        self.non_negative_subsidy, self.batch_size = bool(non_negative_subsidy), batch_size

    def _subsets(self, n: int) -> np.ndarray:
        size = self.batch_size or max(64, self.utility.preferred_batch)
        blocks, got, b = [], 0, 0
        while self.n_samples is None or got < self.n_samples:
            want = size if self.n_samples is None else min(size, self.n_samples - got)
            batch = self.sampler.batch(n, b, want)
            if batch is None:
                break
            blocks.append(batch.masks)
            got, b = got + len(batch.masks), b + 1
        return np.concatenate(blocks)

    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "LeastCoreValuation":
        if continue_from is not None:
            raise UserError("least core is solved in one go; it cannot continue a previous result")
        result = self._init_result(data, None)
        self.utility = self.utility.with_dataset(data)
        n = len(data)
        if self.sampler.finite and n > MAX_EXACT_N:
            raise UserError(f"exact least core enumerates 2^n subsets; n = {n} is too many (max {MAX_EXACT_N})")
        masks = np.unique(self._subsets(n), axis=0)
        sizes = masks.sum(1)
        with self.utility.session():
            total = self.utility.require_fittable()
            keep = (sizes > 0) & (sizes < n)
            A = masks[keep]
            b = np.concatenate([self.utility.evaluate(A[s:s + 4096]) for s in range(0, len(A), 4096)]) if len(A) \
                else np.zeros(0)
        x, e, msg = solve_least_core(A.astype(float), b, total, self.non_negative_subsidy)
        if x is None:
            warnings.warn(f"least core: {msg}", RuntimeWarning, stacklevel=2)
            result.values[:] = np.nan
            result.status = "failed"
        else:
            result.values = np.asarray(x, float)
            result.counts[:] = 1
            result.status = "converged"
        result.meta.update({"subsidy": e if e is not None else float("nan"), "n_constraints": int(len(A)),
                            "utility_evaluations": self.utility.n_evaluations, "solver": msg})
        self._result = result
        return self

    @property
    def subsidy(self) -> float:
        return float(self.result.meta["subsidy"])


class ExactLeastCoreValuation(LeastCoreValuation):
    algorithm_name = "exact_least_core"

    def __init__(self, utility: Utility, non_negative_subsidy: bool = False, *, batch_size: int | None = None):
        super().__init__(utility, AllSetsSampler(), None, non_negative_subsidy, batch_size=batch_size)


class MonteCarloLeastCoreValuation(LeastCoreValuation):
    algorithm_name = "montecarlo_least_core"

    def __init__(self, utility: Utility, n_samples: int, non_negative_subsidy: bool = False, *, seed: int = 0,
                 batch_size: int | None = None):
        super().__init__(utility, UniformSetSampler(seed=seed), int(n_samples), non_negative_subsidy,
                         batch_size=batch_size)
