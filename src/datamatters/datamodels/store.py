"""The datamodel store: one memory-mapped ``.npy`` per key, (num_models, *shape), and a completion flag per row.

Layout (compatible with the reference's: ``<key>.npy`` and ``_completed.npy``)::

    store/spec.json   store/<key>.npy ...   store/_completed.npy (uint8)   store/claims/ (pool mode)

Safety the reference lacked: ``initialize_store`` refuses to touch an existing store unless ``force=True`` (the
reference silently re-created the memmaps, wiping results), a spec that disagrees with the one on disk is refused,
rows are validated before anything is written, and each row's data is flushed before its flag is set, so a worker
killed at any point leaves every completed row intact and its own row marked incomplete (redone on the next run).
Many processes may write different rows at once (shared mappings of the same files).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from datamatters.datamodels.spec import COMPLETED, DatamodelSpec
from datamatters.errors import UserError

SPEC_FILE = "spec.json"


def _npy(path: Path, key: str) -> Path:
    return path / f"{key}.npy"


class DatamodelStore:
    """An opened store. ``store[key]`` is the (read-only unless opened ``r+``) memmap of that key."""

    def __init__(self, path: Path, spec: DatamodelSpec, mode: str = "r+"):
        self.path, self.spec, self.mode = Path(path), spec, mode
        self._arrays: dict[str, np.memmap] = {}
        for key in [*spec.schema, COMPLETED]:
            f = _npy(self.path, key)
            if not f.is_file():
                raise UserError(f"datamodel store {self.path} is missing {f.name}; it is damaged, re-create it "
                                "with initialize_store(..., force=True)")
            arr = np.load(f, mmap_mode=mode)
            want_shape = (spec.num_models,) if key == COMPLETED else (spec.num_models, *spec.shape(key))
            want_dtype = np.dtype(np.uint8) if key == COMPLETED else spec.dtype(key)
            if arr.shape != want_shape or arr.dtype != want_dtype:
                raise UserError(f"{f} holds {arr.dtype}{arr.shape} but spec.json says {want_dtype}{want_shape}; "
                                "the store is damaged or was edited by hand")
            self._arrays[key] = arr

    # ---- reading --------------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> np.memmap:
        if key not in self._arrays or key == COMPLETED:
            raise UserError(f"store {self.path} has no key {key!r}; it has {sorted(self.spec.schema)}")
        return self._arrays[key]

    @property
    def num_models(self) -> int:
        return self.spec.num_models

    @property
    def completed(self) -> np.ndarray:
        """Bool (num_models,) copy of the completion flags."""
        return np.asarray(self._arrays[COMPLETED]).astype(bool)

    def completed_rows(self, rows: Iterable[int] | None = None) -> np.ndarray:
        done = self.completed
        idx = np.arange(self.num_models) if rows is None else np.asarray(list(rows), dtype=np.int64)
        return idx[done[idx]]

    def pending(self, rows: Iterable[int]) -> list[int]:
        done = self.completed
        return [int(i) for i in rows if not done[int(i)]]

    # ---- writing --------------------------------------------------------------------------------------------
    def check_rows(self, rows: Sequence[int]) -> list[int]:
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < self.num_models]
        if bad:
            raise UserError(f"rows {bad[:5]} are outside the store (0..{self.num_models - 1})")
        if len(set(rows)) != len(rows):
            raise UserError("duplicate rows in one write")
        return rows

    def write_rows(self, rows: Sequence[int], values: Mapping[str, object], flag_hook=None) -> None:
        """Write a block of rows: validate everything first, then each key's rows (flushed), then the flags
        (flushed). ``flag_hook`` (tests) runs between the data flush and the flags."""
        if self.mode == "r":
            raise UserError(f"store {self.path} was opened read-only")
        rows = self.check_rows(rows)
        clean = self.spec.check_values(values, len(rows))
        for key, block in clean.items():
            arr = self._arrays[key]
            arr[rows] = block
            arr.flush()
        if flag_hook is not None:
            flag_hook(rows)
        flags = self._arrays[COMPLETED]
        flags[rows] = 1
        flags.flush()

    def write_row(self, index: int, values: Mapping[str, object]) -> None:
        """One row; ``values[key]`` has the key's own shape (no leading model axis)."""
        self.write_rows([index], {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)[None]
                                  for k, v in values.items()})


def _read_spec(path: Path) -> DatamodelSpec:
    return DatamodelSpec.from_json(path / SPEC_FILE)


