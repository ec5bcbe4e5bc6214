"""Hydra config -> engine objects (datamodule, model, optimiser, trainer). Only tasks use this."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from datamatters.data.base import IndexedDataModule
from datamatters.errors import UserError
from datamatters.models import build_model
from datamatters.tasks.common import RunContext, quiet_console


def build_datamodule(cfg: DictConfig, **overrides: Any) -> IndexedDataModule:
    dm = hydra.utils.instantiate(cfg.data, **overrides)
    dm.setup()
    return dm


def build_network(model_cfg: DictConfig, dm: IndexedDataModule):
    kw = OmegaConf.to_container(model_cfg, resolve=True)
    name = kw.pop("name")
    return build_model(name, dm.input_shape, dm.num_classes, **kw)


def build_optimizer(opt_cfg: DictConfig):
    return hydra.utils.instantiate(opt_cfg)


def build_scheduler(sched_cfg: DictConfig | None):
    if sched_cfg is None or "_target_" not in sched_cfg:
        return None
    return hydra.utils.instantiate(sched_cfg)


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The checkpoint a re-run or requeued job resumes from, if one exists."""
    last = Path(ckpt_dir) / "last.ckpt"
    return str(last) if last.is_file() else None


def build_callbacks(cfg: DictConfig, ctx: RunContext, ckpt_dir: Path, monitor: bool = True) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = cfg.callbacks
    every = OmegaConf.select(cb, "checkpoint.every_n_train_steps", default=50)
    callbacks = [ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step}", save_last=True, save_top_k=0,
                                 every_n_train_steps=every, auto_insert_metric_name=False)]
    if monitor:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", save_top_k=1,
                                         monitor=OmegaConf.select(cb, "checkpoint.monitor", default="val/loss"),
                                         mode=OmegaConf.select(cb, "checkpoint.mode", default="min"),
                                         save_on_train_epoch_end=False, enable_version_counter=False))
    dyn = OmegaConf.select(cb, "dynamics")
    if dyn is not None:
        from datamatters.dynamics.callback import WeightStatsRecorder

        tags = {"seed": cfg.get("seed"), "config_hash": ctx.cfg_hash, "experiment": cfg.get("experiment_name")}
        callbacks.append(WeightStatsRecorder(**OmegaConf.to_container(dyn, resolve=True), out_dir=ctx.run_dir, tags=tags))
    return callbacks


warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def slurm_plugins() -> list:
    """Under SLURM, submitit (the Hydra launcher) owns the preemption/time-limit signal: it requeues the array task
    and re-runs the job, which resumes from ``last.ckpt``. Lightning keeps reading ranks from SLURM but its own
    auto-requeue (a second SIGUSR1 handler and ``scontrol requeue``) is switched off so the two never both act."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def build_trainer(cfg: DictConfig, ctx: RunContext, *, ckpt_dir: Path, loggers: list | None = None,
                  monitor: bool = True, **overrides: Any):
    import lightning as L

    quiet_console()  # Lightning's handlers exist once it is imported
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw.pop("_target_", None)
    kw.update(overrides)
    kw["plugins"] = [*(kw.get("plugins") or []), *slurm_plugins()]
    logger = kw.pop("logger", loggers if loggers is not None else ctx.loggers)
    if kw.get("max_epochs") is not None and kw["max_epochs"] < 1:
        raise UserError(f"trainer.max_epochs must be >= 1, got {kw['max_epochs']}")
    callbacks = build_callbacks(cfg, ctx, ckpt_dir, monitor=monitor)
    return L.Trainer(logger=logger, callbacks=callbacks,
                     default_root_dir=str(ctx.run_dir), **kw)
