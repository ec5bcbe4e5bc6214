"""InfoBatch (Qin et al., ICLR 2024): per-epoch random pruning of well-learned points with loss rescaling.

Each point's score is its last training loss (3.0 before it is first seen, as the reference). At the start of an
epoch, the points whose score is below the mean of all scores are "well learned"; a random ``prune_ratio`` of them
is dropped for that epoch and the kept ones get loss weight ``1 / (1 - prune_ratio)``, so the epoch's expected
gradient is unchanged. Pruning runs during the first ``floor(delta * num_epochs)`` epochs (the reference's
``iterations <= delta * num_epochs`` with its 1-based count); later epochs see all the data with weight 1.

It changes each epoch's data, not each batch: ``InfoBatchSampler`` is the train loader's sampler and
``InfoBatchModule`` weights the per-example losses and feeds the losses back. Under DDP every rank computes the same
plan (same scores, same per-epoch seed), takes its shard, and the scores are all-gathered every step.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamatters.errors import UserError
from datamatters.selection.module import SelectiveModule
from datamatters.selection.rules import Selection, uniform
from datamatters.selection.scoring import synced_clock
from datamatters.training.classifier import per_example_loss, predictions

INITIAL_SCORE = 3.0


class InfoBatchState:
    """Scores and loss weights of the train split's points (by position), and the per-epoch pruning plan."""

    def __init__(self, indices: np.ndarray, num_epochs: int, prune_ratio: float = 0.5, delta: float = 0.875):
        if not 0.0 <= float(prune_ratio) < 1.0:
            raise UserError(f"selection.infobatch.prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0.0 <= float(delta) <= 1.0:
            raise UserError(f"selection.infobatch.delta must be in [0, 1], got {delta}")
        if int(num_epochs) < 1:
            raise UserError(f"InfoBatch needs trainer.max_epochs >= 1, got {num_epochs}")
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        n = len(self.indices)
        self.position = torch.full((int(self.indices.max()) + 1 if n else 0,), -1, dtype=torch.long)
        self.position[self.indices] = torch.arange(n)
        self.scores = torch.full((n,), INITIAL_SCORE)
        self.weights = torch.ones(n)
        self.num_epochs, self.prune_ratio, self.delta = int(num_epochs), float(prune_ratio), float(delta)
        self.plan_s = 0.0
        self.kept = n

    def prunes(self, epoch: int) -> bool:
        return epoch < math.floor(self.delta * self.num_epochs)

    def plan(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """This epoch's positions in random order; sets ``weights`` (1 / (1 - r) on kept below-mean points)."""
        t0 = time.perf_counter()
        n = len(self.scores)
        self.weights.fill_(1.0)
        if not self.prunes(epoch):
            order = torch.randperm(n, generator=generator)
        else:
            low = self.scores < self.scores.mean()
            low_pos = low.nonzero().squeeze(1)
            n_keep = int((1.0 - self.prune_ratio) * len(low_pos))
            kept_low = low_pos[torch.randperm(len(low_pos), generator=generator)[:n_keep]]
            self.weights[kept_low] = 1.0 / (1.0 - self.prune_ratio)
            keep = torch.cat([(~low).nonzero().squeeze(1), kept_low])
            order = keep[torch.randperm(len(keep), generator=generator)]
        self.kept = len(order)
        self.plan_s += time.perf_counter() - t0
        return order

    def _pos(self, global_idx: torch.Tensor) -> torch.Tensor:
        g = global_idx.cpu().long()
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= len(self.position)):
            raise ValueError("InfoBatch got a point outside the train split it was built for")
        pos = self.position[g]
        if (pos < 0).any():
            raise ValueError("InfoBatch got a point outside the train split it was built for")
        return pos

    def weight_of(self, global_idx: torch.Tensor) -> torch.Tensor:
        return self.weights[self._pos(global_idx)]

    def update(self, global_idx: torch.Tensor, losses: torch.Tensor) -> None:
        losses = losses.detach().float().cpu()
        if not torch.isfinite(losses).all():
            raise UserError("non-finite training loss: training diverged; lower the learning rate (optimizer.lr)")
        self.scores[self._pos(global_idx)] = losses

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "weights": self.weights.clone(), "kept": self.kept}

    def load_state_dict(self, st: dict) -> None:
        self.scores.copy_(st["scores"]), self.weights.copy_(st["weights"])
        self.kept = int(st["kept"])


