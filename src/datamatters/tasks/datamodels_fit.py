"""The datamodels regression job: lasso path on the training store for targets [start, end) -> weights file."""
from __future__ import annotations

from omegaconf import DictConfig

from datamatters.tasks.common import job, make_loggers, print_summary, write_summary
from datamatters.tasks.datamodels_common import dm_cfg, fit_stage, store_path


def run(cfg: DictConfig) -> dict:
    dm_cfg(cfg)
    with job(cfg, cfg.task.get("job_type", "datamodels_fit")) as ctx:
        make_loggers(ctx)
        _, metrics = fit_stage(cfg, ctx)
        weights = metrics.pop("_weights")
        summary = write_summary(ctx, {**metrics, "time/fit_s": metrics["fit/seconds"]},
                                {"weights": weights, "store_train": store_path(cfg, "train")})
        print_summary(summary, ["fit/models", "fit/targets", "fit/mean_nonzeros", "fit/mean_val_mse", "fit/seconds",
                                "run_dir"], title="datamodels_fit")
        return summary
