"""Many seeds of one data-selection rule (uniform, RHO-LOSS, ...) trained together, with weight statistics recorded:
the training runs of the selection training map (``tasks/dynamics_selection.py``).

As ``SelectiveModule`` does for one seed: each step draws a big batch of n_B points, scores it without gradients
(per-example loss of the current model; uniform takes no scoring pass), keeps ``n_select(n_B, percent_train)`` points
with the selection engine's rule (``datamatters.selection.rules``, unchanged) and takes one optimiser step on them.
Here the seeds' parameters are stacked and the scoring forward and the step's gradient are one
``torch.func.vmap`` call each, with one optimiser over the stacks. The optimiser must be elementwise (Adam, AdamW,
SGD: then it is exactly one independent optimiser per seed). Per seed, everything that is random is its own: the
initialisation (the model built under ``torch.manual_seed(seed)``), the big-batch order (a generator seeded by the
seed) and the rule's draws (another one), so a seed's run does not depend on the other seeds in the stack. The
data, its label noise and the irreducible losses are shared.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from datamatters.dynamics.callback import TABLE_NAME, write_table
from datamatters.dynamics.stats import StatsComputer
from datamatters.errors import UserError
from datamatters.selection.rules import NEEDS_IL, NEEDS_MC, get_rule, n_select, uniform

_SELECT_SALT = 0x5E1EC7


def check_stackable(model: nn.Module) -> None:
    """Batch norm keeps shared running statistics and active dropout draws one mask for the whole stack: neither is
    one independent model per seed."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            raise UserError(f"stacked selection training does not support {type(m).__name__} (running statistics "
                            "are shared state); use a model without batch norm")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise UserError("stacked selection training does not support dropout (one mask would be shared by all "
                            "seeds); set model.dropout=0")


