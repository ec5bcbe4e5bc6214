"""The irreducible-loss job: train the IL model on the holdout split, pick the checkpoint by validation loss (never
test: the reference leaks here), then save eval-mode, un-augmented per-example losses over the target-train split.
``irreducible.early_stopping_patience`` (default null: all epochs, as the reference) stops the fit after that many
validation checks without a lower val loss; ``irreducible.log_every_step=false`` logs the IL fit's metrics once per
epoch (a small IL model's fit costs about half as much CPU time); ``irreducible.fit=lean`` trains it in a plain torch
loop with the same batches, optimiser steps and epoch choice (for small in-memory IL models: no trainer overhead, no
resumable checkpoints, one device)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamatters.artifacts import config_hash
from datamatters.errors import UserError
from datamatters.selection.il_fit import EpochLoggedClassifier, check_patience, early_stopping, lean_fit
from datamatters.selection.il_store import save_irreducible_losses
from datamatters.tasks.building import build_datamodule, build_network, build_optimizer, build_trainer, last_checkpoint
from datamatters.tasks.common import RunContext, job, make_loggers, print_summary, write_summary
from datamatters.training.classifier import ClassifierModule, evaluate_losses

IL_DATA_KEYS_IGNORED = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "fit_split", "data_dir", "augment")


def il_config_key(cfg: DictConfig) -> str:
    """Hash of what determines the IL values: data (not loader settings), the IL model and its training, the seed."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for k in IL_DATA_KEYS_IGNORED:
        data.pop(k, None)
    il = OmegaConf.to_container(cfg.irreducible, resolve=True)
    for k in ("path", "output", "checkpoint", "log_every_step", "fit"):  # where the values go, how the fit runs
        il.pop(k, None)
    if il.get("early_stopping_patience") is None:  # all epochs: the key of a file made before the option existed
        il.pop("early_stopping_patience", None)
    return config_hash({"data": data, "irreducible": il, "seed": cfg.get("seed")})


def check_il_plan(cfg: DictConfig) -> None:
    """Refuse, before any training, an IL plan that cannot work (today's failures came late and raw)."""
    if not OmegaConf.select(cfg, "data.holdout", default=True) and not cfg.irreducible.get("no_holdout", False):
        raise UserError("data.holdout=false leaves no holdout split to train the irreducible-loss model on: add "
                        "irreducible.no_holdout=true (two IL models, each on one half of target-train) or keep "
                        "data.holdout=true")
    if int(cfg.irreducible.max_epochs) < 1:
        raise UserError(f"irreducible.max_epochs must be >= 1, got {cfg.irreducible.max_epochs}")
    check_patience(cfg.irreducible.get("early_stopping_patience"))
    if cfg.irreducible.get("fit", "lightning") not in ("lightning", "lean"):
        raise UserError(f"irreducible.fit must be 'lightning' (the default) or 'lean' (a plain torch loop for small "
                        f"in-memory IL models), got {cfg.irreducible.fit!r}")
    if cfg.irreducible.get("fit", "lightning") == "lean":
        lean_device(cfg)


# trainer settings the lean fit reproduces (anything else changes the optimisation or the validation schedule)
LEAN_TRAINER = {"precision": ("32-true", "32", 32, None), "devices": (1, "1", None), "strategy": ("auto", None),
                "max_steps": (-1, None), "check_val_every_n_epoch": (1, None), "val_check_interval": (1.0, None),
                "gradient_clip_val": (None, 0, 0.0), "accumulate_grad_batches": (1, None),
                "limit_train_batches": (1.0, None), "limit_val_batches": (1.0, None), "fast_dev_run": (False, None, 0)}


def lean_device(cfg: DictConfig) -> torch.device:
    """The one device of a lean IL fit, after refusing trainer settings it does not reproduce."""
    tr = cfg.trainer
    bad = [f"trainer.{k}={tr.get(k)!r}" for k, ok in LEAN_TRAINER.items() if tr.get(k) not in ok]
    acc = str(tr.get("accelerator", "auto"))
    if acc not in ("cpu", "gpu", "cuda", "auto"):
        bad.append(f"trainer.accelerator={acc!r}")
    if bad:
        raise UserError(f"irreducible.fit=lean trains on one device in 32-bit with every batch and a validation per "
                        f"epoch; it cannot honour {', '.join(bad)}: use irreducible.fit=lightning")
    cuda = acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def pass_device(trainer) -> torch.device:
    """The trainer's accelerator: after ``fit`` Lightning moves the module back to CPU, so a loss pass over a split
    must move the model back itself (on GPU, hours of CPU work otherwise)."""
    return trainer.strategy.root_device


