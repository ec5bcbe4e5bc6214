"""Plain supervised training of ``cfg.model`` on ``data.fit_split`` (dynamics runs, baselines)."""
from __future__ import annotations

from omegaconf import DictConfig

from datamatters.evaluation.plots import plot_learning_curves
from datamatters.tasks.building import (build_datamodule, build_network, build_optimizer, build_scheduler,
                                        build_trainer, last_checkpoint)
from datamatters.tasks.common import job, log_image, make_loggers, print_summary, write_summary
from datamatters.training.classifier import ClassifierModule


def run(cfg: DictConfig) -> dict:
    with job(cfg, cfg.task.get("job_type", "train")) as ctx:
        dm = build_datamodule(cfg)
        make_loggers(ctx)
        module = ClassifierModule(build_network(cfg.model, dm), build_optimizer(cfg.optimizer),
                                  build_scheduler(cfg.get("scheduler")), num_classes=dm.num_classes,
                                  loss=cfg.task.get("loss", "ce"))
        ckpt_dir = ctx.run_dir / "checkpoints"
        trainer = build_trainer(cfg, ctx, ckpt_dir=ckpt_dir)
        trainer.fit(module, datamodule=dm, ckpt_path=last_checkpoint(ckpt_dir))
        test = trainer.test(module, datamodule=dm, verbose=False)[0] if len(dm.split_indices("test")) else {}
        if not trainer.is_global_zero:  # DDP: only rank 0 writes results
            return {}
        artifacts = {"checkpoint_dir": ckpt_dir}
        curve = plot_learning_curves({cfg.model.name: ctx.run_dir / "csv" / "metrics.csv"}, ctx.run_dir / "learning_curve.png")
        if curve is not None:
            artifacts["learning_curve"] = curve
            log_image(ctx, "learning_curve", curve)
        summary = write_summary(ctx, {"test/acc": test.get("test/acc"), "test/loss": test.get("test/loss"),
                                      "trainer/steps": int(trainer.global_step)}, artifacts)
        print_summary(summary, ["test/acc", "trainer/steps", "time/wall_clock_s", "run_dir"], title="classifier")
        return summary
