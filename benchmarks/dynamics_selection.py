"""The training map of data selection, as committed in ``benchmarks/results/dynamics_selection.json``: the job
``+experiment=dynamics_selection`` at the K that BIC chooses, then re-read at other K (``--also_k``: the same runs
and HMM fits, copied to ``<out>_k<K>``: no retraining, no refitting), merged into one results JSON (+ the figure) for
the README block (``python benchmarks/report.py --write``).

    python benchmarks/dynamics_selection.py                              # 20 + 20 seeds, 100 epochs (~20 min here)
    python benchmarks/dynamics_selection.py --out outputs/dsel --also_k 3 4 -- task.epochs=50   # extra overrides

Rerunning with the same ``--out`` reuses the finished runs (and the HMM fits) of the job.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_job(out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "run.py"), "+experiment=dynamics_selection", "logger.wandb.enabled=false",
           "dynamics.n_jobs=1", f"hydra.run.dir={out}", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads((out / "selection_map.json").read_text())


def reread(d: dict) -> dict:
    """What the map at another K says: per method occupancy, runs visiting, steps to the final state; the
    comparisons."""
    keep = ("occupancy", "visited_runs", "final_state_runs", "convergence_step")
    return {"hmm": {k: d["hmm"][k] for k in ("k", "test_ll_per_sample", "features", "state_means")},
            "state_order": d["state_order"],
            "methods": {m: {k: v[k] for k in keep} for m, v in d["methods"].items()},
            "comparisons": d["comparisons"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/dynamics_selection", help="the job's run dir (reused when rerun)")
    ap.add_argument("--also_k", type=int, nargs="*", default=[4], help="re-read the same runs at these K")
    ap.add_argument("--note", default="", help="carried into the JSON (e.g. what was reduced)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the job (after --)")
    a = ap.parse_args(argv)
    out = (ROOT / a.out).resolve()
    extra = [*a.overrides, *([f"task.note='{a.note}'"] if a.note else [])]
    d = run_job(out, extra)
    d["also_k"] = {}
    for k in a.also_k:
        if k == d["hmm"]["k"]:
            continue
        other = out.parent / f"{out.name}_k{k}"
        for part in ("runs", "hmm/fits"):  # the runs, and the HMM fits (reused: same data and settings)
            if not (other / part).is_dir():
                shutil.copytree(out / part, other / part)
        d["also_k"][str(k)] = reread(run_job(other, [*extra, f"dynamics.k={k}"]))
    d["command"] = "python benchmarks/dynamics_selection.py " + " ".join(
        [f"--also_k {' '.join(map(str, a.also_k))}", *(["--"] + a.overrides if a.overrides else [])])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dynamics_selection.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(out / "selection_map.png", RESULTS / "dynamics_selection.png")
    print(f"wrote {RESULTS / 'dynamics_selection.json'} and dynamics_selection.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
