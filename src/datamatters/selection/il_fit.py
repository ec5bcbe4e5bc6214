"""Training the irreducible-loss (IL) model cheaply: metrics logged once per epoch, early stopping on val loss, and a
lean fit without Lightning.

A small IL model's arithmetic is cheaper than Lightning's bookkeeping around it: ``self.log`` on every training step
(train/loss and train/acc) cost about half of the CPU time of a 64-unit MLP's 20-epoch fit on mnist1d
(benchmarks/rho_speedup.py). ``EpochLoggedClassifier`` keeps per-epoch sums in tensors and logs the same keys with
the same epoch values as ``ClassifierModule`` (example-weighted mean loss, micro accuracy) once per epoch.
``lean_fit`` goes further for small in-memory IL models: a plain torch loop over the same loaders (so the same batch
order), the same optimiser steps, validation and best-epoch / early-stopping rule as the Lightning fit, without the
trainer's ~10 ms of bookkeeping per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from datamatters.errors import UserError
from datamatters.training.classifier import ClassifierModule, per_example_loss, predictions

SPLITS = ("train", "val", "test")


def batch_sums(logits: torch.Tensor, losses: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """(loss sum, correct count, example count) of one batch in float32: epoch means are sums over batches
    divided once (the example-weighted mean loss and micro accuracy that ``ClassifierModule`` logs)."""
    with torch.no_grad():
        correct = (predictions(logits, loss) == y).sum()
        return torch.stack([losses.detach().float().sum(), correct.float(), correct.new_tensor(len(y)).float()])


class EpochLoggedClassifier(ClassifierModule):
    """``ClassifierModule`` without per-step logging: ``{split}/loss`` and ``{split}/acc`` are logged once per epoch
    (summed over ranks under DDP), so there is no ``train/loss_step``; use ``ClassifierModule`` where a step curve is
    wanted (the dynamics recorder reads it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sums: dict[str, torch.Tensor] = {}  # split -> (loss sum, correct count, example count) this epoch

    def _reset(self, split: str) -> None:
        self._sums[split] = torch.zeros(3, dtype=torch.float32, device=self.device)

    def _step(self, batch, split: str):
        _, x, y = batch
        logits = self(x)
        losses = per_example_loss(logits, y, self.loss_name)
        self._sums[split] += batch_sums(logits, losses, y, self.loss_name)
        return losses.mean()

    def _log_epoch(self, split: str) -> None:
        s = self.trainer.strategy.reduce(self._sums[split].clone(), reduce_op="sum")
        if float(s[2]) > 0:
            self.log_dict({f"{split}/loss": s[0] / s[2], f"{split}/acc": s[1] / s[2]}, on_step=False, on_epoch=True)

    def on_train_epoch_start(self):
        self._reset("train")

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_start(self):
        self._reset("val")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_start(self):
        self._reset("test")

    def on_test_epoch_end(self):
        self._log_epoch("test")


def check_patience(patience) -> int | None:
    """``None`` (train every epoch, as the reference) or a positive number of validation checks."""
    if patience is None:
        return None
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise UserError(f"irreducible.early_stopping_patience must be null (train all epochs) or an integer >= 1 "
                        f"(validation checks without a lower val loss before stopping), got {patience!r}")
    return int(patience)


def early_stopping(patience, monitor: str = "val/loss", mode: str = "min") -> list:
    """The callbacks that stop an IL fit after ``patience`` validation checks without improving ``monitor`` (the
    quantity the best checkpoint is chosen on, so the choice rule is unchanged up to the stop); none when
    ``patience`` is None."""
    patience = check_patience(patience)
    if patience is None:
        return []
    from lightning.pytorch.callbacks import EarlyStopping

    return [EarlyStopping(monitor=monitor, mode=mode, patience=patience)]


@dataclass
class LeanFit:
    """What a lean fit leaves: the best epoch's weights (already loaded into the model), its validation metrics."""

    state: dict
    best_epoch: int  # 0-based, as the Lightning checkpoint's "epoch"
    epochs_trained: int  # < max_epochs when early stopping ended the fit
    metrics: dict  # val/loss and val/acc of the best epoch


@torch.no_grad()
def _validate(model: torch.nn.Module, loader, loss: str, device) -> dict:
    """Example-weighted mean loss and accuracy, summed in float32 as ``EpochLoggedClassifier`` sums them."""
    model.eval()
    s = torch.zeros(3, dtype=torch.float32, device=device)
    for _, x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        s += batch_sums(logits, per_example_loss(logits, y, loss), y, loss)
    model.train()
    return {"val/loss": float(s[0] / s[2]), "val/acc": float(s[1] / s[2])}


def lean_fit(model: torch.nn.Module, optimizer: Callable, train_loader, val_loader, max_epochs: int, *,
             patience: int | None = None, monitor: str = "val/loss", mode: str = "min", loss: str = "ce",
             device: torch.device | str = "cpu", on_epoch: Callable | None = None) -> LeanFit:
    """Fit ``model`` in a plain torch loop: per epoch one pass over ``train_loader`` (iterated again each epoch, so a
    seeded shuffling loader gives the Lightning fit's batch order), then validation. The best epoch is the first with
    a strictly better ``monitor`` (ModelCheckpoint's rule); ``patience`` stops after that many epochs without one
    (EarlyStopping's rule). ``on_epoch(epoch, metrics, model)`` sees every epoch (logging). A non-finite loss or an
    empty split is a UserError."""
    if monitor not in ("val/loss", "val/acc") or mode not in ("min", "max"):
        raise UserError(f"the lean IL fit chooses its epoch on val/loss or val/acc (min/max), got {monitor!r} "
                        f"({mode!r}): use irreducible.fit=lightning for other checkpoint monitors")
    patience = check_patience(patience)
    if len(train_loader) == 0 or len(val_loader) == 0:
        raise UserError(f"the IL model's {'training' if len(train_loader) == 0 else 'validation'} split is empty: "
                        f"the lean IL fit needs holdout and val points (check data.holdout / data.val_fraction)")
    model.to(device).train()
    opt = optimizer(model.parameters())
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    best, best_epoch, state, wait, epoch = math.inf if mode == "min" else -math.inf, -1, None, 0, 0
    for epoch in range(int(max_epochs)):
        tot = torch.zeros(3, dtype=torch.float32, device=device)
        for _, x, y in train_loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            losses = per_example_loss(logits, y, loss)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            opt.step()
            tot += batch_sums(logits, losses, y, loss)
        metrics = {"train/loss": float(tot[0] / tot[2]), "train/acc": float(tot[1] / tot[2]),
                   **_validate(model, val_loader, loss, device)}
        bad = [k for k in ("train/loss", "val/loss") if not math.isfinite(metrics[k])]
        if bad:
            raise UserError(f"the IL model diverged: {bad[0]} is {metrics[bad[0]]} at epoch {epoch}; lower "
                            f"irreducible.optimizer.lr (or the IL batch size's lr scaling) and rerun")
        if on_epoch is not None:
            on_epoch(epoch, metrics, model)
        if better(metrics[monitor], best):
            best, best_epoch, wait = metrics[monitor], epoch, 0
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_metrics = {k: metrics[k] for k in ("val/loss", "val/acc")}
        else:
            wait += 1
            if patience is not None and wait >= patience:
                break
    model.load_state_dict(state)
    return LeanFit(state, best_epoch, epoch + 1, best_metrics)
