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
        if n_rows == 0:
            raise UserError("the dataset to value is empty: pass at least one training point")
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
        """``(x, y)`` of the rows of ``players``."""
        r = self.rows(players)
        return self.x[r], self.y[r]

    def labels_of_players(self) -> np.ndarray:
        """One label per player (the label of its first row); class-wise Shapley needs ungrouped data."""
        first = np.zeros(len(self), np.int64)
        first[self.group_of_row[::-1]] = np.arange(self.n_rows)[::-1]
        return np.asarray(self.y)[first]

    @classmethod
    def from_arrays(cls, X, y, train_size: float = 0.8, seed: int = 0, stratify: bool = False):
        """Split arrays into (train, test) Datasets, names = row positions in ``X``."""
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(X))
        tr, te = train_test_split(idx, train_size=train_size, random_state=seed,
                                  stratify=np.asarray(y) if stratify else None)
        return cls(X[tr], y[tr], names=tr), cls(X[te], y[te], names=te)

    def __repr__(self) -> str:
        g = f", groups={len(self)}" if self.is_grouped else ""
        return f"Dataset(n_rows={self.n_rows}{g})"
