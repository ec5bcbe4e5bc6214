"""Cost of the weight-statistics callback: the same small Lightning run with and without ``WeightStatsRecorder`` at
the experiments' default intervals, interleaved (with, without, with, ...) so both sides see the same machine load.

Settings: the digits MLP of ``+experiment=digits_dynamics`` (Xavier MLP 64-800-10, AdamW, batch 256, statistics
every 20 steps) and the sparse-parity MLP of ``+experiment=sparse_parity`` (40-1000-1, hinge, SGD, batch 32,
statistics every 10 epochs). Reports wall-clock overhead (median over repeats) and the callback's own measured time.

    python benchmarks/dynamics_overhead.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from datamatters.data.digits import DigitsDataModule
from datamatters.data.synthetic import SparseParityDataModule
from datamatters.dynamics.callback import WeightStatsRecorder
from datamatters.models import build_model
from datamatters.training import ClassifierModule

ROOT = Path(__file__).resolve().parent
SETTINGS = {
    "digits_mlp_every_20_steps": dict(
        dm=lambda: DigitsDataModule(label_noise={}, holdout=False, batch_size=256),
        model=lambda: build_model("ref_mlp", (1, 8, 8), 10, hidden=[800]),
        opt=partial(torch.optim.AdamW, lr=1e-3), loss="ce", epochs=60, rec=dict(every_n_steps=20)),
    "sparse_parity_every_10_epochs": dict(
        dm=lambda: SparseParityDataModule(label_noise={}, batch_size=32),
        model=lambda: build_model("ref_mlp", (40,), 2, hidden=[1000], single_logit=True),
        opt=partial(torch.optim.SGD, lr=0.1, weight_decay=0.01), loss="hinge", epochs=20,
        rec=dict(every_n_epochs=10)),
}


def one_run(s: dict, with_cb: bool, out: Path) -> tuple[float, float, int]:
    L.seed_everything(0, verbose=False)
    dm = s["dm"]()
    dm.setup()
    module = ClassifierModule(s["model"](), s["opt"], num_classes=dm.num_classes, loss=s["loss"])
    cbs = [WeightStatsRecorder(**s["rec"], out_dir=out)] if with_cb else []
    trainer = L.Trainer(max_epochs=s["epochs"], callbacks=cbs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(module, dm)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, (cbs[0].stat_seconds if cbs else 0.0), (len(cbs[0].rows) if cbs else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--result", type=Path, default=ROOT / "results" / "dynamics_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"method": "same run with/without the callback, interleaved (with, without) x repeats, one torch thread; "
                     "shared 2-core machine, so wall-clock differences are noisy; process CPU time is less sensitive to "
                     "the other jobs' load, and the callback's own timer (stat_seconds, time inside record()) is the "
                     "direct measure", "settings": {}}
    for name, s in SETTINGS.items():
        w_on, w_off, c_on, c_off, inside, n_rec = [], [], [], [], [], 0
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                wall, cpu, st, n_rec = one_run(s, True, Path(d))
                w_on.append(wall)
                c_on.append(cpu)
                inside.append(st)
            wall, cpu, _, _ = one_run(s, False, Path("."))
            w_off.append(wall)
            c_off.append(cpu)
            print(name, r, f"with {w_on[-1]:.2f}s/{c_on[-1]:.2f}cpu without {w_off[-1]:.2f}s/{c_off[-1]:.2f}cpu "
                  f"inside {inside[-1]:.3f}s")
        med = statistics.median
        res["settings"][name] = {
            "wall_with_s": w_on, "wall_without_s": w_off, "cpu_with_s": c_on, "cpu_without_s": c_off,
            "callback_seconds": inside, "records": n_rec,
            "overhead_wall_pct_median": round(100 * (med(w_on) - med(w_off)) / med(w_off), 2),
            "overhead_cpu_pct_median": round(100 * (med(c_on) - med(c_off)) / med(c_off), 2),
            "overhead_inside_pct_median": round(100 * med(inside) / med(c_off), 2),
        }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["settings"], indent=1))


if __name__ == "__main__":
    main()
