"""Irreducible losses keyed by global index, with the metadata that ties them to one dataset/split/seed/labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamatters.artifacts import load_indexed, save_indexed
from datamatters.errors import UserError

CHECKED_KEYS = ("dataset", "split", "data_seed", "n", "targets_checksum")


def save_irreducible_losses(path: str | Path, losses: np.ndarray, indices: np.ndarray, meta: dict) -> Path:
    if not np.all(np.isfinite(losses)):
        raise UserError("irreducible losses contain NaN/inf: the IL model diverged; lower its learning rate "
                        "(irreducible.optimizer.lr) and rerun")
    return save_indexed(path, np.asarray(losses, np.float32), indices, meta)


def load_irreducible_losses(path: str | Path, expected_meta: dict, indices: np.ndarray) -> tuple[np.ndarray, dict]:
    """Load IL values aligned with ``indices``; refuse a file made for another dataset, split, seed or labels."""
    expect = {k: expected_meta[k] for k in CHECKED_KEYS if k in expected_meta}
    values, stored_idx, meta = load_indexed(path, expect=expect, indices=indices, what="irreducible-loss")
    pos = np.argsort(stored_idx)
    aligned = values[pos][np.searchsorted(stored_idx[pos], indices)]
    return aligned, meta


class ILTable:
    """Dense lookup of irreducible losses by global index (NaN where unknown -> error on lookup)."""

    def __init__(self, indices: np.ndarray, values: np.ndarray):
        size = int(np.max(indices)) + 1 if len(indices) else 0
        table = torch.full((size,), float("nan"))
        table[torch.as_tensor(indices, dtype=torch.long)] = torch.as_tensor(values, dtype=torch.float32)
        self.table = table

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.table.device)
        if idx.numel() and int(idx.max()) >= len(self.table):
            raise UserError("a training index has no irreducible loss: the IL file does not cover this split")
        out = self.table[idx]
        if torch.isnan(out).any():
            raise UserError("a training index has no irreducible loss: the IL file does not cover this split")
        return out

    def to(self, device) -> "ILTable":
        self.table = self.table.to(device)
        return self
