"""Gathering run tables: discovery, sorting, dropping NaN runs, the seeded run split and the normalisations."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import zscore

from datamatters.dynamics.tables import Normalizer, find_run_tables, load_runs, split_runs, stack
from datamatters.errors import UserError


def _write(root, name, n=6, seed=0, nan=False, fmt="parquet"):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"step": np.arange(n)[::-1] * 10, "a": rng.normal(size=n), "b": rng.normal(size=n),
                       "c": np.ones(n)})
    if nan:
        df.loc[2, "a"] = np.nan
    d = root / name
    d.mkdir(parents=True)
    if fmt == "csv":
        df.to_csv(d / "weight_stats.csv", index=False)
    else:
        df.to_parquet(d / "weight_stats.parquet")
    return df


def test_discovery_sorting_and_nan_runs(tmp_path):
    for i in range(4):
        _write(tmp_path, f"sweep/{i}", seed=i, nan=i == 3)
    _write(tmp_path, "sweep/csvrun", seed=9, fmt="csv")
    found = find_run_tables(tmp_path / "sweep")
    assert len(found) == 5 and found == sorted(found)
    assert find_run_tables(str(tmp_path / "sweep" / "[01]")) == found[:2]
    rs = load_runs(found, ["a", "b"])
    assert len(rs.tables) == 4 and len(rs.dropped) == 1 and rs.dropped[0].endswith("3/weight_stats.parquet")
    assert all(t["step"].is_monotonic_increasing for t in rs.tables)
    with pytest.raises(UserError, match="no run tables"):
        find_run_tables(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="lacks columns"):
        load_runs(found, ["a", "zz"])


def test_split_is_seeded_and_normalisations(tmp_path):
    for i in range(10):
        _write(tmp_path, f"r{i}", seed=i)
    rs = load_runs(find_run_tables(tmp_path), ["a", "b", "c"])
    a = split_runs(rs, 0.2, seed=0)
    tr, te = list(a.train), list(a.test)
    assert len(te) == 2 and sorted(tr + te) == list(range(10))
    split_runs(rs, 0.2, seed=0)
    assert rs.test == te
    split_runs(rs, 0.2, seed=1)
    assert rs.test != te
    split_runs(rs, 0.2, seed=0)
    # per-run z-score = scipy's zscore along time; a constant feature becomes 0, not NaN
    norm = Normalizer("run")
    X, lengths = stack(rs, rs.train, norm)
    assert lengths == [6] * 8
    np.testing.assert_allclose(X[:6, :2], zscore(rs.tables[rs.train[0]][["a", "b"]].to_numpy(), axis=0))
    assert np.all(X[:, 2] == 0)
    # global: statistics of the training runs only
    g = Normalizer("global").fit([rs.tables[i] for i in rs.train], rs.features)
    Xg, _ = stack(rs, rs.train, g)
    np.testing.assert_allclose(Xg[:, :2].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Xg[:, :2].std(0), 1)
    d = Normalizer("run", difference=True)
    Xd, ld = stack(rs, rs.train, d)
    assert ld == [5] * 8
    np.testing.assert_allclose(Xd[:5, :2], zscore(np.diff(rs.tables[rs.train[0]][["a", "b"]].to_numpy(), axis=0)))
    with pytest.raises(UserError, match="normalize"):
        Normalizer("zz")
