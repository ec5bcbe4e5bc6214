"""Whole test x train influence matrices, chunk by chunk: sequentially, or as a dask graph.

Both calculators compute the factors of every test chunk **once** and the features (gradients) of every train
chunk **once per group of test chunks**: pyDVL 0.10 calls ``influences(x_test, y_test, x, y)`` for every (test
chunk, train chunk) pair, which recomputes the inverse-curvature solve for each pair (the expensive part).

* ``SequentialInfluenceCalculator``: lazy; ``.to_tensor()`` / ``.to_numpy()`` in memory or ``.to_zarr(path)``
  chunk-wise. Test factors are gathered in groups of at most ``factor_budget`` numbers; each train chunk's
  gradients are computed once per group and multiplied with all of the group's factors.
* ``DaskInfluenceCalculator``: dask arrays in, dask array out (``.to_zarr`` via ``store.write_dask``). Each test
  chunk's factors and each train chunk's features are single graph nodes shared by all blocks that need them.
  The influence models are not thread-safe (``torch.func.functional_call`` swaps module attributes while it
  runs), so a client whose workers have more than one thread is refused with a clear message.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence import store
from datamatters.influence.base import InfluenceModel, as_mode, reiterable


def _split(batch) -> tuple[Tensor | None, Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return torch.as_tensor(batch[0]), batch[1], batch[2]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return None, batch[0], batch[1]
    raise UserError("data batches must be (x, y) or (index, x, y) tuples")


def _length(data: Iterable) -> int:
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        return len(ds)
    return sum(_split(b)[1].shape[0] for b in data)


def _first_batch_size(data: Iterable) -> int:
    first = next(iter(data), None)
    if first is None:
        raise UserError("a data loader yielded no batches")
    return int(_split(first)[1].shape[0])


def method_name(model: InfluenceModel) -> str:
    """The registry name of the model's method (``"cg"``), the name stored in artifacts by both calculators."""
    from datamatters.influence import METHODS

    return next((k for k, cls in METHODS.items() if type(model) is cls), type(model).__name__)


