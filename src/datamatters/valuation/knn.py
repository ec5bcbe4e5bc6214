"""KNN-Shapley (Jia et al. 2019): exact Shapley values of the K-nearest-neighbour utility in O(T n log n).

The utility is u(S) = (1/T) sum_t (1/K) sum_{k <= min(K, |S|)} 1[y of the k-th nearest point *of S* to x_t = y_t]
(``KNNClassifierUtility``; pyDVL 0.10's KNN utility instead keeps the K nearest of the *whole* training set and
drops those outside S, which is a different game with other Shapley values). For one test point, with training
points sorted by distance alpha_1..alpha_n (closest first, ties by position):

    s(alpha_n) = 1[y_alpha_n = y_t] / max(K, n)     (the paper and pyDVL use 1/n, wrong when K > n)
    s(alpha_i) = s(alpha_{i+1}) + (1[y_alpha_i = y_t] - 1[y_alpha_{i+1} = y_t]) / max(K, i)

Here the recursion is a reversed cumulative sum over a (T, n) matrix, so all test points of a chunk are done by
a handful of array operations instead of pyDVL's Python loop over test points and positions.
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.base import Valuation
from datamatters.valuation.dataset import Dataset, check_finite, check_same_features
from datamatters.valuation.result import ValuationResult
from datamatters.valuation.utility import OK, Utility


def _check(test: Dataset, train: Dataset) -> None:
    check_same_features(test, train)
    check_finite(train, "training set")
    check_finite(test, "test set")


def _metric_of(model) -> tuple[str, dict]:
    params = model.get_params()
    metric, kw = params.get("metric", "minkowski"), dict(params.get("metric_params") or {})
    if metric == "minkowski":
        kw.setdefault("p", params.get("p", 2))
    return metric, kw


def _k_of(model_or_k) -> tuple[int, str, dict]:
    if isinstance(model_or_k, (int, np.integer)):
        k, metric, kw = int(model_or_k), "euclidean", {}
    else:
        k = int(model_or_k.get_params()["n_neighbors"])
        metric, kw = _metric_of(model_or_k)
    if k < 1:
        raise UserError(f"KNN needs n_neighbors >= 1, got {k}")
    return k, metric, kw


def sorted_neighbours(x_test, x_train, metric: str = "euclidean", metric_kw: dict | None = None) -> np.ndarray:
    """Training positions sorted by distance to each test point, (T, n); ties keep the training order."""
    from sklearn.metrics import pairwise_distances

    d = pairwise_distances(np.asarray(x_test).reshape(len(x_test), -1), np.asarray(x_train).reshape(len(x_train), -1),
                           metric=metric, **(metric_kw or {}))
    return np.argsort(d, axis=1, kind="stable")


def knn_shapley_values(order: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, k: int) -> np.ndarray:
    """Sum over the test points of the exact KNN-Shapley values, from the neighbour order (T, n)."""
    T, n = order.shape
    match = np.asarray(y_train)[order] == np.asarray(y_test)[:, None]  # (T, n) bool
    steps = np.empty((T, n))  # steps[:, i] = s(alpha_i) - s(alpha_{i+1}); the last one is s(alpha_n) itself
    steps[:, -1] = match[:, -1] / max(k, n)  # Jia et al.'s 1/n assumes K <= n; max(K, n) is exact for any K
    if n > 1:
        np.subtract(match[:, :-1], match[:, 1:], out=steps[:, :-1], dtype=np.float64)
        steps[:, :-1] /= np.maximum(k, np.arange(1, n))[None, :]
    s = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]  # reversed cumulative sum: s(alpha_i) for every i
    return np.bincount(order.ravel(), weights=s.ravel(), minlength=n)


BYTES_PER_PAIR = 48  # distances, order, steps, their cumulative sum (8 bytes each), match, and headroom


class KNNShapleyValuation(Valuation):
    """Exact KNN-Shapley; ``model`` is a ``KNeighborsClassifier`` (its K and metric are used) or K itself
    (Euclidean). Test points are processed in chunks of ``chunk`` (default: as many as fit in ``max_memory_mb``,
    about 48 bytes per test-train pair), so memory stays bounded whatever the number of test points."""

    algorithm_name = "knn_shapley"

    def __init__(self, model, test_data: Dataset, chunk: int | None = None, max_memory_mb: float = 512,
                 progress: bool = False):
        super().__init__()
        self.k, self.metric, self.metric_kw = _k_of(model)
        if chunk is not None and int(chunk) < 1 or not max_memory_mb > 0:
            raise UserError(f"KNN-Shapley needs chunk >= 1 and max_memory_mb > 0, got {chunk}, {max_memory_mb}")
        self.test_data, self.chunk, self.max_memory_mb = test_data, chunk, float(max_memory_mb)
        self.progress = progress

    def chunk_size(self, n_train: int) -> int:
        if self.chunk is not None:
            return int(self.chunk)
        return max(1, int(self.max_memory_mb * 2**20 // (BYTES_PER_PAIR * max(n_train, 1))))

    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "KNNShapleyValuation":
        if data.is_grouped:
            raise UserError("KNN-Shapley values single points; pass an ungrouped Dataset")
        result = self._init_result(data, continue_from)
        _check(self.test_data, data)
        x, y = data.data()
        xt, yt = self.test_data.data()
        total, c = np.zeros(len(data)), self.chunk_size(len(data))
        for s in range(0, len(xt), c):
            order = sorted_neighbours(xt[s:s + c], x, self.metric, self.metric_kw)
            total += knn_shapley_values(order, y, np.asarray(yt)[s:s + c], self.k)
        values = total / len(xt)
        exact = ValuationResult(values, counts=np.ones(len(data), np.int64), indices=data.indices, names=data.names,
                                algorithm=str(self), status="converged")
        self._result = exact if continue_from is None else result.merge(exact)
        return self


class KNNClassifierUtility(Utility):
    """The KNN game: u(S) as in the module docstring (the utility whose exact Shapley value KNN-Shapley is)."""

    def __init__(self, model, test_data: Dataset, **kw):
        super().__init__(None, default=0.0, **kw)
        self.k, self.metric, self.metric_kw = _k_of(model)
        self.test_data = test_data
        self._order = None

    def _bind(self, data):
        if data.is_grouped:
            raise UserError("the KNN utility values single points; pass an ungrouped Dataset")
        _check(self.test_data, data)
        xt, _ = self.test_data.data()
        self._order = sorted_neighbours(xt, data.x, self.metric, self.metric_kw)
        self._match = np.asarray(data.y)[self._order] == np.asarray(self.test_data.y)[:, None]

    def _compute(self, masks):
        out = np.empty(len(masks))
        for j, m in enumerate(np.asarray(masks, bool)):
            inside = m[self._order]  # (T, n): is the r-th nearest point in S
            first_k = inside & (np.cumsum(inside, axis=1) <= self.k)
            out[j] = (first_k & self._match).sum(1).mean() / self.k
        return out, np.full(len(masks), OK, np.int8)

    def __str__(self):
        return f"KNNClassifierUtility(k={self.k})"
