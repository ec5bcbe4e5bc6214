"""Benchmark: datamodel training throughput, batched path vs one model per process (the reference's worker).

Same job on both sides: digits (629 training points, 359 target digits), logistic regression on an alpha = 0.5
Bernoulli subset, Adam lr 0.02, batch 64, 10 epochs, margins on the targets written to a datamodel store.

* reference-style worker: one new Python process per model index (as ``datamodels.training.worker`` is launched),
  training through Lightning (``ClassifierModule`` via ``LightningSubsetTrainer``) and writing its row;
* the same Lightning trainer in one process (no process start-up), to show where the gain comes from;
* the batched path: ``BatchedSubsetTrainer`` training blocks of models at once with stacked parameters.

Runs are interleaved (process, batched, in-process Lightning, ...) under the same load; 1 CPU thread everywhere
(the shared 2-core machine runs other jobs; a second thread mostly waits for a core).

    python benchmarks/datamodels_training.py [--batched-models 1000 --process-models 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "datamodels_training.json"
HP = dict(alpha=0.5, seed=0, epochs=10, batch_size=64, lr=0.02)


def _setup(store_dir: Path, num_models: int):
    import torch

    torch.set_num_threads(1)
    from datamatters.data.digits import DigitsDataModule
    from datamatters.datamodels import initialize_store, standard_spec

    dm = DigitsDataModule(label_noise={"pc_corrupted": 0.0})
    dm.setup()
    spec = standard_spec(num_models, len(dm.split_indices("train")), len(dm.split_indices("test")))
    store = initialize_store(store_dir, spec, exist_ok=True)
    return dm, store


def lightning_trainer(dm):
    from functools import partial

    import torch

    from datamatters.datamodels import LightningSubsetTrainer
    from datamatters.models import build_model

    return LightningSubsetTrainer(dm.dataset("train"), dm.dataset("test"), lambda: build_model("logistic", (1, 8, 8), 10),
                                  partial(torch.optim.Adam, lr=HP["lr"]), alpha=HP["alpha"], seed=HP["seed"],
                                  batch_size=HP["batch_size"],
                                  trainer_kwargs={"max_epochs": HP["epochs"], "accelerator": "cpu", "devices": 1})


def one_model(store_dir: str, index: int) -> None:
    """The child process: what one reference worker does for one index."""
    from datamatters.datamodels import run_worker

    dm, store = _setup(Path(store_dir), 10_000)
    run_worker(store, lightning_trainer(dm), [index])


def batched(store_dir: Path, n: int) -> float:
    from datamatters.datamodels import BatchedSubsetTrainer, run_worker
    from datamatters.models import build_model

    dm, store = _setup(store_dir, n)
    _, Xtr, ytr = dm.dataset("train").tensors()
    _, Xt, yt = dm.dataset("test").tensors()
    tr = BatchedSubsetTrainer(build_model("logistic", (1, 8, 8), 10), Xtr, ytr, Xt, yt, **HP)
    t0 = time.perf_counter()
    run_worker(store, tr, range(n))  # the worker's own block rule (MAX_AUTO_BLOCK rows per block, written as trained)
    return time.perf_counter() - t0


def in_process_lightning(store_dir: Path, n: int) -> float:
    from datamatters.datamodels import run_worker

    dm, store = _setup(store_dir, n)
    tr = lightning_trainer(dm)
    t0 = time.perf_counter()
    run_worker(store, tr, range(n))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batched-models", type=int, default=1000)
    ap.add_argument("--process-models", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("STORE", "INDEX"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if a.one:
        one_model(a.one[0], int(a.one[1]))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc_s, batched_s, inproc_s, load = [], [], [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(a.repeats):
            for i in range(a.process_models):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--one", str(tmp / "proc"), str(r * 100 + i)], check=True,
                               env=env, capture_output=True)
                proc_s.append(time.perf_counter() - t0)
            batched_s.append(batched(tmp / f"batched{r}", a.batched_models) / a.batched_models)
            inproc_s.append(in_process_lightning(tmp / f"inproc{r}", a.process_models) / a.process_models)
            load.append(os.getloadavg()[0])
            print(f"repeat {r}: per model: process {proc_s[-1]:.2f}s, in-process Lightning {inproc_s[-1]:.3f}s, "
                  f"batched {batched_s[-1] * 1000:.2f}ms", flush=True)
    import statistics as st

    import torch

    from datamatters.datamodels.workers import MAX_AUTO_BLOCK

    res = {
        "benchmark": "datamodels training throughput (train one subset model + margins on 359 targets + store row)",
        "setting": {**HP, "model": "logistic", "data": "digits: 629 train points, 359 targets", "threads": 1,
                    "batched_models_per_run": a.batched_models,
                    "batched_block_size": f"auto ({MAX_AUTO_BLOCK} rows per block)"},
        "models_per_s": {"one_process_per_model_lightning": 1 / st.median(proc_s),
                         "lightning_in_one_process": 1 / st.median(inproc_s),
                         "batched": 1 / st.median(batched_s)},
        "seconds_per_model": {"one_process_per_model_lightning": proc_s, "lightning_in_one_process": inproc_s,
                              "batched": batched_s},
        "speedup_batched_vs_process_per_model": st.median(proc_s) / st.median(batched_s),
        "speedup_batched_vs_lightning_in_process": st.median(inproc_s) / st.median(batched_s),
        "goal_speedup": 20.0,
        "notes": ("Interleaved runs under the same load; shared 2-core machine with other jobs running, so absolute "
                  "numbers are noisy. The per-process baseline includes Python/torch/Lightning start-up, which is "
                  "what a one-model-per-process worker pays for every model."),
        "loadavg_1min_during": load,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("models_per_s", "speedup_batched_vs_process_per_model",
                                          "speedup_batched_vs_lightning_in_process")}, indent=1))


if __name__ == "__main__":
    main()
