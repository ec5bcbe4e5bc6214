"""Workers: fill store rows by training subset models; explicit index lists or pool mode with claim files.

A *trainer* is a callable ``trainer(indices: list[int]) -> {key: array (len(indices), *shape)}`` (the batched
ensemble trainer trains a whole block at once); ``per_index(fn)`` adapts the reference's per-model
``main(index, logdir) -> dict`` to it.

Pool mode: workers started without indices claim the next free rows under an ``flock`` on ``claims/.lock`` (the
kernel drops the lock when a process dies) by writing ``claims/<row>.json`` = {pid, host, time, nonce}. A claim is
stale, and may be taken over, when its process is gone (same host) or its file has not been touched for
``claim_timeout_s`` (a live worker touches its claims every ``claim_timeout_s / 4``), so a crashed claimant never
blocks a row forever. Completion flags, not claims, are the truth: a claimed row is trained at most once by live
workers and a finished row is never redone.

Timeouts: ``timeout_s`` bounds the worker's wall clock; when it runs out with rows left (checked between blocks,
and by SIGALRM inside a block when running in the main thread) ``WorkerTimeout`` is raised, which the jobs turn
into a non-zero exit (the reference's worker exited 0, so timed-out rows looked like success).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from datamatters.datamodels.store import DatamodelStore
from datamatters.errors import UserError

Trainer = Callable[[list], Mapping[str, object]]


class WorkerTimeout(UserError):
    """The worker ran out of time with rows left; completed rows are kept, rerun to finish."""


@dataclass
class WorkerReport:
    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def models_per_second(self) -> float:
        return len(self.done) / self.seconds if self.seconds > 0 else float("nan")


def per_index(fn: Callable[..., Mapping[str, object]], logdir: str | Path | None = None) -> Trainer:
    """Adapt ``fn(index=i, logdir=...) -> {key: row}`` (the reference's worker ``main``) to a block trainer."""

    def trainer(indices: list) -> dict:
        rows = []
        for i in indices:
            d = None
            if logdir is not None:
                d = Path(logdir) / "workers" / str(i)
                d.mkdir(parents=True, exist_ok=True)
            rows.append({k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
                         for k, v in fn(index=int(i), logdir=None if d is None else str(d)).items()})
        keys = rows[0].keys() if rows else []
        if any(r.keys() != keys for r in rows):
            raise UserError("the worker function returned different keys for different indices")
        return {k: np.stack([r[k] for r in rows]) for k in keys}

    return trainer


# ---- pool claims -----------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClaimBoard:
    """Claim files for pool mode (see module docstring)."""

    def __init__(self, store: DatamodelStore, claim_timeout_s: float = 3600.0):
        self.store, self.timeout = store, float(claim_timeout_s)
        self.dir = store.path / "claims"
        self.dir.mkdir(exist_ok=True)
        self.host, self.pid, self.nonce = socket.gethostname(), os.getpid(), uuid.uuid4().hex
        self.held: set[int] = set()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _file(self, row: int) -> Path:
        return self.dir / f"{row}.json"

    @contextlib.contextmanager
    def _lock(self):
        with open(self.dir / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def is_stale(self, row: int) -> bool:
        f = self._file(row)
        try:
            info = json.loads(f.read_text())
            age = time.time() - f.stat().st_mtime
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return True
        if info.get("host") == self.host and not _pid_alive(int(info.get("pid", -1))):
            return True
        return age > self.timeout

    def claim(self, n: int, rows: Iterable[int] | None = None) -> list[int]:
        """Atomically claim up to ``n`` rows that are neither completed nor validly claimed."""
        got: list[int] = []
        with self._lock():
            done = self.store.completed
            candidates = range(self.store.num_models) if rows is None else rows
            for r in candidates:
                r = int(r)
                if done[r] or r in self.held:
                    continue
                if self._file(r).exists() and not self.is_stale(r):
                    continue
                body = json.dumps({"pid": self.pid, "host": self.host, "time": time.time(), "nonce": self.nonce})
                tmp = self.dir / f".{r}.{self.nonce}.tmp"
                tmp.write_text(body)
                os.replace(tmp, self._file(r))
                got.append(r)
                if len(got) >= n:
                    break
            self.held.update(got)
        return got

    def release(self, rows: Iterable[int]) -> None:
        with self._lock():
            for r in rows:
                f = self._file(int(r))
                try:
                    if json.loads(f.read_text()).get("nonce") == self.nonce:
                        f.unlink()
                except (FileNotFoundError, json.JSONDecodeError):
                    pass
                self.held.discard(int(r))

    def open_rows(self) -> int:
        """Rows not completed (claimed or not)."""
        return int((~self.store.completed).sum())

    # heartbeat: keep our claims fresh while a long block trains
    def __enter__(self):
        def beat():
            while not self._stop.wait(max(self.timeout / 4, 0.05)):
                for r in list(self.held):
                    with contextlib.suppress(OSError):
                        os.utime(self._file(r))

        self._beat = threading.Thread(target=beat, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        self.release(list(self.held))


# ---- the worker ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _alarm(deadline: float | None):
    """Raise WorkerTimeout at ``deadline`` inside long blocks (main thread only; elsewhere: checks only)."""
    if deadline is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise WorkerTimeout("datamodel worker timed out in the middle of a block; completed rows are kept, "
                            "rerun (or raise the timeout) to finish the rest")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _blocks(rows: Sequence[int], size: int) -> Iterable[list[int]]:
    for s in range(0, len(rows), size):
        yield list(rows[s:s + size])


def run_worker(store: DatamodelStore, trainer: Trainer, indices: Iterable[int] | None = None, *,
               pool: bool = False, block_size: int = 1, timeout_s: float | None = None,
               claim_timeout_s: float = 3600.0, redo: bool = False, progress: bool = False,
               flag_hook=None) -> WorkerReport:
    """Train and store the rows ``indices`` (skipping completed ones unless ``redo``), ``block_size`` at a time;
    or with ``pool=True`` claim free rows (of ``indices`` if given, else the whole store) until none are left.
    Raises ``WorkerTimeout`` when ``timeout_s`` runs out with rows left."""
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    t0 = time.time()
    deadline = None if timeout_s is None else t0 + float(timeout_s)
    report = WorkerReport()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"datamodels {store.path.name}", unit="model")

    def do_block(block: list[int]) -> None:
        if deadline is not None and time.time() >= deadline:
            raise WorkerTimeout(f"datamodel worker ran out of time ({timeout_s} s) with rows left (next: "
                                f"{block[:5]}...); completed rows are kept, rerun to finish")
        with _alarm(deadline):
            out = trainer(block)
            store.write_rows(block, out, flag_hook=flag_hook)
        report.done.extend(block)
        if bar is not None:
            bar.update(len(block))

    try:
        if pool:
            if redo:
                raise UserError("redo is not supported in pool mode; reset_rows() first")
            with ClaimBoard(store, claim_timeout_s) as board:
                while True:
                    block = board.claim(block_size, indices)
                    if not block:
                        break
                    try:
                        do_block(block)
                    finally:
                        board.release(block)
        else:
            if indices is None:
                raise UserError("give the indices to train, or use pool=True")
            rows = store.check_rows(list(indices))
            todo = rows if redo else store.pending(rows)
            report.skipped = sorted(set(rows) - set(todo))
            for block in _blocks(todo, block_size):
                do_block(block)
    finally:
        report.seconds = time.time() - t0
        if bar is not None:
            bar.close()
    return report
