"""LiSSA (Agarwal et al. 2017): a stochastic Neumann series for ``(C + lambda I)^-1 b``, with repetitions.

One chain iterates ``h <- b + (1 - dampen) h - (C_batch + lambda I) h / scale`` on random mini-batches and
returns ``h / scale`` (pyDVL 0.10's update and defaults: ``maxiter=1000, dampen=0, scale=10, rtol=1e-4``, start
``h = b``, stop when ``max |change / h| < rtol``). A single chain plateaus at the noise level of its mini-batch
curvature; here ``repetitions`` independent chains (different seeds) are averaged, as in the original paper's
S1 repetitions, which cuts that noise by ``sqrt(repetitions)``. All right-hand sides of a call run in the same
chains (one vmapped product per step).

The training inputs are held in memory (gathered once at fit) so random mini-batches are cheap index lookups.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel
from datamatters.influence.blocks import Block
from datamatters.influence.curvature import Curvature
from datamatters.influence.functional import split_batch


class LissaInfluence(InfluenceModel):
    symmetric = False  # stochastic: each call draws its own batches

    def __init__(self, model, loss, *, regularization=None, block_structure="full", curvature="hessian",
                 maxiter: int = 1000, dampen: float = 0.0, scale: float = 10.0, rtol: float = 1e-4,
                 repetitions: int = 4, batch_size: int | None = None, seed: int = 0,
                 warn_on_max_iteration: bool = False, vector_chunk: int = 64, **kw):
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature=curvature, **kw)
        if int(maxiter) < 1 or int(repetitions) < 1 or not scale > 0 or not 0 <= dampen < 1:
            raise UserError(f"LiSSA needs maxiter >= 1, repetitions >= 1, scale > 0 and 0 <= dampen < 1 (got "
                            f"{maxiter}, {repetitions}, {scale}, {dampen})")
        self.maxiter, self.dampen, self.scale, self.rtol = int(maxiter), float(dampen), float(scale), float(rtol)
        self.repetitions, self.batch_size, self.seed = int(repetitions), batch_size, int(seed)
        self.warn, self.vector_chunk = bool(warn_on_max_iteration), int(vector_chunk)
        self.last_info: dict[str, dict] = {}

    def _fit(self, data: Iterable) -> None:
        xs, ys = zip(*(split_batch(b) for b in data))
        self._X, self._Y = self.fn.prepare(torch.cat(xs), torch.cat(ys))
        self._bs = int(self.batch_size or xs[0].shape[0])
        if not 1 <= self._bs <= len(self._X):
            raise UserError(f"LiSSA batch_size must be in [1, {len(self._X)}], got {self._bs}")
        self.operators = {b.name: Curvature(self.fn, b, data, self.curvature, self.vector_chunk) for b in self.blocks}

    def _chain(self, block: Block, B: Tensor, gen: torch.Generator) -> tuple[Tensor, int]:
        op, lam = self.operators[block.name], self.regularization[block.name]
        h, n = B.clone(), len(self._X)
        for it in range(self.maxiter):
            idx = torch.randperm(n, generator=gen)[:self._bs].to(self._X.device)  # a batch without replacement
            Ch = op.batch_matvec(h, self._X[idx], self._Y[idx]) + lam * h
            new = B + (1 - self.dampen) * h - Ch / self.scale
            if not bool(torch.isfinite(new).all()):
                raise UserError("LiSSA diverged (non-finite iterate): increase scale or dampen, or regularization")
            rel = ((new - h).abs() / new.abs().clamp(min=torch.finfo(new.dtype).tiny)).max()
            h = new
            if float(rel) < self.rtol:
                return h / self.scale, it + 1
        return h / self.scale, self.maxiter

    def _solve_block(self, block: Block, G: Tensor) -> Tensor:
        out, iters = torch.zeros_like(G), []
        for r in range(self.repetitions):
            gen = torch.Generator(device="cpu").manual_seed(1_000_003 * self.seed + r)  # same chains every call
            h, it = self._chain(block, G, gen)
            out += h
            iters.append(it)
        self.last_info[block.name] = {"iterations": iters}
        if self.warn and max(iters) >= self.maxiter:
            warnings.warn(f"LiSSA block {block.name!r}: chains ran to maxiter={self.maxiter} without rtol={self.rtol}")
        return out / self.repetitions
