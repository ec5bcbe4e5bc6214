"""Nystroem sketch: ``(C_nys + lambda I)^-1`` by the Woodbury formula from a rank-r randomized sketch.

``C_nys = (C O)(O^T C O)^+ (C O)^T = U L U^T`` with a Gaussian test matrix ``O`` (one pass over the data for all
``rank`` products), then ``(C_nys + lambda I)^-1 b = U (L + lambda)^-1 U^T b + (b - U U^T b) / lambda``
(pyDVL 0.10's ``NystroemSketchInfluence``; regularization must be positive). Exact when ``rank`` equals the
block size.
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel
from datamatters.influence.blocks import Block
from datamatters.influence.curvature import Curvature
from datamatters.influence.lowrank import LowRank, nystroem_sketch


class NystroemSketchInfluence(InfluenceModel):
    needs_positive_regularization = True

    def __init__(self, model, loss, *, regularization=None, block_structure="full", curvature="hessian",
                 rank: int = 10, seed: int = 0, vector_chunk: int = 64, **kw):
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature=curvature, **kw)
        if int(rank) < 1:
            raise UserError(f"Nystroem rank must be >= 1, got {rank}")
        self.rank, self.seed, self.vector_chunk = int(rank), int(seed), int(vector_chunk)
        self.low_rank: dict[str, LowRank] = {}

    def _fit(self, data: Iterable) -> None:
        for b in self.blocks:
            op = Curvature(self.fn, b, data, self.curvature, vector_chunk=self.vector_chunk)
            self.low_rank[b.name] = nystroem_sketch(op.matvec, b.size, self.rank, seed=self.seed,
                                                    dtype=self.fn.dtype, device=self.fn.device)

    def _solve_block(self, block: Block, G: Tensor) -> Tensor:
        return self.low_rank[block.name].solve(G, self.regularization[block.name], complement=True)