# ---- sequential ------------------------------------------------------------------------------------------------
@dataclass
class LazyInfluences:
    """A test x train influence matrix computed on demand, block by block."""

    model: InfluenceModel
    test_data: Iterable
    train_data: Iterable
    mode: str = "up"
    factor_budget: int = 1 << 26
    progress: bool = False
    test_index: np.ndarray | None = field(default=None, init=False)
    train_index: np.ndarray | None = field(default=None, init=False)

    def _groups(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, factors of consecutive test chunks) with at most ``factor_budget`` numbers per group."""
        rows, start, group, size, idx = 0, 0, [], 0, []
        for batch in self.test_data:
            i, x, y = _split(batch)
            F = self.model.influence_factors(x, y)
            idx.append(i)
            group.append(F)
            size += F.numel()
            rows += F.shape[0]
            if size >= self.factor_budget:
                yield start, torch.cat(group)
                start, group, size = rows, [], 0
        self.test_index = None if any(i is None for i in idx) or not idx else torch.cat(idx).numpy()
        if group:
            yield start, torch.cat(group)

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        """Yields ``(row, col, block)``: rows of a factor group times one train chunk."""
        groups = self._groups()
        if self.progress:
            from tqdm.auto import tqdm

            groups = tqdm(groups, desc="influence (test groups)")
        for row, F in groups:
            col, idx = 0, []
            for batch in self.train_data:
                i, x, y = _split(batch)
                block = self.model.influences_from_factors(F, x, y, self.mode)
                idx.append(i)
                yield row, col, block
                col += block.shape[1]
            self.train_index = None if any(i is None for i in idx) or not idx else torch.cat(idx).numpy()

    def to_tensor(self) -> Tensor:
        rows: dict[int, list[Tensor]] = {}
        for r, _, b in self.blocks():
            rows.setdefault(r, []).append(b)
        if not rows:
            raise UserError("no test points: the test data loader yielded no batches")
        return torch.cat([torch.cat(rows[r], dim=1) for r in sorted(rows)])

    def to_numpy(self) -> np.ndarray:
        return self.to_tensor().cpu().numpy()

    def to_zarr(self, path: str | Path, meta: Mapping[str, Any] | None = None, overwrite: bool = True,
                chunks: tuple[int, int] | None = None) -> Path:
        """Write blocks to a zarr store as they are computed (see ``store``); returns the path."""
        n_test, n_train = _length(self.test_data), _length(self.train_data)
        chunks = chunks or (_first_batch_size(self.test_data), _first_batch_size(self.train_data))
        arr = None
        for r, c, b in self.blocks():
            if arr is None:
                shape = (n_test, n_train, *b.shape[2:])
                arr = store.create(path, shape, chunks, b.cpu().numpy().dtype,
                                   {"mode": self.mode, "method": method_name(self.model), **dict(meta or {})},
                                   overwrite)
            arr[r:r + b.shape[0], c:c + b.shape[1]] = b.cpu().numpy()
        if arr is None:
            raise UserError("no test points: the test data loader yielded no batches")
        store.write_indices(path, self.test_index, self.train_index)
        return Path(path)


class SequentialInfluenceCalculator:
    """Maps an influence model over chunks (batches of data loaders), lazily."""

    def __init__(self, model: InfluenceModel, factor_budget: int = 1 << 26, progress: bool = False):
        if not isinstance(model, InfluenceModel):
            raise UserError(f"expected a fitted InfluenceModel, got {type(model).__name__}")
        model._check_fitted()
        self.model, self.factor_budget, self.progress = model, int(factor_budget), bool(progress)

    def influence_factors(self, data: Iterable) -> Iterator[Tensor]:
        for batch in reiterable(data, "data"):
            _, x, y = _split(batch)
            yield self.model.influence_factors(x, y)

    def influences(self, test_data: Iterable, train_data: Iterable, mode: Any = "up") -> LazyInfluences:
        return LazyInfluences(self.model, reiterable(test_data, "test data"), reiterable(train_data, "train data"),
                              as_mode(mode), self.factor_budget, self.progress)

    def self_influences(self, data: Iterable) -> Tensor:
        out = [self.model.self_influences(*_split(b)[1:]) for b in reiterable(data, "data")]
        if not out:
            raise UserError("the data loader yielded no batches")
        return torch.cat(out)


# ---- dask ------------------------------------------------------------------------------------------------------
def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


_LOCKS: "weakref.WeakKeyDictionary[InfluenceModel, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _exclusive(model: InfluenceModel):
    """One task at a time per model object in this process. In-process dask workers (``processes=False``) share
    the caller's model object, and ``functional_call`` swaps its parameters while it runs: concurrent tasks would
    read each other's parameters (wrong numbers, more often under load). Uncontended in process workers."""
    if model.is_thread_safe:
        return nullcontext()
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


