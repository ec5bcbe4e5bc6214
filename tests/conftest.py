"""Shared test helpers: compose configs with Hydra's compose API, run jobs in-process or as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")


def compose_cfg(overrides: list[str] | None = None, config_name: str = "train"):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import datamatters.tasks.schema  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []))


def run_job(tmp_path: Path, overrides: list[str], config_name: str = "train") -> dict:
    """Compose and run a job in-process with its run dir and caches under ``tmp_path``."""
    from datamatters.tasks.common import dispatch

    cfg = compose_cfg([f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides], config_name)
    return dispatch(cfg)


def run_cli(args: list[str], tmp_path: Path, script: str = "run.py", timeout: int = 900) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (new process), logs under ``tmp_path``."""
    env = {**os.environ, "WANDB_MODE": "offline", "LOG_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny(tmp_path):
    """Overrides that make a digits RHO-LOSS job take a few seconds."""
    return ["trainer.max_epochs=3", "irreducible.max_epochs=2", "trainer.enable_progress_bar=false",
            "logger.wandb.enabled=false"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors are faster on one thread, and tests never oversubscribe the (2-core) CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """One torch thread for a module's module-scoped fixtures too (they are set up before the function-scoped
    autouse fixture above); a module opts in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _one_blas_thread():
    """The same for numpy/scikit-learn's BLAS: two xdist workers with two BLAS threads each oversubscribe 2 cores
    (a scikit-learn fit test took 12.6 s instead of 1 s). Tests that compare thread counts set their own limits."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup) every test on the one-node SLURM cluster runs on the same worker: the
    session fixture that starts the cluster also stops it, which must not happen under another worker's job."""
    for item in items:
        if item.get_closest_marker("slurm") or "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
