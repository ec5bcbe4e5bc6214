"""Influence matrices on disk: a zarr group with the matrix, the global indices of its rows and columns, and a
metadata record that loading checks (the project's artifact pattern, in zarr so it can be written chunk-wise).

Layout of ``<path>`` (a zarr v3 group): ``influences`` (n_test, n_train[, ...]), ``test_index`` (n_test,) and
``train_index`` (n_train,) int64 global indices, and ``attrs["meta"]`` (method, dataset, split, config hash...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datamatters.errors import UserError

ARRAY = "influences"


def create(path: str | Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype, meta: Mapping[str, Any] | None,
           overwrite: bool = True):
    """Create the group and an empty matrix; returns the zarr array to write blocks into."""
    import zarr

    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass overwrite=True or choose another path")
    g = zarr.open_group(str(path), mode="w")
    g.attrs["meta"] = dict(meta or {})
    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape)) + tuple(shape[len(chunks):])
    return g.create_array(ARRAY, shape=tuple(int(s) for s in shape), chunks=chunks, dtype=np.dtype(dtype),
                          fill_value=0)


def write_indices(path: str | Path, test_index, train_index, meta: Mapping[str, Any] | None = None) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="a")
    for name, idx in (("test_index", test_index), ("train_index", train_index)):
        if idx is not None:
            idx = np.asarray(idx, dtype=np.int64)
            arr = g.create_array(name, shape=idx.shape, dtype=np.int64, overwrite=True)
            arr[:] = idx
    if meta is not None:
        g.attrs["meta"] = {**dict(g.attrs.get("meta", {})), **dict(meta)}


def open_matrix(path: str | Path, expect: Mapping[str, Any] | None = None):
    """``(array, test_index, train_index, meta)``; ``expect`` keys must match the stored metadata."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise UserError(f"influence matrix not found: {path}")
    try:
        g = zarr.open_group(str(path), mode="r")
        arr = g[ARRAY]
    except Exception as exc:  # noqa: BLE001 - any zarr failure means "not our artifact"
        raise UserError(f"{path} is not an influence matrix store ({exc})") from exc
    meta = dict(g.attrs.get("meta", {}))
    for key, want in (expect or {}).items():
        if str(meta.get(key)) != str(want):
            raise UserError(f"influence matrix {path} was made for {key}={meta.get(key)!r}, this run needs {want!r}")
    test_index = g["test_index"][:] if "test_index" in g else None
    train_index = g["train_index"][:] if "train_index" in g else None
    for name, idx, n in (("test_index", test_index, arr.shape[0]), ("train_index", train_index, arr.shape[1])):
        if idx is not None and len(idx) != n:
            raise UserError(f"influence matrix {path}: {name} has {len(idx)} entries for {n} rows/columns")
    return arr, test_index, train_index, meta
