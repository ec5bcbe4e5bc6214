"""Preemption without a cluster: a job killed mid-epoch resumes from last.ckpt in its run dir with the same steps,
selections and W&B run; and the SLURM signal has exactly one owner (submitit), Lightning's auto-requeue being off."""
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, compose_cfg, run_job

RHO = ["data.batch_size=64", "trainer.max_epochs=8", "irreducible.max_epochs=5", "trainer.enable_progress_bar=false",
       "callbacks.checkpoint.every_n_train_steps=5"]


def test_rho_job_killed_mid_epoch_resumes_to_the_same_result(tmp_path, caplog):
    """SIGKILL right after the first checkpoint (step 5 of 80, mid-epoch), then the same job again in the same run
    dir, as a requeued job does. An uninterrupted run takes 8 epochs x ceil(629 / 64) = 80 steps and selects
    9 x 6 + 5 = 59 points per epoch (the last batch has 53 points)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "LOG_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *RHO, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ckpt.is_file() and proc.poll() is None, "the job should be mid-training with a checkpoint"
        proc.send_signal(signal.SIGKILL)  # preempted with no grace period: nothing runs after this
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "summary.json").exists()
    run_id = (run_dir / "wandb_id.txt").read_text()
    caplog.set_level(logging.INFO)
    resumed = run_job(tmp_path, [*RHO, f"paths.output_dir={run_dir}"])  # the requeued job: same config, same dir
    assert f"Restoring states from the checkpoint path at {ckpt}" in caplog.text
    assert resumed["trainer/steps"] == 80
    assert np.load(resumed["artifacts"]["selected_indices"]).shape == (80, 6)  # selections before the kill kept
    # Lightning replays the rest of an interrupted epoch from a fresh shuffle (the loader is not resumable), so the
    # ragged last batch may fall elsewhere: the same steps, the number of selected points within one batch's n_b
    assert abs(resumed["trainer/examples_seen"] - 8 * 59) <= 6
    assert (run_dir / "wandb_id.txt").read_text() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both attempts, one W&B run


def _trainer_under_fake_slurm(monkeypatch, tmp_path):
    from datamatters.tasks.building import build_trainer
    from datamatters.tasks.common import RunContext

    for k, v in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "dm", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(k, v)
    cfg = compose_cfg(["logger.wandb.enabled=false", "trainer.enable_progress_bar=false"])
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, cfg_hash="x", job_type="train")
    return build_trainer(cfg, ctx, ckpt_dir=tmp_path / "checkpoints", loggers=[])


def test_submitit_owns_the_slurm_signal_not_lightning(monkeypatch, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    trainer = _trainer_under_fake_slurm(monkeypatch, tmp_path)
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False  # ranks from SLURM, no requeue
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is before  # Lightning installed no requeue handler
    finally:
        trainer._signal_connector.teardown()
    # the control: Lightning's default would have taken SIGUSR1
    env.auto_requeue = True
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is not before
    finally:
        trainer._signal_connector.teardown()
        signal.signal(signal.SIGUSR1, before)


def test_no_slurm_no_plugin(monkeypatch):
    from datamatters.tasks.building import slurm_plugins

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    assert slurm_plugins() == []


@pytest.fixture
def stop_task(monkeypatch):
    """A task that fails the way a job being stopped does (an error while tearing down)."""
    calls = []

    def run(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        raise ConnectionResetError("Connection lost")

    monkeypatch.setitem(sys.modules, "datamatters.tasks.dm_stop", types.SimpleNamespace(run=run))
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))  # stands in for submitit's bypass
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_a_job_stopped_by_the_scheduler_leaves_no_result(monkeypatch, tmp_path, stop_task):
    """Under submitit an error raised after SIGTERM becomes SystemExit, which submitit does not record as the job's
    result, so the sweep waits for the requeued job instead of reporting a stale failure."""
    from datamatters.tasks import common

    monkeypatch.setattr(common, "_STOPPED_BY", [])
    cfg = compose_cfg(["task.name=dm_stop"])
    with pytest.raises(ConnectionResetError):  # not under submitit: an ordinary error
        common.dispatch(cfg)
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))
    with pytest.raises(SystemExit, match="requeue/preemption"):
        common.dispatch(cfg)
    assert stop_task == [signal.SIGTERM, signal.SIGTERM]  # the handler already there still ran each time
