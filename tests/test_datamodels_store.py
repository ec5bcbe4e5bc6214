"""Datamodel store and workers: creation safety, row-then-flag, validation, skipping, SIGKILL, pool, timeouts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from datamatters.datamodels import (ClaimBoard, DatamodelSpec, WorkerTimeout, initialize_store, open_store,
                                    per_index, run_worker, standard_spec)
from datamatters.errors import UserError

N_TRAIN, N_T = 6, 4


def _spec(num_models=10, **meta):
    return standard_spec(num_models, N_TRAIN, N_T, outputs=("masks", "margins"), meta={"alpha": 0.5, **meta})


def _row(i: int) -> dict:
    """Deterministic fake outputs for row i."""
    return {"masks": (np.arange(N_TRAIN) + i) % 2 == 0, "margins": np.arange(N_T, dtype=np.float32) + 10 * i}


def _trainer(calls: list | None = None, sleep: float = 0.0):
    def trainer(indices):
        if calls is not None:
            calls.extend(indices)
        time.sleep(sleep)
        rows = [_row(i) for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    return trainer


def _assert_row(store, i):
    np.testing.assert_array_equal(store["masks"][i], _row(i)["masks"])
    np.testing.assert_array_equal(store["margins"][i], _row(i)["margins"])


# ---- spec and creation -----------------------------------------------------------------------------------------
def test_spec_roundtrip_and_validation(tmp_path):
    spec = _spec(dataset="digits")
    (tmp_path / "s.json").write_text(spec.to_json())
    assert DatamodelSpec.from_json(tmp_path / "s.json") == spec
    # the reference's spec.json format (no meta) is accepted
    ref = {"num_models": 3, "schema": {"masks": {"shape": [5], "dtype": "bool_"}, "margins": {"shape": [2], "dtype": "float16"}}}
    assert DatamodelSpec.from_dict(ref).dtype("masks") == np.bool_
    for bad, match in [({"num_models": 0, "schema": {"a": {"shape": [1], "dtype": "float32"}}}, "num_models >= 1"),
                       ({"num_models": 2, "schema": {}}, "at least one key"),
                       ({"num_models": 2, "schema": {"_completed": {"shape": [1], "dtype": "uint8"}}},
                        "invalid schema key '_completed'"),
                       ({"num_models": 2, "schema": {"a/b": {"shape": [1], "dtype": "float32"}}},
                        "invalid schema key 'a/b'"),
                       ({"num_models": 2, "schema": {"a": {"shape": [-1], "dtype": "float32"}}},
                        "shape must be a list of non-negative ints"),
                       ({"num_models": 2, "schema": {"a": {"shape": [1], "dtype": "object"}}},
                        "is not a bool, integer or float type"),
                       ({"num_models": 2, "schema": {"a": {"shape": [1]}}}, "needs 'shape' and 'dtype'"),
                       ({"schema": {}}, "must have 'num_models' and 'schema'")]:
        with pytest.raises(UserError, match=match):
            DatamodelSpec.from_dict(bad)


def test_initialize_creates_memmaps_and_refuses_overwrite(tmp_path):
    path = tmp_path / "store"
    store = initialize_store(path, _spec())
    assert sorted(p.name for p in path.iterdir()) == ["_completed.npy", "margins.npy", "masks.npy", "spec.json"]
    assert store["masks"].shape == (10, N_TRAIN) and store["margins"].dtype == np.float32
    assert np.load(path / "margins.npy", mmap_mode="r").shape == (10, N_T)  # plain .npy files, like the reference
    store.write_row(3, _row(3))
    with pytest.raises(UserError, match="already exists.*1 rows completed.*force=True"):
        initialize_store(path, _spec())
    again = initialize_store(path, _spec(), exist_ok=True)  # same spec: a sweep job may call this safely
    _assert_row(again, 3)
    assert again.completed[3]
    with pytest.raises(UserError, match="another spec"):
        initialize_store(path, _spec(num_models=11), exist_ok=True)
    wiped = initialize_store(path, _spec(), force=True)
    assert not wiped.completed.any() and not wiped["margins"].any()


def test_concurrent_initialize_with_exist_ok_creates_one_store(tmp_path):
    """Many sweep jobs call initialize_store at once: one creates it (atomic rename), the others open it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        stores = list(ex.map(lambda _: initialize_store(tmp_path / "s", _spec(), exist_ok=True), range(8)))
    stores[0].write_row(1, _row(1))
    assert all(s.completed[1] for s in stores)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary directories left behind


