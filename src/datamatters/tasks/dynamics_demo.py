"""The dynamics demo: train a few seeds in-process with the weight-statistics callback, then run the HMM analysis on
them (``python run.py +experiment=dynamics_demo``). Each seed trains exactly as ``task=classifier`` would (same
builders, same callback path) into ``<run dir>/runs/seed<k>/``; the analysis writes into the run dir."""
from __future__ import annotations

from omegaconf import DictConfig, open_dict

from datamatters.errors import UserError
from datamatters.tasks.building import (build_datamodule, build_network, build_optimizer, build_scheduler,
                                        build_trainer, last_checkpoint)
from datamatters.tasks.common import RunContext, hash_of, job, make_loggers, print_summary, seed_everything
from datamatters.tasks.dynamics_hmm import SUMMARY_KEYS, analyse, debug_sized, options
from datamatters.training.classifier import ClassifierModule


def train_seed(cfg: DictConfig, ctx: RunContext, seed: int) -> None:
    """One training run with ``seed`` (interpolations such as ``data.seed: ${seed}`` follow it)."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.seed = int(seed)
    run_dir = ctx.run_dir / "runs" / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    sctx = RunContext(cfg=sub, run_dir=run_dir, cfg_hash=hash_of(sub), job_type="train")
    seed_everything(seed)
    dm = build_datamodule(sub)
    module = ClassifierModule(build_network(sub.model, dm), build_optimizer(sub.optimizer),
                              build_scheduler(sub.get("scheduler")), num_classes=dm.num_classes,
                              loss=sub.task.get("loss", "ce"))
    ckpt_dir = run_dir / "checkpoints"
    trainer = build_trainer(sub, sctx, ckpt_dir=ckpt_dir, loggers=False, monitor=False)
    trainer.fit(module, datamodule=dm, ckpt_path=last_checkpoint(ckpt_dir))


def run(cfg: DictConfig) -> dict:
    cfg = debug_sized(cfg)
    seeds = list(cfg.task.get("seeds") or [])
    if len(seeds) < 2:
        raise UserError(f"task.seeds needs at least 2 seeds for a train/test split of runs, got {seeds}")
    if cfg.callbacks.get("dynamics") is None:
        raise UserError("the demo needs callbacks.dynamics (the weight-statistics recorder settings)")
    _, opts = options(cfg)
    with job(cfg, cfg.task.get("job_type", "dynamics")) as ctx:
        for s in seeds:
            train_seed(cfg, ctx, int(s))
        make_loggers(ctx)
        summary = analyse(ctx, ctx.run_dir / "runs", opts)
        print_summary(summary, SUMMARY_KEYS, title="dynamics demo")
        return summary
