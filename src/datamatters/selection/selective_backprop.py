"""Selective Backprop (Jiang et al., 2019, "Accelerating deep learning by focusing on the biggest losers").

Every forward batch is scored; each example is kept with probability ``CDF_R(loss) ** beta``, where ``CDF_R`` is the
fraction of the last ``history`` losses (this batch's included, appended first) strictly below the example's loss,
and only the kept examples are backpropagated. As the reference: beta = 3 (examples/train.py ``--prob_pow``), a
history of 1024 losses, no floor on the probability, and the first epoch primed (every example trained on, the
history not updated). The reference queues kept examples until a full backprop batch; here each forward batch's
kept examples make one step (the issue's formulation), so a step trains on about n_B / (beta + 1) points.
"""
from __future__ import annotations

import torch

from datamatters.errors import UserError
from datamatters.selection.module import SelectiveModule
from datamatters.selection.rules import Selection


class LossHistory:
    """The last ``size`` losses (a ring buffer) and the percentile (CDF) of new losses within them."""

    def __init__(self, size: int = 1024):
        if int(size) < 1:
            raise UserError(f"selection.selective_backprop.history must be >= 1, got {size}")
        self.buf = torch.empty(int(size))
        self.count = 0

    def append(self, losses: torch.Tensor) -> None:
        v = losses.detach().float().cpu().reshape(-1)[-len(self.buf):]
        self.buf[(self.count + torch.arange(len(v))) % len(self.buf)] = v
        self.count += len(v)

    def values(self) -> torch.Tensor:
        return self.buf[: min(self.count, len(self.buf))]

    def cdf(self, losses: torch.Tensor) -> torch.Tensor:
        """Fraction of the history strictly below each loss."""
        h = torch.sort(self.values()).values
        if not len(h):
            raise ValueError("empty loss history")
        return torch.searchsorted(h, losses.detach().float().cpu(), side="left").float() / len(h)


class SelectiveBackpropRule:
    """A stateful selection rule: probabilities ``cdf ** beta`` after appending the batch, then independent draws."""

    def __init__(self, beta: float = 3.0, history: int = 1024):
        if float(beta) < 0:
            raise UserError(f"selection.selective_backprop.beta must be >= 0, got {beta}")
        self.beta, self.history = float(beta), LossHistory(history)

    def probabilities(self, loss: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(loss).all():
            raise UserError("non-finite loss in the forward batch: training diverged; lower the learning rate (optimizer.lr)")
        self.history.append(loss)
        return self.history.cdf(loss) ** self.beta

    def __call__(self, k: int, *, loss: torch.Tensor, generator: torch.Generator | None = None, **_) -> Selection:
        p = self.probabilities(loss)
        keep = torch.rand(len(p), generator=generator) < p
        return Selection(keep.nonzero().squeeze(1).to(loss.device), scores=p.to(loss.device))


class SelectiveBackpropModule(SelectiveModule):
    """The selective module with Selective Backprop's rule; a batch with nothing kept takes no step (single
    process), and under DDP a rank with nothing kept contributes a zero gradient to the shared step."""

    def __init__(self, model, optimizer=None, scheduler=None, *, beta: float = 3.0, history: int = 1024,
                 prime_epochs: int = 1, **kw):
        self.sb = SelectiveBackpropRule(beta, history)
        kw.update(method="selective_backprop", percent_train=1.0, rule=self._select)
        super().__init__(model, optimizer, scheduler, **kw)
        self.prime_epochs = int(prime_epochs)

    def _select(self, k: int, *, loss: torch.Tensor, generator=None, **_) -> Selection:
        if self.current_epoch < self.prime_epochs:
            return Selection(torch.arange(len(loss), device=loss.device))
        return self.sb(k, loss=loss, generator=generator)

    def _optimise(self, x, y, sel):
        if len(sel.idx) == 0:
            if self._world_size() <= 1:
                return torch.zeros(())
            sel = Selection(torch.zeros(1, dtype=torch.long), weights=torch.zeros(1))
        return super()._optimise(x, y, sel)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["selective_backprop_history"] = {"buf": self.sb.history.buf.clone(), "count": self.sb.history.count}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        st = checkpoint.get("selective_backprop_history")
        if st:
            self.sb.history.buf.copy_(st["buf"])
            self.sb.history.count = int(st["count"])
