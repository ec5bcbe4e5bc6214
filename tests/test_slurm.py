"""Sweeps against a real single-node SLURM cluster through Hydra's submitit launcher (hydra/launcher=slurm): a multirun
completes, requeued and preempted jobs resume from their checkpoints, and a failing job's error reaches the sweep."""
import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_job
from slurm_fixtures import ROOT, slurm_cluster, sweep, sweep_cmd, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_multirun_of_four_training_jobs_completes(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    res = sweep(slurm_cluster, sweep_dir, ["seed=0,1,2,3", "trainer.max_epochs=2", "irreducible.max_epochs=2",
                                           "hydra.launcher.name=dm_four"])
    assert res.returncode == 0, res.stderr[-4000:]
    for i in range(4):
        s = _summary(sweep_dir / str(i))  # the run dir is ${hydra.sweep.dir}/${hydra.job.num}
        assert s["run_dir"] == str(sweep_dir / str(i))
        assert s["trainer/steps"] == 4 and 0.0 <= s["test/acc"] <= 1.0
    hashes = {_summary(sweep_dir / str(i))["config_hash"] for i in range(4)}
    assert len(hashes) == 4  # four different seeds
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").glob("*_*") if p.is_dir())
    assert len(tasks) == 4 and len({t.split("_")[0] for t in tasks}) == 1  # the sweep is ONE SLURM job array


def test_requeued_and_preempted_jobs_resume_from_their_checkpoints(slurm_cluster, tmp_path):
    """Job 0 (W&B on) is requeued by the admin: scontrol requeue sends SIGTERM and puts it back in the queue. Job 1
    gets submitit's preemption/time-limit signal (USR2): submitit re-pickles it and requeues it itself. Both restore
    last.ckpt in their run dir and end with the optimiser steps of an uninterrupted run; job 0 reattaches to its W&B
    run."""
    sweep_dir, name = tmp_path / "sweep", "dm_requeue"
    job = ["task=classifier", "data.batch_size=16", "trainer.max_epochs=8", "callbacks.checkpoint.every_n_train_steps=10"]
    env = {**slurm_cluster.env, "LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen(sweep_cmd(sweep_dir, [*job, "logger.wandb.enabled=true,false",
                                                  f"hydra.launcher.name={name}"]),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        array = wait_for(lambda: next(iter(slurm_cluster.jobs(name)), "").split("_")[0], 120, "the job array")
        actions = {0: ["scontrol", "requeue", f"{array}_0"], 1: ["scancel", "--signal=USR2", f"{array}_1"]}

        def interrupt_each_after_its_first_checkpoint():
            for i in [i for i in actions if (sweep_dir / str(i) / "checkpoints" / "last.ckpt").is_file()]:
                assert not (sweep_dir / str(i) / "summary.json").exists(), f"job {i} finished before interruption"
                slurm_cluster.run(*actions.pop(i))
            return not actions

        wait_for(interrupt_each_after_its_first_checkpoint, 400, "first checkpoints of jobs 0 and 1", poll=0.05)
        uninterrupted = run_job(tmp_path / "local", [*job, "logger.wandb.enabled=false",
                                                     "trainer.enable_progress_bar=false"])

        def finished():
            slurm_cluster.release_requeued(name)
            return proc.poll() is not None

        wait_for(finished, 600, "the sweep to finish", poll=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            slurm_cluster.run("scancel", "-n", name, check=False)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-4000:]
    assert uninterrupted["trainer/steps"] == 320  # 8 epochs x ceil(629 / 16) batches
    for i in (0, 1):
        run_dir = sweep_dir / str(i)
        assert _summary(run_dir)["trainer/steps"] == uninterrupted["trainer/steps"]
        assert "Restoring states from the checkpoint path" in (run_dir / "run.log").read_text()
    run_id = (sweep_dir / "0" / "wandb_id.txt").read_text().strip()
    attempts = sorted((sweep_dir / "0" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2, attempts  # the requeued attempt logged to the same W&B run
    logs = {i: "".join(p.read_text() for p in (sweep_dir / ".submitit").glob(f"{array}_{i}/*log.*")) for i in (0, 1)}
    assert "Caught signal SIGUSR2" in logs[1] and "preempted" in logs[1]  # submitit handled the signal...
    assert all("Handling auto-requeue signal" not in text for text in logs.values())  # ...and Lightning did not


def test_a_failing_job_reports_its_error_in_the_sweep_output(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    res = sweep(slurm_cluster, sweep_dir, ["task=classifier", "trainer.max_epochs=0,1", "hydra.launcher.name=dm_fail"])
    assert res.returncode != 0
    assert "trainer.max_epochs must be >= 1, got 0" in res.stderr, res.stderr[-3000:]
    assert "Error executing job with overrides" in res.stderr and "trainer.max_epochs=0" in res.stderr
    assert _summary(sweep_dir / "1")["trainer/steps"] > 0  # the other job of the array still finished
