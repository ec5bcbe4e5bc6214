"""All datamodels stages in one job (``python run.py +experiment=digits_datamodels``): fill the training and
held-out stores (resuming whatever is already there), fit the lasso path, evaluate LDS, the LDS curve, the
counterfactual check and plots; summary.json carries lds/mean, lds/ci_low, lds/ci_high, models/trained, timings."""
from __future__ import annotations

import time

from omegaconf import DictConfig

from datamatters.artifacts import write_json
from datamatters.tasks.common import job, make_loggers, print_summary, write_summary
from datamatters.tasks.datamodels_common import (datamodule, dm_cfg, eval_stage, fit_stage, split_details,
                                                 store_path, train_stage)


def run(cfg: DictConfig) -> dict:
    d = dm_cfg(cfg)
    with job(cfg, cfg.task.get("job_type", "datamodels")) as ctx:
        make_loggers(ctx)
        dm = datamodule(cfg)
        if d.get("jobs") is not None or d.get("pool"):
            from datamatters.errors import UserError

            raise UserError("task=datamodels trains every row itself; use task=datamodels_train for chunks or pools")
        metrics: dict = {}
        for which in ("train", "eval"):
            metrics.update(train_stage(cfg, ctx, dm, which))
        metrics["models/trained"] = metrics["train/rows_completed"]  # the models the datamodels are fit on
        metrics["models/eval"] = metrics["eval/rows_completed"]
        metrics["models/trained_this_run"] = metrics["train/models_trained"] + metrics["eval/models_trained"]
        fit, fit_metrics = fit_stage(cfg, ctx)
        weights = fit_metrics.pop("_weights")
        metrics.update(fit_metrics)
        metrics["time/fit_s"] = fit_metrics["fit/seconds"]
        t0 = time.time()
        ev, artifacts = eval_stage(cfg, ctx, dm, fit)
        metrics["time/eval_s"] = round(time.time() - t0, 3)
        ev, details = split_details(ev)
        metrics.update(ev)
        artifacts.update({"weights": weights, "store_train": store_path(cfg, "train"),
                          "store_eval": store_path(cfg, "eval"),
                          "details": write_json(ctx.run_dir / "datamodels_eval.json", details)})
        summary = write_summary(ctx, metrics, artifacts)
        print_summary(summary, ["lds/mean", "lds/ci_low", "lds/ci_high", "models/trained", "fit/mean_nonzeros",
                                "counterfactual/pearson", "time/train_s", "time/fit_s", "time/eval_s", "run_dir"],
                      title="datamodels")
        return summary