def test_spec_mismatch_and_damage_refused(tmp_path):
    path = tmp_path / "store"
    initialize_store(path, _spec())
    for other in [_spec(num_models=12), _spec(alpha=0.3),
                  standard_spec(10, N_TRAIN + 1, N_T, meta={"alpha": 0.5}),
                  standard_spec(10, N_TRAIN, N_T, outputs=("masks", "margins", "loss"), meta={"alpha": 0.5})]:
        with pytest.raises(UserError, match="another spec"):
            open_store(path, spec=other)
    open_store(path, spec=_spec())  # the same spec opens
    with pytest.raises(UserError, match="no datamodel store"):
        open_store(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a datamodel store"):
        initialize_store(tmp_path / "junk", _spec())
    np.save(path / "margins.npy", np.zeros((10, N_T + 1), np.float32))
    with pytest.raises(UserError, match="damaged"):
        open_store(path)


def test_force_deletes_only_what_the_store_created(tmp_path):
    """force=True re-creates a store, but never deletes a directory that is not a store, nor files the store did
    not create (the old code ran rmtree on whatever was at the path)."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match=r"not a datamodel store \(no spec.json; it holds thesis.tex\).*nothing was"):
        initialize_store(user, _spec(), force=True)
    assert (user / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory \\(a file\\)"):
        initialize_store(tmp_path / "file", _spec(), force=True)
    assert (tmp_path / "file").read_text() == "x"

    path = tmp_path / "store"
    store = initialize_store(path, _spec())
    run_worker(store, _trainer(), pool=True, block_size=2)  # leaves claims/ (its lock file)
    (path / "workers" / "3").mkdir(parents=True)              # an empty per_index log directory
    (path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"files the store did not create \(notes.txt\); nothing was deleted"):
        initialize_store(path, _spec(), force=True)
    assert (path / "notes.txt").is_file() and open_store(path).completed.all()  # the store is intact too
    (path / "workers" / "3" / "log.txt").write_text("user log")
    (path / "notes.txt").unlink()
    with pytest.raises(UserError, match=r"did not create \(workers/\)"):
        initialize_store(path, _spec(), force=True)
    (path / "workers" / "3" / "log.txt").unlink()
    wiped = initialize_store(path, _spec(), force=True)  # only store files left: re-created
    assert not wiped.completed.any()
    assert sorted(p.name for p in path.iterdir()) == ["_completed.npy", "margins.npy", "masks.npy", "spec.json"]
    (path / "spec.json").write_text("{broken")
    with pytest.raises(UserError, match="cannot be read.*nothing was deleted"):
        initialize_store(path, _spec(), force=True)
    assert (path / "margins.npy").is_file()


# ---- writing ---------------------------------------------------------------------------------------------------
def test_row_is_flushed_before_its_flag(tmp_path):
    store = initialize_store(tmp_path / "s", _spec())
    seen = {}

    def hook(rows):  # runs after the data flush, before the flags
        other = open_store(tmp_path / "s", mode="r")  # an independent reader sees the data already
        seen["data"] = np.array(other["margins"][rows])
        seen["flag"] = other.completed[rows].copy()

    run_worker(store, _trainer(), [2, 5], block_size=2, flag_hook=hook)
    np.testing.assert_array_equal(seen["data"], np.stack([_row(2)["margins"], _row(5)["margins"]]))
    assert not seen["flag"].any()
    assert store.completed[[2, 5]].all() and store.completed.sum() == 2


@pytest.mark.parametrize("bad, match", [
    ({"margins": np.zeros((1, N_T + 1), np.float32)}, r"'margins' has shape \(1, 5\), the spec wants \(1, 4\)"),
    ({"margins": np.full((1, N_T), np.nan, np.float32)}, "'margins' has NaN or infinite values"),
    ({"margins": np.full((1, N_T), np.inf, np.float32)}, "'margins' has NaN or infinite values"),
    ({"margins": np.full((1, N_T), 1e39)}, r"NaN or infinite values \(after casting to float32\)"),  # overflow
    ({"masks": np.zeros((1, N_TRAIN), np.float32)}, "'masks' has dtype float32, which cannot be stored as bool"),
    ({"margins": None}, r"missing \['margins'\]"),
    ({"extra": np.zeros((1, 2))}, r"unexpected \['extra'\]"),
])
def test_bad_outputs_rejected_before_any_write(tmp_path, bad, match):
    store = initialize_store(tmp_path / "s", _spec())
    good = {k: v[None] for k, v in _row(1).items()}
    vals = {**good, **{k: v for k, v in bad.items() if v is not None}}
    for k, v in bad.items():
        if v is None:
            vals.pop(k)
    with pytest.raises(UserError, match=match):
        store.write_rows([1], vals)
    assert not store["masks"].any() and not store["margins"].any() and not store.completed.any()


def test_completed_rows_are_skipped_and_redo(tmp_path):
    store = initialize_store(tmp_path / "s", _spec())
    calls: list = []
    rep = run_worker(store, _trainer(calls), range(0, 6), block_size=4)
    assert calls == list(range(6)) and rep.done == list(range(6))
    calls.clear()
    rep = run_worker(store, _trainer(calls), range(4, 10), block_size=4)
    assert calls == [6, 7, 8, 9] and rep.skipped == [4, 5]
    for i in range(10):
        _assert_row(store, i)
    calls.clear()
    run_worker(store, _trainer(calls), [1], redo=True)
    assert calls == [1]
    with pytest.raises(UserError, match="outside"):
        run_worker(store, _trainer(), [10])


def test_per_index_adapter_matches_reference_worker_signature(tmp_path):
    store = initialize_store(tmp_path / "s", _spec())
    seen = []

    def main(index, logdir):  # the reference's worker function
        seen.append(Path(logdir).name)
        return _row(index)

    run_worker(store, per_index(main, logdir=tmp_path / "logs"), [0, 7], block_size=2)
    assert seen == ["0", "7"] and (tmp_path / "logs" / "workers" / "7").is_dir()
    _assert_row(store, 7)


def test_timeout_raises_and_keeps_finished_rows(tmp_path):
    store = initialize_store(tmp_path / "s", _spec())
    with pytest.raises(WorkerTimeout):
        run_worker(store, _trainer(sleep=0.3), range(10), block_size=1, timeout_s=0.5)
    done = store.completed
    assert 1 <= done.sum() < 10
    for i in np.flatnonzero(done):
        _assert_row(store, i)
    assert issubclass(WorkerTimeout, UserError)  # jobs turn it into a non-zero exit


# ---- processes: SIGKILL and pool -------------------------------------------------------------------------------
_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from datamatters.datamodels import open_store, run_worker

    def _row(i):
        return {{"masks": (np.arange({n_train}) + i) % 2 == 0, "margins": np.arange({n_t}, dtype=np.float32) + 10 * i}}

    args = json.loads(sys.argv[1])
    store = open_store(args["store"])
    log = args.get("log")

    def trainer(indices):
        if log:
            with open(log, "a") as fh:
                fh.write("".join(f"{{i}} {{os.getpid()}}\\n" for i in indices))
        time.sleep(args.get("sleep", 0.0))
        rows = [_row(i) for i in indices]
        return {{k: np.stack([r[k] for r in rows]) for k in rows[0]}}

    def hook(rows):
        if args.get("hang_row") in rows and not args.get("per_row"):
            open(args["marker"], "w").close()
            time.sleep(60)

    class PerRow:  # finishes rows one at a time; hangs while training hang_row
        def iter_rows(self, indices):
            for i in indices:
                if i == args.get("hang_row"):
                    open(args["marker"], "w").close()
                    time.sleep(60)
                yield [i], trainer([i])

    run_worker(store, PerRow() if args.get("per_row") else trainer, args.get("indices"),
               pool=args.get("pool", False), block_size=args.get("block", 1), flag_hook=hook)
""")


