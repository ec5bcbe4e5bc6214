"""Workers: fill store rows by training subset models; explicit index lists or pool mode with claim files.

A *trainer* is a callable ``trainer(indices: list[int]) -> {key: array (len(indices), *shape)}`` (the batched
ensemble trainer trains a whole block at once); ``per_index(fn)`` adapts the reference's per-model
``main(index, logdir) -> dict`` to it. A trainer that finishes rows one part at a time also has
``iter_rows(indices)`` yielding ``(rows, values)`` as parts complete; each part is written and flushed at once, so a
killed worker loses only the part in flight (one row for per-model trainers, one vectorised chunk for the batched
trainer), never the rows it already finished.

Block sizes (``block_size=None``): a pool claims by guided self-scheduling, a quarter of the unclaimed rows per
live worker (``ceil(free / (4 * workers))``, at most ``MAX_AUTO_BLOCK``), so the first worker of a pool never
claims a whole small store and claims shrink as the store fills; an explicit index list is trained
``MAX_AUTO_BLOCK`` rows at a time.

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
MAX_AUTO_BLOCK = 100  # batched CPU training gains < 20% in models/s beyond ~100 models at once


class WorkerTimeout(UserError):
    """The worker ran out of time with rows left; completed rows are kept, rerun to finish."""


@dataclass
class WorkerReport:
    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0


class per_index:  # noqa: N801 (used like the function it replaced)
    """Adapt ``fn(index=id, logdir=...) -> {key: row}`` (the reference's worker ``main``) to a trainer; row ``i``
    is model ``id_offset + i``, and each row is written as soon as ``fn`` returns it."""

    def __init__(self, fn: Callable[..., Mapping[str, object]], logdir: str | Path | None = None,
                 id_offset: int = 0):
        self.fn, self.logdir, self.id_offset = fn, logdir, int(id_offset)
        self._keys = None

    def _one(self, row: int) -> dict:
        index = self.id_offset + int(row)
        d = None
        if self.logdir is not None:
            d = Path(self.logdir) / "workers" / str(index)
            d.mkdir(parents=True, exist_ok=True)
        out = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
               for k, v in self.fn(index=index, logdir=None if d is None else str(d)).items()}
        if self._keys is not None and out.keys() != self._keys:
            raise UserError(f"the worker function returned keys {sorted(out)} for index {index} but "
                            f"{sorted(self._keys)} before; it must return the same keys for every index")
        self._keys = out.keys()
        return out

    def iter_rows(self, indices: Sequence[int]):
        for i in indices:
            yield [int(i)], {k: v[None] for k, v in self._one(i).items()}

    def __call__(self, indices: Sequence[int]) -> dict:
        rows = [self._one(i) for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in (rows[0] if rows else {})}


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

    def _live_claims(self) -> tuple[set[int], set[tuple]]:
        """Rows validly claimed by others, and the (host, pid) of every live claimant."""
        rows, owners = set(), set()
        for f in self.dir.glob("*.json"):
            if not f.stem.isdigit() or int(f.stem) in self.held or self.is_stale(int(f.stem)):
                continue
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(f.read_text())
                rows.add(int(f.stem))
                owners.add((info.get("host"), info.get("pid")))
        return rows, owners

    def claim(self, n: int | None, rows: Iterable[int] | None = None) -> list[int]:
        """Atomically claim up to ``n`` rows that are neither completed nor validly claimed; ``n=None``: a
        guided share, ``ceil(open / (4 * live workers))`` capped at ``MAX_AUTO_BLOCK``."""
        got: list[int] = []
        with self._lock():
            done = self.store.completed
            candidates = range(self.store.num_models) if rows is None else rows
            taken, owners = self._live_claims()
            free = [int(r) for r in candidates if not done[int(r)] and int(r) not in self.held
                    and int(r) not in taken]
            if n is None:
                n = auto_block(len(free), len(owners | {(self.host, self.pid)}))
            for r in free:
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


def _parts(trainer: Trainer, block: list[int]):
    """(rows, values) as the trainer completes them: part by part with ``iter_rows``, else the whole block."""
    if not hasattr(trainer, "iter_rows"):
        yield block, trainer(block)
        return
    left = set(block)
    for rows, values in trainer.iter_rows(block):
        rows = [int(r) for r in rows]
        if not set(rows) <= left or len(set(rows)) != len(rows):
            raise UserError(f"the trainer returned rows {rows[:5]} that are not pending in its block")
        left -= set(rows)
        yield rows, values
    if left:
        raise UserError(f"the trainer's iter_rows skipped rows {sorted(left)[:5]} of its block")


def auto_block(n_rows: int, workers: int = 1) -> int:
    """Guided block size: a quarter of the rows left per worker, between 1 and ``MAX_AUTO_BLOCK``."""
    return min(MAX_AUTO_BLOCK, max(1, -(-int(n_rows) // (4 * max(int(workers), 1)))))


def run_worker(store: DatamodelStore, trainer: Trainer, indices: Iterable[int] | None = None, *,
               pool: bool = False, block_size: int | None = None, timeout_s: float | None = None,
               claim_timeout_s: float = 3600.0, redo: bool = False, progress: bool = False,
               flag_hook=None) -> WorkerReport:
    """Train and store the rows ``indices`` (skipping completed ones unless ``redo``), ``block_size`` at a time
    (None: guided, see the module docstring); or with ``pool=True`` claim free rows (of ``indices`` if given, else
    the whole store) until none are left. Rows are written as the trainer completes them (``iter_rows``).
    Raises ``WorkerTimeout`` when ``timeout_s`` runs out with rows left."""
    if block_size is not None and int(block_size) < 1:
        raise UserError(f"block_size must be >= 1 (or None for automatic blocks), got {block_size}")
    indices = None if indices is None else list(indices)
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
            for rows, out in _parts(trainer, block):
                store.write_rows(rows, out, flag_hook=flag_hook)
                report.done.extend(rows)
                if bar is not None:
                    bar.update(len(rows))

    try:
        if pool:
            if redo:
                raise UserError("redo is not supported in pool mode (a pool claims unfinished rows); give the "
                                "indices to redo")
            with ClaimBoard(store, claim_timeout_s) as board:
                while True:
                    block = board.claim(None if block_size is None else int(block_size), indices)
                    if not block:
                        break
                    try:
                        do_block(block)
                    finally:
                        board.release(block)
        else:
            if indices is None:
                raise UserError("give the indices to train, or use pool=True")
            rows = store.check_rows(indices)
            todo = rows if redo else store.pending(rows)
            report.skipped = sorted(set(rows) - set(todo))
            size = min(MAX_AUTO_BLOCK, max(len(todo), 1)) if block_size is None else int(block_size)
            for s in range(0, len(todo), size):
                do_block(todo[s:s + size])
    finally:
        report.seconds = time.time() - t0
        if bar is not None:
            bar.close()
    return report
