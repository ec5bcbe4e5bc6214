"""HMM selection that never loses work, and defaults chosen on planted data.

Planted runs: 5 Gaussian states in 6 features of very different scales (1e-3 .. 1e3, like weight statistics), 40
runs, left to right 0 -> 1 -> (2) -> 3 -> 4, where state 2 is a detour visited by every other run (those runs converge
later). The default pipeline must find K = 5, the states (label agreement) and state 2 as the detour."""
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment

from datamatters.dynamics import hmm
from datamatters.dynamics.hmm import HMMParams, regularised, select
from datamatters.dynamics.pipeline import HMMOptions, analyse_runs
from datamatters.errors import UserError

FEATS = [f"f{i}" for i in range(6)]


def planted_runs(n_runs=40, seed=0, d=6, sep=10.0):
    rng = np.random.default_rng(seed)
    means = np.cumsum(rng.normal(size=(5, d)), 0)
    means *= sep / np.linalg.norm(np.diff(means, axis=0), axis=1).min()
    scales = 10.0 ** rng.uniform(-3, 3, size=d)
    offsets = rng.normal(size=d) * scales * 5
    runs = []
    for i in range(n_runs):
        order = [0, 1, 2, 3, 4] if i % 2 == 0 else [0, 1, 3, 4]
        z = np.concatenate([[s] * int(rng.integers(5, 9)) for s in order])
        runs.append(((means[z] + rng.normal(size=(len(z), d))) * scales + offsets, z))
    return runs


def write_runs(root, runs):
    for i, (X, z) in enumerate(runs):
        df = pd.DataFrame(X, columns=FEATS).assign(step=100 * np.arange(len(z)), val_acc=np.where(z == 4, 0.95, 0.5))
        (root / f"run{i:02d}").mkdir(parents=True)
        df.to_parquet(root / f"run{i:02d}" / "weight_stats.parquet")
    return root


def agreement(paths: pd.DataFrame, runs, names) -> tuple[float, dict]:
    """Fraction of checkpoints whose state matches the planted one (best relabelling), and the relabelling."""
    truth = {n: z for n, (_, z) in zip(names, runs)}
    pred = paths.groupby("run", sort=False)["state"].apply(np.asarray)
    p = np.concatenate([pred[n] for n in truth])
    t = np.concatenate(list(truth.values()))
    C = np.zeros((p.max() + 1, 5))
    np.add.at(C, (p, t), 1)
    r, c = linear_sum_assignment(-C)
    return C[r, c].sum() / len(t), dict(zip(c.tolist(), r.tolist()))


def _analyse(tmp_path, **opts):
    runs = planted_runs()
    root = write_runs(tmp_path / "runs", runs)
    metrics, arts = analyse_runs(root, tmp_path / "out", HMMOptions(features=FEATS, n_jobs=1, **opts))
    paths = pd.read_parquet(arts["state_paths"])
    names = [str(root / f"run{i:02d}" / "weight_stats.parquet") for i in range(len(runs))]
    return metrics, paths, runs, names


def _check_recovered(metrics, paths, runs, names):
    assert metrics["hmm/k_bic"] == 5
    acc, to_state = agreement(paths, runs, names)
    assert acc > 0.97
    assert metrics["hmm/detour_states"] == [to_state[2]]
    assert metrics[f"hmm/state{to_state[2]}/visited_frac"] == pytest.approx(0.5)


def test_default_pipeline_recovers_five_states_and_the_detour(tmp_path):
    """Fast twin of the slow test below: the defaults with K <= 6 and one restart."""
    _check_recovered(*_analyse(tmp_path, k_max=6, restarts=1))


@pytest.mark.slow
def test_default_pipeline_full_grid_and_the_reference_choices(tmp_path):
    """Full defaults (K <= 8, 5 restarts) recover the planted model; the reference's three choices together do not."""
    _check_recovered(*_analyse(tmp_path / "default"))
    ref, *_ = _analyse(tmp_path / "reference", normalize="run", criterion_of="mean", init="dirichlet")
    assert ref["hmm/k_bic"] != 5


@pytest.mark.slow
def test_hmmlearn_random_init_is_what_traps_em():
    """The pipeline's training runs, same seeds: uniform initial transitions find the planted K = 5 optimum,
    hmmlearn's sparse Dirichlet draw does not (the reason for init='uniform')."""
    runs = planted_runs()[:32]
    X = np.vstack([r[0] for r in runs])
    X = (X - X.mean(0)) / X.std(0)
    lengths = [len(r[1]) for r in runs]
    ll = {init: [hmm.fit_one(X, lengths, 5, random_state=hmm.fit_seed(0, 5, r), init=init).score(X, lengths)
                 for r in range(3)] for init in ("uniform", "dirichlet")}
    assert max(ll["uniform"]) - min(ll["uniform"]) < 1e-6 * abs(max(ll["uniform"]))
    assert max(ll["dirichlet"]) < max(ll["uniform"]) - 100


def test_unknown_init_is_a_clear_error():
    with pytest.raises(UserError, match="init must be one of"):
        select(np.zeros((4, 1)), [4], k_max=1, init="kmeans")


