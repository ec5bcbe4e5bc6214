"""Direct: the dense curvature of each block, factorised once at fit time (small models only).

pyDVL's ``DirectInfluence`` re-solves ``torch.linalg.solve(H + lambda I, g)`` on every call, i.e. it refactorises
the (p, p) matrix for every chunk of test points; here the LU factorisation is computed once in ``fit`` and each
call is two triangular solves (Cholesky when the regularised curvature is positive definite, LU otherwise).
The Hessian of a model built from Linear layers (``nn.Linear``, or an ``nn.Sequential`` whose first layer with
parameters in the block is one; plain classes, no hooks) is assembled from per-example second derivatives in the
layers' outputs (``ModelFunction.leading_linear_hessian_sum``), not from one Hessian-vector product per parameter
(pyDVL: ``torch.func.hessian`` per batch).
(pyDVL's dense Gauss-Newton also mis-normalises by the number of parameters;
``curvature="empirical_fisher"`` here is the exact mean of ``g g^T``.)
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError

from datamatters.influence.base import InfluenceModel
from datamatters.influence.blocks import Block
from datamatters.influence.curvature import Curvature


class DirectInfluence(InfluenceModel):
    """Exact ``(C_bb + lambda_b I)^-1 g`` per block from the materialised curvature."""

    def __init__(self, model, loss, *, regularization=None, block_structure="full", curvature="hessian",
                 column_chunk: int = 128, **kw):
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature=curvature, **kw)
        self.column_chunk = int(column_chunk)
        self.matrices: dict[str, Tensor] = {}
        self._lu: dict[str, tuple[Tensor, Tensor]] = {}

    def _fit(self, data: Iterable) -> None:
        for b in self.blocks:
            C = Curvature(self.fn, b, data, self.curvature).dense(self.column_chunk)
            self.matrices[b.name] = C
            A = C + self.regularization[b.name] * torch.eye(b.size, dtype=C.dtype, device=C.device)
            L, info = torch.linalg.cholesky_ex(A)  # positive definite (always for GGN/Fisher + lambda > 0): half of LU
            if int(info) == 0:
                self._lu[b.name] = (L, None)
                continue
            LU, piv, info = torch.linalg.lu_factor_ex(A)  # an indefinite Hessian
            if int(info) != 0:
                raise UserError(f"block {b.name!r}: curvature + regularization is singular; increase regularization")
            self._lu[b.name] = (LU, piv)

    def _solve_block(self, block: Block, G: Tensor) -> Tensor:
        LU, piv = self._lu[block.name]
        if piv is None:
            return torch.cholesky_solve(G.T, LU).T
        return torch.linalg.lu_solve(LU, piv, G.T).T
