"""Sweeps against a real single-node SLURM cluster through Hydra's submitit launcher (hydra/launcher=slurm): a multirun
completes (inside the container command of slurm_singularity), a failing job's error reaches the sweep, requeued and
preempted jobs resume from their checkpoints, and a DDP job runs as SLURM tasks. Each spawned job pays ~12 s of
imports, so each test runs ONE sweep that checks several things."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_job
from slurm_fixtures import ROOT, slurm_cluster, sweep, sweep_cmd, wait_for  # noqa: F401 (fixture)

def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _fake_singularity(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in `singularity` (none is installed here) that records its arguments and runs the command it was given,
    as `singularity exec` does inside the image. Returns (its bin dir, the file of recorded calls)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "singularity_calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "singularity"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n[ "$1" = exec ] || exit 3\nshift\n'
                    + 'while [ $# -gt 0 ] && [ "${1%.sif}" = "$1" ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    return bin_dir, calls


@pytest.mark.slurm
def test_sweep_through_the_container_fills_one_store_and_reports_failing_jobs(slurm_cluster, tmp_path):
    """ONE sweep, ONE SLURM job array of four jobs, each spawned job paying its imports once:
    - jobs 0 and 1 (task.name=dm_bogus) fail: their error reaches the sweep output, the other jobs still finish in their
      own run dirs (the failing jobs come first: they end in seconds and free the node's 2 CPUs for the others);
    - the datamodels training stage: jobs 2 and 3 (datamodels.jobs=0,1) write their 2 x 20 rows of one shared store;
    - through hydra/launcher=slurm_singularity on the real cluster: every array task runs inside `singularity exec`."""
    from datamatters.datamodels.store import open_store

    bin_dir, calls = _fake_singularity(tmp_path)
    image = tmp_path / "datamatters.sif"
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "DM_IMAGE": str(image),
           "DM_SINGULARITY_ARGS": f"--nv --bind {ROOT}"}
    root, sweep_dir = tmp_path / "dm", tmp_path / "sweep"
    res = sweep(slurm_cluster, sweep_dir, [
        "+experiment=digits_datamodels", "task=datamodels_train", "task.name=dm_bogus,datamodels_train",
        "datamodels.jobs=range(0,2)", "datamodels.models_per_job=20", "datamodels.num_models=40",
        "datamodels.epochs=2", f"datamodels.root={root}", "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.name=dm_sweep"], env=env, launcher="slurm_singularity")
    assert res.returncode != 0
    assert "unknown task 'dm_bogus'" in res.stderr, res.stderr[-3000:]
    assert "Error executing job with overrides" in res.stderr and "task.name=dm_bogus" in res.stderr
    done = [i for i in range(4) if (sweep_dir / str(i) / "summary.json").is_file()]
    assert done == [2, 3], res.stderr[-3000:]  # job num = (task.name, datamodels.jobs) in sweep order
    for i in done:
        assert _summary(sweep_dir / str(i))["run_dir"] == str(sweep_dir / str(i))  # ${hydra.sweep.dir}/${hydra.job.num}
    assert len({_summary(sweep_dir / str(i))["config_hash"] for i in done}) == 2  # two different jobs' configs
    store = open_store(root / "store", mode="r")
    assert store.completed.all() and len(store.completed) == 40
    assert 0.4 < float(np.asarray(store["masks"]).mean()) < 0.6  # alpha = 0.5 subsets
    assert np.isfinite(np.asarray(store["margins"])).all()
    assert [_summary(sweep_dir / str(i))["models/trained"] for i in done] == [20, 20]  # each row once, by its job
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").glob("*_*") if p.is_dir())
    assert len(tasks) == 4 and len({t.split("_")[0] for t in tasks}) == 1  # the sweep is ONE SLURM job array
    lines = calls.read_text().splitlines()
    assert len(lines) == 4, lines  # every array task, failing ones included, ran through the container command
    assert all(line.startswith(f"exec --nv --bind {ROOT} {image} python -u -m submitit.core._submit ")
               for line in lines), lines


def test_a_classifier_job_with_no_epochs_fails_before_training(tmp_path, capsys):
    """The error the 4-job sweep used to get from its failing jobs, checked in-process (no cluster, no spawned job)."""
    with pytest.raises(SystemExit):
        run_job(tmp_path, ["task=classifier", "trainer.max_epochs=0", "trainer.enable_progress_bar=false",
                           "logger.wandb.enabled=false"])
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "trainer.max_epochs must be >= 1, got 0" in err, err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


@pytest.mark.slurm
def test_requeued_and_preempted_jobs_resume_from_their_checkpoints(slurm_cluster, tmp_path):
    """Job 0 (W&B on) is requeued by the admin: scontrol requeue sends SIGTERM and puts it back in the queue. Job 1
    gets submitit's preemption/time-limit signal (USR2): submitit re-pickles it and requeues it itself. Both restore
    last.ckpt in their run dir and end with the optimiser steps of an uninterrupted run (8 epochs x ceil(629 / 16)
    batches = 320); job 0 reattaches to its W&B run. The two jobs run side by side: each attempt pays its imports."""
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
            slurm_cluster.release_requeued(name)  # the first one interrupted restarts while the other still runs
            for i in [i for i in actions if (sweep_dir / str(i) / "checkpoints" / "last.ckpt").is_file()]:
                assert not (sweep_dir / str(i) / "summary.json").exists(), f"job {i} finished before interruption"
                slurm_cluster.run(*actions.pop(i))
            return not actions

        wait_for(interrupt_each_after_its_first_checkpoint, 400, "first checkpoints of jobs 0 and 1", poll=0.05)

        def finished():
            slurm_cluster.release_requeued(name)
            return proc.poll() is not None

        wait_for(finished, 600, "the sweep to finish", poll=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            slurm_cluster.run("scancel", "-n", name, check=False)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-4000:]
    for i in (0, 1):
        run_dir = sweep_dir / str(i)
        s = _summary(run_dir)
        assert s["trainer/steps"] == 320  # as uninterrupted: 8 epochs x ceil(629 / 16) batches
        assert s["run_dir"] == str(run_dir)  # the run dir is ${hydra.sweep.dir}/${hydra.job.num}
        assert s["test/acc"] > 0.8  # chance is 0.1; 320 steps of the digits MLP reach ~0.95
        assert (run_dir / "run.log").read_text().count("Restoring states from the checkpoint path") == 1
    run_id = (sweep_dir / "0" / "wandb_id.txt").read_text().strip()
    attempts = sorted((sweep_dir / "0" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2, attempts  # the requeued attempt logged to the same W&B run
    logs = {i: "".join(p.read_text() for p in (sweep_dir / ".submitit").glob(f"{array}_{i}/*log.*")) for i in (0, 1)}
    assert "Caught signal SIGUSR2" in logs[1] and "preempted" in logs[1]  # submitit handled the signal...
    assert all("Handling auto-requeue signal" not in text for text in logs.values())  # ...and Lightning did not


@pytest.mark.slurm
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