class StackedSelection:
    """``seeds`` runs of ``method`` on ``(X, y)`` (target-train, noisy labels as trained on)."""

    def __init__(self, make_model: Callable[[int], nn.Module], seeds: Sequence[int], X: torch.Tensor,
                 y: torch.Tensor, *, method: str, optimizer: Callable, percent_train: float = 0.1,
                 big_batch: int = 320, il: torch.Tensor | None = None, corrupted: torch.Tensor | None = None,
                 eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, device: str = "cpu"):
        if method in NEEDS_MC:
            raise UserError(f"selection.method={method} scores with MC dropout, which stacked training does not "
                            "support; choose uniform, reducible_loss, ce_loss, gradnorm_ub, irreducible_loss, ...")
        self.rule = get_rule(method)
        if method in NEEDS_IL and il is None:
            raise UserError(f"selection.method={method} needs irreducible losses")
        if len(seeds) < 1 or len(set(seeds)) != len(seeds):
            raise UserError(f"seeds must be distinct and at least one, got {list(seeds)}")
        self.method, self.seeds, self.device = method, [int(s) for s in seeds], device
        self.big_batch, self.percent_train = int(big_batch), float(percent_train)
        n_select(self.big_batch, self.percent_train)  # validates percent_train
        models = []
        for s in self.seeds:
            torch.manual_seed(s)
            models.append(make_model(s).to(device))
        check_stackable(models[0])
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.stats = StatsComputer(models[0])
        self.X, self.y = X.to(device), y.to(device).long()
        self.il = None if il is None else il.to(device).float()
        self.corrupted = None if corrupted is None else corrupted.to(device).bool()
        self.eval_sets = {k: (a.to(device), b.to(device).long()) for k, (a, b) in (eval_sets or {}).items()}
        self.order_gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.select_gens = [torch.Generator().manual_seed(s + _SELECT_SALT) for s in self.seeds]
        self.opt = optimizer(list(self.params.values()))
        self._forward = vmap(self._logits)
        self._grad = vmap(grad(self._loss))
        self.step_count, self.epoch = 0, 0
        self._seen = torch.zeros(len(self.seeds))  # points trained on since the last row (and in all)
        self._seen_corrupted = torch.zeros(len(self.seeds))
        self.total_seen = torch.zeros(len(self.seeds))
        self.total_corrupted = torch.zeros(len(self.seeds))

    # ---- the model as a function of one seed's parameters -----------------------------------------------------
    def _logits(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    def _loss(self, params, buffers, x, y, w):
        losses = F.cross_entropy(self._logits(params, buffers, x), y, reduction="none")
        return (losses * w).mean()

    # ---- one step ----------------------------------------------------------------------------------------------
    def select(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions (S, k) into X, loss weights (S, k))`` chosen by the rule in each seed's big batch ``pos``."""
        S, n = pos.shape
        k = n_select(n, self.percent_train)
        x, y = self.X[pos], self.y[pos]
        if self.rule is uniform:  # no scoring pass: uniform needs no statistics
            sels = [uniform(k, n=n, generator=g) for g in self.select_gens]
        else:
            with torch.no_grad():
                logits = self._forward(self.params, self.buffers, x).float()
                loss = F.cross_entropy(logits.reshape(S * n, -1), y.reshape(-1), reduction="none").view(S, n)
            il = self.il[pos] if self.il is not None else None
            sels = [self.rule(k, loss=loss[s], il=None if il is None else il[s], logits=logits[s], targets=y[s],
                              generator=self.select_gens[s]) for s in range(S)]
        chosen = torch.stack([pos[s, sel.idx.to(pos.device)] for s, sel in enumerate(sels)])
        weights = torch.stack([sel.weights.to(self.device).float() if sel.weights is not None
                               else torch.ones(k, device=self.device) for sel in sels])
        return chosen, weights

    def step(self, pos: torch.Tensor) -> None:
        chosen, w = self.select(pos)
        grads = self._grad(self.params, self.buffers, self.X[chosen], self.y[chosen], w)
        for name, g in grads.items():
            self.params[name].grad = g
        self.opt.step()
        self.step_count += 1
        self._seen += chosen.shape[1]
        self.total_seen += chosen.shape[1]
        if self.corrupted is not None:
            c = self.corrupted[chosen].sum(1).float().cpu()
            self._seen_corrupted += c
            self.total_corrupted += c

    def epoch_batches(self) -> torch.Tensor:
        """(S, n) positions: each seed's own shuffle of X for this epoch (``train`` cuts it into big batches)."""
        n = len(self.X)
        return torch.stack([torch.randperm(n, generator=g) for g in self.order_gens]).to(self.device)

    # ---- what is recorded --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) mean loss and accuracy of every seed on ``(X, y)``."""
        logits = vmap(self._logits, in_dims=(0, 0, None))(self.params, self.buffers, X).float()
        S = logits.shape[0]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(S), reduction="none").view(S, -1)
        return loss.mean(1), (logits.argmax(-1) == y).float().mean(1)

    def record(self) -> list[dict]:
        """One row per seed: step, epoch, the 14 statistics, loss/accuracy on target-train (``train_*``, the labels
        trained on) and each eval set (``val_*``, ...), the corrupted fraction of the points trained on since the
        previous row."""
        metrics = {"train": self.evaluate(self.X, self.y)}
        metrics.update({name: self.evaluate(*xy) for name, xy in self.eval_sets.items()})
        frac = (self._seen_corrupted / self._seen.clamp(min=1)).tolist()
        rows = []
        for i, s in enumerate(self.seeds):
            row = {"step": self.step_count, "epoch": self.epoch}
            row.update(self.stats({n: t[i] for n, t in self.params.items()}))
            for name, (loss, acc) in metrics.items():
                row[f"{name}_loss"], row[f"{name}_acc"] = float(loss[i]), float(acc[i])
            if self.corrupted is not None:
                row["selected_corrupted_frac"] = frac[i]
            row.update(seed=s, method=self.method)
            rows.append(row)
        self._seen.zero_()
        self._seen_corrupted.zero_()
        return rows

    def train(self, epochs: int, record_every: int, out_root: str | Path | None = None) -> dict[int, list[dict]]:
        """``epochs`` passes over X in big batches (the last one smaller), a row per seed after step 1 and every
        ``record_every`` steps; one table per seed under ``out_root/seed<k>/weight_stats.parquet`` when given."""
        if int(epochs) < 1 or int(record_every) < 1:
            raise UserError(f"epochs and record_every must be >= 1, got {epochs} and {record_every}")
        rows: dict[int, list[dict]] = {s: [] for s in self.seeds}
        for self.epoch in range(int(epochs)):
            order = self.epoch_batches()
            for b in range(math.ceil(order.shape[1] / self.big_batch)):
                self.step(order[:, b * self.big_batch:(b + 1) * self.big_batch])
                if self.step_count % record_every == 0 or self.step_count == 1:
                    for r in self.record():
                        rows[r["seed"]].append(r)
        if out_root is not None:
            for s, r in rows.items():
                write_table(pd.DataFrame(r), Path(out_root) / f"seed{s}" / TABLE_NAME,
                            {"tags": {"seed": s, "method": self.method}, "every": int(record_every),
                             "unit": "steps"})
        return rows

    def member(self, i: int) -> dict[str, torch.Tensor]:
        """Seed ``i``'s parameters (views into the stacks)."""
        return {n: t[i] for n, t in self.params.items()}


def finite_or_raise(rows: dict[int, list[dict]], method: str) -> None:
    """A diverged seed (NaN loss) is an error naming it, not a run silently dropped by the HMM."""
    for s, r in rows.items():
        if r and not np.isfinite([x["train_loss"] for x in r]).all():
            raise UserError(f"{method} seed {s} diverged (non-finite training loss); lower optimizer.lr")