def _script(tmp_path) -> Path:
    f = tmp_path / "worker_script.py"
    f.write_text(_SCRIPT.format(n_train=N_TRAIN, n_t=N_T))
    return f


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_row_leaves_other_rows_and_row_is_redone(tmp_path):
    path = tmp_path / "s"
    initialize_store(path, _spec())
    marker = tmp_path / "hanging"
    args = {"store": str(path), "indices": list(range(8)), "hang_row": 3, "marker": str(marker)}
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path)), json.dumps(args)], env=_env())
    try:
        deadline = time.time() + 120
        while not marker.exists():  # row 3's data is written and flushed, its flag is not set yet
            assert proc.poll() is None and time.time() < deadline, "worker died or never reached row 3"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = open_store(path)
    assert store.completed.tolist() == [True] * 3 + [False] * 7
    for i in range(3):
        _assert_row(store, i)
    calls: list = []
    run_worker(store, _trainer(calls), range(8))
    assert calls == [3, 4, 5, 6, 7]  # the killed row is redone, finished rows are not
    for i in range(8):
        _assert_row(store, i)


def _kill_when_marked(proc, marker):
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "worker died or never reached the hang"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_pool_worker_killed_mid_block_keeps_the_rows_it_finished(tmp_path):
    """A pool worker claims a block of 6 and is killed while training its 4th row: the 3 rows it finished were
    written as they completed (not at the end of the block), and a new worker takes over the dead claims."""
    path = tmp_path / "s"
    initialize_store(path, _spec(num_models=10))
    marker = tmp_path / "hanging"
    args = {"store": str(path), "pool": True, "block": 6, "per_row": True, "hang_row": 3, "marker": str(marker)}
    _kill_when_marked(subprocess.Popen([sys.executable, str(_script(tmp_path)), json.dumps(args)], env=_env()),
                      marker)
    store = open_store(path)
    assert store.completed.tolist() == [True] * 3 + [False] * 7
    for i in range(3):
        _assert_row(store, i)
    calls: list = []
    run_worker(store, _trainer(calls), pool=True)  # the dead worker's claims (rows 3..5) are stale
    assert sorted(calls) == list(range(3, 10)) and store.completed.all()


