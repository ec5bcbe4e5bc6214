"""ValuationResult (vectorised updates, merge, sort, index, save/load, pandas) and stopping criteria."""
import numpy as np
import pytest

from datamatters.errors import UserError
from datamatters.valuation import (
    AbsoluteStandardError,
    HistoryDeviation,
    MaxChecks,
    MaxTime,
    MaxUpdates,
    MinUpdates,
    MSRBanzhafValuation,
    RankCorrelation,
    TMCShapleyValuation,
    UniformSampler,
    ShapleyValuation,
    ValuationResult,
)
from datamatters.valuation.games import ShoesGame
from datamatters.valuation.stopping import check_terminates


def raw_samples(seed=0, n=5, m=400):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, m), rng.normal(size=m) * 3 + rng.integers(0, n, m)


def reference_stats(pos, x, n):
    mean = np.array([x[pos == i].mean() for i in range(n)])
    var = np.array([x[pos == i].var(ddof=1) for i in range(n)])
    cnt = np.bincount(pos, minlength=n)
    return mean, var, cnt


def test_batched_updates_equal_plain_statistics():
    pos, x = raw_samples()
    r = ValuationResult.zeros(5)
    for chunk in np.array_split(np.arange(len(x)), 7):  # batches of different sizes
        r.update(pos[chunk], x[chunk])
    mean, var, cnt = reference_stats(pos, x, 5)
    np.testing.assert_allclose(r.values, mean, rtol=1e-12)
    np.testing.assert_allclose(r.variances, var, rtol=1e-10)
    np.testing.assert_array_equal(r.counts, cnt)
    np.testing.assert_allclose(r.stderr, np.sqrt(var / cnt), rtol=1e-10)


def test_merge_is_count_weighted_over_union_of_indices():
    pos, x = raw_samples(1, n=6)
    a = ValuationResult.zeros(indices=np.arange(6), algorithm="x")
    b = ValuationResult.zeros(indices=np.arange(6), algorithm="x")
    a.update(pos[:150], x[:150])
    b.update(pos[150:], x[150:])
    m = a + b
    mean, var, cnt = reference_stats(pos, x, 6)
    np.testing.assert_allclose(m.values, mean, rtol=1e-12)
    np.testing.assert_allclose(m.variances, var, rtol=1e-10)
    np.testing.assert_array_equal(m.counts, cnt)
    # disjoint and overlapping index sets
    c = ValuationResult([1.0, 2.0], counts=[1, 3], indices=[10, 11], algorithm="x")
    d = ValuationResult([5.0, 7.0], counts=[3, 1], indices=[11, 12], algorithm="x")
    e = c.merge(d)
    np.testing.assert_array_equal(e.indices, [10, 11, 12])
    np.testing.assert_allclose(e.values, [1.0, 3.5, 7.0])
    np.testing.assert_array_equal(e.counts, [1, 6, 1])
    with pytest.raises(UserError):
        c.merge(ValuationResult([1.0], indices=[10], algorithm="other"))
    with pytest.raises(UserError):
        c.merge(ValuationResult([1.0], indices=[10], names=["z"], algorithm="x"))


def test_sort_index_and_dataframe():
    r = ValuationResult([3.0, 1.0, 2.0], variances=[0.1, 0.2, 0.3], counts=[1, 2, 3], indices=[0, 1, 2],
                        names=["a", "b", "c"], algorithm="alg")
    s = r.sort()
    np.testing.assert_array_equal(s.names, ["b", "c", "a"])
    np.testing.assert_array_equal(s.variances, [0.2, 0.3, 0.1])
    np.testing.assert_array_equal(r.names, ["a", "b", "c"])  # not in place by default
    d = r.sort(reverse=True, key="count")
    np.testing.assert_array_equal(d.indices, [2, 1, 0])
    assert d.positions([0])[0] == 2
    sub = r[[0, 2]]
    np.testing.assert_array_equal(sub.values, [3.0, 2.0])
    df = s.to_dataframe()
    assert list(df.columns) == ["alg", "alg_variances", "alg_stderr", "alg_counts"]
    assert list(df.index) == ["b", "c", "a"]
    np.testing.assert_allclose(df["alg_variances"], [0.2, 0.3, 0.1])  # no double permutation (pyDVL bug)
    with pytest.raises(UserError):
        r.sort(key="colour")


