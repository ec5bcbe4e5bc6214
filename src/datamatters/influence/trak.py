"""TRAK-style influence (Park et al. 2023): randomly projected per-example gradients and a projected
empirical-Fisher kernel, ``scores = phi_test (Phi^T Phi / n + lambda I)^-1 Phi_train^T``.

``phi = P g`` with a fixed random ``P`` (k, p) whose entries are Rademacher ``+-1/sqrt(k)`` (or Gaussian with
variance ``1/k``), so ``E[P^T P] = I`` and inner products of projected gradients estimate those of the full ones
(Johnson-Lindenstrauss). ``P`` is generated in column blocks from ``(seed, block index)``, so it is the same
matrix whatever the chunking, and is never stored whole for large models. This is the single-model form of
TRAK with loss gradients (the orientation and units of the other methods); TRAK's ensembling over independently
trained models is done by averaging the score matrices of several fitted instances.

``regularization`` is added to the *mean* ``Phi^T Phi / n`` like every other method here (TRAK's ``lambda`` on
the sum is ``n`` times larger).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel, reject_options
from datamatters.influence.functional import split_batch

PROJECTIONS = ("rademacher", "gaussian")
_COLS = 1 << 16  # parameters per generated column block of P


class TrakInfluence(InfluenceModel):
    def __init__(self, model, loss, *, projection_dim: int = 512, regularization=0.0,
                 projection: str = "rademacher", seed: int = 0, block_structure="full", cache_limit: int = 1 << 26,
                 **kw):
        reject_options("TrakInfluence", kw, {"curvature": "its kernel is the projected empirical Fisher"})
        if isinstance(regularization, dict):
            raise UserError("TRAK has one projected kernel: regularization must be a single number")
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature="empirical_fisher", **kw)
        if int(projection_dim) < 1:
            raise UserError(f"projection_dim must be >= 1, got {projection_dim}")
        if projection not in PROJECTIONS:
            raise UserError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.k, self.projection, self.seed, self.cache_limit = int(projection_dim), projection, int(seed), cache_limit
        self.lam = float(next(iter(self.regularization.values())))
        self._P: Tensor | None = None

    @property
    def feature_dim(self) -> int:
        return self.k

    # ---- the projection ------------------------------------------------------------------------------------
    def _columns(self, j: int, stop: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(1_000_003 * self.seed + j)
        shape = (self.k, stop - j * _COLS)
        if self.projection == "rademacher":
            P = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(self.fn.dtype) * 2 - 1
        else:
            P = torch.randn(shape, generator=gen, dtype=torch.float64).to(self.fn.dtype)
        return (P / self.k ** 0.5).to(self.fn.device)

    def _blocks_of_P(self):
        p = self.n_parameters
        if self._P is not None:
            yield 0, p, self._P
            return
        for j, s in enumerate(range(0, p, _COLS)):
            yield s, min(s + _COLS, p), self._columns(j, min(s + _COLS, p))

    def projection_matrix(self) -> Tensor:
        """The whole (k, p) matrix (for perturbation influences and inspection)."""
        return torch.cat([P for _, _, P in self._blocks_of_P()], dim=1)

    # ---- features ------------------------------------------------------------------------------------------
    def features(self, x: Tensor, y: Tensor) -> Tensor:
        out = []
        for s in range(0, x.shape[0], self.grad_chunk):
            G = self.fn.grads(x[s:s + self.grad_chunk], y[s:s + self.grad_chunk], chunk=self.grad_chunk)
            out.append(sum(G[:, a:b] @ P.T for a, b, P in self._blocks_of_P()))
        if not out:
            return torch.zeros(0, self.k, dtype=self.fn.dtype, device=self.fn.device)
        return torch.cat(out)

    def feature_fn(self):
        P, g = self.projection_matrix(), self.fn.flat_grad_fn()
        return lambda x1, y1: P @ g(x1, y1)

    # ---- fit / solve ---------------------------------------------------------------------------------------
    def _fit(self, data: Iterable) -> None:
        if self.k * self.n_parameters <= self.cache_limit:
            self._P = self.projection_matrix()
        K, n = torch.zeros(self.k, self.k, dtype=self.fn.dtype, device=self.fn.device), 0
        for batch in data:
            x, y = self.fn.prepare(*split_batch(batch))
            Phi = self.features(x, y)
            K += Phi.T @ Phi
            n += x.shape[0]
        K = K / n + self.lam * torch.eye(self.k, dtype=K.dtype, device=K.device)
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            raise UserError(f"TRAK kernel is singular (projection_dim={self.k} vs {n} training points); "
                            "set regularization > 0 or a smaller projection_dim")
        self._chol = L

    def _solve(self, Phi: Tensor) -> Tensor:
        return torch.cholesky_solve(Phi.T, self._chol).T
