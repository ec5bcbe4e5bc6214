"""SVP baseline job: train a proxy for a few epochs (recording per-epoch correctness on the train split), rank the
train split once, then train the target with plain minibatches on the kept fraction."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from datamatters.selection.svp import keep_top, svp_scores
from datamatters.tasks.building import build_datamodule, build_network, build_optimizer, build_scheduler, build_trainer
from datamatters.tasks.common import job, make_loggers, print_summary, write_summary
from datamatters.training.classifier import ClassifierModule, evaluate_losses


class _TrainCorrectness(L.Callback):
    """Records, after every proxy epoch, which train points the proxy classifies correctly (for forgetting events)."""

    def __init__(self, loader, targets):
        self.loader, self.targets, self.history = loader, targets, []

    def on_train_epoch_end(self, trainer, module):
        _, _, logits = evaluate_losses(module.model, self.loader)
        self.history.append(logits.argmax(-1) == self.targets)


def run_svp(cfg: DictConfig) -> dict:
    svp = cfg.selection.svp
    with job(cfg, "train") as ctx:
        dm = build_datamodule(cfg)
        make_loggers(ctx)
        train_loader = dm.loader("train")
        targets = dm.split_targets("train")
        proxy = ClassifierModule(build_network(cfg.model, dm), build_optimizer(cfg.optimizer), num_classes=dm.num_classes)
        rec = _TrainCorrectness(train_loader, targets)
        trainer = build_trainer(cfg, ctx, ckpt_dir=ctx.run_dir / "checkpoints_proxy", monitor=False,
                                max_epochs=int(svp.proxy_epochs), logger=False)
        trainer.callbacks.append(rec)
        trainer.fit(proxy, datamodule=dm)
        _, _, logits = evaluate_losses(proxy.model, train_loader)
        probs = torch.softmax(torch.as_tensor(logits), -1).numpy()
        scores = svp_scores(svp.score, probs=probs, correct_history=np.array(rec.history))
        keep = dm.split_indices("train")[keep_top(scores, float(svp.keep_fraction))]
        dm.add_split("svp_kept", keep)
        dm.fit_split = "svp_kept"
        target = ClassifierModule(build_network(cfg.model, dm), build_optimizer(cfg.optimizer),
                                  build_scheduler(cfg.get("scheduler")), num_classes=dm.num_classes)
        trainer = build_trainer(cfg, ctx, ckpt_dir=ctx.run_dir / "checkpoints")
        trainer.fit(target, datamodule=dm)
        test = trainer.test(target, datamodule=dm, verbose=False)[0]
        pos = np.searchsorted(dm.split_indices("train"), keep)
        kept_path = ctx.run_dir / "selected_indices.npy"
        np.save(kept_path, keep)
        summary = write_summary(ctx, {
            "test/acc": test.get("test/acc"), "trainer/steps": int(trainer.global_step),
            "selection/corrupted_frac": float(np.mean(dm.is_corrupted[pos])) if len(pos) else 0.0,
            "data/corrupted_frac": float(np.mean(dm.is_corrupted)), "selection/method": "svp",
        }, {"selected_indices": kept_path})
        print_summary(summary, ["test/acc", "selection/corrupted_frac", "data/corrupted_frac", "trainer/steps", "run_dir"],
                      title=f"SVP ({svp.score})")
        return summary
