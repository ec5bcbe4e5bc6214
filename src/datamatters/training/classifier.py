"""The one plain classifier LightningModule: IL model, subset models, valuation utilities, dynamics runs."""
from __future__ import annotations

from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per-example loss. ``hinge`` is for a single-output binary model (labels {0, 1} -> {-1, +1})."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "hinge":
        return F.relu(1 - (2 * y.float() - 1) * logits.reshape(-1))
    raise ValueError(f"unknown loss {loss!r}; use 'ce' or 'hinge'")


def predictions(logits: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    return (logits.reshape(-1) > 0).long() if loss == "hinge" else logits.argmax(-1)


class ClassifierModule(L.LightningModule):
    """Supervised training of ``model`` on ``(index, x, y)`` batches.

    ``optimizer`` is a callable ``params -> Optimizer`` (a Hydra ``_partial_`` or ``functools.partial``) and
    ``scheduler`` an optional callable ``optimizer -> LRScheduler`` stepped per epoch.
    """

    def __init__(self, model: nn.Module, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 num_classes: int | None = None, loss: str = "ce"):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer or (lambda p: torch.optim.AdamW(p, lr=1e-3))
        self.scheduler_factory = scheduler
        self.loss_name = loss
        n_cls = 2 if loss == "hinge" else int(num_classes or self._guess_classes(model))
        self.metrics = nn.ModuleDict({s: MulticlassAccuracy(n_cls, average="micro") for s in ("train_", "val_", "test_")})

    @staticmethod
    def _guess_classes(model: nn.Module) -> int:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return last[-1].out_features if last else 2

    def forward(self, x):
        return self.model(x)

    def _step(self, batch, split: str):
        _, x, y = batch
        logits = self(x)
        loss = per_example_loss(logits, y, self.loss_name).mean()
        acc = self.metrics[split + "_"]
        acc(predictions(logits, self.loss_name), y)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test", batch_size=len(y))
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=split != "train", batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}


@torch.inference_mode()
def evaluate_losses(model: nn.Module, loader, loss: str = "ce", device=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode per-example losses over a loader: ``(global_indices, losses, logits)``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    idx_all, loss_all, logit_all = [], [], []
    for idx, x, y in loader:
        x = x.to(device) if torch.is_tensor(x) else {k: v.to(device) for k, v in x.items()}
        logits = model(x)
        loss_all.append(per_example_loss(logits, y.to(device), loss).float().cpu())
        logit_all.append(logits.float().cpu())
        idx_all.append(torch.as_tensor(idx))
    model.train(was_training)
    return torch.cat(idx_all).numpy(), torch.cat(loss_all).numpy(), torch.cat(logit_all).numpy()
