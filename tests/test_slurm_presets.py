"""The launcher presets (no cluster needed): each composes and instantiates, SLURM ones requeue under submitit's
signal and follow trainer.devices, and the `local` preset runs a sweep through submitit's local executor."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, ROOT

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "hydra" / "launcher").glob("*.yaml"))


def launcher_cfg(tmp_path, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import datamatters.tasks.schema  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.sweep.dir={tmp_path}", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_presets_are_the_documented_four():
    assert PRESETS == ["local", "slurm", "slurm_gpu", "slurm_singularity"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_instantiates(tmp_path, preset):
    cfg = launcher_cfg(tmp_path, [f"hydra/launcher={preset}"])
    launcher = instantiate(cfg)
    params = launcher.params  # resolved, as submitit gets them
    assert params["timeout_min"] > 0 and params["tasks_per_node"] == 1
    assert params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    if preset != "local":
        assert type(launcher).__name__ == "SlurmLauncher"
        assert params["additional_parameters"]["requeue"] is True and params["signal_delay_s"] >= 60
        assert params["max_num_timeout"] >= 1  # time limits requeue (submitit owns the signal)
        assert "export WANDB_MODE=offline" in params["setup"] or os.environ.get("WANDB_MODE", "offline") != "offline"
        assert any("HYDRA_FULL_ERROR" in line for line in params["setup"])


@pytest.mark.parametrize("preset", ["slurm", "slurm_gpu", "slurm_singularity"])
def test_slurm_tasks_and_gpus_follow_trainer_devices(tmp_path, preset):
    params = instantiate(launcher_cfg(tmp_path, [f"hydra/launcher={preset}", "trainer=ddp",
                                                 "trainer.devices=4"])).params
    assert params["tasks_per_node"] == 4
    if preset != "slurm":
        assert params["gpus_per_node"] == 4


@pytest.mark.slow  # two job processes: ~25 s of CPU
def test_local_preset_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "LOG_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=local", "task=classifier",
                          "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger.wandb.enabled=false",
                          "seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for i in (0, 1):
        s = json.loads((sweep / str(i) / "summary.json").read_text())
        assert s["trainer/steps"] == 2 and Path(s["run_dir"]) == sweep / str(i)
