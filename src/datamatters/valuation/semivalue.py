"""The semivalue engine: any coefficient with any sampler, one batch of utilities at a time.

Per batch the sampler's subsets become one ``utility.evaluate`` call (so a batch of subset models trains at once
or spreads over the workers), marginals are importance-weighted with ``w(n, k) / p(S | i)`` (or left unweighted
when ``coefficient`` is None, i.e. the sampler's distribution *is* the semivalue, as in TMC and MSR-Banzhaf), and
the result absorbs the whole batch in one vectorised merge. Stopping is checked after every batch.

Three evaluation strategies follow the sampler's kind:

* ``marginal``: (i, S) pairs, u(S + i) - u(S);
* ``permutation``: prefix utilities of many permutations at once, in blocks, with truncation;
* ``msr``: one u(S) updates every index, in an "in" and an "out" running mean (O(B n) per batch of B sets;
  pyDVL rebuilt an n-sized result for every single update, O(n^2) per set).
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.base import Valuation
from datamatters.valuation.coefficients import Coefficient
from datamatters.valuation.dataset import Dataset
from datamatters.valuation.result import ValuationResult, merge_samples
from datamatters.valuation.samplers.base import Sampler
from datamatters.valuation.stopping import StoppingCriterion, check_terminates
from datamatters.valuation.utility import Utility, compute_env

MSR_KEYS = ("in_mean", "in_var", "in_count", "out_mean", "out_var", "out_count")


def importance_weights(coefficient: Coefficient | None, sampler: Sampler, n: int, k: np.ndarray) -> np.ndarray:
    if coefficient is None:
        return np.ones(np.shape(k))
    return np.exp(coefficient.log(n, k) - sampler.log_weight(n, k))


@functools.lru_cache(maxsize=4)
def _player_keys(n: int) -> np.ndarray:
    """One random 64-bit key per player (fixed: they never touch the sampled permutations)."""
    return np.random.default_rng(0x5E7).integers(0, 2**63, n, dtype=np.uint64)


def _prefix_hashes(perms: np.ndarray) -> np.ndarray:
    """A hash per prefix: the wrapping sum of its members' keys. Equal sets hash equal, so distinct hashes prove
    distinct prefixes."""
    return np.add.accumulate(_player_keys(perms.shape[1])[perms], axis=1)  # uint64: wraps, never overflows


def prefix_utilities(perms: np.ndarray, utility: Utility, truncation, total: float | None,
                     block: int | None = None) -> np.ndarray:
    """u of every prefix of every permutation, (B, n), with pyDVL's truncation semantics (after a truncation
    the prefix utility stays constant). Positions that cannot truncate are evaluated in one block; afterwards
    each step evaluates ``block`` positions of every running permutation (auto: fill the preferred batch).

    A step often evaluates one subset, so its bookkeeping is kept to a few array calls: the running
    permutations' ranks are re-gathered only when one stops, truncation is checked on plain floats, and the
    utility is told when the prefix hashes prove the step's subsets distinct (no duplicate search)."""
    B, n = perms.shape
    ranks = np.argsort(perms, axis=1)  # the inverse permutations: a player's position
    U = np.empty((B, n))
    hashes = _prefix_hashes(perms) if B > 1 else None
    positions = np.arange(n)[:, None]
    first = min(n, truncation.first_possible(n))
    rows, run_ranks, run_idx = list(range(B)), ranks, slice(None)  # the running permutations
    pos = 0
    while pos < n and rows:
        m = len(rows)
        step = block or max(1, math.ceil(utility.preferred_batch / m))
        end = first if pos < first else min(n, pos + step)
        if m == 1 and end == pos + 1:  # one permutation left, one prefix per step: walk it on plain values
            _walk(perms[rows[0]], ranks[rows[0]] < pos, pos, U[rows[0]], utility, truncation, total)
            break
        k = end - pos
        masks = (run_ranks[:, None, :] <= positions[pos:end]).reshape(m * k, n)
        distinct = m == 1 or len(set(hashes[run_idx, pos:end].ravel().tolist())) == m * k
        vals = utility._evaluate(masks, distinct=distinct).reshape(m, k)
        U[run_idx, pos:end] = vals
        j0 = max(pos, first - 1)  # no truncation can fire before position first - 1
        if j0 < end:
            stopped = []
            for i, (r, us) in enumerate(zip(rows, vals[:, j0 - pos:].tolist())):
                for j, u in enumerate(us, j0 + 1):  # j: the prefix length
                    if truncation.fires(j, u, n, total):
                        U[r, j:] = u
                        stopped.append(i)
                        break
            if stopped:
                keep = [i for i in range(m) if i not in stopped]
                rows = [rows[i] for i in keep]
                run_ranks, run_idx = run_ranks[keep], np.asarray(rows, np.intp)
        pos = end
    return U


