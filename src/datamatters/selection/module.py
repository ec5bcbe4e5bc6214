"""The selective LightningModule: score each big batch, keep the selected points, take one optimiser step on them."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from datamatters.errors import UserError
from datamatters.selection.il_store import ILTable
from datamatters.selection.rules import NEEDS_IL, NEEDS_MC, get_rule, n_select, percentiles, temperature_at
from datamatters.selection.scoring import score_batch
from datamatters.training.classifier import ClassifierModule, per_example_loss, predictions


class SelectiveModule(ClassifierModule):
    """Manual optimisation: for each big batch of n_B points, score without gradients, select
    n_b = max(1, int(percent_train * n_B)) with ``method``, step on the selected points.

    Irreducible losses come from ``il_table`` (a file) or ``il_model`` (a frozen IL model in eval mode, on the fly).
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
        self.il_table, self.il_model = il_table, il_model
        if il_model is not None:
            il_model.eval().requires_grad_(False)
        self.corrupted = corrupted
        self.score_train_mode, self.keep_bn = score_mode == "train", not update_bn_on_score
        self.score_precision, self.channels_last = score_precision, channels_last
        self.temperature = dict(temperature or {})
        self.mc_samples = int(mc_samples) if method in NEEDS_MC else 0
        self.total_steps, self.seed = total_steps, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.selected: list[np.ndarray] = []
        self.totals = {"examples_seen": 0, "examples_scored": 0, "corrupted_selected": 0, "score_s": 0.0, "step_s": 0.0}

    # ---- the step ---------------------------------------------------------------------------------------------
    def irreducible(self, idx: torch.Tensor, x, y: torch.Tensor) -> torch.Tensor | None:
        if self.il_table is not None:
            return self.il_table(idx.cpu()).to(y.device)
        if self.il_model is not None:
            self.il_model.eval()
            with torch.inference_mode():
                return per_example_loss(self.il_model(x).float(), y)
        return None

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        if self.channels_last and torch.is_tensor(x) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        k = n_select(len(y), self.percent_train)
        t0 = time.perf_counter()
        stats = score_batch(self.model, x, y, train_mode=self.score_train_mode, keep_bn=self.keep_bn,
                            precision=self.score_precision, mc_samples=self.mc_samples)
        il = self.irreducible(idx, x, y) if self.method in NEEDS_IL or self.il_table is not None else None
        temp = temperature_at(self.global_step, self.total_steps or 1, **self.temperature) if self.temperature else 1.0
        sel = self.rule(k, loss=stats["loss"], il=il, logits=stats["logits"], targets=y, mc_logits=stats.get("mc_logits"),
                        generator=self.generator, temperature=temp)
        t1 = time.perf_counter()
        loss = self._optimise(x, y, sel)
        t2 = time.perf_counter()
        self._account(idx, y, sel, stats["loss"], il, t1 - t0, t2 - t1)
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

    def _account(self, idx, y, sel, loss, il, score_s: float, step_s: float) -> None:
        sel_idx = idx[sel.idx.to(idx.device)].cpu()
        self.selected.append(sel_idx.numpy().astype(np.int64))
        t = self.totals
        t["examples_seen"] += len(sel_idx)
        t["examples_scored"] += len(idx)
        t["score_s"] += score_s
        t["step_s"] += step_s
        log = {"trainer/examples_seen": float(t["examples_seen"]), "trainer/examples_scored": float(t["examples_scored"])}
        if self.corrupted is not None:
            c = self.corrupted[sel_idx].float()
            t["corrupted_selected"] += int(c.sum())
            log["selection/corrupted_frac"] = float(c.mean())
        mask = torch.zeros(len(idx), dtype=torch.bool)
        mask[sel.idx.cpu()] = True
        for name, v in (("loss", loss), ("il", il)):
            if v is None:
                continue
            v = v.detach().cpu()
            for tag, part in (("selected", v[mask]), ("not_selected", v[~mask])):
                log.update({f"selection/{name}_{tag}_{q}": val for q, val in percentiles(part).items()})
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=len(idx))

    def on_train_epoch_end(self) -> None:
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
