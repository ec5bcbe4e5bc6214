"""CINIC-10 (Darlow et al., 2018) from its image folders, and the image-folder helpers other loaders share.

Expected layout (the official archive extracted into ``<data_dir>/CINIC-10``; ``folder`` changes the name)::

    <data_dir>/CINIC-10/{train,valid,test}/{airplane,automobile,...,truck}/*.png

Global indices are torchvision ``ImageFolder`` order (class folder, then file name), per folder. Splits as the
reference: target-train = ``train``; holdout = ``valid`` minus a seeded ``val_fraction`` carve-out (validation for model
selection); test = ``test``. ``in_memory`` decodes every image once into a ``uint8`` tensor (32x32 images: 0.8 GB for
all 270k), which makes batches plain tensor gathers instead of PNG decodes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.splits import carve
from datamatters.data.transforms import CINIC_MEAN_STD, ImageTensorBase, RandomCropFlip, pil_pipeline
from datamatters.errors import UserError

CINIC_URL = "https://datashare.ed.ac.uk/handle/10283/3192"


def image_folder(root: Path, find_classes=None):
    """A torchvision ``ImageFolder`` over ``root`` (items ``(PIL RGB image, class index)``); ``find_classes``
    overrides how class folders map to labels."""
    from torchvision.datasets import ImageFolder

    cls = ImageFolder
    if find_classes is not None:
        cls = type("LabelledImageFolder", (ImageFolder,), {"find_classes": lambda self, d: find_classes(d)})
    try:
        return cls(str(root))
    except FileNotFoundError as exc:  # no class folders / no images
        raise UserError(f"{root}: {exc}") from exc


def decode_all(folder, size: tuple[int, int], workers: int = 4) -> torch.Tensor:
    """Every image of an ``ImageFolder`` as one ``uint8`` tensor (n, 3, H, W); all images must be ``size`` (H, W)."""
    def load(i):
        img = folder.loader(folder.samples[i][0])
        a = np.array(img, dtype=np.uint8)
        if a.shape[:2] != tuple(size):
            raise UserError(f"{folder.samples[i][0]} is {a.shape[1]}x{a.shape[0]}, expected {size[1]}x{size[0]}; "
                            f"set in_memory=false for images of mixed sizes")
        return a

    out = torch.empty((len(folder.samples), 3, *size), dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, a in enumerate(pool.map(load, range(len(folder.samples)), chunksize=256)):
            out[i] = torch.from_numpy(a).permute(2, 0, 1)
    return out


class CINIC10DataModule(IndexedDataModule):
    name = "cinic10"
    num_classes = 10
    input_shape = (3, 32, 32)
    folders = ("train", "valid", "test")

    def __init__(self, folder: str = "CINIC-10", in_memory: bool = False, mean_std=CINIC_MEAN_STD, **kw):
        super().__init__(**kw)
        self.folder, self.in_memory = folder, bool(in_memory)
        self.mean_std = (tuple(mean_std[0]), tuple(mean_std[1]))

    def load_sources(self):
        root = self.data_dir / self.folder
        missing = [f for f in self.folders if not (root / f).is_dir()]
        if missing:
            raise self.missing(root, f"Missing {'/'.join(missing)}/: download CINIC-10 from {CINIC_URL} and extract "
                                     f"it so that {root}/train, valid and test hold one folder per class")
        out = {}
        for f in self.folders:
            ds = image_folder(root / f)
            if len(ds.classes) != self.num_classes:
                raise UserError(f"{root / f} has {len(ds.classes)} class folders, CINIC-10 has {self.num_classes}")
            targets = np.asarray(ds.targets, dtype=np.int64)
            if self.in_memory:
                ds = ImageTensorBase(decode_all(ds, self.input_shape[1:], self.num_workers or 4), targets,
                                     *self.mean_std)
            out[f] = (ds, targets)
        return out

    def make_splits(self):
        holdout, val = carve(np.arange(len(self.clean_targets["valid"])), self.val_fraction, self.seed, salt=2)
        return {"train": Split("train", np.arange(len(self.clean_targets["train"]))),
                "holdout": Split("valid", holdout), "val": Split("valid", val),
                "test": Split("test", np.arange(len(self.clean_targets["test"])))}

    def train_transform(self):
        if self.in_memory:
            mean, std = self.mean_std
            return RandomCropFlip(32, padding=4, fill=[-m / s for m, s in zip(mean, std)])
        return pil_pipeline(self.mean_std, train=True, crop=32, random_crop_padding=4)

    def eval_transform(self):
        return None if self.in_memory else pil_pipeline(self.mean_std, train=False)
