"""Sweeps against a real single-node SLURM cluster through Hydra's submitit launcher (hydra/launcher=slurm): a multirun
completes, requeued and preempted jobs resume from their checkpoints, and a failing job's error reaches the sweep."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_job
from slurm_fixtures import ROOT, slurm_cluster, sweep, sweep_cmd, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_multirun_of_four_jobs_completes_and_a_failing_job_reports_its_error(slurm_cluster, tmp_path):
    """Four jobs, ONE SLURM job array: the two with trainer.max_epochs=0 fail with their error in the sweep output,
    the other two still finish in their own run dirs."""
    sweep_dir = tmp_path / "sweep"
    res = sweep(slurm_cluster, sweep_dir, ["task=classifier", "seed=0,1", "trainer.max_epochs=0,2",
                                           "hydra.launcher.name=dm_four"])
    assert res.returncode != 0
    assert "trainer.max_epochs must be >= 1, got 0" in res.stderr, res.stderr[-3000:]
    assert "Error executing job with overrides" in res.stderr and "trainer.max_epochs=0" in res.stderr
    done = [i for i in range(4) if (sweep_dir / str(i) / "summary.json").is_file()]
    assert len(done) == 2, res.stderr[-3000:]
    for i in done:
        s = _summary(sweep_dir / str(i))  # the run dir is ${hydra.sweep.dir}/${hydra.job.num}
        assert s["run_dir"] == str(sweep_dir / str(i))
        assert s["trainer/steps"] == 4  # 2 epochs x ceil(629 / 320)
        assert s["test/acc"] > 0.3  # chance is 0.1; 4 steps of the digits MLP get past it on every seed
    assert len({_summary(sweep_dir / str(i))["config_hash"] for i in done}) == 2  # two different seeds
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


def test_datamodels_sweep_fills_one_store(slurm_cluster, tmp_path):
    """The datamodels training stage as a SLURM array: 2 jobs x 50 models write their rows of one shared store."""
    from datamatters.datamodels.store import open_store

    root = tmp_path / "dm"
    res = sweep(slurm_cluster, tmp_path / "sweep", [
        "+experiment=digits_datamodels", "task=datamodels_train", "datamodels.jobs=range(0,2)",
        "datamodels.models_per_job=50", "datamodels.num_models=100", "datamodels.epochs=2", f"datamodels.root={root}",
        "hydra.launcher.name=dm_datamodels"])
    assert res.returncode == 0, res.stderr[-4000:]
    store = open_store(root / "store", mode="r")
    assert store.completed.all() and len(store.completed) == 100
    assert 0.4 < float(np.asarray(store["masks"]).mean()) < 0.6  # alpha = 0.5 subsets
    assert np.isfinite(np.asarray(store["margins"])).all()
    trained = [json.loads((tmp_path / "sweep" / str(j) / "summary.json").read_text())["models/trained"] for j in range(2)]
    assert trained == [50, 50]  # each row written exactly once, by its own job


def test_ddp_job_runs_as_two_slurm_tasks(slurm_cluster, tmp_path):
    """Multi-device training on SLURM: with trainer=ddp the preset asks for one task per device and Lightning takes
    its ranks from SLURM (no process spawning); gloo on CPU here, NCCL on GPUs with slurm_gpu."""
    sweep_dir = tmp_path / "sweep"
    res = sweep(slurm_cluster, sweep_dir, ["trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=160",
                                           "trainer.max_epochs=3", "irreducible.max_epochs=3",
                                           "logger.wandb.enabled=true", "hydra.launcher.name=dm_ddp"])
    assert res.returncode == 0, res.stderr[-4000:]
    (task_dir,) = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    assert len(list(task_dir.glob("*_result.pkl"))) == 2  # two SLURM tasks ran the job
    s = _summary(sweep_dir / "0")
    assert s["trainer/steps"] == 6 and s["trainer/examples_seen"] == 3 * 62  # totals gathered from both ranks
    run_id = (sweep_dir / "0" / "wandb_id.txt").read_text().strip()
    assert Path(s["wandb/run_dir"]).name.endswith(run_id)  # rank 0 logged under the id it stored; rank 1 did not race


def test_singularity_preset_runs_the_job_through_the_container_command(slurm_cluster, tmp_path):
    """hydra/launcher=slurm_singularity on the real cluster, with a stand-in `singularity` (none is installed here)
    that records its arguments and runs the command it was given, as `singularity exec` does inside the image."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "singularity_calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "singularity"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n[ "$1" = exec ] || exit 3\nshift\n'
                    + 'while [ $# -gt 0 ] && [ "${1%.sif}" = "$1" ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    image = tmp_path / "datamatters.sif"
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "DM_IMAGE": str(image),
           "DM_SINGULARITY_ARGS": f"--nv --bind {ROOT}"}
    sweep_dir = tmp_path / "sweep"
    res = sweep(slurm_cluster, sweep_dir, ["task=classifier", "trainer.max_epochs=1", "hydra.launcher.gpus_per_node=null",
                                           "hydra.launcher.name=dm_sif"], env=env, launcher="slurm_singularity")
    assert res.returncode == 0, res.stderr[-4000:]
    assert _summary(sweep_dir / "0")["trainer/steps"] == 2
    (call,) = calls.read_text().splitlines()
    assert call.startswith(f"exec --nv --bind {ROOT} {image} python -u -m submitit.core._submit ")
