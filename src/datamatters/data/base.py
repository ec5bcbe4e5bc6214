"""The datamodule every dataset shares: sources, deterministic splits, label noise, loaders.

Splits (all global indices into a *source*, i.e. an underlying dataset such as CIFAR's 50k train set):
``train`` (target-train, the only split that gets label noise), ``holdout`` (irreducible-loss training), ``val``
(model selection, never the test set) and ``test``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from datamatters.artifacts import array_checksum
from datamatters.data.indexed import IndexedDataset, TensorBase, TensorIndexedDataset
from datamatters.data.noise import corrupt_labels
from datamatters.errors import UserError

SPLITS = ("train", "holdout", "val", "test")


@dataclass
class Split:
    source: str
    indices: np.ndarray


def _batched_collate(batch):
    return batch


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DistributedBatchSampler(torch.utils.data.DistributedSampler):
    """This rank's share of a split (DistributedSampler's split, padding and per-epoch seed), cut into batches for the
    in-memory path that gathers whole batches by fancy indexing. Lightning cannot re-shard a loader whose sampler
    yields batches, so the datamodule shards it; being a DistributedSampler, Lightning leaves it in place and calls
    ``set_epoch``. Every rank gets the same number of equal-size batches, so DDP steps stay in lockstep."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size, self.drop_last_batch = int(batch_size), bool(drop_last)

    def __iter__(self):
        idx = list(super().__iter__())
        stop = len(self) * self.batch_size
        for i in range(0, min(stop, len(idx)), self.batch_size):
            yield idx[i: i + self.batch_size]

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last_batch else -(-n // b)


class IndexedDataModule(L.LightningDataModule):
    """Subclasses implement ``load_sources`` and ``make_splits`` (and optionally the transforms)."""

    name = "base"
    num_classes: int = 0
    input_shape: tuple = ()

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        label_noise: dict | None = None,
        val_fraction: float = 0.1,
        fit_split: str = "train",
        augment: bool = True,
        download: bool = False,
        pin_memory: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.seed, self.val_fraction = int(seed), float(val_fraction)
        self.label_noise = dict(label_noise or {})
        if fit_split not in SPLITS:
            raise UserError(f"data.fit_split must be one of {SPLITS}, got {fit_split!r}")
        self.fit_split, self.augment, self.download = fit_split, bool(augment), bool(download)
        self.extra = kwargs
        self.sources: dict[str, Any] = {}
        self.targets: dict[str, np.ndarray] = {}
        self.clean_targets: dict[str, np.ndarray] = {}
        self.splits: dict[str, Split] = {}
        self.is_corrupted = np.zeros(0, dtype=bool)
        self._ready = False
        self.train_loader_factory: Callable | None = None  # dataset -> train loader (InfoBatch's per-epoch sampler)

    # ---- hooks for subclasses -------------------------------------------------------------------------------
    def load_sources(self) -> dict[str, tuple[Any, np.ndarray]]:
        """Return ``{source_name: (base_dataset, targets)}``; raise ``UserError`` naming the path if data is missing."""
        raise NotImplementedError

    def make_splits(self) -> dict[str, Split]:
        raise NotImplementedError

    def train_transform(self) -> Callable | None:
        return None

    def eval_transform(self) -> Callable | None:
        return None

    # ---- shared machinery -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        for name, (base, targets) in self.load_sources().items():
            self.sources[name] = base
            self.clean_targets[name] = np.asarray(targets, dtype=np.int64)
            self.targets[name] = self.clean_targets[name].copy()
        self.splits = self.make_splits()
        self._check_disjoint()
        tr = self.splits["train"]
        noise = self.label_noise
        self.targets[tr.source], self.is_corrupted = corrupt_labels(
            self.clean_targets[tr.source],
            tr.indices,
            pc_corrupted=float(noise.get("pc_corrupted", 0.0) or 0.0),
            kind=noise.get("kind", "uniform") or "none",
            num_classes=self.num_classes,
            seed=int(noise.get("seed", self.seed) if noise.get("seed") is not None else self.seed),
        )
        self._ready = True

    def _check_disjoint(self) -> None:
        """No global index may be in two splits of the same source (vectorised: Clothing-1M has 1M points)."""
        by_source: dict[str, list[tuple[str, np.ndarray]]] = {}
        for name, sp in self.splits.items():
            sp.indices = np.asarray(sp.indices, dtype=np.int64)
            by_source.setdefault(sp.source, []).append((name, sp.indices))
        for source, parts in by_source.items():
            allidx = np.concatenate([p for _, p in parts]) if parts else np.zeros(0, np.int64)
            uniq, counts = np.unique(allidx, return_counts=True)
            if (counts > 1).any():
                g = int(uniq[np.argmax(counts > 1)])
                names = [n for n, p in parts if np.isin(g, p)]
                raise RuntimeError(f"splits {names} of source {source!r} overlap at index {g}")

    def dataset(self, split: str, augment: bool = False) -> IndexedDataset:
        self.setup()
        if split not in self.splits:
            raise UserError(f"unknown split {split!r}; this datamodule has {list(self.splits)}")
        sp = self.splits[split]
        transform = self.train_transform() if augment else self.eval_transform()
        base = self.sources[sp.source]
        cls = TensorIndexedDataset if isinstance(base, TensorBase) and transform is None else IndexedDataset
        return cls(base, sp.indices, self.targets[sp.source], transform)

    def loader(self, split: str, shuffle: bool = False, augment: bool = False, batch_size: int | None = None,
               drop_last: bool = False, seed: int | None = None, shard: bool = False) -> DataLoader:
        """``shard``: under torch.distributed (DDP), this rank's share of the split; the Lightning hooks set it, direct
        calls (e.g. computing every point's loss) see the whole split."""
        ds = self.dataset(split, augment=augment)
        bs = batch_size or (self.batch_size if shuffle else self.eval_batch_size)
        gen = torch.Generator().manual_seed(self.seed if seed is None else int(seed)) if shuffle else None
        kw = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        if isinstance(ds, TensorIndexedDataset):
            # whole batches gathered by fancy indexing: one tensor op per batch instead of one per item
            if shard and _world_size() > 1:
                sampler = DistributedBatchSampler(ds, bs, shuffle, drop_last, self.seed if seed is None else int(seed))
            else:
                sampler = torch.utils.data.BatchSampler(
                    torch.utils.data.RandomSampler(ds, generator=gen) if shuffle else torch.utils.data.SequentialSampler(ds),
                    batch_size=bs, drop_last=drop_last)
            return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_batched_collate, **kw)
        # per-item path: Lightning swaps in a DistributedSampler itself under DDP
        return DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=gen, drop_last=drop_last, **kw)

    def train_dataloader(self) -> DataLoader:
        if self.train_loader_factory is not None:
            return self.train_loader_factory(self.dataset(self.fit_split, augment=self.augment))
        return self.loader(self.fit_split, shuffle=True, augment=self.augment, shard=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shard=True)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shard=True)

    # ---- facts other components need ------------------------------------------------------------------------
    def split_indices(self, split: str) -> np.ndarray:
        self.setup()
        return self.splits[split].indices

    def split_targets(self, split: str) -> np.ndarray:
        self.setup()
        sp = self.splits[split]
        return self.targets[sp.source][sp.indices]

    def split_clean_targets(self, split: str) -> np.ndarray:
        self.setup()
        sp = self.splits[split]
        return self.clean_targets[sp.source][sp.indices]

    def add_split(self, name: str, indices: np.ndarray, like: str = "train") -> None:
        """Register a sub-split (e.g. one half of train for the no-holdout IL models) on the source of ``like``."""
        self.setup()
        src = self.splits[like].source
        indices = np.asarray(indices, dtype=np.int64)
        if not np.isin(indices, self.splits[like].indices).all():
            raise ValueError(f"split {name!r} must be a subset of {like!r}")
        self.splits[name] = Split(src, indices)

    def metadata(self, split: str) -> dict:
        """What an artifact keyed by this split's indices must match when loaded."""
        self.setup()
        return {
            "dataset": self.name,
            "split": split,
            "data_seed": self.seed,
            "n": int(len(self.splits[split].indices)),
            "targets_checksum": array_checksum(self.split_targets(split)),
        }

    def missing(self, path: Path, how: str) -> UserError:
        """The one message for a dataset that is not under the data root."""
        dl = " or set data.download=true on a machine with internet" if self._supports_download() else ""
        return UserError(
            f"{self.name}: no data at {path}. {how}{dl}. The data root is paths.data_dir (env DATA_DIR)."
        )

    def _supports_download(self) -> bool:
        return False
