"""MNIST and QMNIST read by torchvision from the idx files under the data root.

Expected layout (what ``torchvision.datasets.MNIST/QMNIST(root, download=True)`` leaves there)::

    <data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    <data_dir>/QMNIST/raw/qmnist-{train,test}-{images-idx3-ubyte,labels-idx2-int}

Splits as CIFAR: target-train = even indices of the 60k train set, holdout = odd indices minus a seeded ``val_fraction``
carve-out (validation), test = the 10k test set. QMNIST's test file holds 60k digits: the first 10k (``test10k``, the
MNIST test set) are the test split; ``holdout_from: test50k`` uses the other 50k as the holdout and validation instead
(the reference's QMNIST set-up), and all 60k train digits become target-train. No augmentation (as the reference).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.cifar import even_odd_splits
from datamatters.data.splits import carve
from datamatters.data.transforms import MNIST_MEAN_STD, ImageTensorBase
from datamatters.errors import UserError


class MNISTDataModule(IndexedDataModule):
    name = "mnist"
    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, holdout: bool = True, **kw):
        super().__init__(**kw)
        self.use_holdout = bool(holdout)

    def _supports_download(self) -> bool:
        return True

    def _raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def _open(self, train: bool):
        from torchvision.datasets import MNIST

        try:
            return MNIST(str(self.data_dir), train=train, download=self.download)
        except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True to download it"
            raise self.missing(self._raw_dir(), "Put the four idx files (train/t10k images and labels, uncompressed) "
                                                "there, from http://yann.lecun.com/exdb/mnist/ or a torchvision "
                                                "download on another machine") from exc

    def _source(self, ds) -> tuple:
        images = ds.data.unsqueeze(1).contiguous()  # (n, 1, 28, 28) uint8
        labels = np.asarray(ds.targets if ds.targets.ndim == 1 else ds.targets[:, 0], dtype=np.int64)
        return ImageTensorBase(images, labels, *MNIST_MEAN_STD), labels

    def load_sources(self):
        return {"train": self._source(self._open(True)), "test": self._source(self._open(False))}

    def make_splits(self):
        return even_odd_splits(len(self.clean_targets["train"]), len(self.clean_targets["test"]), self.val_fraction,
                               self.seed, self.use_holdout)


class QMNISTDataModule(MNISTDataModule):
    name = "qmnist"
    test10k = 10_000  # QMNIST's test file: the first 10k are MNIST's test set, the other 50k are new digits

    def __init__(self, holdout_from: str = "train", **kw):
        super().__init__(**kw)
        if holdout_from not in ("train", "test50k"):
            raise UserError(f"qmnist: holdout_from must be 'train' or 'test50k', got {holdout_from!r}")
        self.holdout_from = holdout_from

    def _raw_dir(self) -> Path:
        return self.data_dir / "QMNIST" / "raw"

    def _open(self, train: bool):
        from torchvision.datasets import QMNIST

        try:
            return QMNIST(str(self.data_dir), what="train" if train else "test", compat=True, download=self.download)
        except RuntimeError as exc:
            raise self.missing(self._raw_dir(), "Put qmnist-{train,test}-images-idx3-ubyte and "
                                                "qmnist-{train,test}-labels-idx2-int (uncompressed) there, from "
                                                "https://github.com/facebookresearch/qmnist") from exc

    def make_splits(self):
        if self.holdout_from == "train":
            splits = super().make_splits()
            splits["test"] = Split("test", np.arange(min(self.test10k, len(self.clean_targets["test"]))))
            return splits
        n_test = len(self.clean_targets["test"])
        if n_test <= self.test10k:
            raise UserError(f"qmnist: holdout_from=test50k needs the full 60k QMNIST test file; "
                            f"{self._raw_dir()} has {n_test} test digits")
        holdout, val = carve(np.arange(self.test10k, n_test), self.val_fraction, self.seed, salt=2)
        return {"train": Split("train", np.arange(len(self.clean_targets["train"]))),
                "holdout": Split("test", holdout), "val": Split("test", val),
                "test": Split("test", np.arange(self.test10k))}
