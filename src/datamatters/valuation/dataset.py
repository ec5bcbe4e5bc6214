"""The data being valued: rows ``(x, y)``, player names, and optional groups (one player per group).

A *player* is what gets a value: a single row, or a group of rows when ``groups`` is given (pyDVL's
``GroupedDataset``). Subsets are boolean masks over players, shape (B, n_players); ``row_masks`` expands them to
rows for the model. Names are what results are keyed by (global dataset indices in the jobs).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from datamatters.errors import UserError


class Dataset:
    """``x`` (n_rows, ...) and ``y`` (n_rows,) arrays (numpy or torch); ``names`` one per player (default: the
    player positions); ``groups`` (n_rows,) any hashable labels, making each distinct label one player."""

    def __init__(self, x: Any, y: Any, names=None, groups=None, description: str = ""):
        n_rows = len(x)
        if len(y) != n_rows:
            raise UserError(f"x has {n_rows} rows but y has {len(y)}")
        self.x, self.y, self.description = x, y, description
        if groups is None:
            self.group_of_row = np.arange(n_rows, dtype=np.int64)
            self.group_labels = None
            n_players = n_rows
        else:
            groups = np.asarray(groups)
            if len(groups) != n_rows:
                raise UserError(f"groups has {len(groups)} entries for {n_rows} rows")
            self.group_labels, self.group_of_row = np.unique(groups, return_inverse=True)
            n_players = len(self.group_labels)
        if names is None:
            names = self.group_labels if self.group_labels is not None else np.arange(n_players)
        names = np.asarray(names)
        if len(names) != n_players:
            raise UserError(f"names has {len(names)} entries but there are {n_players} players")
        self.names = names
        self.indices = np.arange(n_players, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_rows(self) -> int:
        return len(self.group_of_row)

    @property
    def is_grouped(self) -> bool:
        return self.group_labels is not None

    def row_masks(self, masks: np.ndarray) -> np.ndarray:
        """Player masks (B, n_players) -> row masks (B, n_rows)."""
        masks = np.asarray(masks, dtype=bool)
        return masks if not self.is_grouped else masks[:, self.group_of_row]

    def rows(self, players=None) -> np.ndarray:
        """Row positions belonging to ``players`` (positions or a bool mask; all if None)."""
        if players is None:
            return np.arange(self.n_rows)
        sel = np.zeros(len(self), bool)
        sel[np.asarray(players)] = True
        return np.flatnonzero(sel[self.group_of_row])

    def data(self, players=None) -> tuple[Any, Any]:
        """``(x, y)`` of the rows of ``players``; all of them (None): the arrays themselves, not a copy (scorers
        keep the test set, and a worker payload would ship it twice)."""
        if players is None:
            return self.x, self.y
        r = self.rows(players)
        return self.x[r], self.y[r]

    def labels_of_players(self) -> np.ndarray:
        """One label per player (the label of its first row); class-wise Shapley needs ungrouped data."""
        first = np.zeros(len(self), np.int64)
        first[self.group_of_row[::-1]] = np.arange(self.n_rows)[::-1]
        return np.asarray(self.y)[first]

    def __repr__(self) -> str:
        g = f", groups={len(self)}" if self.is_grouped else ""
        return f"Dataset(n_rows={self.n_rows}{g})"


# ---- checks where data enters a valuation (run once; the algorithms behind them trust their inputs) -------------
def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def check_nonempty(data: Dataset, what: str) -> None:
    if data.n_rows == 0:
        raise UserError(f"the {what} is empty: pass at least one point")


def check_finite(data: Dataset, what: str) -> None:
    """Refuse NaN/inf features; the cheap sum test runs first, the element scan only to name the first row."""
    x = _np(data.x)
    if not np.issubdtype(x.dtype, np.number) or np.isfinite(x.sum()):
        return
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
    raise UserError(f"the {what} has non-finite features (NaN or inf) in {int(bad.sum())} rows, the first at "
                    f"position {int(np.argmax(bad))}: drop or impute them")


def check_same_features(test: Dataset, train: Dataset, what: str = "test set") -> None:
    """The test set must be non-empty and have the training set's feature shape."""
    check_nonempty(test, what)
    a, b = np.shape(test.x)[1:], np.shape(train.x)[1:]
    if tuple(a) != tuple(b):
        raise UserError(f"the {what} has features of shape {tuple(a)} but the training set {tuple(b)}: "
                        "both must come from the same feature space")


def check_labels(data: Dataset, n_classes: int, what: str) -> None:
    """Class labels must be integers in [0, n_classes) for a model with ``n_classes`` outputs."""
    y = _np(data.y)
    if len(y) == 0:
        return
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise UserError(f"the {what} has labels of type {y.dtype}: a classifier needs integer class labels")
    lo, hi = y.min(), y.max()
    if lo < 0 or hi >= n_classes:
        raise UserError(f"the {what} has labels from {int(lo)} to {int(hi)}, but the model has {n_classes} outputs: "
                        f"labels must be in [0, {n_classes}) (relabel the classes, or give the model more outputs)")
