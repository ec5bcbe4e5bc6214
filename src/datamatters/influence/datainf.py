"""DataInf (Kwon et al. 2024): the inverse *harmonic* mean of damped rank-one curvatures, in closed form.

``(1/n) sum_i (g_i g_i^T + lambda I)^-1 b = (b - (1/n) sum_i g_i (g_i . b) / (lambda + ||g_i||^2)) / lambda``
(Sherman-Morrison per example; pyDVL 0.10's ``InverseHarmonicMeanInfluence``). For a block of ``p <= dense_limit``
parameters the (p, p) matrix ``(1/n) sum_i g_i g_i^T / (lambda + ||g_i||^2)`` is accumulated once at fit, so a
solve is one matrix product; larger blocks stream the training gradients at every solve (as pyDVL always does).

``regularization="auto"`` uses the paper's per-block heuristic ``lambda_b = 0.1 * mean_i ||g_ib||^2 / p_b``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel, reiterable, reject_options
from datamatters.influence.blocks import Block
from datamatters.influence.functional import split_batch


class DataInfInfluence(InfluenceModel):
    needs_positive_regularization = True

    def __init__(self, model, loss, *, regularization=None, block_structure="full", dense_limit: int = 4096,
                 **kw):
        reject_options("DataInfInfluence", kw, {"curvature": "it inverts damped per-example outer products"})
        self._auto = isinstance(regularization, str)
        if self._auto and regularization != "auto":
            raise UserError(f"regularization must be a number, a dict or 'auto', got {regularization!r}")
        if self._auto:
            self.needs_positive_regularization = False
        super().__init__(model, loss, regularization=None if self._auto else regularization,
                         block_structure=block_structure, curvature="empirical_fisher", **kw)
        self.dense_limit = int(dense_limit)
        self.weighted: dict[str, Tensor] = {}

    def _grad_batches(self, block: Block):
        for batch in self.data:
            x, y = self.fn.prepare(*split_batch(batch))
            yield self.fn.grads(x, y, chunk=self.grad_chunk, block=block)

    def _fit(self, data: Iterable) -> None:
        self.data = reiterable(data)
        if self._auto:
            for b in self.blocks:
                sq, n = 0.0, 0
                for G in self._grad_batches(b):
                    sq, n = sq + float((G ** 2).sum()), n + G.shape[0]
                self.regularization[b.name] = max(0.1 * sq / max(n, 1) / b.size, torch.finfo(self.fn.dtype).tiny)
        for b in self.blocks:
            if b.size > self.dense_limit:
                continue
            lam, M, n = self.regularization[b.name], torch.zeros(b.size, b.size, dtype=self.fn.dtype,
                                                                  device=self.fn.device), 0
            for G in self._grad_batches(b):
                M += (G / (lam + (G ** 2).sum(1, keepdim=True))).T @ G
                n += G.shape[0]
            self.weighted[b.name] = M / n

    def _solve_block(self, block: Block, V: Tensor) -> Tensor:
        lam = self.regularization[block.name]
        if block.name in self.weighted:
            return (V - V @ self.weighted[block.name]) / lam
        acc, n = torch.zeros_like(V), 0
        for G in self._grad_batches(block):
            acc += ((V @ G.T) / (lam + (G ** 2).sum(1))) @ G
            n += G.shape[0]
        return (V - acc / n) / lam


InverseHarmonicMeanInfluence = DataInfInfluence