def _walk(order: np.ndarray, mask: np.ndarray, pos: int, u_row: np.ndarray, utility: Utility, truncation,
          total: float | None) -> None:
    """``prefix_utilities`` for a single permutation from position ``pos`` (``mask``: its prefix before it), one
    prefix per evaluation, until it truncates or ends; writes into ``u_row``."""
    n, one, fires = len(order), utility._evaluate_one, truncation.fires
    while pos < n:
        mask[order[pos]] = True
        u = one(mask)
        u_row[pos] = u
        pos += 1
        if fires(pos, u, n, total):
            u_row[pos:] = u
            return


class SemivalueValuation(Valuation):
    """Estimate a semivalue with ``sampler`` until ``is_done``. ``coefficient`` None means no importance
    correction (the sampler's own distribution defines the value)."""

    algorithm_name = "semivalue"

    def __init__(self, utility: Utility, sampler: Sampler, is_done: StoppingCriterion,
                 coefficient: Coefficient | None, skip_converged: bool = False, progress: bool = False):
        super().__init__()
        if not isinstance(utility, Utility):
            raise UserError(f"utility must be a datamatters.valuation Utility, got {type(utility).__name__}")
        if skip_converged and not sampler.supports_skip:
            raise UserError(f"{sampler} cannot skip converged indices; use an infinite powerset sampler "
                            "(uniform, antithetic, stratified, Owen with finite=False) or skip_converged=False")
        self.utility, self.sampler, self.is_done = utility, sampler, is_done
        self.coefficient, self.skip_converged, self.progress = coefficient, bool(skip_converged), bool(progress)
        self._total: float | None = None

    def __str__(self) -> str:
        return self.algorithm_name

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "SemivalueValuation":
        result = self._init_result(data, continue_from)
        check_terminates(self.is_done, self.sampler.finite)
        self.utility = self.utility.with_dataset(data)
        n = len(data)
        batch_id = self._restore_sampler(result)
        self.is_done.reset()
        self._total = None
        started, evals0 = time.perf_counter(), self.utility.n_evaluations
        active = None
        with self.utility.session(), _progress(self.progress, str(self)) as bar:
            self._prepare(result, n)
            size = self.sampler.batch_size or self._auto_batch_size(n)
            while True:
                batch = self.sampler.batch(n, batch_id, size, active)
                if batch is None:
                    result.status = "converged"
                    break
                self._process(batch, result, n)
                batch_id += 1
                bar.update(1)
                if self.is_done(result):
                    break
                if self.skip_converged:
                    active = ~self.is_done.converged
        result.meta.update(self._meta(batch_id, started, evals0, result.meta))
        self._result = result
        return self

    def _restore_sampler(self, result: ValuationResult) -> int:
        state = result.meta.get("sampler") if result.meta.get("seed") == self.sampler.seed else None
        if state and state.get("name") == str(self.sampler):
            self.sampler.set_state(state.get("state", {}))
            return int(state.get("next_batch", 0))
        self.sampler.reset()
        return 0

    def _meta(self, batch_id: int, started: float, evals0: int, previous: dict) -> dict:
        return {
            "seed": self.sampler.seed,
            "sampler": {"name": str(self.sampler), "next_batch": batch_id, "state": self.sampler.state()},
            "utility_evaluations": int(previous.get("utility_evaluations", 0)) + self.utility.n_evaluations - evals0,
            "fit_seconds": float(previous.get("fit_seconds", 0.0)) + time.perf_counter() - started,
            "stopping": str(self.is_done),
        }

    def _auto_batch_size(self, n: int) -> int:
        """From the utility alone, never from the number of workers (the batches fix which subsets are drawn):
        set ``batch_size`` >= n_jobs yourself to keep many workers busy."""
        if self.sampler.kind == "permutation":
            return max(4, self.utility.preferred_batch // max(n, 1))
        return max(16, self.utility.preferred_batch)

    def _prepare(self, result: ValuationResult, n: int) -> None:
        if self.sampler.kind == "msr":
            for k in MSR_KEYS:
                if k not in result.extra:
                    result.extra[k] = np.zeros(n, np.int64 if k.endswith("count") else float)
        trunc = getattr(self.sampler, "truncation", None)
        if trunc is not None and trunc.needs_total:
            self._total = self.utility.require_fittable()

    def _process(self, batch, result: ValuationResult, n: int) -> None:
        kind = self.sampler.kind
        if kind == "marginal":
            self._process_marginals(batch.idx, batch.masks, result, n)
        elif kind == "permutation":
            self._process_permutations(batch.perms, result, n)
        elif kind == "msr":
            self._process_msr(batch.masks, result, n)
        else:
            raise UserError(f"{self.sampler} does not sample marginals; it cannot estimate a semivalue")

    # ---- strategies -------------------------------------------------------------------------------------------
    def _process_marginals(self, idx, masks, result, n):
        B = len(idx)
        with_i = masks.copy()
        with_i[np.arange(B), idx] = True
        u = self.utility._evaluate(np.concatenate([with_i, masks]))
        k = masks.sum(1)
        result.update(idx, (u[:B] - u[B:]) * importance_weights(self.coefficient, self.sampler, n, k))

    def _process_permutations(self, perms, result, n):
        trunc = self.sampler.truncation
        if self.utility.n_workers > 1 and not self.utility.batches_models:
            # process workers: ship whole permutations (one round trip each), walk the prefixes there
            chunks = np.array_split(perms, min(len(perms), self.utility.n_workers))
            parts = self.utility.run_tasks(_prefixes_in_worker, [(c, trunc, self._total) for c in chunks if len(c)])
            U = np.concatenate([p[0] for p in parts])
            self.utility.n_evaluations += int(sum(p[1] for p in parts))
        else:
            U = prefix_utilities(perms, self.utility, trunc, self._total, self.sampler.prefix_block)
        prev = np.concatenate([np.full((len(perms), 1), self.utility.default), U[:, :-1]], axis=1)
        w = importance_weights(self.coefficient, self.sampler, n, np.arange(n))
        result.update(perms.ravel(), ((U - prev) * w[None, :]).ravel())

    def _process_msr(self, masks, result, n):
        u = self.utility._evaluate(masks)
        k = masks.sum(1)
        w_in = importance_weights(self.coefficient, self.sampler, n, np.maximum(k - 1, 0))
        w_out = importance_weights(self.coefficient, self.sampler, n, k)
        e = result.extra
        r, c = np.nonzero(masks)
        e["in_mean"], e["in_var"], e["in_count"] = merge_samples(e["in_mean"], e["in_var"], e["in_count"],
                                                                 c, (u * w_in)[r])
        r, c = np.nonzero(~masks)
        e["out_mean"], e["out_var"], e["out_count"] = merge_samples(e["out_mean"], e["out_var"], e["out_count"],
                                                                    c, (u * w_out)[r])
        combine_msr(result)


def _prefixes_in_worker(utility: Utility, task) -> tuple[np.ndarray, int]:
    """Worker side of a parallel permutation batch: the prefix utilities of a chunk of permutations, one subset
    at a time (nothing evaluated after a truncation), and how many utilities that took."""
    perms, truncation, total = task
    own = utility.worker_copy()  # own counters: threads of one dask worker may share the payload
    with compute_env(own):  # once per task, not per subset
        return prefix_utilities(perms, own, truncation, total, block=1), own.n_evaluations


def combine_msr(result: ValuationResult) -> None:
    """values = in-mean - out-mean; counts = min of the two counts; variances chosen so that stderr is the
    standard error of the difference (pyDVL's conventions); NaN/inf until both means have a sample."""
    e = result.extra
    counts = np.minimum(e["in_count"], e["out_count"])
    se2 = e["in_var"] / np.maximum(e["in_count"], 1) + e["out_var"] / np.maximum(e["out_count"], 1)
    result.values = np.where(counts > 0, e["in_mean"] - e["out_mean"], np.nan)
    result.variances = np.where(counts > 0, se2 * counts, np.inf)
    result.counts = counts.astype(np.int64)


class _NullBar:
    def update(self, k):
        pass


class _progress:
    """tqdm over batches when asked, a no-op otherwise."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __enter__(self):
        if not self.enabled:
            return _NullBar()
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=self.desc, unit="batch")
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


__all__ = ["SemivalueValuation", "combine_msr", "importance_weights", "prefix_utilities"]
