"""Many seeds of the modular-addition transformer in one process: parameters stacked along a seed axis, one
``torch.func.vmap(grad(functional_call))`` step for all seeds and one AdamW over the stacks (AdamW is elementwise, so
that is exactly one independent AdamW per seed), as the batched ensemble trainer does. The Python and optimiser
overhead per step is paid once instead of once per seed, which is what makes 40 seeds x the reference's length one
job.

Each seed keeps everything of its own: the initialisation (the model built under ``torch.manual_seed(seed)``), the
30/70 split (``ModularAdditionDataModule(seed=seed)``, as the reference) and the minibatch stream (a generator seeded
by the seed), so a seed's run does not depend on which other seeds share the stack. Statistics rows are computed with
the callback's ``StatsComputer`` and written in its table format, one ``weight_stats.parquet`` per seed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from datamatters.dynamics.callback import TABLE_NAME, write_table
from datamatters.dynamics.stats import StatsComputer


def seed_model(seed: int, p: int, d_model: int = 128, num_heads: int = 4, d_mlp: int = 512, layernorm: bool = False):
    """The grokking transformer as ``model=transformer`` builds it, initialised under ``seed``."""
    from datamatters.models import build_model

    torch.manual_seed(int(seed))
    return build_model("transformer", (3,), p, d_model=d_model, num_heads=num_heads, d_head=d_model // num_heads,
                       d_mlp=d_mlp, layernorm=layernorm)


def seed_split(p: int, frac: float, seed: int):
    """``(X_train, y_train, X_eval, y_eval)`` of the seed's split; evaluation on all held-out pairs (the reference)."""
    from datamatters.data.synthetic import ModularAdditionDataModule

    dm = ModularAdditionDataModule(p=p, train_fraction=frac, seed=seed, label_noise={})
    dm.setup()
    _, Xtr, ytr = dm.dataset("train").tensors()
    held = np.concatenate([dm.split_indices("val"), dm.split_indices("test")])
    X, y = dm.sources["all"].X, dm.sources["all"].y
    return Xtr, ytr, X[held], y[held]


def batch_indices(gen: torch.Generator, n: int, batch_size: int | None) -> torch.Tensor:
    """The next minibatch of one seed: ``batch_size`` distinct training pairs (all pairs when None)."""
    return torch.arange(n) if not batch_size else torch.randperm(n, generator=gen)[:batch_size]


class StackedSeeds:
    """All seeds of one setting, trained together."""

    def __init__(self, seeds: Sequence[int], p: int = 113, frac: float = 0.3, d_model: int = 128, num_heads: int = 4,
                 d_mlp: int = 512, layernorm: bool = False, lr: float = 1e-3, weight_decay: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.98), batch_size: int | None = 256, device: str = "cpu"):
        self.seeds, self.batch_size, self.device = [int(s) for s in seeds], batch_size, device
        models = [seed_model(s, p, d_model, num_heads, d_mlp, layernorm).to(device) for s in self.seeds]
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.stats = StatsComputer(models[0])
        data = [seed_split(p, frac, s) for s in self.seeds]
        self.Xtr, self.ytr, self.Xev, self.yev = (torch.stack([d[i] for d in data]).to(device) for i in range(4))
        self.gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=weight_decay, betas=betas)
        self._grad = vmap(grad_and_value(self._loss))
        self.step_count = 0

    def _loss(self, params, buffers, x, y):
        return F.cross_entropy(functional_call(self.base, (params, buffers), (x,)), y)

    def step(self) -> torch.Tensor:
        """One optimiser step of every seed; returns the (seeds,) minibatch losses."""
        idx = torch.stack([batch_indices(g, self.Xtr.shape[1], self.batch_size) for g in self.gens]).to(self.device)
        x = torch.gather(self.Xtr, 1, idx[..., None].expand(-1, -1, self.Xtr.shape[-1]))
        grads, loss = self._grad(self.params, self.buffers, x, torch.gather(self.ytr, 1, idx))
        for n, g in grads.items():
            self.params[n].grad = g
        self.opt.step()
        self.step_count += 1
        return loss.detach()

    def member(self, i: int) -> dict[str, torch.Tensor]:
        """Seed ``i``'s parameters (views into the stacks)."""
        return {n: t[i] for n, t in self.params.items()}

    @torch.no_grad()
    def record(self) -> list[dict]:
        """One table row per seed: step, the statistics, train/val loss and accuracy (val = every held-out pair)."""
        def evaluate(pr, bu, x, y):
            logits = functional_call(self.base, (pr, bu), (x,))
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

        tl, ta = vmap(evaluate)(self.params, self.buffers, self.Xtr, self.ytr)
        vl, va = vmap(evaluate)(self.params, self.buffers, self.Xev, self.yev)
        rows = []
        for i, s in enumerate(self.seeds):
            row = {"step": self.step_count, "epoch": self.step_count}
            row.update(self.stats(self.member(i)))
            row.update(train_loss=float(tl[i]), train_acc=float(ta[i]), val_loss=float(vl[i]), val_acc=float(va[i]),
                       seed=s)
            rows.append(row)
        return rows

    def train(self, steps: int, record_every: int, out_root: str | Path | None = None, log=None) -> dict[int, list]:
        """``steps`` steps, a row per seed after step 1 and every ``record_every`` steps; tables under
        ``out_root/seed<k>/weight_stats.parquet`` when given."""
        rows: dict[int, list] = {s: [] for s in self.seeds}
        for _ in range(int(steps)):
            self.step()
            if self.step_count % record_every == 0 or self.step_count == 1:
                for r in self.record():
                    rows[r["seed"]].append(r)
                if log and self.step_count % (20 * record_every) == 0:
                    log(self.step_count, np.mean([v[-1]["val_acc"] for v in rows.values()]))
        if out_root is not None:
            for s, r in rows.items():
                write_table(pd.DataFrame(r), Path(out_root) / f"seed{s}" / TABLE_NAME,
                            {"tags": {"seed": s}, "every": record_every, "unit": "steps"})
        return rows
