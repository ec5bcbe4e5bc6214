"""scikit-learn's digits (1,797 8x8 images, embedded): the default dataset that runs anywhere in seconds."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.indexed import TensorBase
from datamatters.data.splits import carve, even_odd


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``X`` (1797, 1, 8, 8) float32 in [0, 1] and ``y`` int64."""
    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


class DigitsDataModule(IndexedDataModule):
    """One source ``all``: seeded test (``test_fraction``) and val (``val_fraction``) carve-outs, then the rest
    split even/odd (by position after a seeded shuffle) into target-train and holdout, as the reference does for CIFAR."""

    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, test_fraction: float = 0.2, holdout: bool = True, **kw):
        super().__init__(**kw)
        self.test_fraction, self.use_holdout = float(test_fraction), bool(holdout)

    def load_sources(self):
        X, y = digits_arrays()
        return {"all": (TensorBase(torch.from_numpy(X), torch.from_numpy(y)), y)}

    def make_splits(self):
        n = len(self.clean_targets["all"])
        rest, test = carve(np.arange(n), self.test_fraction, self.seed, salt=1)
        rest, val = carve(rest, self.val_fraction * n / max(len(rest), 1), self.seed, salt=2)
        shuffled = rest[np.random.default_rng([self.seed, 3]).permutation(len(rest))]
        if self.use_holdout:
            train, holdout = even_odd(shuffled)
        else:
            train, holdout = shuffled, shuffled[:0]
        return {
            "train": Split("all", np.sort(train)),
            "holdout": Split("all", np.sort(holdout)),
            "val": Split("all", val),
            "test": Split("all", test),
        }
