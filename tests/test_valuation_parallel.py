"""Same seed, same values, whatever the number of workers: in-process, loky processes and dask."""
import numpy as np
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier

from datamatters.valuation import (
    Dataset,
    MaxChecks,
    ModelUtility,
    MSRBanzhafValuation,
    SupervisedScorer,
    TMCShapleyValuation,
)
from datamatters.valuation.data_oob import DataOOBValuation


def problem(n=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2, size=(3, 4))
    y, yt = rng.integers(0, 3, n), rng.integers(0, 3, 30)
    return (Dataset(centers[y] + rng.normal(size=(n, 4)), y),
            Dataset(centers[yt] + rng.normal(size=(30, 4)), yt))


def tmc(n_jobs=1, dask_address=None):
    train, test = problem()
    u = ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test), n_jobs=n_jobs, dask_address=dask_address,
                     show_warnings=False)
    return TMCShapleyValuation(u, is_done=MaxChecks(2), seed=11).fit(train).result  # auto batch size


def msr(n_jobs=1, dask_address=None):
    train, test = problem()
    u = ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test), n_jobs=n_jobs, dask_address=dask_address,
                     show_warnings=False)
    return MSRBanzhafValuation(u, MaxChecks(4), batch_size=16, seed=5).fit(train).result


def oob(n_jobs=1, dask_address=None):
    train, _ = problem()
    return DataOOBValuation(DecisionTreeClassifier(random_state=0), n_estimators=12, seed=2, n_jobs=n_jobs,
                            dask_address=dask_address).fit(train).result


def test_loky_workers_give_identical_values():
    serial = tmc()
    par = tmc(n_jobs=2)
    np.testing.assert_array_equal(serial.values, par.values)
    np.testing.assert_array_equal(serial.counts, par.counts)


def test_dask_cluster_gives_identical_values():
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        address = c.scheduler_address
        for run in (tmc, msr, oob):
            np.testing.assert_array_equal(run().values, run(dask_address=address).values)


def _pid_and_sum(payload, item):
    import os

    return os.getpid(), payload + item


def test_local_workers_outlive_a_fit_and_read_each_fits_payload():
    """Worker start (seconds of imports) is paid once per session, not per fit; a new fit's payload replaces
    the old one in every worker, and its temporary file is removed when the fit ends."""
    import os

    from datamatters.valuation.parallel import make_executor

    first = make_executor(2)
    first.bind(100)
    out = first.map(_pid_and_sum, range(6))
    path, pool = first._path, first._pool
    first.close()
    assert [s for _, s in out] == [100, 101, 102, 103, 104, 105] and not os.path.exists(path)
    second = make_executor(2)
    second.bind(-1)
    assert second._pool is pool  # the same processes
    again = second.map(_pid_and_sum, range(6))
    second.close()
    assert [s for _, s in again] == [-1, 0, 1, 2, 3, 4]
    assert os.getpid() not in {p for p, _ in out + again}


def test_prestarted_workers_are_the_ones_a_fit_uses():
    """prestart (the job calls it before loading data) starts the pool that fits then use: same processes (a pool
    started with other settings would be replaced by loky, its imports lost)."""
    import os

    from datamatters.valuation.parallel import make_executor, prestart

    assert prestart(1) == []  # serial: nothing to start
    warm = {f.result(timeout=300) for f in prestart(2)}
    ex = make_executor(2)
    ex.bind(0)
    pids = set(ex._pool._processes)
    used = {p for p, _ in ex.map(_pid_and_sum, range(8))}
    ex.close()
    assert warm and warm <= pids and used <= pids and os.getpid() not in pids
