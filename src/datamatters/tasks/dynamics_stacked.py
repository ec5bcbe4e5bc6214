"""Modular addition for many seeds as ONE job: ``python run.py +experiment=modular_addition_stacked``.

All seeds train together in this process (``datamatters.dynamics.stacked.StackedSeeds``: stacked parameters,
torch.func, one AdamW), each seed's table goes to ``<run dir>/runs/seed<k>/weight_stats.parquet`` (the callback's
format), then the HMM analysis runs on them as ``+experiment=dynamics_hmm`` would.
"""
from __future__ import annotations

import time

from omegaconf import DictConfig, OmegaConf

from datamatters.errors import UserError
from datamatters.tasks.common import job, log_metrics, make_loggers, print_summary
from datamatters.tasks.dynamics_hmm import SUMMARY_KEYS, analyse, debug_sized, options

SIZE_KEYS = ("p", "frac", "d_model", "num_heads", "d_mlp", "layernorm", "lr", "weight_decay", "betas", "batch_size")


def run(cfg: DictConfig) -> dict:
    import torch

    from datamatters.dynamics.stacked import StackedSeeds

    cfg = debug_sized(cfg)
    t = OmegaConf.to_container(cfg.task, resolve=True)
    seeds = list(t.get("seeds") or [])
    if len(seeds) < 2:
        raise UserError(f"task.seeds needs at least 2 seeds for a train/test split of runs, got {seeds}")
    for k in ("steps", "record_every"):
        if not isinstance(t.get(k), int) or t[k] < 1:
            raise UserError(f"task.{k} must be a whole number >= 1, got {t.get(k)!r}")
    _, opts = options(cfg)
    device = "cuda" if t.get("device", "auto") == "auto" and torch.cuda.is_available() else \
        ("cpu" if t.get("device", "auto") == "auto" else t["device"])
    with job(cfg, t.get("job_type", "dynamics")) as ctx:
        size = {k: (tuple(t[k]) if k == "betas" else t[k]) for k in SIZE_KEYS if k in t}
        t0 = time.perf_counter()
        StackedSeeds(seeds, device=device, **size).train(t["steps"], t["record_every"], ctx.run_dir / "runs")
        seconds = time.perf_counter() - t0
        make_loggers(ctx)
        log_metrics(ctx, {"train/seconds": seconds, "train/seed_steps_per_s": len(seeds) * t["steps"] / seconds})
        summary = analyse(ctx, ctx.run_dir / "runs", opts)
        summary.update({"train/seconds": seconds, "train/seed_steps_per_s": len(seeds) * t["steps"] / seconds})
        print_summary(summary, SUMMARY_KEYS + ["train/seed_steps_per_s"], title="modular addition, stacked seeds")
        return summary
