"""Dask workers as SLURM jobs: a dask-jobqueue SLURMCluster from configs/dask/slurm.yaml, kept up until interrupted.

    python scripts/dask_cluster.py jobs=4 queue=cpu cores=8 processes=8 memory=32GB
    python run.py +experiment=digits_valuation valuation.dask_address=$(cat outputs/dask/scheduler_address)

Arguments are ``key=value`` overrides of the config (OmegaConf dotlist). ``--print-job-script`` prints the sbatch
script the workers would get and exits. Stop with Ctrl-C or SIGTERM: the worker jobs are cancelled.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dask" / "slurm.yaml"
SCRIPT_KEYS = ("jobs", "max_jobs", "address_file")


def load(overrides: list[str]) -> tuple[dict, dict]:
    """(SLURMCluster kwargs with _target_, this script's settings) from the config plus overrides."""
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(overrides))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    own = {k: resolved.pop(k) for k in SCRIPT_KEYS}
    return resolved, own


def start(cluster_kw: dict):
    from hydra.utils import instantiate

    Path(cluster_kw["log_directory"]).mkdir(parents=True, exist_ok=True)
    return instantiate(cluster_kw)


def main(argv: list[str]) -> int:
    print_only = "--print-job-script" in argv
    cluster_kw, own = load([a for a in argv if a != "--print-job-script"])
    cluster = start(cluster_kw)
    try:
        if print_only:
            print(cluster.job_script())
            return 0
        if own["max_jobs"]:
            cluster.adapt(minimum_jobs=int(own["jobs"]), maximum_jobs=int(own["max_jobs"]))
        else:
            cluster.scale(jobs=int(own["jobs"]))
        address = Path(own["address_file"])
        address.parent.mkdir(parents=True, exist_ok=True)
        tmp = address.with_suffix(".tmp")
        tmp.write_text(cluster.scheduler_address + "\n")
        os.replace(tmp, address)
        print(f"dask scheduler {cluster.scheduler_address} (written to {address}); dashboard "
              f"{cluster.dashboard_link}; {own['jobs']} worker job(s) requested. Ctrl-C stops it.", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):  # wake up regularly so the signal handler gets to run
            pass
        address.unlink(missing_ok=True)
        return 0
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
