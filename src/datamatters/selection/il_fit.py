"""Training the irreducible-loss (IL) model cheaply: metrics logged once per epoch, and early stopping on val loss.

A small IL model's arithmetic is cheaper than Lightning's bookkeeping around it: ``self.log`` on every training step
(train/loss and train/acc) cost about half of the CPU time of a 64-unit MLP's 20-epoch fit on mnist1d
(benchmarks/rho_speedup.py). ``EpochLoggedClassifier`` keeps per-epoch sums in tensors and logs the same keys with
the same epoch values as ``ClassifierModule`` (example-weighted mean loss, micro accuracy) once per epoch.
"""
from __future__ import annotations

import torch

from datamatters.errors import UserError
from datamatters.training.classifier import ClassifierModule, per_example_loss, predictions

SPLITS = ("train", "val", "test")


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
        with torch.no_grad():
            correct = (predictions(logits, self.loss_name) == y).sum()
            self._sums[split] += torch.stack([losses.detach().float().sum(), correct.float(),
                                              correct.new_tensor(len(y)).float()])
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
