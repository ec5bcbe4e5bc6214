"""Arnoldi: top eigenpairs of each block's curvature, ``H^-1 ~ V (D + lambda)^-1 V^T`` (Schioppa et al. 2022).

pyDVL 0.10 defaults: ``rank=10``, ``tol=1e-6``, ``use_woodbury=False`` (the part of the gradient outside the
top-eigenvector span is dropped, which is what makes this a low-rank method); ``use_woodbury=True`` keeps it with
weight ``1/lambda`` (the exact inverse of the regularised low-rank matrix). The eigenpairs come from block
Lanczos by default (a block of vectors per data pass; ``krylov_dimension`` sets the block size, default
``max(2, min(8, rank // 2))``), or from ARPACK as in pyDVL (one vector per pass).

Without Woodbury the inverse lives in the span of the ``r`` eigenvectors, so by default (``compact=True``) the
features are the gradients' coordinates in that basis, ``V^T g`` (r numbers instead of p), and the factors are
``diag(1 / (d + lambda)) V^T g``: the influence ``<factor, V^T g_train>`` is the same number, but a test x train
block costs ``n_test * r * n_train`` instead of ``n_test * p * n_train``. ``expand_factors`` maps factors back
to parameter space (``V factor`` = pyDVL's ``H^-1 g``); ``compact=False`` keeps parameter-space factors.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel
from datamatters.influence.blocks import Block
from datamatters.influence.curvature import Curvature
from datamatters.influence.lowrank import LowRank, arpack_eigs, lanczos_eigs

SOLVERS = ("lanczos", "arpack")


class ArnoldiInfluence(InfluenceModel):
    def __init__(self, model, loss, *, regularization=None, block_structure="full", curvature="hessian",
                 rank: int = 10, tol: float = 1e-6, max_iter: int | None = None, krylov_dimension: int | None = None,
                 use_woodbury: bool = False, eigen_solver: str = "lanczos", seed: int = 0, vector_chunk: int = 64,
                 compact: bool = True, **kw):
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature=curvature, **kw)
        if int(rank) < 1:
            raise UserError(f"Arnoldi rank must be >= 1, got {rank}")
        if eigen_solver not in SOLVERS:
            raise UserError(f"eigen_solver must be one of {SOLVERS}, got {eigen_solver!r}")
        if use_woodbury:
            for b, lam in self.regularization.items():
                if lam <= 0:
                    raise UserError(f"use_woodbury needs regularization > 0 (block {b!r} has {lam})")
        self.rank, self.tol, self.max_iter, self.krylov_dimension = int(rank), float(tol), max_iter, krylov_dimension
        self.use_woodbury, self.eigen_solver, self.seed = bool(use_woodbury), eigen_solver, int(seed)
        self.vector_chunk = int(vector_chunk)
        self.compact = bool(compact) and not self.use_woodbury
        self.low_rank: dict[str, LowRank] = {}

    def _fit(self, data: Iterable) -> None:
        for b in self.blocks:
            op = Curvature(self.fn, b, data, self.curvature, vector_chunk=self.vector_chunk)
            kw = dict(tol=self.tol, max_iter=self.max_iter, dtype=self.fn.dtype, device=self.fn.device)
            if self.eigen_solver == "arpack":
                self.low_rank[b.name] = arpack_eigs(op.matvec, b.size, min(self.rank, b.size - 1),
                                                    krylov_dimension=self.krylov_dimension, **kw)
            else:
                self.low_rank[b.name] = lanczos_eigs(op.matvec, b.size, self.rank, block=self.krylov_dimension,
                                                     seed=self.seed, **kw)

    def _solve_block(self, block: Block, G: Tensor) -> Tensor:
        return self.low_rank[block.name].solve(G, self.regularization[block.name], self.use_woodbury)

    # ---- compact coordinates in the eigenbasis ------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        if not self.compact:
            return self.n_parameters
        return sum(int(self.low_rank[b.name].values.numel()) for b in self.blocks)

    def features(self, x: Tensor, y: Tensor) -> Tensor:
        G = self.fn.grads(x, y, chunk=self.grad_chunk)
        if not self.compact:
            return G
        return torch.cat([G[:, b.slice] @ self.low_rank[b.name].vectors.to(G.dtype) for b in self.blocks], 1)

    def feature_fn(self):
        g = self.fn.flat_grad_fn()
        if not self.compact:
            return g
        V = torch.block_diag(*[self.low_rank[b.name].vectors for b in self.blocks]).to(self.fn.dtype)
        return lambda x1, y1: g(x1, y1) @ V

    def _solve(self, Phi: Tensor) -> Tensor:
        if not self.compact:
            return super()._solve(Phi)
        d = torch.cat([self.low_rank[b.name].values + self.regularization[b.name] for b in self.blocks])
        if bool((d == 0).any()):
            raise UserError("low-rank curvature has a zero eigenvalue and no regularization; set regularization > 0")
        return Phi / d.to(Phi.dtype)

    def expand_factors(self, factors: Tensor) -> Tensor:
        """Parameter-space factors ``(C + lambda I)^-1 g`` (p numbers per row) from compact ones."""
        if not self.compact:
            return factors
        out, i = [], 0
        for b in self.blocks:
            V = self.low_rank[b.name].vectors.to(factors.dtype)
            out.append(factors[:, i:i + V.shape[1]] @ V.T)
            i += V.shape[1]
        return torch.cat(out, 1)