def test_save_load_round_trip_without_pickle(tmp_path):
    r = ValuationResult([1.0, -2.0], variances=[0.5, 0.25], counts=[3, 4], indices=[0, 1], names=["p", "q"],
                        algorithm="tmc", status="converged", extra={"in_mean": np.array([1.0, 2.0])},
                        meta={"seed": 3, "sampler": {"next_batch": 7}})
    path = r.save(tmp_path / "v.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert set(z.files) >= {"values", "variances", "counts", "indices", "names", "header"}
    q = ValuationResult.load(path, indices=[0, 1])
    for attr in ("values", "variances", "counts", "indices", "names"):
        np.testing.assert_array_equal(getattr(q, attr), getattr(r, attr))
    assert (q.algorithm, q.status, q.meta) == (r.algorithm, r.status, r.meta)
    np.testing.assert_array_equal(q.extra["in_mean"], [1.0, 2.0])
    with pytest.raises(UserError, match="other data indices"):
        ValuationResult.load(path, indices=[0, 2])
    with pytest.raises(UserError, match="not found"):
        ValuationResult.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a saved ValuationResult"):
        ValuationResult.load(tmp_path / "junk.npz")


@pytest.mark.parametrize("make", [
    lambda g: TMCShapleyValuation(g, is_done=MaxChecks(4), seed=2, batch_size=3),
    lambda g: MSRBanzhafValuation(g, MaxChecks(4), batch_size=16, seed=2),
    lambda g: ShapleyValuation(g, UniformSampler(batch_size=16, seed=2), MaxChecks(4)),
])
def test_continue_from_saved_result_equals_one_long_fit(tmp_path, make):
    g = ShoesGame(2, 3)
    first = make(g).fit(g.data).result
    first.save(tmp_path / "r.npz")
    resumed = make(g).fit(g.data, continue_from=ValuationResult.load(tmp_path / "r.npz")).result
    long = make(g)
    long.is_done = MaxChecks(8)
    direct = long.fit(g.data).result
    np.testing.assert_allclose(resumed.values, direct.values, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(resumed.counts, direct.counts)
    # the resumed fit recomputes u(N) for the truncation rule once; nothing else is evaluated twice
    assert 0 <= resumed.meta["utility_evaluations"] - direct.meta["utility_evaluations"] <= 1


def test_continue_rejects_other_data():
    g, h = ShoesGame(2, 3), ShoesGame(3, 3)
    r = MSRBanzhafValuation(g, MaxChecks(1), batch_size=4).fit(g.data).result
    with pytest.raises(UserError, match="other data"):
        MSRBanzhafValuation(h, MaxChecks(1), batch_size=4).fit(h.data, continue_from=r)


def result_with(values, counts, stderr=None):
    counts = np.asarray(counts)
    var = None if stderr is None else np.asarray(stderr) ** 2 * counts
    return ValuationResult(values, variances=var, counts=counts)


def test_count_criteria_and_composition():
    r = result_with([0.0, 0.0, 0.0], [2, 5, 9])
    assert MaxUpdates(9)(r) and not MaxUpdates(10)(r)
    assert MinUpdates(2)(r) and not MinUpdates(3)(r)
    mu = MinUpdates(5)
    mu(r)
    np.testing.assert_array_equal(mu.converged, [False, True, True])
    c = MaxUpdates(100) | MinUpdates(5)
    assert not c(r)
    np.testing.assert_array_equal(c.converged, [False, True, True])
    a = MaxUpdates(3) & MinUpdates(2)
    assert a(r)
    n = ~MaxUpdates(3)
    assert not n(r)
    np.testing.assert_array_equal(n.converged, [True, False, False])
    checks = MaxChecks(3)
    assert [checks(r) for _ in range(3)] == [False, False, True]
    assert checks.completion() == 1.0
    assert MaxTime(1e-9)(r)
    assert (MaxUpdates(5) | AbsoluteStandardError(0.1)).guaranteed
    assert not (MaxUpdates(5) & AbsoluteStandardError(0.1)).guaranteed
    assert not (~MaxUpdates(5)).guaranteed


def test_standard_error_rank_and_history_criteria():
    ase = AbsoluteStandardError(0.1, fraction=0.5, burn_in=3)
    assert not ase(result_with([1, 2, 3, 4], [10, 10, 2, 10], [0.05, 0.5, 0.01, 0.5]))
    np.testing.assert_array_equal(ase.converged, [True, False, False, False])
    assert ase(result_with([1, 2, 3, 4], [10, 10, 10, 10], [0.05, 0.05, 0.5, 0.5]))

    rc = RankCorrelation(rtol=0.01, burn_in=0)
    vals = np.arange(10.0)
    for t in range(1, 4):
        done = rc(result_with(vals + 0.01 * t * np.sin(np.arange(10)), np.full(10, t)))
    assert done  # ranking stable across checks

    hd = HistoryDeviation(n_steps=2, rtol=0.05)
    flip = [result_with([-1.0, -2.0], [5, 5]), result_with([-1.5, 1.0], [6, 6]), result_with([-1.0, -2.0], [7, 7])]
    # |v_t - v_{t-2}| / |v_t| = 0 here: converged
    assert [hd(r) for r in flip][-1]
    hd2 = HistoryDeviation(n_steps=1, rtol=0.05)
    seq = [result_with([-1.0, -1.0], [5, 5]), result_with([-3.0, -3.0], [6, 6])]
    # a signed denominator (pyDVL) gives mean((2/-3)) < 0.05 and would stop; |v_t| does not
    assert not any(hd2(r) for r in seq)


def test_unbounded_rule_with_infinite_sampler_is_refused():
    g = ShoesGame(2, 1)
    for rule in (RankCorrelation(0.01, 10), AbsoluteStandardError(0.01), ~MaxUpdates(5),
                 MinUpdates(3) & HistoryDeviation(5, 0.1)):
        with pytest.raises(UserError, match="not certain to fire"):
            ShapleyValuation(g, UniformSampler(seed=0), rule).fit(g.data)
    check_terminates(RankCorrelation(0.01, 10) | MaxChecks(5), sampler_finite=False)  # bounded: fine
    with pytest.raises(UserError):
        MaxUpdates(0)
    with pytest.raises(UserError):
        MaxTime(0)
