"""Arnoldi: top eigenpairs of each block's curvature, ``H^-1 ~ V (D + lambda)^-1 V^T`` (Schioppa et al. 2022).

pyDVL 0.10 defaults: ``rank=10``, ``tol=1e-6``, ``use_woodbury=False`` (the part of the gradient outside the
top-eigenvector span is dropped, which is what makes this a low-rank method); ``use_woodbury=True`` keeps it with
weight ``1/lambda`` (the exact inverse of the regularised low-rank matrix). The eigenpairs come from block
Lanczos by default (many curvature products per data pass), or from ARPACK as in pyDVL.
"""
from __future__ import annotations

from typing import Iterable

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
                 **kw):
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
