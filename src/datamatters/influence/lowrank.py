"""Low-rank curvature: top eigenpairs (Arnoldi / Lanczos) and randomized Nystroem sketches.

All routines take ``matmat(V)``: rows of ``V`` (k, p) times the symmetric matrix, so that many vectors share one
pass over the training data. The eigen-solver is a block Lanczos method with full re-orthogonalisation and
Rayleigh-Ritz extraction (``eigen_solver="lanczos"``): each step multiplies a whole block of vectors at once,
where ARPACK (pyDVL's ``eigsh``) asks for one vector per pass. Both stop when every wanted Ritz pair has
``||A v - theta v|| <= tol * |theta|`` (ARPACK's criterion); ``eigen_solver="arpack"`` is kept for comparison.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from datamatters.errors import UserError

MatMat = Callable[[Tensor], Tensor]


@dataclass
class LowRank:
    """``A ~ U diag(values) U^T`` with orthonormal columns ``U`` (p, r)."""

    values: Tensor
    vectors: Tensor

    def solve(self, G: Tensor, regularization: float, complement: bool) -> Tensor:
        """Rows of ``G`` times ``(U diag(values) U^T + lambda I)^-1``. With ``complement`` the part of ``G``
        outside span(U) is kept with weight ``1/lambda`` (the exact Woodbury inverse); without, it is dropped
        (pyDVL's Arnoldi default)."""
        U = self.vectors.to(G.dtype)
        d = self.values.to(G.dtype) + regularization
        if bool((d == 0).any()):
            raise UserError("low-rank curvature has a zero eigenvalue and no regularization; set regularization > 0")
        coef = G @ U
        out = (coef / d) @ U.T
        if complement:
            if regularization <= 0:
                raise UserError("the Woodbury complement term needs regularization > 0")
            out = out + (G - coef @ U.T) / regularization
        return out


def _orth(W: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis of the columns of ``W``, dropping directions below ``rtol * s_max`` (rank-revealing)."""
    if W.shape[1] == 0:
        return W
    U, s, _ = torch.linalg.svd(W, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return W[:, :0]
    rtol = rtol if rtol is not None else max(W.shape) * torch.finfo(W.dtype).eps * 10
    return U[:, s > rtol * s[0]]


def lanczos_eigs(matmat: MatMat, p: int, rank: int, *, block: int | None = None, tol: float = 1e-6,
                 max_iter: int | None = None, seed: int = 0, dtype=torch.float64, device="cpu") -> LowRank:
    """Top-``rank`` (largest magnitude) eigenpairs of a symmetric operator by block Lanczos."""
    rank = int(min(rank, p))
    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    b = int(min(p, block or max(2, min(8, rank // 2))))  # small blocks: fewest products for the same accuracy
    tol = max(float(tol), 50 * torch.finfo(dtype).eps)
    steps = int(max_iter) if max_iter else max(20, math.ceil(p / b))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    Q = _orth(torch.randn(p, b, generator=gen, dtype=dtype).to(device))
    basis, images = Q, matmat(Q.T).T
    for _ in range(steps):
        T = basis.T @ images
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        top = torch.argsort(theta.abs(), descending=True)[:rank]
        theta, S = theta[top], S[:, top]
        R = images @ S - (basis @ S) * theta
        res = torch.linalg.norm(R, dim=0)
        if basis.shape[1] >= p or bool((res <= tol * theta.abs().clamp(min=1e-300)).all()):
            break
        W = images[:, -Q.shape[1]:]
        for _ in range(2):
            W = W - basis @ (basis.T @ W)
        Q = _orth(W)
        if Q.shape[1] == 0:  # invariant subspace found: the Ritz pairs are exact
            break
        basis = torch.cat([basis, Q], 1)
        images = torch.cat([images, matmat(Q.T).T], 1)
    else:
        warnings.warn(f"block Lanczos stopped after {steps} steps with max relative residual "
                      f"{float((res / theta.abs()).max()):.2e} > tol={tol:.1e}; increase max_iter or tol")
    order = torch.argsort(theta.abs(), descending=True)
    return LowRank(theta[order], (basis @ S)[:, order])


def arpack_eigs(matmat: MatMat, p: int, rank: int, *, krylov_dimension: int | None = None, tol: float = 1e-6,
                max_iter: int | None = None, dtype=torch.float64, device="cpu") -> LowRank:
    """Top-``rank`` eigenpairs with scipy's ARPACK (pyDVL's solver; one vector per product)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if rank >= p:
        raise UserError(f"ARPACK needs rank < number of parameters ({p}); use eigen_solver='lanczos' for full rank")

    def mv(v):
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=dtype, device=device)
        return matmat(t[None])[0].cpu().numpy()

    def mm(V):
        t = torch.as_tensor(np.asarray(V), dtype=dtype, device=device)
        return matmat(t.T).T.cpu().numpy()

    op = LinearOperator((p, p), matvec=mv, matmat=mm, dtype=np.float64 if dtype == torch.float64 else np.float32)
    ncv = krylov_dimension or min(p, max(2 * rank + 1, 20))
    try:
        vals, vecs = eigsh(op, k=rank, ncv=ncv, tol=tol, maxiter=max_iter)
    except ArpackNoConvergence as exc:
        warnings.warn(f"ARPACK did not converge ({exc}); using the pairs found so far")
        vals, vecs = exc.eigenvalues, exc.eigenvectors
    order = np.argsort(-np.abs(vals))
    return LowRank(torch.as_tensor(vals[order].copy(), dtype=dtype, device=device),
                   torch.as_tensor(vecs[:, order].copy(), dtype=dtype, device=device))


def nystroem_sketch(matmat: MatMat, p: int, rank: int, *, seed: int = 0, dtype=torch.float64,
                    device="cpu") -> LowRank:
    """Randomized Nystroem approximation ``(A O)(O^T A O)^+ (A O)^T = U diag(values) U^T`` (Tropp et al. 2017,
    the stable shifted version pyDVL uses). Exact (to round-off) when ``rank == p``."""
    rank = int(min(rank, p))
    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega, _ = torch.linalg.qr(torch.randn(p, rank, generator=gen, dtype=dtype).to(device))
    Y = matmat(omega.T).T
    shift = math.sqrt(p) * torch.finfo(dtype).eps * torch.linalg.norm(Y)
    Y = Y + shift * omega
    M = omega.T @ Y
    M = (M + M.T) / 2
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:  # indefinite curvature: shift past the most negative eigenvalue (negative part is clipped)
        extra = torch.linalg.eigvalsh(M).min().abs() + shift
        shift = shift + extra
        Y = Y + extra * omega
        M = omega.T @ Y
        L = torch.linalg.cholesky((M + M.T) / 2)
    B = torch.linalg.solve_triangular(L, Y.T, upper=False).T  # Y L^-T
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    return LowRank((s ** 2 - shift).clamp(min=0), U)
