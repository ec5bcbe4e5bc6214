"""Gathering run tables into HMM training data.

The reference's steps, with its crashes and silent failures turned into checks: gather the per-run tables, sort each
by ``step``, drop runs with NaN in the chosen features, split runs (not checkpoints) into train/test with
``sklearn.model_selection.train_test_split`` (seeded; the reference used 80/20 with ``random_state=0``), then
normalise each run's features: z-score per run per feature (the reference's ``scipy.stats.zscore`` along time,
population std) or globally (mean/std of the training runs), optionally after first differences. A feature that is
constant within a run has no scale: it becomes 0 after centring instead of the reference's NaN.
"""
from __future__ import annotations

import glob as globlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from datamatters.dynamics.callback import TABLE_NAME, read_table
from datamatters.dynamics.stats import FEATURES
from datamatters.errors import UserError

NORMALIZATIONS = ("run", "global", "none")


def find_run_tables(runs: str | Path | Sequence[str | Path], filename: str = TABLE_NAME) -> list[Path]:
    """Run tables under a directory (searched recursively for ``filename``), matching a glob, or listed explicitly.
    A glob may match tables or run directories. Sorted, so the same inputs always give the same order."""
    items = [runs] if isinstance(runs, (str, Path)) else list(runs)
    found: set[Path] = set()
    for item in items:
        item = str(item)
        if globlib.has_magic(item):
            matches = [Path(p) for p in sorted(globlib.glob(item, recursive=True))]
        else:
            matches = [Path(item)]
        for m in matches:
            if m.is_dir():
                found.update(m.rglob(filename))
                if filename.endswith(".parquet"):
                    found.update(m.rglob(filename.replace(".parquet", ".csv")))
            elif m.is_file() and m.suffix in (".parquet", ".csv"):
                found.add(m)
    if not found:
        raise UserError(f"no run tables ({filename}) found under {runs!r}. Point dynamics.runs at the run "
                        "directories of a sweep that recorded weight statistics (callbacks.dynamics set), or a glob.")
    return sorted(found)


@dataclass
class RunSet:
    """Runs ready for the HMM: raw tables (sorted by step), their names, and which are train/test."""

    names: list[str]
    tables: list[pd.DataFrame]
    features: list[str]
    dropped: list[str] = field(default_factory=list)
    train: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)

    def lengths(self, which: Sequence[int]) -> list[int]:
        return [len(self.tables[i]) for i in which]


def load_runs(paths: Sequence[str | Path], features: Sequence[str] = FEATURES, max_checkpoints: int | None = None,
              min_length: int = 2) -> RunSet:
    """Read, check and sort the run tables; runs with NaN in the features are dropped (and named)."""
    features = list(features)
    if not features:
        raise UserError("dynamics: the feature list is empty")
    names, tables, dropped = [], [], []
    for p in paths:
        df = read_table(p)
        missing = [c for c in ["step", *features] if c not in df.columns]
        if missing:
            raise UserError(f"run table {p} lacks columns {missing}; it has {list(df.columns)[:30]}. "
                            "Record it with the dynamics callback or choose dynamics.features it has.")
        df = df.sort_values("step", kind="stable").drop_duplicates("step", keep="last").reset_index(drop=True)
        if max_checkpoints:
            df = df.head(int(max_checkpoints))
        if df[features].isna().to_numpy().any() or not np.isfinite(df[features].to_numpy(float)).all():
            dropped.append(str(p))
            continue
        if len(df) < min_length:
            dropped.append(str(p))
            continue
        names.append(str(p))
        tables.append(df)
    if not tables:
        raise UserError(f"all {len(paths)} run tables have NaN/inf in the features {features} or fewer than "
                        f"{min_length} checkpoints; nothing to fit")
    return RunSet(names, tables, features, dropped)


def split_runs(rs: RunSet, test_fraction: float = 0.2, seed: int = 0) -> RunSet:
    """Seeded split of runs into train/test (``sklearn.model_selection.train_test_split``, as the reference)."""
    from sklearn.model_selection import train_test_split

    n = len(rs.tables)
    if test_fraction <= 0:
        rs.train, rs.test = list(range(n)), []
        return rs
    if n < 2:
        raise UserError(f"dynamics: {n} usable run(s); a train/test split needs at least 2 (or set test_fraction=0)")
    tr, te = train_test_split(np.arange(n), test_size=test_fraction, random_state=int(seed))
    rs.train, rs.test = sorted(int(i) for i in tr), sorted(int(i) for i in te)
    return rs


def _zscore(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, (X - mean) / safe, 0.0)


@dataclass
class Normalizer:
    """Per-run or global z-scoring, optionally of first differences. ``fit`` only looks at the training runs."""

    how: str = "run"
    difference: bool = False
    mean_: np.ndarray | None = None
    std_: np.ndarray | None = None

    def __post_init__(self):
        if self.how not in NORMALIZATIONS:
            raise UserError(f"dynamics.normalize must be one of {NORMALIZATIONS}, got {self.how!r}")

    def _raw(self, df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
        X = df[list(features)].to_numpy(np.float64)
        return np.diff(X, axis=0) if self.difference else X

    def fit(self, tables: Sequence[pd.DataFrame], features: Sequence[str]) -> "Normalizer":
        if self.how == "global":
            X = np.vstack([self._raw(t, features) for t in tables])
            self.mean_, self.std_ = X.mean(0), X.std(0)
        return self

    def transform(self, df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
        X = self._raw(df, features)
        if self.how == "run":
            return _zscore(X, X.mean(0), X.std(0))
        if self.how == "global":
            return _zscore(X, self.mean_, self.std_)
        return X

    def steps(self, df: pd.DataFrame) -> np.ndarray:
        """The step of each transformed row (differences are attributed to the later checkpoint)."""
        s = df["step"].to_numpy()
        return s[1:] if self.difference else s


def stack(rs: RunSet, which: Sequence[int], norm: Normalizer) -> tuple[np.ndarray, list[int]]:
    """``(X (sum of lengths, d), lengths)`` of the chosen runs, in hmmlearn's concatenated layout."""
    seqs = [norm.transform(rs.tables[i], rs.features) for i in which]
    if not seqs:
        return np.zeros((0, len(rs.features))), []
    return np.vstack(seqs), [len(s) for s in seqs]
