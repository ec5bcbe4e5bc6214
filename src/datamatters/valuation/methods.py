"""The named semivalue methods with pyDVL 0.10's defaults, plus leave-one-out."""
from __future__ import annotations

import copy

import numpy as np

from datamatters.valuation.base import Valuation
from datamatters.valuation.coefficients import BanzhafCoefficient, BetaCoefficient, ShapleyCoefficient
from datamatters.valuation.dataset import Dataset
from datamatters.valuation.result import ValuationResult
from datamatters.valuation.samplers import (
    DeterministicUniformSampler,
    MSRSampler,
    OwenSampler,
    PermutationSampler,
    RelativeTruncation,
    Sampler,
    TruncationPolicy,
)
from datamatters.valuation.semivalue import SemivalueValuation
from datamatters.valuation.stopping import HistoryDeviation, MaxUpdates, NoStopping, StoppingCriterion
from datamatters.valuation.utility import Utility, UtilityCache


class ShapleyValuation(SemivalueValuation):
    """Data Shapley with any sampler (importance-weighted by the Shapley coefficient); named ``owen_shapley``
    (the job's method name) when the sampler is an Owen sampler, ``shapley`` otherwise."""

    algorithm_name = "shapley"

    def __init__(self, utility: Utility, sampler: Sampler, is_done: StoppingCriterion, skip_converged=False,
                 progress=False):
        super().__init__(utility, sampler, is_done, ShapleyCoefficient(), skip_converged, progress)
        if isinstance(sampler, OwenSampler):
            self.algorithm_name = "owen_shapley"


class ExactShapleyValuation(ShapleyValuation):
    """All n 2^(n-1) marginals (n <= 24), with a utility cache so each subset is trained once."""

    algorithm_name = "exact_shapley"

    def __init__(self, utility: Utility, *, batch_size: int | None = None, progress=False):
        if utility.cache is None:  # a copy: the caller's utility keeps its own (absent) cache
            utility = copy.copy(utility)
            utility.cache = UtilityCache()
        super().__init__(utility, DeterministicUniformSampler(batch_size=batch_size), NoStopping(), progress=progress)


class TMCShapleyValuation(SemivalueValuation):
    """Truncated Monte Carlo Shapley (Ghorbani & Zou 2019) with pyDVL's defaults: permutations truncated by
    ``RelativeTruncation(rtol=0.01, burn_in_fraction=0.4)``, stopped by ``HistoryDeviation(100, 0.05)``. pyDVL's
    default rule alone may never fire, so ours adds ``| MaxUpdates(1000)`` (1000 permutations) as a bound."""

    algorithm_name = "tmc_shapley"

    def __init__(self, utility: Utility, truncation: TruncationPolicy | None = None,
                 is_done: StoppingCriterion | None = None, *, seed: int = 0, batch_size: int | None = None,
                 antithetic: bool = False, prefix_block: int | None = None, progress=False):
        from datamatters.valuation.samplers import AntitheticPermutationSampler

        truncation = truncation if truncation is not None else RelativeTruncation(rtol=0.01, burn_in_fraction=0.4)
        cls = AntitheticPermutationSampler if antithetic else PermutationSampler
        sampler = cls(truncation=truncation, batch_size=batch_size, seed=seed, prefix_block=prefix_block)
        if is_done is None:
            is_done = HistoryDeviation(100, 0.05) | MaxUpdates(1000)
        super().__init__(utility, sampler, is_done, None, False, progress)


class BanzhafValuation(SemivalueValuation):
    """Data Banzhaf with any sampler (importance-weighted)."""

    algorithm_name = "banzhaf"

    def __init__(self, utility: Utility, sampler: Sampler, is_done: StoppingCriterion, skip_converged=False,
                 progress=False):
        super().__init__(utility, sampler, is_done, BanzhafCoefficient(), skip_converged, progress)


class MSRBanzhafValuation(SemivalueValuation):
    """Data Banzhaf with maximum sample reuse (Wang & Jia 2023): every utility evaluation updates all indices."""

    algorithm_name = "banzhaf_msr"  # the job's method name (configs/valuation/banzhaf_msr.yaml)

    def __init__(self, utility: Utility, is_done: StoppingCriterion, *, batch_size: int | None = None, seed: int = 0,
                 progress=False):
        super().__init__(utility, MSRSampler(batch_size=batch_size, seed=seed), is_done, None, False, progress)


class BetaShapleyValuation(SemivalueValuation):
    """Beta(alpha, beta)-Shapley (Kwon & Zou 2022) with any sampler; (16, 1) is the paper's recommendation."""

    algorithm_name = "beta_shapley"

    def __init__(self, utility: Utility, sampler: Sampler, is_done: StoppingCriterion, alpha: float = 16.0,
                 beta: float = 1.0, skip_converged=False, progress=False):
        super().__init__(utility, sampler, is_done, BetaCoefficient(alpha, beta), skip_converged, progress)
        self.alpha, self.beta = alpha, beta


class LOOValuation(Valuation):
    """Leave-one-out: v_i = u(N) - u(N \\ {i}), all n + 1 utilities in batches."""

    algorithm_name = "loo"

    def __init__(self, utility: Utility, *, batch_size: int | None = None):
        super().__init__()
        self.utility, self.batch_size = utility, batch_size

    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "LOOValuation":
        result = self._init_result(data, continue_from)
        self.utility = self.utility.with_dataset(data)
        n = len(data)
        with self.utility.session():
            total = self.utility.require_fittable()
            size = self.batch_size or max(16, self.utility.preferred_batch)
            u_minus = np.concatenate([self.utility.evaluate(~np.eye(n, dtype=bool)[s:s + size])
                                      for s in range(0, n, size)])
        result.update(np.arange(n), total - u_minus)
        result.status = "converged"
        result.meta["utility_evaluations"] = int(result.meta.get("utility_evaluations", 0)) + \
            self.utility.n_evaluations
        self._result = result
        return self
