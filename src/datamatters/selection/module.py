"""The selective LightningModule: score each big batch, keep the selected points, take one optimiser step on them."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from datamatters.errors import UserError
from datamatters.selection.il_store import ILTable
from datamatters.selection.rules import (NEEDS_IL, NEEDS_MC, epoch_temperature, get_rule, n_select, percentiles,
                                         temperature_at, uniform)
from datamatters.selection.scoring import has_active_dropout, score_batch, synced_clock
from datamatters.training.classifier import ClassifierModule, per_example_loss, predictions


class SelectiveModule(ClassifierModule):
    """Manual optimisation: for each big batch of n_B points, score without gradients, select
    n_b = max(1, int(percent_train * n_B)) with ``method``, step on the selected points.

    Irreducible losses come from ``il_table`` (a file) or ``il_model`` (a frozen IL model in eval mode, on the fly).
    The IL model is kept outside the module tree: not in checkpoints, not seen by callbacks that walk the module
    (the dynamics recorder), never switched to train mode or moved by Lightning; it follows the batch's device.
    ``uniform`` takes no scoring pass (it needs no statistics), so its wall-clock is a fair baseline.
    ``corrupted`` (bool by global index) is used only for the ``selection/corrupted_frac`` metric.
    """

    def __init__(self, model: nn.Module, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 num_classes: int | None = None, method: str = "reducible_loss", percent_train: float = 0.1,
                 il_table: ILTable | None = None, il_model: nn.Module | None = None,
                 corrupted: torch.Tensor | None = None, score_mode: str = "train", update_bn_on_score: bool = False,
                 score_precision: str | None = None, temperature: dict | None = None, mc_samples: int = 10,
                 total_steps: int | None = None, seed: int = 0, channels_last: bool = False,
                 rule: Callable | None = None):
        super().__init__(model, optimizer, scheduler, num_classes)
        self.automatic_optimization = False
        self.rule = rule or get_rule(method)  # rule: a peer's own (stateful) rule under its own method name
        self.method, self.percent_train = method, float(percent_train)
        n_select(100, self.percent_train)  # validate early
        if method in NEEDS_IL and il_table is None and il_model is None:
            raise ValueError(f"selection method {method!r} needs irreducible losses (il_table or il_model)")
        if method in NEEDS_MC and not has_active_dropout(model):
            raise UserError(f"selection.method={method} scores with MC dropout, but the model has no dropout layer "
                            f"with p > 0: every point would score the same and be picked by position. Use a model "
                            f"with dropout (e.g. model.dropout=0.2) or another selection method")
        self.il_table = il_table
        self._il = [il_model.eval().requires_grad_(False)] if il_model is not None else []  # a list: outside the tree
        self.corrupted = corrupted
        self.score_train_mode, self.keep_bn = score_mode == "train", not update_bn_on_score
        self.score_precision, self.channels_last = score_precision, channels_last
        self.temperature = dict(temperature or {})
        self.n_classes = int(self.metrics["train_"].num_classes)
        self.class_counts = torch.zeros(2, self.n_classes, dtype=torch.long)  # scored, selected (this epoch)
        self.mc_samples = int(mc_samples) if method in NEEDS_MC else 0
        self.total_steps, self.seed = total_steps, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.selected: list[np.ndarray] = []
        self.totals = {"examples_seen": 0, "examples_scored": 0, "corrupted_selected": 0, "score_s": 0.0, "step_s": 0.0}

    @property
    def il_model(self) -> nn.Module | None:
        return self._il[0] if self._il else None

    def setup(self, stage: str) -> None:
        """Per-process state, before a checkpoint is restored (which then overrides it): each DDP rank draws from its
        own generator, and the step-wise temperature's horizon is this process's number of optimiser steps."""
        rank = int(self.global_rank) if self._trainer is not None else 0
        self.generator.manual_seed(self.seed + 1_000_003 * rank)
        if self._trainer is not None and self.total_steps is None:
            self.total_steps = int(self.trainer.estimated_stepping_batches)

    # ---- the step ---------------------------------------------------------------------------------------------
    def irreducible(self, idx: torch.Tensor, x, y: torch.Tensor) -> torch.Tensor | None:
        if self.il_table is not None:
            return self.il_table(idx.cpu()).to(y.device)
        il_model = self.il_model
        if il_model is not None:
            if next(il_model.parameters()).device != y.device:
                il_model.to(y.device)
            il_model.eval()
            with torch.inference_mode():
                return per_example_loss(il_model(x).float(), y)
        return None

    def temperature_now(self) -> float:
        if self.method == "boltzmann":
            return epoch_temperature(self.current_epoch, **self.temperature)
        if self.temperature:
            return temperature_at(self.global_step, self.total_steps or 1, **self.temperature)
        return 1.0

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        if self.channels_last and torch.is_tensor(x) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        k = n_select(len(y), self.percent_train)
        t0 = synced_clock(self.device)
        il = self.irreducible(idx, x, y) if self.method in NEEDS_IL or self.il_table is not None else None
        if self.rule is uniform:  # no scoring pass: uniform needs no statistics
            stats = {}
            sel = uniform(k, n=len(y), generator=self.generator)
            sel.idx = sel.idx.to(y.device)
        else:
            stats = score_batch(self.model, x, y, train_mode=self.score_train_mode, keep_bn=self.keep_bn,
                                precision=self.score_precision, mc_samples=self.mc_samples)
            sel = self.rule(k, loss=stats["loss"], il=il, logits=stats["logits"], targets=y,
                            mc_logits=stats.get("mc_logits"), generator=self.generator, temperature=self.temperature_now())
        t1 = synced_clock(self.device)
        loss = self._optimise(x, y, sel)
        t2 = synced_clock(self.device)
        self._account(idx, y, sel, stats.get("loss"), il, t1 - t0, t2 - t1)
        return loss

    def _optimise(self, x, y, sel) -> torch.Tensor:
        opt = self.optimizers()
        pos = sel.idx.to(y.device)
        xs = x[pos] if torch.is_tensor(x) else {k: v[pos] for k, v in x.items()}
        logits = self(xs)
        losses = per_example_loss(logits, y[pos])
        loss = (losses * sel.weights.to(losses.device)).mean() if sel.weights is not None else losses.mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        acc = self.metrics["train_"]
        acc(predictions(logits.detach(), self.loss_name), y[pos])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=len(pos))
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(pos))
        return loss.detach()

    def logs_this_step(self) -> bool:
        """Whether this step's on-step metrics reach a logger: Lightning writes them only every
        ``trainer.log_every_n_steps`` steps (every step under fast_dev_run), and nowhere without a logger. Per-step
        diagnostics are computed and logged only then; on the other steps they were dropped anyway, and each
        ``self.log`` call costs ~0.2 ms of Lightning bookkeeping: ~20 of them made a RHO-LOSS step on a tiny MLP cost
        about 3x a uniform one."""
        if self._trainer is None:
            return False
        tr = self.trainer
        return bool(tr.loggers) and (bool(tr.fast_dev_run) or tr._logger_connector.should_update_logs)

    def _account(self, idx, y, sel, loss, il, score_s: float, step_s: float) -> None:
        """Run totals and per-class counts every step; the per-step diagnostics only when logged (``logs_this_step``)."""
        sel_pos = sel.idx.cpu()
        sel_idx = idx.cpu()[sel_pos]
        self.selected.append(sel_idx.numpy().astype(np.int64))
        t = self.totals
        t["examples_seen"] += len(sel_idx)
        t["examples_scored"] += len(idx)
        t["score_s"] += score_s
        t["step_s"] += step_s
        c = self.corrupted[sel_idx] if self.corrupted is not None else None
        if c is not None:
            t["corrupted_selected"] += int(c.sum())
        yc = y.detach().cpu().long()
        self.class_counts[0] += torch.bincount(yc, minlength=self.n_classes)[: self.n_classes]
        self.class_counts[1] += torch.bincount(yc[sel_pos], minlength=self.n_classes)[: self.n_classes]
        if not self.logs_this_step():
            return
        log = {"trainer/examples_seen": float(t["examples_seen"]), "trainer/examples_scored": float(t["examples_scored"])}
        if c is not None:
            log["selection/corrupted_frac"] = float(c.float().mean())
        mask = torch.zeros(len(idx), dtype=torch.bool)
        mask[sel_pos] = True
        for name, v in (("loss", loss), ("il", il), ("score", sel.scores)):
            if v is None:
                continue
            v = v.detach().cpu()
            for tag, part in (("selected", v[mask]), ("not_selected", v[~mask])):
                log.update({f"selection/{name}_{tag}_{q}": val for q, val in percentiles(part).items()})
        log.update({f"selection/{k}": float(v) for k, v in (sel.stats or {}).items()})
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=len(idx))

    def on_train_epoch_end(self) -> None:
        """Per-class selected fraction of the epoch (selected / scored points of each class; a point drawn twice
        counts twice); then the per-epoch lr step."""
        scored, chosen = self.class_counts
        self.log_dict({f"selection/class_frac_{c}": float(chosen[c]) / int(scored[c])
                       for c in range(self.n_classes) if scored[c] > 0}, on_step=False, on_epoch=True)
        self.class_counts.zero_()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()

    # ---- results and resumption -------------------------------------------------------------------------------
    def selected_indices(self) -> np.ndarray:
        """(steps, n_b) global indices selected at each step (ragged last batches are padded with -1)."""
        if not self.selected:
            return np.zeros((0, 0), dtype=np.int64)
        width = max(len(s) for s in self.selected)
        out = np.full((len(self.selected), width), -1, dtype=np.int64)
        for i, s in enumerate(self.selected):
            out[i, : len(s)] = s
        return out

    # Under DDP each rank scores and selects within its own big batch of n_B points (its shard of the data), so one
    # optimiser step sees world_size * n_b selected points out of world_size * n_B scored. The bookkeeping below is
    # therefore per rank: checkpoints keep every rank's state, and at the end of fit the totals are summed and the
    # per-step selections concatenated across ranks, so rank 0 reports the whole run.
    def _selection_state(self) -> dict:
        return {
            "selected": torch.from_numpy(self.selected_indices()),
            "totals": {k: float(v) for k, v in self.totals.items()},
            "generator": self.generator.get_state(),
        }

    def _world_size(self) -> int:
        return int(self.trainer.world_size) if self._trainer is not None else 1

    def _gather(self, obj) -> list:
        out = [None] * self._world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self._selection_state()
        if self._world_size() > 1:  # every rank runs this hook when a checkpoint is written
            state = {"per_rank": self._gather(state)}
        checkpoint["selection_state"] = state

    def on_train_end(self) -> None:
        if self._world_size() <= 1:
            return
        states = self._gather({"selected": self.selected, "totals": dict(self.totals)})
        times = ("score_s", "step_s")
        self.totals = {k: (sum(s["totals"][k] for s in states) / (len(states) if k in times else 1))
                       for k in self.totals}
        self.selected = [np.concatenate(rows) for rows in zip(*(s["selected"] for s in states))]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("selection_state")
        if not st:
            return
        if "per_rank" in st:
            ranks = st["per_rank"]
            if len(ranks) != self._world_size():
                raise UserError(f"this checkpoint was written by {len(ranks)} DDP processes; resume it with the same "
                                f"number of devices (trainer.devices x trainer.num_nodes = {len(ranks)})")
            st = ranks[self.global_rank]
        sel = st["selected"].numpy()
        self.selected = [row[row >= 0] for row in sel]
        self.totals.update({k: (int(v) if k not in ("score_s", "step_s") else v) for k, v in st["totals"].items()})
        self.generator.set_state(st["generator"])
