"""The datamodels evaluation job: LDS on held-out models, LDS vs number of models, counterfactual check, plots."""
from __future__ import annotations

import time

from omegaconf import DictConfig

from datamatters.artifacts import write_json
from datamatters.tasks.common import job, make_loggers, print_summary, write_summary
from datamatters.tasks.datamodels_common import datamodule, dm_cfg, eval_stage, split_details


def run(cfg: DictConfig) -> dict:
    dm_cfg(cfg)
    with job(cfg, cfg.task.get("job_type", "datamodels_eval")) as ctx:
        make_loggers(ctx)
        t0 = time.time()
        metrics, artifacts = eval_stage(cfg, ctx, datamodule(cfg))
        metrics, details = split_details(metrics)
        artifacts["details"] = write_json(ctx.run_dir / "datamodels_eval.json", details)
        summary = write_summary(ctx, {**metrics, "time/eval_s": round(time.time() - t0, 3)}, artifacts)
        print_summary(summary, ["lds/mean", "lds/ci_low", "lds/ci_high", "lds/eval_models", "counterfactual/pearson",
                                "time/eval_s", "run_dir"], title="datamodels_eval")
        return summary
