"""One artifact pattern: an array keyed by global index plus a metadata record checked on load.

Files are plain ``.npz`` (no pickles): ``values`` (n, ...), ``indices`` (n,) int64 global indices and ``meta``
(a JSON string). Loading compares the stored metadata with what the caller expects and refuses a mismatch, so a
file made for another dataset, split or seed is an error, never a silent mix-up.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datamatters.errors import UserError


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable object (dicts are key-sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def array_checksum(a: np.ndarray) -> str:
    """Checksum of an array's bytes, used to tie artifacts to the exact targets they were made for."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_indexed(path: str | Path, values: np.ndarray, indices: np.ndarray, meta: Mapping[str, Any]) -> Path:
    """Save per-example ``values`` keyed by global ``indices`` with a metadata record."""
    values = np.asarray(values)
    indices = np.asarray(indices, dtype=np.int64)
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows but indices has {indices.shape[0]}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("indices must be unique")
    meta_json = json.dumps(dict(meta), sort_keys=True, default=str)
    path = Path(path)
    atomic_write_bytes(path, lambda fh: np.savez(fh, values=values, indices=indices, meta=np.array(meta_json)))
    return path


def load_indexed(
    path: str | Path,
    expect: Mapping[str, Any] | None = None,
    indices: np.ndarray | None = None,
    what: str = "artifact",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load ``(values, indices, meta)``; check metadata keys in ``expect`` and, if given, the exact index order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}. Create it first or point the config at an existing file.")
    try:
        with np.load(path, allow_pickle=False) as z:
            values, stored_idx, meta = z["values"], z["indices"], json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{what} file {path} is not a datamatters artifact ({exc}).") from exc
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if str(have) != str(want):
            raise UserError(
                f"{what} file {path} was made for {key}={have!r}, but this run needs {key}={want!r}. "
                f"Recompute it for this configuration (or point the config at the right file)."
            )
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) != len(stored_idx):
            raise UserError(
                f"{what} file {path} has {len(stored_idx)} entries but this split has {len(indices)}. "
                "It was made for another dataset or split; recompute it."
            )
        if not np.array_equal(np.sort(indices), np.sort(stored_idx)):
            raise UserError(f"{what} file {path} covers other global indices than this split; recompute it.")
    return values, stored_idx, meta


def write_json(path: str | Path, obj: Mapping[str, Any]) -> Path:
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
