"""Base class of valuation methods: ``fit(data, continue_from=None)``, then ``result`` / ``values()``."""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.dataset import Dataset, check_nonempty
from datamatters.valuation.result import ValuationResult


class Valuation:
    algorithm_name = "valuation"

    def __init__(self):
        self._result: ValuationResult | None = None

    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "Valuation":  # pragma: no cover
        raise NotImplementedError

    @property
    def result(self) -> ValuationResult:
        if self._result is None:
            raise UserError(f"{self} has not been fitted: call fit(data) first")
        return self._result

    def values(self, sort: bool = False) -> ValuationResult:
        """A copy of the result (sorted by value, ascending, if ``sort``)."""
        r = self.result.copy()
        return r.sort() if sort else r

    @property
    def is_fitted(self) -> bool:
        return self._result is not None

    def _init_result(self, data: Dataset, continue_from: ValuationResult | None) -> ValuationResult:
        if not isinstance(data, Dataset):
            raise UserError(f"fit() needs a datamatters.valuation.Dataset, got {type(data).__name__}")
        check_nonempty(data, "training set to value")
        if continue_from is None:
            return ValuationResult.zeros(indices=data.indices, names=data.names, algorithm=str(self))
        r = continue_from.copy()
        if not (np.array_equal(r.indices, data.indices) and
                np.array_equal(r.names.astype(str), np.asarray(data.names).astype(str))):
            raise UserError("the result to continue from was computed for other data (indices or names differ)")
        if r.algorithm and r.algorithm != str(self):
            raise UserError(f"cannot continue a {r.algorithm!r} result with {self}")
        r.status = "pending"
        return r

    def __str__(self) -> str:
        return self.algorithm_name