def _factors_task(model: InfluenceModel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with _exclusive(model):
        return _np(model.influence_factors(torch.from_numpy(np.ascontiguousarray(x)),
                                           torch.from_numpy(np.ascontiguousarray(y))))


def _features_task(model: InfluenceModel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with _exclusive(model):
        return _np(model.feature_rows(torch.from_numpy(np.ascontiguousarray(x)),
                                      torch.from_numpy(np.ascontiguousarray(y))))


def _product_task(F: np.ndarray, feats: np.ndarray, dtype) -> np.ndarray:
    return (F @ feats.T).astype(dtype, copy=False)  # factors may be in a compute dtype other than the scores'


def _perturbation_task(model: InfluenceModel, F: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with _exclusive(model):
        return _np(model.influences_from_factors(torch.from_numpy(F), torch.from_numpy(np.ascontiguousarray(x)),
                                                 torch.from_numpy(np.ascontiguousarray(y)), "perturbation"))


SYNCHRONOUS = "synchronous"


class DaskInfluenceCalculator:
    """Influences over dask arrays. ``client``: a ``distributed.Client`` (its workers must be single-threaded
    unless the model is thread-safe), or ``"synchronous"`` to build graphs for dask's synchronous scheduler
    (debugging; the model object is used in-process)."""

    def __init__(self, model: InfluenceModel, client: Any):
        if not isinstance(model, InfluenceModel):
            raise UserError(f"expected a fitted InfluenceModel, got {type(model).__name__}")
        model._check_fitted()
        from dask import delayed

        self.model = model
        if client == SYNCHRONOUS:
            self.client, self._model = None, delayed(model, pure=True)
            return
        from distributed import Client

        if not isinstance(client, Client):
            raise UserError("DaskInfluenceCalculator needs a distributed.Client (or client='synchronous' for "
                            f"debugging), got {type(client).__name__}")
        threads = client.nthreads()
        if not threads:
            raise UserError("the dask client has no workers yet; start the cluster (or wait for workers) first")
        multi = {w: n for w, n in threads.items() if n > 1}
        if multi and not model.is_thread_safe:
            raise UserError(
                f"{type(model).__name__} is not thread-safe, but dask workers {sorted(multi)} run "
                f"{max(multi.values())} threads each. Start the cluster with one thread per worker, e.g. "
                "LocalCluster(n_workers=4, threads_per_worker=1) or Client(threads_per_worker=1).")
        self.client = client
        self._model = client.scatter(model, broadcast=True)

    @staticmethod
    def _prepare(x, y, what: str):
        import dask.array as da

        if x is None or y is None:
            raise UserError(f"{what}: give both x and y as dask arrays (got {'no x' if x is None else 'no y'})")
        if not isinstance(x, da.Array) or not isinstance(y, da.Array):
            raise UserError(f"{what}: x and y must be dask arrays, got {type(x).__name__} and {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise UserError(f"{what}: x has {x.shape[0]} rows and y {y.shape[0]}; they must match")
        x = x.rechunk({i: -1 for i in range(1, x.ndim)})
        y = y.rechunk((x.chunks[0],) + tuple((s,) for s in y.shape[1:]))
        return x, y

    def _factor_nodes(self, x, y):
        from dask import delayed

        return [(n, delayed(_factors_task, pure=True)(self._model, xb, yb))
                for n, xb, yb in zip(x.chunks[0], x.to_delayed().ravel(), y.to_delayed().ravel())]

    def influence_factors(self, x, y):
        """(n, feature_dim) dask array of factors, one task per chunk of ``x``."""
        import dask.array as da

        x, y = self._prepare(x, y, "influence_factors")
        d, dt = self.model.feature_dim, self.model.fn.dtype
        return da.concatenate([da.from_delayed(f, shape=(n, d), dtype=_np(torch.zeros((), dtype=dt)).dtype)
                               for n, f in self._factor_nodes(x, y)])

    def influences(self, x_test, y_test, x=None, y=None, mode: Any = "up"):
        """(n_test, n_train[, *x.shape[1:]]) dask array; block (i, j) depends on test chunk i's factors and, in
        ``up`` mode, train chunk j's features, each computed once."""
        import dask.array as da
        from dask import delayed

        mode = as_mode(mode)
        if (x is None) != (y is None):
            raise UserError("influences: give both x and y for the training side, or neither")
        x_test, y_test = self._prepare(x_test, y_test, "influences (test side)")
        x, y = (x_test, y_test) if x is None else self._prepare(x, y, "influences (train side)")
        score_dtype = getattr(self.model, "score_dtype", None) or self.model.fn.dtype  # TRAK: the caller's dtype
        dtype = _np(torch.zeros((), dtype=score_dtype)).dtype
        factors = self._factor_nodes(x_test, y_test)
        train = list(zip(x.chunks[0], x.to_delayed().ravel(), y.to_delayed().ravel()))
        if mode == "up":
            feats = [delayed(_features_task, pure=True)(self._model, xb, yb) for _, xb, yb in train]
            rows = [[da.from_delayed(delayed(_product_task, pure=True)(F, f, dtype), shape=(m, n), dtype=dtype)
                     for (n, _, _), f in zip(train, feats)] for m, F in factors]
        else:
            tail = tuple(x.shape[1:])
            rows = [[da.from_delayed(delayed(_perturbation_task, pure=True)(self._model, F, xb, yb),
                                     shape=(m, n, *tail), dtype=dtype) for n, xb, yb in train] for m, F in factors]
        return da.concatenate([da.concatenate(r, axis=1) for r in rows], axis=0)


def write_dask(array, path: str | Path, test_index=None, train_index=None, meta: Mapping[str, Any] | None = None,
               **compute_kw) -> Path:
    """Write a dask influence matrix to the store layout (``dask.array.to_zarr`` writes chunks in parallel)."""
    store.create(path, (0,) * array.ndim, (1,) * array.ndim, array.dtype, meta)
    array.to_zarr(str(path), component=store.ARRAY, overwrite=True, compute=False).compute(**compute_kw)
    store.write_indices(path, test_index, train_index)
    return Path(path)
