"""The real single-node SLURM cluster (scripts/slurm_cluster.sh) for tests marked ``slurm``, and helpers to sweep on it.

The session fixture reuses a cluster that already answers, else starts one (installing slurm-wlm/munge with apt-get
when root) and stops it at the end. It skips only when it cannot start one: not root and no slurmctld installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
STATE = Path(os.environ.get("SLURM_STATE_DIR", ROOT / ".slurm"))

# Small, fast jobs: one CPU and 1 GB each so two run at once on a 2-core node; no W&B unless a test asks for it.
FAST_JOB = ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=15"]


@dataclass
class Cluster:
    env: dict

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def jobs(self, name: str) -> dict[str, tuple[str, str]]:
        """``{array_task_id: (state, reason)}`` for the jobs called ``name`` (array tasks show as ``<id>_<i>``)."""
        out = self.run("squeue", "-h", "-r", "-n", name, "-o", "%i %T %r", check=False).stdout
        return {i: (st, why) for i, st, why in (line.split(maxsplit=2) for line in out.splitlines() if line.strip())}

    def release_requeued(self, name: str) -> None:
        """Slurm holds a requeued job ~2 minutes (BeginTime); start it now to keep tests short."""
        for job, (state, reason) in self.jobs(name).items():
            if state == "PENDING" and reason == "BeginTime":
                self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)


def _cluster_env() -> dict:
    return {**os.environ, "SLURM_CONF": str(STATE / "slurm.conf"), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def slurm_cluster():
    env = _cluster_env()
    up = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    if not up and os.geteuid() != 0 and shutil.which("slurmctld", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        pytest.skip("SLURM tests need slurm-wlm + munge: run as root (scripts/slurm_cluster.sh installs them) or "
                    "apt-get install slurm-wlm munge; CI runs these as root")
    if not up:
        res = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"could not start the SLURM cluster:\n{res.stdout}\n{res.stderr}"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    try:
        yield Cluster(env)
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if not up:
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def sweep_cmd(sweep_dir: Path, overrides: list[str], launcher: str = "slurm", script: str = "run.py") -> list[str]:
    return [sys.executable, str(ROOT / script), "-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}",
            *FAST_JOB, *overrides]


def sweep(cluster: Cluster, sweep_dir: Path, overrides: list[str], timeout: int = 600, env: dict | None = None,
          **kw) -> subprocess.CompletedProcess:
    """Run a Hydra multirun through the submitit launcher and wait for it (the launcher blocks until the array ends)."""
    env = {**cluster.env, "LOG_DIR": str(sweep_dir.parent / "logs"), **(env or {})}
    return subprocess.run(sweep_cmd(sweep_dir, overrides, **kw), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
