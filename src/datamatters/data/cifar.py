"""CIFAR-10 and CIFAR-100 from the official python-pickle batches (torchvision's on-disk layout under the data root).

Expected layout (what ``torchvision.datasets.CIFAR10/100(root, download=True)`` leaves there)::

    <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data_dir>/cifar-100-python/{train, test, meta}

Splits as the reference: target-train = even indices of the 50k train set, holdout = odd indices, minus a seeded
``val_fraction`` carve-out of the holdout used for model selection (the reference selects on the test set); test = the
10k test set. Pixels stay ``uint8`` in memory and are normalised on access (see ``data.transforms``).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.splits import carve, even_odd
from datamatters.data.transforms import CIFAR_MEAN_STD, ImageTensorBase, RandomCropFlip
from datamatters.errors import UserError


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays, lists, bytes, str) and nothing else, so a tampered file in a
    shared data folder cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def read_batch(path: Path) -> dict:
    """One CIFAR python batch as a dict with str keys (the files were pickled under Python 2: latin1 bytes)."""
    try:
        with open(path, "rb") as fh:
            d = _ArrayUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a CIFAR python batch ({exc}); re-extract the official archive") from exc
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR python batch (holds a {type(d).__name__}, not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def even_odd_splits(n_train: int, n_test: int, val_fraction: float, seed: int, holdout: bool = True,
                    train_source: str = "train", test_source: str = "test") -> dict[str, Split]:
    """The reference's CIFAR split, shared by MNIST and GLUE: target-train = even indices of the train source, holdout =
    odd indices minus a seeded ``val_fraction`` carve-out (validation), test = all of the test source.
    ``holdout=False`` (no-holdout variant): everything but the val carve-out is target-train."""
    if holdout:
        train, rest = even_odd(np.arange(n_train))
        rest, val = carve(rest, val_fraction, seed, salt=2)
    else:
        train, val = carve(np.arange(n_train), val_fraction, seed, salt=2)
        rest = train[:0]
    return {"train": Split(train_source, train), "holdout": Split(train_source, rest),
            "val": Split(train_source, val), "test": Split(test_source, np.arange(n_test))}


def _images(data) -> torch.Tensor:
    a = np.asarray(data, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(-1, 3, 32, 32)))


class CIFAR10DataModule(IndexedDataModule):
    name = "cifar10"
    num_classes = 10
    input_shape = (3, 32, 32)
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"

    def __init__(self, holdout: bool = True, mean_std=CIFAR_MEAN_STD, **kw):
        super().__init__(**kw)
        self.use_holdout = bool(holdout)
        self.mean_std = (tuple(mean_std[0]), tuple(mean_std[1]))

    def _supports_download(self) -> bool:
        return True

    def _download(self) -> None:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if self.num_classes == 10 else torchvision.datasets.CIFAR100
        cls(str(self.data_dir), train=True, download=True)

    def _read(self, files) -> tuple[torch.Tensor, np.ndarray]:
        batches = [read_batch(self.data_dir / self.folder / f) for f in files]
        for f, b in zip(files, batches):
            if "data" not in b or self.label_key not in b:
                raise UserError(f"{self.name}: {self.data_dir / self.folder / f} has no 'data'/'{self.label_key}' "
                                f"entries; it is not a CIFAR python batch. Re-extract the official archive.")
        images = torch.cat([_images(b["data"]) for b in batches])
        labels = np.concatenate([np.asarray(b[self.label_key], dtype=np.int64) for b in batches])
        return images, labels

    def load_sources(self):
        root = self.data_dir / self.folder
        needed = [root / f for f in (*self.train_files, *self.test_files)]
        if not all(p.is_file() for p in needed) and self.download:
            self._download()
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise self.missing(root, f"Missing {', '.join(missing)}: extract the python version of the archive from "
                                     f"{self.url} into {self.data_dir}")
        out = {}
        for source, files in (("train", self.train_files), ("test", self.test_files)):
            images, labels = self._read(files)
            out[source] = (ImageTensorBase(images, labels, *self.mean_std), labels)
        return out

    def make_splits(self):
        return even_odd_splits(len(self.clean_targets["train"]), len(self.clean_targets["test"]), self.val_fraction,
                               self.seed, self.use_holdout)

    def train_transform(self):
        mean, std = self.mean_std
        return RandomCropFlip(32, padding=4, fill=[-m / s for m, s in zip(mean, std)])

    def eval_transform(self):
        return None  # normalisation happens in the source view; eval batches take the whole-tensor fast path


class CIFAR100DataModule(CIFAR10DataModule):
    name = "cifar100"
    num_classes = 100
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