def losses_on_accelerator(model: torch.nn.Module, loader, trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``trainer``: a Lightning trainer, or the device of a lean fit."""
    model.to(trainer if isinstance(trainer, torch.device) else pass_device(trainer))
    return evaluate_losses(model, loader)


def _is_rank_zero() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


def _barrier() -> None:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.barrier()


def _fit_one(cfg: DictConfig, ctx: RunContext, dm, fit_split: str, tag: str):
    """Train one IL model on ``fit_split``; return it with the best-val-loss weights loaded, its validation
    metrics (plus ``best_epoch`` and ``epochs_trained``) and the trainer. No best checkpoint (no validation ran): a
    UserError, never silently the last weights."""
    il = cfg.irreducible
    dm.fit_split = fit_split
    dm.batch_size = int(il.get("batch_size") or dm.batch_size)
    dm.augment = bool(il.get("augment", dm.augment))
    model = build_network(il.model, dm)
    if il.get("fit", "lightning") == "lean":
        return _fit_lean(cfg, ctx, dm, model)
    module_cls = ClassifierModule if il.get("log_every_step", True) else EpochLoggedClassifier
    module = module_cls(model, build_optimizer(il.optimizer), num_classes=dm.num_classes)
    ckpt_dir = ctx.run_dir / f"checkpoints_{tag}"
    trainer = build_trainer(cfg, ctx, ckpt_dir=ckpt_dir, max_epochs=int(il.max_epochs))
    # stop on the quantity the best checkpoint is chosen on; before the checkpoint callbacks, so they save its state
    trainer.callbacks[:0] = early_stopping(il.get("early_stopping_patience"),
                                           OmegaConf.select(cfg, "callbacks.checkpoint.monitor", default="val/loss"),
                                           OmegaConf.select(cfg, "callbacks.checkpoint.mode", default="min"))
    trainer.fit(module, datamodule=dm, ckpt_path=last_checkpoint(ckpt_dir))
    if trainer.fast_dev_run:  # a smoke test: no checkpoints are written, the last weights are the only ones
        return module.model, {}, trainer
    best = Path(ckpt_dir) / "best.ckpt"
    if not best.is_file():
        raise UserError(f"the IL model's best checkpoint {best} was not written (no validation ran: check "
                        f"trainer.limit_val_batches / check_val_every_n_epoch); refusing to use the last-epoch weights "
                        f"silently. Fix the validation settings and rerun")
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    epochs_trained = int(trainer.current_epoch)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    return module.model, {**val, "best_epoch": int(ckpt["epoch"]), "epochs_trained": epochs_trained}, trainer


def _fit_lean(cfg: DictConfig, ctx: RunContext, dm, model):
    """``_fit_one`` in a plain torch loop: the same loaders, optimiser and epoch choice; metrics logged per epoch."""
    il, device = cfg.irreducible, lean_device(cfg)

    def log(epoch, metrics, _):
        for lg in ctx.loggers:
            lg.log_metrics({**metrics, "epoch": epoch}, step=epoch)

    fit = lean_fit(model, build_optimizer(il.optimizer), dm.train_dataloader(), dm.val_dataloader(),
                   int(il.max_epochs), patience=il.get("early_stopping_patience"),
                   monitor=OmegaConf.select(cfg, "callbacks.checkpoint.monitor", default="val/loss"),
                   mode=OmegaConf.select(cfg, "callbacks.checkpoint.mode", default="min"), device=device, on_epoch=log)
    for lg in ctx.loggers:
        lg.save()  # Lightning's fit writes buffered metrics (the CSV) at its end
    return model, {**fit.metrics, "best_epoch": fit.best_epoch, "epochs_trained": fit.epochs_trained}, device


def train_irreducible(cfg: DictConfig, ctx: RunContext, out_path: Path) -> dict:
    """Train the IL model(s) and write the IL file; returns the metadata written. The loss pass runs on the trainer's
    accelerator, once (on rank 0 under DDP; the other ranks wait for the file)."""
    check_il_plan(cfg)
    dm = build_datamodule(cfg)
    train_idx = dm.split_indices("train")
    if cfg.irreducible.get("no_holdout", False):
        # two IL models, each trained on one half of the train split, give the IL of the other half
        perm = np.random.default_rng([int(cfg.seed), 7]).permutation(len(train_idx))
        halves = (np.sort(train_idx[perm[: len(perm) // 2]]), np.sort(train_idx[perm[len(perm) // 2:]]))
        dm.add_split("half_a", halves[0])
        dm.add_split("half_b", halves[1])
        fits = [(*_fit_one(cfg, ctx, dm, fit, tag), other) for fit, other, tag in
                (("half_a", "half_b", "a"), ("half_b", "half_a", "b"))]
        vals = [v for _, v, _, _ in fits]
        val = {k: float(np.mean([v.get(k, np.nan) for v in vals])) for k in vals[0]} if vals[0] else {}
        epochs = {k: [v.get(k) for v in vals] for k in ("best_epoch", "epochs_trained")}  # per half
    else:
        model, val, trainer = _fit_one(cfg, ctx, dm, "holdout", "il")
        fits = [(model, val, trainer, "train")]
        epochs = {k: val.get(k) for k in ("best_epoch", "epochs_trained")}
    meta = dm.metadata("train") | {
        "seed": cfg.get("seed"),
        "config_hash": il_config_key(cfg),
        "holdout_val_acc": val.get("val/acc"),
        "holdout_val_loss": val.get("val/loss"),
        "no_holdout": bool(cfg.irreducible.get("no_holdout", False)),
        "il_best_epoch": epochs["best_epoch"],  # 0-based epoch of the checkpoint used
        "il_epochs_trained": epochs["epochs_trained"],  # < max_epochs when early stopping ended the fit
    }
    if _is_rank_zero():
        parts = [losses_on_accelerator(m, dm.loader(split), tr)[:2] for m, _, tr, split in fits]
        indices, values = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        save_irreducible_losses(out_path, values, indices, meta)
    _barrier()
    return meta


def run(cfg: DictConfig) -> dict:
    with job(cfg, "irreducible") as ctx:
        make_loggers(ctx)
        out = Path(cfg.irreducible.get("output") or ctx.run_dir / "irreducible_losses.npz")
        meta = train_irreducible(cfg, ctx, out)
        summary = write_summary(ctx, {"irreducible/val_acc": meta["holdout_val_acc"],
                                      "irreducible/val_loss": meta["holdout_val_loss"]}, {"irreducible_losses": out})
        print_summary(summary, ["irreducible/val_acc", "irreducible/val_loss", "run_dir"], title="irreducible loss")
        print(f"IL file: {out}")
        return summary