def test_pool_claims_a_guided_share_not_the_whole_store(tmp_path):
    """block_size=None: ceil(free / (4 * live workers)) rows per claim, at most MAX_AUTO_BLOCK."""
    from datamatters.datamodels.workers import MAX_AUTO_BLOCK

    store = initialize_store(tmp_path / "s", _spec(num_models=40))
    assert ClaimBoard(store).claim(None) == list(range(10))  # alone: a quarter of 40
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # rows 0..9 held by a live process of this host (another worker): 30 free, 2 workers -> 4
        for r in range(10):
            (tmp_path / "s" / "claims" / f"{r}.json").write_text(
                json.dumps({"pid": other.pid, "host": ClaimBoard(store).host, "time": 0, "nonce": "w"}))
        assert ClaimBoard(store).claim(None) == list(range(10, 14))
    finally:
        other.kill()
        other.wait()
    big = initialize_store(tmp_path / "big", _spec(num_models=10_000))
    assert len(ClaimBoard(big).claim(None)) == MAX_AUTO_BLOCK
    calls: list = []
    rep = run_worker(initialize_store(tmp_path / "t", _spec(num_models=8)), _trainer(calls), pool=True)
    assert sorted(calls) == list(range(8)) and sorted(rep.done) == list(range(8))


def test_concurrent_pool_workers_finish_every_row_exactly_once(tmp_path):
    path = tmp_path / "s"
    initialize_store(path, _spec(num_models=30))
    log = tmp_path / "log.txt"
    args = {"store": str(path), "pool": True, "block": 2, "sleep": 0.2, "log": str(log)}
    procs = [subprocess.Popen([sys.executable, str(_script(tmp_path)), json.dumps(args)], env=_env())
             for _ in range(3)]
    for p in procs:
        assert p.wait(240) == 0
    lines = [ln.split() for ln in log.read_text().splitlines()]
    rows = sorted(int(r) for r, _ in lines)
    assert rows == list(range(30)), "every row trained exactly once"
    assert len({pid for _, pid in lines}) >= 2, "the work was shared between workers"
    store = open_store(path)
    assert store.completed.all()
    for i in range(30):
        _assert_row(store, i)
    assert not [f for f in (path / "claims").iterdir() if f.suffix == ".json"]  # claims released


def test_stale_claims_are_taken_over(tmp_path):
    store = initialize_store(tmp_path / "s", _spec(num_models=4))
    board = ClaimBoard(store, claim_timeout_s=60)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = board.host
    (board.dir / "0.json").write_text(json.dumps({"pid": dead.pid, "host": host, "time": 0, "nonce": "x"}))
    (board.dir / "1.json").write_text(json.dumps({"pid": os.getppid(), "host": host, "time": 0, "nonce": "y"}))
    (board.dir / "2.json").write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0, "nonce": "z"}))
    old = time.time() - 3600
    os.utime(board.dir / "2.json", (old, old))  # other host, not touched for an hour
    assert board.is_stale(0) and not board.is_stale(1) and board.is_stale(2)
    assert board.claim(10) == [0, 2, 3]  # row 1 is held by a live process
    other = ClaimBoard(store, claim_timeout_s=60)
    assert other.claim(10) == []
    board.release([0, 2, 3])
    assert other.claim(10) == [0, 2, 3]