# ---- never lose work ----------------------------------------------------------------------------------------------
def test_regularised_only_touches_covariances_hmmlearn_refuses():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 3))
    good = A @ A.T + np.eye(3)
    bad = np.diag([1e6, 1.0, -1e-4])  # a negative eigenvalue: what EM's cancellation leaves at unscaled features
    p = HMMParams(np.full(2, .5), np.full((2, 2), .5), np.zeros((2, 3)), np.stack([good, bad]), "full")
    fixed, changed = regularised(p, 1e-3)
    assert changed and np.array_equal(fixed.covars[0], good)
    np.testing.assert_allclose(np.linalg.eigvalsh(fixed.covars[1]), [1e-3, 1.0, 1e6])
    fixed.to_model()  # hmmlearn's validating setter accepts it
    with pytest.raises(ValueError, match="positive-definite"):
        p.to_model()
    same, changed = regularised(HMMParams(p.startprob, p.transmat, p.means, np.stack([good, good]), "full"), 1e-3)
    assert not changed
    diag, changed = regularised(HMMParams(p.startprob, p.transmat, p.means, np.array([[1., 2, 0], [1, 1, 1]]),
                                          "diag"), 1e-3)
    assert changed and diag.covars[0, 2] == 1e-3 and (diag.covars[1] == 1).all()


@pytest.mark.slow
def test_unscaled_planted_runs_finish_with_warnings_and_keep_every_fit():
    """The issue's reproducer: 40 planted runs, 6 features, normalize=none, K up to 8. Some fit ends with a covariance
    that is not positive definite; the selection warns and keeps (regularised) every fit instead of raising."""
    runs = planted_runs()
    X, L = np.vstack([r[0] for r in runs[:32]]), [len(r[1]) for r in runs[:32]]
    Xt, Lt = np.vstack([r[0] for r in runs[32:]]), [len(r[1]) for r in runs[32:]]
    with pytest.warns(UserWarning, match="not positive definite"):
        sel = select(X, L, Xt, Lt, k_max=8, restarts=1, n_jobs=1, init="dirichlet")
    assert len(sel.table) == 8 and (sel.table["status"] == "regularised").any()
    assert set(sel.models) == {(k, 0) for k in range(1, 9)}
    assert np.isfinite(sel.table["bic"]).all()
    for p in sel.models.values():
        assert (np.linalg.eigvalsh(p.full_covars()) > 0).all()


def test_a_fit_that_fails_is_dropped_with_a_warning_and_the_rest_kept(monkeypatch):
    runs = planted_runs(n_runs=10)
    X, L = np.vstack([r[0] for r in runs]), [len(r[1]) for r in runs]
    X = (X - X.mean(0)) / X.std(0)
    real = hmm.fit_one

    def failing(X, lengths, k, *a, **kw):
        if k == 2:
            raise ValueError("component 1 of 'full' covars must be symmetric, positive-definite")
        return real(X, lengths, k, *a, **kw)

    monkeypatch.setattr(hmm, "fit_one", failing)
    with pytest.warns(UserWarning, match=r"2 fit\(s\) \(K=2 restart 0, K=2 restart 1\) failed numerically"):
        sel = select(X, L, k_max=3, restarts=2, n_jobs=1, covariance_type="diag")
    assert len(sel.table) == 6 and set(sel.models) == {(1, 0), (1, 1), (3, 0), (3, 1)}
    assert list(sel.by_k["k"]) == [1, 3] and sel.k_bic in (1, 3)
    monkeypatch.setattr(hmm, "fit_one", lambda *a, **kw: (_ for _ in ()).throw(ValueError("always")))
    with pytest.raises(UserError, match="every one of the 2 HMM fits failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        select(X, L, k_max=1, restarts=2, n_jobs=1)


def test_finished_fits_are_persisted_and_a_killed_selection_resumes(tmp_path, monkeypatch):
    """Kill simulated by running part of the grid (K <= 2) first: the whole grid then fits only the missing ones and
    gives exactly the models of an uninterrupted run; other data or settings never reuse the cache."""
    runs = planted_runs(n_runs=10)
    X, L = np.vstack([r[0] for r in runs]), [len(r[1]) for r in runs]
    X = (X - X.mean(0)) / X.std(0)
    kw = dict(restarts=2, n_jobs=1, covariance_type="diag")
    calls = []
    real = hmm.fit_one
    monkeypatch.setattr(hmm, "fit_one", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    part = select(X, L, k_max=2, cache_dir=tmp_path, **kw)
    assert part.n_fitted == 4 and part.n_resumed == 0 and len(list(tmp_path.glob("k*_r*.npz"))) == 4
    (tmp_path / "k2_r1.npz").unlink()  # killed while writing this fit: its record has no arrays
    calls.clear()
    whole = select(X, L, k_max=3, cache_dir=tmp_path, **kw)
    assert whole.n_resumed == 3 and whole.n_fitted == 3 and sorted(calls) == [2, 3, 3]
    fresh = select(X, L, k_max=3, **kw)
    assert whole.k_bic == fresh.k_bic
    for key, p in fresh.models.items():
        np.testing.assert_array_equal(whole.models[key].means, p.means)
    pd.testing.assert_frame_equal(whole.by_k.drop(columns="seconds"), fresh.by_k.drop(columns="seconds"))
    calls.clear()
    select(X, L, k_max=3, cache_dir=tmp_path, **kw)
    assert calls == []
    select(X, L, k_max=3, cache_dir=tmp_path, **{**kw, "covariance_type": "spherical"})
    select(X[::-1].copy(), L, k_max=1, cache_dir=tmp_path, **kw)
    assert len(calls) == 3 * 2 + 2
