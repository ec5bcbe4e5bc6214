"""SVP baseline job as the RHO-LOSS paper ran it (Coleman et al., ICLR 2020; OATML/RHO-Loss svp_*.yaml): a proxy
ranks the train split once, the target trains with plain minibatches of ``selection.svp.batch_size`` (32) on the
``selection.percent_train`` (10%) highest-scoring points for ``trainer.max_epochs``. The proxy is the IL model when
``irreducible.checkpoint`` names one (as the reference), else a copy of the target architecture trained with early
stopping on validation loss (at most ``proxy_epochs``). Proxy scoring runs on the trainer's accelerator."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from datamatters.errors import UserError
from datamatters.selection.svp import keep_top, svp_scores
from datamatters.tasks.building import build_datamodule, build_network, build_optimizer, build_scheduler, build_trainer
from datamatters.tasks.common import job, make_loggers, print_summary, write_summary
from datamatters.tasks.irreducible import losses_on_accelerator
from datamatters.training.classifier import ClassifierModule, evaluate_losses


class _TrainCorrectness(L.Callback):
    """Records, after every proxy epoch, which train points the proxy classifies correctly (for forgetting events)."""

    def __init__(self, loader, targets):
        self.loader, self.targets, self.history = loader, targets, []

    def on_train_epoch_end(self, trainer, module):
        _, _, logits = evaluate_losses(module.model, self.loader)
        self.history.append(logits.argmax(-1) == self.targets)


def _train_proxy(cfg: DictConfig, ctx, dm, train_loader, targets):
    """A proxy trained on target-train with early stopping on val loss; returns (trainer, module, correctness)."""
    from lightning.pytorch.callbacks import EarlyStopping

    svp = cfg.selection.svp
    proxy = ClassifierModule(build_network(cfg.model, dm), build_optimizer(cfg.optimizer), num_classes=dm.num_classes)
    rec = _TrainCorrectness(train_loader, targets)
    trainer = build_trainer(cfg, ctx, ckpt_dir=ctx.run_dir / "checkpoints_proxy", monitor=False,
                            max_epochs=int(svp.proxy_epochs), logger=False)
    trainer.callbacks.extend([rec, EarlyStopping(monitor="val/loss", patience=int(svp.patience), mode="min")])
    trainer.fit(proxy, datamodule=dm)
    return trainer, proxy, np.array(rec.history)


def run_svp(cfg: DictConfig) -> dict:
    from datamatters.tasks.rho import load_il_model

    svp = cfg.selection.svp
    keep_fraction = float(svp.keep_fraction if svp.get("keep_fraction") is not None else cfg.selection.percent_train)
    from_il = bool(cfg.irreducible.get("checkpoint"))
    if from_il and svp.score == "forgetting":
        raise UserError("selection.svp.score=forgetting needs the proxy's per-epoch history; with "
                        "irreducible.checkpoint (a trained proxy) use entropy or least_confidence")
    with job(cfg, "train") as ctx:
        dm = build_datamodule(cfg)
        make_loggers(ctx)
        train_loader = dm.loader("train")
        targets = dm.split_targets("train")
        if from_il:
            proxy_model, history = load_il_model(cfg, dm), None
            trainer = build_trainer(cfg, ctx, ckpt_dir=ctx.run_dir / "checkpoints_proxy", monitor=False, logger=False)
        else:
            trainer, proxy, history = _train_proxy(cfg, ctx, dm, train_loader, targets)
            proxy_model = proxy.model
        _, _, logits = losses_on_accelerator(proxy_model, train_loader, trainer)
        probs = torch.softmax(torch.as_tensor(logits), -1).numpy()
        scores = svp_scores(svp.score, probs=probs, correct_history=history)
        keep = dm.split_indices("train")[keep_top(scores, keep_fraction)]
        dm.add_split("svp_kept", keep)
        dm.fit_split = "svp_kept"
        if svp.get("batch_size"):
            dm.batch_size = int(svp.batch_size)
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
            "svp/kept": int(len(keep)), "svp/proxy": "il_checkpoint" if from_il else "trained",
            "svp/batch_size": int(dm.batch_size),
        }, {"selected_indices": kept_path})
        print_summary(summary, ["test/acc", "selection/corrupted_frac", "data/corrupted_frac", "trainer/steps", "run_dir"],
                      title=f"SVP ({svp.score})")
        return summary
