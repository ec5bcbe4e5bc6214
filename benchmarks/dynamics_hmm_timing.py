"""HMM model-selection time: K = 1..8 x 5 seeded restarts (full covariance, 32 EM iterations) on real run tables,
joblib-parallel vs a serial loop (n_jobs=1: joblib runs the same fits one after another in-process), interleaved
(serial, parallel, serial, ...) so both see the same machine load; also checks that both give identical models.

    python benchmarks/dynamics_hmm_timing.py --runs /tmp/dm_dynamics_modular/plain [--repeats 2 --n_jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from datamatters.dynamics.hmm import select
from datamatters.dynamics.stats import FEATURES
from datamatters.dynamics.tables import Normalizer, find_run_tables, load_runs, split_runs, stack

ROOT = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="/tmp/dm_dynamics_modular/plain")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n_jobs", type=int, default=-1)
    ap.add_argument("--k_max", type=int, default=8)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--covariance_type", default="full")
    ap.add_argument("--result", type=Path, default=ROOT / "results" / "dynamics_hmm_timing.json")
    args = ap.parse_args()
    rs = split_runs(load_runs(find_run_tables(args.runs), FEATURES), 0.2, 0)
    norm = Normalizer("run")
    X, L = stack(rs, rs.train, norm)
    Xt, Lt = stack(rs, rs.test, norm)
    kw = dict(k_max=args.k_max, restarts=args.restarts, covariance_type=args.covariance_type, seed=0)
    times = {"serial": [], "parallel": []}
    sels = {}
    for r in range(args.repeats):
        for mode, n_jobs in (("serial", 1), ("parallel", args.n_jobs)):
            t0 = time.perf_counter()
            sels[mode] = select(X, L, Xt, Lt, n_jobs=n_jobs, **kw)
            times[mode].append(time.perf_counter() - t0)
            print(mode, r, f"{times[mode][-1]:.1f}s")
    same = all(np.array_equal(sels["serial"].models[k].means, sels["parallel"].models[k].means)
               for k in sels["serial"].models)
    res = {
        "data": {"runs": args.runs, "train_rows": int(len(X)), "test_rows": int(len(Xt)), "features": len(FEATURES)},
        "fits": args.k_max * args.restarts, "covariance_type": args.covariance_type, "n_iter": 32,
        "n_jobs": args.n_jobs, "cpu_count": os.cpu_count(),
        "seconds": times, "median_serial_s": statistics.median(times["serial"]),
        "median_parallel_s": statistics.median(times["parallel"]),
        "speedup": statistics.median(times["serial"]) / statistics.median(times["parallel"]),
        "identical_models": same, "k_bic": sels["serial"].k_bic,
        "note": "2 CPU cores shared with other jobs; interleaved repeats; the parallel time includes starting the "
                "loky worker processes",
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("median_serial_s", "median_parallel_s", "speedup", "identical_models")}))


if __name__ == "__main__":
    main()
