"""The data layer: indexed datasets (items are ``(index, x, y)``), splits, label noise, datamodules."""
from datamatters.data.base import IndexedDataModule, Split
from datamatters.data.indexed import IndexedDataset, TensorBase, TensorIndexedDataset
from datamatters.data.noise import corrupt_labels

__all__ = ["IndexedDataModule", "IndexedDataset", "Split", "TensorBase", "TensorIndexedDataset", "corrupt_labels"]
