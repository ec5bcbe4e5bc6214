"""KNN-Shapley against brute-force exact Shapley of the "K nearest neighbours within S" utility (n <= 10)."""
import itertools
import math

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from datamatters.valuation import Dataset, ExactShapleyValuation
from datamatters.valuation.knn import KNNClassifierUtility, KNNShapleyValuation


def brute_force_knn_shapley(X, y, Xt, yt, k):
    """Shapley values by the subset formula, with the utility written out independently (plain loops)."""
    n = len(X)

    def u(S):
        if not S:
            return 0.0
        total = 0.0
        for x, lab in zip(Xt, yt):
            d = [(np.linalg.norm(X[j] - x), j) for j in S]
            nearest = [j for _, j in sorted(d)[:k]]
            total += sum(y[j] == lab for j in nearest) / k
        return total / len(Xt)

    values = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            w = 1 / (n * math.comb(n - 1, size))
            for S in itertools.combinations(others, size):
                values[i] += w * (u(list(S) + [i]) - u(list(S)))
    return values, u(list(range(n)))


@pytest.mark.parametrize("seed,n,k", [(0, 7, 1), (1, 7, 3), (2, 8, 5), (3, 6, 9)])
def test_knn_shapley_equals_brute_force(seed, n, k):
    rng = np.random.default_rng(seed)
    X, Xt = rng.normal(size=(n, 3)), rng.normal(size=(5, 3))
    y, yt = rng.integers(0, 3, n), rng.integers(0, 3, 5)
    exact, u_full = brute_force_knn_shapley(X, y, Xt, yt, k)
    fast = KNNShapleyValuation(KNeighborsClassifier(n_neighbors=k), Dataset(Xt, yt), chunk=2).fit(Dataset(X, y))
    np.testing.assert_allclose(fast.result.values, exact, atol=1e-10)
    assert fast.result.values.sum() == pytest.approx(u_full, abs=1e-10)  # efficiency (u(empty) = 0)
    # the same utility as a datamatters Utility, valued by exhaustive enumeration
    util = KNNClassifierUtility(k, Dataset(Xt, yt))
    via_utility = ExactShapleyValuation(util).fit(Dataset(X, y)).result.values
    np.testing.assert_allclose(via_utility, exact, atol=1e-10)


def test_knn_shapley_n10_and_metric():
    rng = np.random.default_rng(5)
    X, Xt = rng.normal(size=(10, 2)), rng.normal(size=(4, 2))
    y, yt = rng.integers(0, 2, 10), rng.integers(0, 2, 4)
    for model in (KNeighborsClassifier(3), KNeighborsClassifier(3, metric="manhattan")):
        fast = KNNShapleyValuation(model, Dataset(Xt, yt)).fit(Dataset(X, y)).result.values
        slow = ExactShapleyValuation(KNNClassifierUtility(model, Dataset(Xt, yt))).fit(Dataset(X, y)).result.values
        np.testing.assert_allclose(fast, slow, atol=1e-10)


def test_knn_shapley_result_is_keyed_by_names():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 2)), rng.integers(0, 2, 12)
    names = np.arange(100, 112)
    r = KNNShapleyValuation(2, Dataset(X[:4], y[:4])).fit(Dataset(X, y, names=names)).result
    np.testing.assert_array_equal(r.names, names)
    assert r.status == "converged"
