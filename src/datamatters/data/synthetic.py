"""Generated tasks of the training-dynamics experiments: modular addition (grokking) and sparse parities.

Both are in-memory (``TensorBase``) and deterministic functions of ``seed``; neither has a holdout split (the
holdout exists for RHO-LOSS, which these tasks do not use), so ``holdout`` is empty.
"""
from __future__ import annotations

import numpy as np
import torch

from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.indexed import TensorBase
from datamatters.errors import UserError


def modular_addition_arrays(p: int = 113) -> tuple[np.ndarray, np.ndarray]:
    """All ``p * p`` pairs as token sequences ``[a, b, p]`` (``p`` is the ``=`` token) and labels ``(a + b) mod p``."""
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = a.ravel(), b.ravel()
    X = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int64)
    return X, ((a + b) % p).astype(np.int64)


def sparse_parity_arrays(n: int, n_bits: int = 40, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform vectors in {-1, +1}^n_bits and the parity of the first ``k`` bits as a 0/1 label
    (1 when the product of those bits is +1, as the reference's +-1 target)."""
    rng = np.random.default_rng([int(seed), 0x9A])
    X = rng.integers(0, 2, size=(n, n_bits)).astype(np.float32) * 2 - 1
    return X, (X[:, :k].prod(axis=1) > 0).astype(np.int64)


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


class ModularAdditionDataModule(IndexedDataModule):
    """``(a + b) mod p`` over all ``p * p`` pairs. A seeded ``train_fraction`` (30 %, as the reference) is target-train;
    the remaining pairs are split into val (``val_fraction`` of them) and test. The reference evaluates on all the
    remaining 70 %; here half of it is val (drives model selection and convergence times) and half is test."""

    name = "modular_addition"
    input_shape = (3,)

    def __init__(self, p: int = 113, train_fraction: float = 0.3, **kw):
        kw.setdefault("val_fraction", 0.5)
        super().__init__(**kw)
        if int(p) < 2:
            raise UserError(f"modular_addition: p must be >= 2, got {p}")
        if not 0.0 < float(train_fraction) < 1.0:
            raise UserError(f"modular_addition: train_fraction must be in (0, 1), got {train_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"modular_addition: val_fraction must be in (0, 1), got {self.val_fraction}")
        self.p, self.train_fraction = int(p), float(train_fraction)
        self.num_classes = self.p

    def load_sources(self):
        X, y = modular_addition_arrays(self.p)
        return {"all": (TensorBase(torch.from_numpy(X), torch.from_numpy(y)), y)}

    def make_splits(self):
        n = self.p * self.p
        perm = np.random.default_rng([self.seed, 0x3D]).permutation(n)
        n_train = int(round(self.train_fraction * n))
        rest = perm[n_train:]
        n_val = int(round(self.val_fraction * len(rest)))
        return {
            "train": Split("all", np.sort(perm[:n_train])),
            "holdout": Split("all", _empty()),
            "val": Split("all", np.sort(rest[:n_val])),
            "test": Split("all", np.sort(rest[n_val:])),
        }


class SparseParityDataModule(IndexedDataModule):
    """Sparse parities (n = 40 bits, k = 3 relevant): ``n_train`` / ``n_val`` / ``n_test`` fresh samples (the reference
    draws 1,000 train and 100 test). Labels are 0/1; train a single-logit model with the hinge loss."""

    name = "sparse_parity"
    num_classes = 2

    def __init__(self, n_bits: int = 40, k: int = 3, n_train: int = 1000, n_val: int = 100, n_test: int = 1000, **kw):
        super().__init__(**kw)
        if not 1 <= int(k) <= int(n_bits):
            raise UserError(f"sparse_parity: need 1 <= k <= n_bits, got k={k}, n_bits={n_bits}")
        if min(int(n_train), int(n_val), int(n_test)) < 1:
            raise UserError("sparse_parity: n_train, n_val and n_test must all be >= 1")
        self.n_bits, self.k = int(n_bits), int(k)
        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.input_shape = (self.n_bits,)

    def load_sources(self):
        X, y = sparse_parity_arrays(self.n_train + self.n_val + self.n_test, self.n_bits, self.k, self.seed)
        return {"all": (TensorBase(torch.from_numpy(X), torch.from_numpy(y)), y)}

    def make_splits(self):
        a, b = self.n_train, self.n_train + self.n_val
        idx = np.arange(b + self.n_test)
        return {
            "train": Split("all", idx[:a]),
            "holdout": Split("all", _empty()),
            "val": Split("all", idx[a:b]),
            "test": Split("all", idx[b:]),
        }


def synthetic_image_arrays(n: int, num_classes: int = 10, seed: int = 0, noise: float = 1.0,
                           generation_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 images (3, 32, 32): a smooth per-class template (fixed by ``generation_seed``) plus pixel noise
    (``seed``), normalised to about zero mean and unit variance; labels cycle through the classes."""
    tmpl_rng = np.random.default_rng([int(generation_seed), 0x1A6])
    coarse = tmpl_rng.normal(size=(num_classes, 3, 4, 4)).astype(np.float32)
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)      # 4x4 blocks of 8x8 pixels: learnable by a CNN
    y = (np.arange(n) % num_classes).astype(np.int64)
    X = templates[y] + float(noise) * np.random.default_rng([int(seed), 0x1A7]).normal(size=(n, 3, 32, 32)).astype(np.float32)
    return (X / np.sqrt(1.0 + float(noise) ** 2)).astype(np.float32), y


class SyntheticImagesDataModule(IndexedDataModule):
    """CIFAR-shaped synthetic data (32x32x3, 10 classes) of any size, generated deterministically in memory: for
    throughput benchmarks and tests where no download is possible. Splits (a seeded permutation): ``n_train``
    target-train, ``n_holdout`` holdout, ``n_val`` val, ``n_test`` test."""

    name = "synthetic_images"
    input_shape = (3, 32, 32)

    def __init__(self, n_train: int = 5000, n_holdout: int = 5000, n_val: int = 500, n_test: int = 1000,
                 num_classes: int = 10, noise: float = 1.0, generation_seed: int = 0, **kw):
        super().__init__(**kw)
        sizes = dict(n_train=n_train, n_holdout=n_holdout, n_val=n_val, n_test=n_test)
        if min(int(n_train), int(n_val), int(n_test)) < 1 or int(n_holdout) < 0:
            raise UserError(f"synthetic_images: n_train, n_val and n_test must be >= 1 and n_holdout >= 0, got {sizes}")
        if int(num_classes) < 2:
            raise UserError(f"synthetic_images: num_classes must be >= 2, got {num_classes}")
        self.sizes = {k: int(v) for k, v in sizes.items()}
        self.num_classes, self.noise, self.generation_seed = int(num_classes), float(noise), int(generation_seed)

    def load_sources(self):
        X, y = synthetic_image_arrays(sum(self.sizes.values()), self.num_classes, self.seed, self.noise,
                                      self.generation_seed)
        return {"all": (TensorBase(torch.from_numpy(X), torch.from_numpy(y)), y)}

    def make_splits(self):
        perm = np.random.default_rng([self.seed, 0x1A8]).permutation(sum(self.sizes.values()))
        out, start = {}, 0
        for split, key in (("train", "n_train"), ("holdout", "n_holdout"), ("val", "n_val"), ("test", "n_test")):
            out[split] = Split("all", np.sort(perm[start: start + self.sizes[key]]))
            start += self.sizes[key]
        return out
