"""Conjugate gradient on ``(C + lambda I) x = b`` for many right-hand sides at once, matrix-free.

Every CG iteration multiplies all still-active right-hand sides in one pass over the training data. Each row
``b_j`` stops on its own when ``||r_j|| <= max(rtol * ||b_j||, atol)`` (the per-right-hand-side tolerance; pyDVL
0.10 takes the norm over the wrong axis, squares ``rtol``, and zips rows with parameters, so with more test
points than parameters it silently returns zero rows). Rows are never dropped: a row that does not converge in
``maxiter`` keeps its last iterate and is reported in ``last_info`` and a warning.

``block_cg=True`` (the default) uses the breakdown-free block CG of Ji & Li (2017): one shared Krylov space, search directions
orthonormalised with a rank-revealing SVD so that more right-hand sides than parameters (rank-deficient blocks)
only shrink the search space, never the solution.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel
from datamatters.influence.blocks import Block
from datamatters.influence.curvature import Curvature
from datamatters.influence.lowrank import _orth
from datamatters.influence.preconditioners import Preconditioner, make_preconditioner

MatMat = Callable[[Tensor], Tensor]


def _tolerance(B: Tensor, rtol: float, atol: float) -> Tensor:
    return torch.clamp(rtol * torch.linalg.norm(B, dim=1), min=atol)


def batched_cg(A: MatMat, B: Tensor, *, rtol: float = 1e-4, atol: float = 1e-6, maxiter: int | None = None,
               M: Callable[[Tensor], Tensor] | None = None, X0: Tensor | None = None) -> tuple[Tensor, dict]:
    """Solve ``X A = B`` row-wise (A symmetric positive definite); returns ``(X, info)``."""
    k, p = B.shape
    maxiter = int(maxiter) if maxiter else 10 * p
    X = torch.zeros_like(B) if X0 is None else X0.clone()
    R = B - A(X) if X0 is not None else B.clone()
    tol = _tolerance(B, rtol, atol)
    Z = M(R) if M else R
    P, rz = Z.clone(), (R * Z).sum(1)
    active = torch.linalg.norm(R, dim=1) > tol
    iters = torch.zeros(k, dtype=torch.long)
    breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
    for _ in range(maxiter):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        Pa = P[idx]
        AP = A(Pa)
        pap = (Pa * AP).sum(1)
        bad = pap <= 0
        if bool(bad.any()):  # not positive definite along this direction: stop these rows, report
            breakdown[idx[bad]] = True
            active[idx[bad]] = False
            keep = ~bad
            idx, Pa, AP, pap = idx[keep], Pa[keep], AP[keep], pap[keep]
            if idx.numel() == 0:
                break
        alpha = rz[idx] / pap
        X[idx] += alpha[:, None] * Pa
        R[idx] -= alpha[:, None] * AP
        Za = M(R[idx]) if M else R[idx]
        rz_new = (R[idx] * Za).sum(1)
        P[idx] = Za + (rz_new / rz[idx])[:, None] * Pa
        rz[idx] = rz_new
        iters[idx.cpu()] += 1
        active[idx] = torch.linalg.norm(R[idx], dim=1) > tol[idx]
    res = torch.linalg.norm(R, dim=1)
    return X, {"iterations": iters, "residual": res, "tolerance": tol, "converged": res <= tol,
               "breakdown": breakdown}


def block_cg(A: MatMat, B: Tensor, *, rtol: float = 1e-4, atol: float = 1e-6, maxiter: int | None = None,
             M: Callable[[Tensor], Tensor] | None = None, X0: Tensor | None = None) -> tuple[Tensor, dict]:
    """Breakdown-free block CG (Ji & Li 2017) for the rows of ``B``; returns ``(X, info)``. If ``P^T A P`` stops
    being positive definite (indefinite curvature), the remaining rows continue with ``batched_cg`` from their
    current iterates, which detects and reports the non-positive directions row by row."""
    k, p = B.shape
    maxiter = int(maxiter) if maxiter else 10 * p
    X = torch.zeros_like(B) if X0 is None else X0.clone()
    R = B - A(X) if X0 is not None else B.clone()  # rows = right-hand sides
    tol = _tolerance(B, rtol, atol)
    act = (torch.linalg.norm(R, dim=1) > tol).nonzero().squeeze(1)
    iters = torch.zeros(k, dtype=torch.long)
    P = _orth((M(R[act]) if M else R[act]).T)  # (p, r) search directions
    for _ in range(maxiter):
        if act.numel() == 0 or P.shape[1] == 0:
            break
        Q = A(P.T).T  # (p, r)
        PQ = P.T @ Q
        PQ = (PQ + PQ.T) / 2
        L, info = torch.linalg.cholesky_ex(PQ)
        if int(info) != 0:  # not positive definite on this subspace: finish row by row
            Xa, sub = batched_cg(A, B[act], rtol=rtol, atol=atol, maxiter=maxiter, M=M, X0=X[act])
            X[act] = Xa
            iters[act.cpu()] += sub["iterations"]
            res = torch.linalg.norm(B - A(X), dim=1)
            breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
            breakdown[act] = sub["breakdown"]
            return X, {"iterations": iters, "residual": res, "tolerance": tol, "converged": res <= tol,
                       "breakdown": breakdown}
        alpha = torch.cholesky_solve(P.T @ R[act].T, L)  # (r, a)
        X[act] += (P @ alpha).T
        R[act] -= (Q @ alpha).T
        iters[act.cpu()] += 1
        still = torch.linalg.norm(R[act], dim=1) > tol[act]
        act = act[still]
        if act.numel() == 0:
            break
        Z = (M(R[act]) if M else R[act]).T
        beta = -torch.cholesky_solve(Q.T @ Z, L)
        P = _orth(Z + P @ beta)
    res = torch.linalg.norm(R, dim=1)
    return X, {"iterations": iters, "residual": res, "tolerance": tol, "converged": res <= tol,
               "breakdown": torch.zeros(k, dtype=torch.bool, device=B.device)}


class CgInfluence(InfluenceModel):
    """Matrix-free CG influence (pyDVL defaults: ``rtol=1e-4``, ``atol=1e-6``, ``maxiter=10*p``).

    ``block_cg=True`` (default; pyDVL's ``solve_simultaneously=False``): the right-hand sides of a chunk share
    one Krylov space, which on an MLP Hessian with 20 right-hand sides needed 53 instead of 139 iterations and
    2.8x fewer curvature products than row-wise CG (``block_cg=False``, kept).

    ``x0``: ``"zeros"`` (default) or ``"rhs"`` (pyDVL starts from ``b`` itself). ``preconditioner``: None,
    ``"jacobi"``, ``"nystroem"``, ``{"name": "nystroem", "rank": 20}`` or a Preconditioner instance.
    ``vector_chunk`` bounds how many vectors one vmapped curvature product handles at once. ``materialize``:
    ``"auto"`` (default) switches a block of at most ``dense_limit`` parameters to its dense matrix once the CG
    products spent on it reach its size (break-even); ``False`` stays matrix-free, ``True`` builds it at once.
    """

    def __init__(self, model, loss, *, regularization=None, block_structure="full", curvature="hessian",
                 rtol: float = 1e-4, atol: float = 1e-6, maxiter: int | None = None, preconditioner=None,
                 block_cg: bool = True, x0: str = "zeros", warn_on_max_iteration: bool = True,
                 vector_chunk: int = 64, materialize: bool | str = "auto", dense_limit: int = 4096, **kw):
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature=curvature, **kw)
        if not (rtol >= 0 and atol >= 0) or (rtol == 0 and atol == 0):
            raise UserError(f"CG needs rtol >= 0 and atol >= 0, not both 0 (got rtol={rtol}, atol={atol})")
        if x0 not in ("zeros", "rhs"):
            raise UserError(f"x0 must be 'zeros' or 'rhs', got {x0!r}")
        if maxiter is not None and int(maxiter) < 1:
            raise UserError(f"maxiter must be >= 1, got {maxiter}")
        self.rtol, self.atol, self.maxiter = float(rtol), float(atol), maxiter
        self.block_cg, self.x0, self.warn = bool(block_cg), x0, bool(warn_on_max_iteration)
        if materialize not in (True, False, "auto"):
            raise UserError(f"materialize must be True, False or 'auto', got {materialize!r}")
        self.vector_chunk, self.materialize, self.dense_limit = int(vector_chunk), materialize, int(dense_limit)
        self.dense: dict[str, Tensor] = {}
        self.products: dict[str, int] = {}
        self._precond_spec = preconditioner
        make_preconditioner(preconditioner)  # validate early
        self.operators: dict[str, Curvature] = {}
        self.preconditioners: dict[str, Preconditioner | None] = {}
        self.last_info: dict[str, dict] = {}

    def _fit(self, data: Iterable) -> None:
        import copy

        for b in self.blocks:
            op = Curvature(self.fn, b, data, self.curvature, vector_chunk=self.vector_chunk)
            self.operators[b.name] = op
            pc = copy.deepcopy(make_preconditioner(self._precond_spec))
            if pc is not None:
                pc.fit(op.matvec, b.size, self.regularization[b.name], self.fn.dtype, self.fn.device,
                       diagonal=lambda s, op=op: op.diagonal(s))
            self.preconditioners[b.name] = pc

    def regularized(self, block: Block) -> MatMat:
        """``V -> V (C + lambda I)``. Matrix-free, until (``materialize="auto"``) the curvature products spent on
        this block reach its size ``p <= dense_limit``: from then on the block's matrix, built once with ``p``
        products, is used. The iterates are the same (it is the same operator); at most twice the optimal work."""
        op, lam, name = self.operators[block.name], self.regularization[block.name], block.name

        def apply(V: Tensor) -> Tensor:
            if name not in self.dense and self._materialize_now(block, V.shape[0]):
                self.dense[name] = op.dense()
            if name in self.dense:
                return V @ self.dense[name] + lam * V
            self.products[name] = self.products.get(name, 0) + V.shape[0]
            return op.matvec(V) + lam * V

        return apply

    def _materialize_now(self, block: Block, k: int) -> bool:
        if self.materialize is True:
            return True
        return (self.materialize == "auto" and block.size <= self.dense_limit
                and self.products.get(block.name, 0) + k >= block.size)

    def _solve_block(self, block: Block, G: Tensor) -> Tensor:
        pc = self.preconditioners[block.name]
        solver = block_cg if self.block_cg else batched_cg
        X, info = solver(self.regularized(block), G, rtol=self.rtol, atol=self.atol, maxiter=self.maxiter,
                         M=pc.solve if pc else None, X0=G.clone() if self.x0 == "rhs" else None)
        self.last_info[block.name] = {**info, "materialized": block.name in self.dense}
        failed = int((~info["converged"]).sum())
        if failed and self.warn:
            warnings.warn(f"CG block {block.name!r}: {failed} of {G.shape[0]} right-hand sides did not reach "
                          f"max(rtol*||b||, atol) (worst residual/tolerance "
                          f"{float((info['residual'] / info['tolerance']).max()):.3g}, "
                          f"{int(info['breakdown'].sum())} hit non-positive curvature); increase maxiter or "
                          "regularization, or use curvature='gauss_newton'")
        return X
