"""Datasets whose items are ``(index, x, y)``, ``index`` being the global index into the underlying dataset."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """A view of ``base`` restricted to global ``indices``, yielding ``(index, x, y)``.

    ``base[g]`` must return ``(x, y)`` (torchvision style) or ``x`` alone. ``targets`` (full length, indexed by the
    global index) overrides the base's labels, which is how label noise is applied without touching the base.
    """

    def __init__(
        self,
        base,
        indices: Sequence[int] | np.ndarray,
        targets: np.ndarray | torch.Tensor | None = None,
        transform: Callable | None = None,
    ):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        g = int(self.indices[i])
        item = self.base[g]
        x, y = item if isinstance(item, tuple) else (item, None)
        if self.targets is not None:
            y = self.targets[g]
        if self.transform is not None:
            x = self.transform(x)
        return g, x, torch.as_tensor(y, dtype=torch.long)

    def label_array(self) -> np.ndarray:
        """Labels of this view in order (the possibly-noisy ones)."""
        if self.targets is not None:
            return self.targets[self.indices].numpy()
        return np.asarray([int(self.base[int(g)][1]) for g in self.indices])


class TensorBase:
    """Base dataset over in-memory tensors ``X`` (n, ...) and ``y`` (n,) for small embedded data."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X, self.y = torch.as_tensor(X), torch.as_tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, g: int):
        return self.X[g], self.y[g]


class TensorIndexedDataset(IndexedDataset):
    """Fast path for in-memory data: whole batches are gathered by fancy indexing (see ``batches``)."""

    def __getitem__(self, positions):
        """One position gives one item; a list/tensor of positions (from a BatchSampler) gives a whole batch."""
        if not isinstance(positions, (list, tuple, torch.Tensor, np.ndarray)):
            return super().__getitem__(positions)
        g = torch.as_tensor(self.indices)[torch.as_tensor(positions, dtype=torch.long)]
        y = self.targets[g] if self.targets is not None else self.base.y[g]
        return g, self.base.X[g], y

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(global_indices, X, y)`` of the whole view, for vectorised engines."""
        idx = torch.as_tensor(self.indices)
        y = self.targets[idx] if self.targets is not None else self.base.y[idx]
        X = self.base.X[idx]
        return idx, X, y
