"""A datamodels worker job: fill store rows (a chunk of a sweep, all rows, or pool mode).

    python run.py +experiment=digits_datamodels task=datamodels_train -m datamodels.jobs='range(0,40)' \
        datamodels.models_per_job=50 [hydra/launcher=submitit_slurm]
"""
from __future__ import annotations

from omegaconf import DictConfig

from datamatters.tasks.common import job, make_loggers, print_summary, write_summary
from datamatters.tasks.datamodels_common import datamodule, dm_cfg, store_path, train_stage


def run(cfg: DictConfig) -> dict:
    d = dm_cfg(cfg)
    with job(cfg, cfg.task.get("job_type", "datamodels_train")) as ctx:
        make_loggers(ctx)
        dm = datamodule(cfg)
        which = ["train", "eval"] if d.which == "both" else [d.which]
        if any(w not in ("train", "eval") for w in which):
            from datamatters.errors import UserError

            raise UserError(f"datamodels.which must be train, eval or both, got {d.which!r}")
        metrics: dict = {}
        for w in which:
            metrics.update(train_stage(cfg, ctx, dm, w))
        metrics["models/trained"] = sum(v for k, v in metrics.items() if k.endswith("/models_trained"))
        summary = write_summary(ctx, metrics, {f"store_{w}": store_path(cfg, w) for w in which})
        print_summary(summary, ["models/trained", *[f"{w}/rows_completed" for w in which],
                                *[f"time/{w}_s" for w in which], "run_dir"], title="datamodels_train")
        return summary
