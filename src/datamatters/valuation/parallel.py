"""Where utility evaluations run: in-process, local worker processes (loky), or a dask.distributed cluster.

pyDVL 0.10 sends the utility (model + data) with every task, which makes process parallelism slower than serial
for cheap utilities. Here the payload (the utility without cache, or the bagging setup) goes to each worker
**once** per fit: written once to a temporary file that each loky worker reads at its first task of the fit, or
``client.scatter(..., broadcast=True)`` on dask. Tasks carry only subset masks (a few bytes per subset) and return
arrays, which the caller merges with vectorised updates. Results never depend on the number of workers: all
randomness is keyed by (seed, batch id) or by the subset itself, never by worker order.

Local workers are loky's *reusable* process pool: starting a worker (a new interpreter importing numpy, scipy and
scikit-learn) takes seconds, far more than a fit of a small model, so the processes outlive a fit and later fits
in the same session reuse them (profiled: 2 fresh workers made a 9 s TMC run take 23-32 s).

Give ``dask_address`` (e.g. a ``dask-jobqueue`` SLURMCluster's scheduler address) to run on a cluster.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Sequence

import numpy as np

from datamatters.errors import UserError

_WORKER_PAYLOADS: dict[str, Any] = {}
_IDLE_TIMEOUT_S = 600  # loky stops idle workers after this; the same value everywhere, or loky restarts the pool


def _run_in_worker(token: str, path: str, fn: Callable, item: Any):
    """Worker side: load the fit's payload at its first task (keeping only the current fit's), then run."""
    if token not in _WORKER_PAYLOADS:
        import pickle

        _WORKER_PAYLOADS.clear()
        with open(path, "rb") as f:
            _WORKER_PAYLOADS[token] = pickle.load(f)
    return fn(_WORKER_PAYLOADS[token], item)


class SerialExecutor:
    """Runs tasks in this process (the default, and the fastest for very cheap utilities)."""

    n_workers = 1

    def __init__(self):
        self._payload = None

    def bind(self, payload: Any) -> None:
        self._payload = payload

    def map(self, fn: Callable, items: Sequence) -> list:
        return [fn(self._payload, it) for it in items]

    def close(self) -> None:
        self._payload = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LokyExecutor(SerialExecutor):
    """``n_jobs`` local worker processes (loky's reusable pool) that read the payload once per fit."""

    def __init__(self, n_jobs: int):
        super().__init__()
        self.n_workers = int(n_jobs)
        self._pool = None
        self._token = self._path = ""

    def bind(self, payload):
        import os
        import tempfile

        import cloudpickle  # joblib (loky) depends on it
        from joblib.externals.loky import get_reusable_executor

        self.close()
        self._token = uuid.uuid4().hex
        fd, self._path = tempfile.mkstemp(prefix="datamatters-valuation-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            cloudpickle.dump(payload, f, protocol=5)
        self._pool = get_reusable_executor(max_workers=self.n_workers, timeout=_IDLE_TIMEOUT_S)

    def map(self, fn, items):
        if self._pool is None:
            raise RuntimeError("bind a payload before mapping")
        futures = [self._pool.submit(_run_in_worker, self._token, self._path, fn, it) for it in items]
        return [f.result() for f in futures]

    def close(self):
        import os

        self._pool = None  # the processes stay for the next fit; loky stops them after 10 idle minutes
        if self._path and os.path.exists(self._path):
            os.remove(self._path)
        self._path = ""


class DaskExecutor(SerialExecutor):
    """Tasks on a dask.distributed cluster; the payload is scattered to every worker once."""

    def __init__(self, address: Any):
        super().__init__()
        from distributed import Client

        try:
            self._client = address if isinstance(address, Client) else Client(address, set_as_default=False)
        except OSError as exc:
            raise UserError(f"cannot reach the dask scheduler at {address!r}: {exc}") from exc
        self._own = not isinstance(address, Client)
        self.n_workers = max(1, sum(int(w.get("nthreads", 1)) for w in
                                    self._client.scheduler_info().get("workers", {}).values()))
        self._future = None

    def bind(self, payload):
        self._future = self._client.scatter(payload, broadcast=True, hash=False)

    def map(self, fn, items):
        if self._future is None:
            raise RuntimeError("bind a payload before mapping")
        futures = [self._client.submit(fn, self._future, it, pure=False) for it in items]
        return self._client.gather(futures)

    def close(self):
        self._future = None
        if self._own and self._client is not None:
            self._client.close()
            self._client = None


def resolve_n_jobs(n_jobs: int | None) -> int:
    """Worker processes for ``n_jobs`` with joblib's meaning: a positive integer, or -1 for all cores, -2 for all
    but one, ... (at least 1); None means 1. Zero and non-integers are errors, never silently rounded."""
    if n_jobs is None:
        return 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)):
        raise UserError(f"n_jobs must be an integer (a number of workers, or -1 for all cores, -2 for all but "
                        f"one), got {n_jobs!r}")
    n = int(n_jobs)
    if n == 0:
        raise UserError("n_jobs=0 means no workers: use a positive number of workers, or -1 for all cores "
                        "(-2 for all but one)")
    if n < 0:
        from joblib import cpu_count

        n = max(cpu_count() + 1 + n, 1)
    return n


def _warm_up() -> int:
    """Worker side of ``prestart``: the imports every valuation task needs."""
    import os

    import sklearn.base  # noqa: F401

    import datamatters.valuation  # noqa: F401

    return os.getpid()


def prestart(n_jobs: int | None) -> list:
    """Start the local worker pool now without waiting for it: each worker spends seconds importing numpy,
    scikit-learn and this package, which then overlaps what the caller does before its first fit (a job loads its
    data). Returns the warm-up futures (their results are the worker pids); nothing for one worker."""
    n = resolve_n_jobs(n_jobs)
    if n == 1:
        return []
    from joblib.externals.loky import get_reusable_executor

    pool = get_reusable_executor(max_workers=n, timeout=_IDLE_TIMEOUT_S)
    return [pool.submit(_warm_up) for _ in range(n)]


def make_executor(n_jobs: int | None = 1, dask_address: Any = None) -> SerialExecutor:
    """Dask when an address (or Client) is given, else loky processes for ``n_jobs > 1`` (see ``resolve_n_jobs``)."""
    if dask_address:
        return DaskExecutor(dask_address)
    n = resolve_n_jobs(n_jobs)
    return SerialExecutor() if n == 1 else LokyExecutor(n)


def split(items: np.ndarray, n_chunks: int) -> list[np.ndarray]:
    """Split the first axis into at most ``n_chunks`` contiguous non-empty chunks."""
    n_chunks = max(1, min(int(n_chunks), len(items)))
    return [c for c in np.array_split(items, n_chunks) if len(c)]