def _describe(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    return "a file" if path.is_file() else "neither a file nor a directory"


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _owned(path: Path) -> tuple[list[Path], list[str]]:
    """The files a store at ``path`` created (its spec, one .npy per key, the flags, pool claims, empty worker log
    directories) and the names of anything else in it."""
    try:
        spec = _read_spec(path)
    except (UserError, OSError, ValueError) as exc:
        raise UserError(f"{path}/{SPEC_FILE} cannot be read ({exc}), so which files belong to the store is unknown; "
                        "nothing was deleted. Delete the directory yourself if it is yours to delete") from exc
    ours = {SPEC_FILE, *(_npy(path, k).name for k in [*spec.schema, COMPLETED])}
    files, foreign = [], []
    for p in sorted(path.iterdir()):
        if p.name in ours and p.is_file() and not p.is_symlink():
            files.append(p)
        elif p.name == "workers" and p.is_dir() and not p.is_symlink() and not any(
                c.is_symlink() or not c.is_dir() or any(c.iterdir()) for c in p.iterdir()):
            files.extend(sorted(p.iterdir()))  # per_index's log directories, left empty by the worker function
        elif p.name == "claims" and p.is_dir() and not p.is_symlink():
            for c in sorted(p.iterdir()):
                if c.is_file() and not c.is_symlink() and (c.name == ".lock" or c.suffix in (".json", ".tmp")):
                    files.append(c)
                else:
                    foreign.append(f"claims/{c.name}")
        else:
            foreign.append(p.name + ("/" if p.is_dir() else ""))
    return files, foreign


def _delete_store(path: Path) -> None:
    """``force``: delete the files the store created, and the directory once empty; refuse (deleting nothing)
    when anything else is inside (a worker's logs, a user's files)."""
    files, foreign = _owned(path)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UserError(f"force=True would delete the datamodel store at {path}, but it also holds files the store "
                        f"did not create ({', '.join(foreign[:5])}{more}); nothing was deleted. Move them away "
                        "(or delete the directory yourself) and rerun")
    for f in files:
        f.rmdir() if f.is_dir() else f.unlink()
    for sub in ("claims", "workers"):
        if (path / sub).is_dir():
            (path / sub).rmdir()
    path.rmdir()


def _create(path: Path, spec: DatamodelSpec) -> None:
    for key in spec.schema:
        a = np.lib.format.open_memmap(_npy(path, key), mode="w+", dtype=spec.dtype(key),
                                      shape=(spec.num_models, *spec.shape(key)))
        a.flush()
        del a
    f = np.lib.format.open_memmap(_npy(path, COMPLETED), mode="w+", dtype=np.uint8, shape=(spec.num_models,))
    f.flush()
    del f
    (path / SPEC_FILE).write_text(spec.to_json())


def initialize_store(path: str | Path, spec: DatamodelSpec, force: bool = False, exist_ok: bool = False
                     ) -> DatamodelStore:
    """Create a store for ``spec`` at ``path``.

    An existing store is refused unless ``force=True`` (which deletes the files the store created, and refuses
    if anything else is in the directory) or ``exist_ok=True``
    with an identical spec (then it is opened, so that many jobs of a sweep may all call this). Creation is
    atomic (built in a temporary sibling directory, then renamed), so concurrent creators never see half a store.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a directory ({_describe(path)}); nothing was deleted, even "
                            "with force=True. Choose another store path")
        if not (path / SPEC_FILE).is_file():
            if any(path.iterdir()):
                raise UserError(f"{path} exists and is not a datamodel store (no {SPEC_FILE}; it holds "
                                f"{_listing(path)}); nothing was deleted, even with force=True. Choose another "
                                "store path, or move those files away yourself")
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link to an empty directory; give the directory itself")
            path.rmdir()  # an empty directory: the store takes its place
        elif force:
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link; force=True re-creates a store only at a real "
                                "directory (nothing was deleted). Give the link's target as the store path")
            _delete_store(path)
        elif exist_ok:
            return open_store(path, spec=spec)
        else:
            raise UserError(f"a datamodel store already exists at {path} ({int(open_store(path).completed.sum())} "
                            "rows completed). Open it with open_store, or pass force=True to delete it and its results.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _create(tmp, spec)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (path / SPEC_FILE).is_file() and exist_ok:
            return open_store(path, spec=spec)  # another process created it first
        raise
    return open_store(path, spec=spec)


def open_store(path: str | Path, spec: DatamodelSpec | None = None, mode: str = "r+") -> DatamodelStore:
    """Open an existing store; if ``spec`` is given it must agree with the one on disk (keys, shapes, dtypes,
    number of models and metadata)."""
    path = Path(path)
    if not (path / SPEC_FILE).is_file():
        raise UserError(f"no datamodel store at {path} (no {SPEC_FILE}); create it with initialize_store first")
    on_disk = _read_spec(path)
    if spec is not None:
        diff = on_disk.differences(spec)
        if diff:
            raise UserError(f"the datamodel store at {path} was made for another spec (disk vs requested: "
                            + "; ".join(diff) + "). Use a new store path, or force=True to re-create it.")
    if mode not in ("r", "r+"):
        raise UserError(f"store mode must be 'r' or 'r+', got {mode!r}")
    return DatamodelStore(path, on_disk, mode=mode)