def _dist() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size(), d.get_rank()
    return 1, 0


class InfoBatchSampler(DistributedSampler):
    """Positions of each epoch's InfoBatch plan, this rank's shard (padded by wrapping so every rank gets the same
    number of equal batches). ``batch_size`` set: yields lists of positions (the in-memory batch path). Being a
    DistributedSampler, Lightning leaves it in place under DDP and calls ``set_epoch``."""

    def __init__(self, dataset, state: InfoBatchState, batch_size: int | None = None, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        world, r = _dist()
        super().__init__(dataset, num_replicas=num_replicas or world, rank=r if rank is None else rank,
                         shuffle=True, seed=seed, drop_last=False)
        if len(dataset) != len(state.scores):
            raise ValueError("InfoBatchSampler: dataset and state have different sizes")
        self.state, self.batch_size = state, batch_size

    def positions(self) -> list[int]:
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
        order = self.state.plan(int(self.epoch), g)
        total = -(-len(order) // self.num_replicas) * self.num_replicas
        if total > len(order):
            order = torch.cat([order, order[: total - len(order)]])
        return order[self.rank:: self.num_replicas].tolist()

    def __iter__(self):
        pos = self.positions()
        if self.batch_size is None:
            yield from pos
            return
        for i in range(0, len(pos), self.batch_size):
            yield pos[i: i + self.batch_size]

    def __len__(self) -> int:
        n = -(-self.state.kept // self.num_replicas)
        return n if self.batch_size is None else -(-n // self.batch_size)


def _whole_batch(batch):
    return batch


def infobatch_loader(dataset, state: InfoBatchState, batch_size: int, seed: int, num_workers: int = 0,
                     pin_memory: bool = False) -> DataLoader:
    """The train loader: whole batches gathered by fancy indexing for in-memory data, per-item loading otherwise."""
    from datamatters.data.indexed import TensorIndexedDataset

    kw = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    if isinstance(dataset, TensorIndexedDataset):
        sampler = InfoBatchSampler(dataset, state, batch_size=batch_size, seed=seed)
        return DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_whole_batch, **kw)
    return DataLoader(dataset, sampler=InfoBatchSampler(dataset, state, seed=seed), batch_size=batch_size, **kw)


class InfoBatchModule(SelectiveModule):
    """Plain minibatch training on InfoBatch's epoch plan: loss = mean(weight * per-example loss); every point
    trained on is accounted as selected (``selection/corrupted_frac`` is the corrupted share of what was trained on)."""

    def __init__(self, model, optimizer=None, scheduler=None, *, state: InfoBatchState, **kw):
        kw.update(method="infobatch", percent_train=1.0, rule=uniform)  # rule unused: the sampler selects
        super().__init__(model, optimizer, scheduler, **kw)
        self.state = state

    def _gathered(self, idx: torch.Tensor, losses: torch.Tensor):
        if self._world_size() <= 1:
            return idx, losses
        return self.all_gather(idx).reshape(-1), self.all_gather(losses).reshape(-1)

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        t0 = synced_clock(self.device)
        logits = self(x)
        losses = per_example_loss(logits, y)
        loss = (losses * self.state.weight_of(idx).to(losses.device)).mean()
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        acc = self.metrics["train_"]
        acc(predictions(logits.detach()), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        t1 = synced_clock(self.device)
        # InfoBatch's own cost, and only it: the score update (all-gather under DDP) and this epoch's plan. Logging
        # sits in the step time as in SelectiveModule (timed here, it made InfoBatch's overhead ~1.0 for no scoring).
        self.state.update(*self._gathered(idx, losses.detach()))
        plan_s, self.state.plan_s = self.state.plan_s, 0.0
        score_s = plan_s + synced_clock(self.device) - t1
        self.log("selection/kept_frac", self.state.kept / max(len(self.state.scores), 1), on_step=False,
                 on_epoch=True, batch_size=len(y))
        self._account(idx, y, Selection(torch.arange(len(y))), losses.detach(), None, score_s, t1 - t0)
        return loss.detach()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["infobatch_state"] = self.state.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "infobatch_state" in checkpoint:
            self.state.load_state_dict(checkpoint["infobatch_state"])
