"""Clothing-1M (Xiao et al., 2015): 1M web images of 14 clothing classes with noisy labels, plus small clean sets.

Two on-disk layouts under ``<data_dir>/<folder>`` (``folder`` defaults to ``clothing1m``); ``layout: auto`` picks the
one it finds.

* ``annotations`` (the official release)::

      annotations/{noisy_train,clean_train,clean_val,clean_test}_key_list.txt   one image path per line
      annotations/{noisy,clean}_label_kv.txt                                    "<image path> <label 0-13>"
      images/...                                                                the paths the key lists name

  Pool (where target-train and holdout come from) = ``clean_train`` + ``noisy_train``, each key labelled from its
  own list's label file; a key in several lists is kept once (clean label first) and test/val keys never enter the
  pool. Validation = ``clean_val``; test = ``clean_test``.

* ``folders`` (ImageFolder style)::

      train/<class>/*.jpg    the pool
      val/<class>/*.jpg      optional: validation (else a seeded ``val_fraction`` carve-out of the pool)
      test/<class>/*.jpg

  ``<class>`` is the label id ``0``..``13`` or the official class name (``T-Shirt``, ``Shirt``, ... ``Underwear``).

Splits: the holdout is a seeded random ``holdout_size`` of the pool (the reference's 100k) and target-train is the
REST of the pool. The reference trains on the whole pool including its holdout (its ``DirtyClothing1MDataModule``
overlaps them), which leaks the IL model's training points into target training; here they are disjoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.cinic import image_folder
from datamatters.data.splits import carve
from datamatters.data.transforms import IMAGENET_MEAN_STD, pil_pipeline
from datamatters.errors import UserError

CLASSES = ("T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket", "Downcoat", "Suit",
           "Shawl", "Dress", "Vest", "Underwear")
URL = "https://github.com/Cysu/noisy_label"
ANNOTATION_FILES = ("noisy_train_key_list.txt", "clean_train_key_list.txt", "clean_val_key_list.txt",
                    "clean_test_key_list.txt", "noisy_label_kv.txt", "clean_label_kv.txt")


def _find_classes(directory: str):
    """Class folders named by label id (0-13) or by official class name, mapped to the official label ids."""
    names = sorted(p.name for p in Path(directory).iterdir() if p.is_dir())
    lookup = {str(i): i for i in range(len(CLASSES))} | {c.lower(): i for i, c in enumerate(CLASSES)}
    bad = [n for n in names if n.lower() not in lookup]
    if bad:
        raise UserError(f"{directory}: class folders {bad} are neither label ids 0-13 nor Clothing-1M class names "
                        f"{list(CLASSES)}")
    return names, {n: lookup[n.lower()] for n in names}


class _PathLabelSet:
    """Items ``(PIL RGB image, label)`` from a list of image paths."""

    def __init__(self, paths: list[str], labels: np.ndarray):
        self.paths, self.targets = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, g: int):
        from PIL import Image

        with Image.open(self.paths[g]) as img:
            return img.convert("RGB"), int(self.targets[g])


def _read_kv(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, label = line.split()
            out[key] = int(label)
    return out


def _read_keys(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class Clothing1MDataModule(IndexedDataModule):
    name = "clothing1m"
    num_classes = len(CLASSES)
    input_shape = (3, 224, 224)

    def __init__(self, folder: str = "clothing1m", layout: str = "auto", holdout_size: float = 100_000,
                 train_crop: str = "center", resize: int = 256, crop: int = 224, **kw):
        super().__init__(**kw)
        if layout not in ("auto", "annotations", "folders"):
            raise UserError(f"clothing1m: layout must be auto, annotations or folders, got {layout!r}")
        if train_crop not in ("center", "random"):
            raise UserError(f"clothing1m: train_crop must be center or random, got {train_crop!r}")
        self.folder, self.layout, self.holdout_size = folder, layout, holdout_size
        self.train_crop, self.resize, self.crop = train_crop, int(resize), int(crop)
        self.input_shape = (3, self.crop, self.crop)
        self.clean_mask = np.zeros(0, dtype=bool)  # pool points whose label comes from a clean list

    # ---- sources ----------------------------------------------------------------------------------------------
    def _layout(self, root: Path) -> str:
        if self.layout != "auto":
            return self.layout
        if (root / "annotations").is_dir():
            return "annotations"
        if (root / "train").is_dir():
            return "folders"
        raise self.missing(root, f"Get Clothing-1M (see {URL}) and extract it there: either the official "
                                 f"annotations/ + images/ tree or train/, test/ (and optionally val/) class folders")

    def load_sources(self):
        root = self.data_dir / self.folder
        return self._from_annotations(root) if self._layout(root) == "annotations" else self._from_folders(root)

    def _from_annotations(self, root: Path):
        ann = root / "annotations"
        missing = [f for f in ANNOTATION_FILES if not (ann / f).is_file()]
        if missing:
            raise self.missing(ann, f"Missing {', '.join(missing)}: copy the official annotation files there ({URL})")
        clean, noisy = _read_kv(ann / "clean_label_kv.txt"), _read_kv(ann / "noisy_label_kv.txt")
        lists = {n: _read_keys(ann / f"{n}_key_list.txt") for n in ("clean_test", "clean_val", "clean_train",
                                                                     "noisy_train")}
        taken: set[str] = set()
        sources, pool_clean = {}, []
        for source, parts in (("test", ("clean_test",)), ("val", ("clean_val",)),
                              ("pool", ("clean_train", "noisy_train"))):
            paths, labels = [], []
            for part in parts:
                kv = clean if part.startswith("clean") else noisy
                for key in lists[part]:
                    if key in taken:
                        continue
                    if key not in kv:
                        raise UserError(f"clothing1m: {key} (in {part}_key_list.txt) has no label in {ann}")
                    taken.add(key)
                    paths.append(str(root / key))
                    labels.append(kv[key])
                    if source == "pool":
                        pool_clean.append(part == "clean_train")
            y = np.asarray(labels, dtype=np.int64)
            sources[source] = (_PathLabelSet(paths, y), y)
        self.clean_mask = np.asarray(pool_clean, dtype=bool)
        return sources

    def _from_folders(self, root: Path):
        parts = [("pool", "train"), ("test", "test")] + ([("val", "val")] if (root / "val").is_dir() else [])
        sources = {}
        for source, sub in parts:
            if not (root / sub).is_dir():
                raise self.missing(root / sub, f"Put the {sub} images there in one folder per class (0-13 or class "
                                               f"names), see the clothing1m module docstring")
            ds = image_folder(root / sub, find_classes=_find_classes)
            sources[source] = (ds, np.asarray(ds.targets, dtype=np.int64))
        self.clean_mask = np.zeros(len(sources["pool"][1]), dtype=bool)
        return sources

    # ---- splits ----------------------------------------------------------------------------------------------
    def _count(self, size: float, n: int, what: str) -> int:
        k = int(round(size * n)) if 0 < size < 1 else int(size)
        if not 0 < k < n:
            raise UserError(f"clothing1m: {what}={size} leaves no target-train points in a pool of {n}; use a count "
                            f"below {n} or a fraction in (0, 1)")
        return k

    def make_splits(self):
        pool = np.arange(len(self.clean_targets["pool"]))
        if "val" in self.clean_targets:
            val = Split("val", np.arange(len(self.clean_targets["val"])))
        else:
            pool, carved = carve(pool, self.val_fraction, self.seed, salt=2)
            val = Split("pool", carved)
        k = self._count(self.holdout_size, len(pool), "holdout_size")
        train, holdout = carve(pool, k / len(pool), self.seed, salt=4)
        return {"train": Split("pool", train), "holdout": Split("pool", holdout), "val": val,
                "test": Split("test", np.arange(len(self.clean_targets["test"])))}

    def split_is_clean(self, split: str) -> np.ndarray:
        """Whether each point of a pool split (train/holdout) carries a label from a clean list."""
        self.setup()
        sp = self.splits[split]
        if sp.source != "pool":
            raise UserError(f"clothing1m: split {split!r} is not drawn from the pool")
        return self.clean_mask[sp.indices]

    def train_transform(self):
        return pil_pipeline(IMAGENET_MEAN_STD, train=True, resize=self.resize, crop=self.crop,
                            train_crop=self.train_crop)

    def eval_transform(self):
        return pil_pipeline(IMAGENET_MEAN_STD, train=False, resize=self.resize, crop=self.crop)
