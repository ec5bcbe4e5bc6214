"""Preconditioners for CG on ``(C + lambda I) x = b``: ``solve(R)`` applies ``M^-1`` to rows of ``R``.

* Jacobi: ``M = diag(C) + lambda`` with the diagonal from Hutchinson's estimator. The estimate is clipped at 0
  before adding lambda, so ``M`` stays positive definite (pyDVL's single Gaussian probe can give negative entries,
  which makes CG diverge); the default uses 10 probes, all in one pass over the data.
* Nystroem (Frangella, Tropp & Udell 2023): ``M^-1 = (lambda_r + lambda) U (L + lambda I)^-1 U^T + (I - U U^T)``
  from a rank-r Nystroem sketch ``U L U^T`` of ``C``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.lowrank import nystroem_sketch


class Preconditioner:
    def fit(self, matmat: Callable[[Tensor], Tensor], p: int, regularization: float, dtype, device,
            diagonal: Callable[[], Tensor] | None = None) -> "Preconditioner":
        raise NotImplementedError

    def solve(self, R: Tensor) -> Tensor:
        raise NotImplementedError


class JacobiPreconditioner(Preconditioner):
    def __init__(self, num_samples: int = 10):
        if int(num_samples) < 1:
            raise UserError(f"Jacobi preconditioner needs num_samples >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.inv_diag: Tensor | None = None

    def fit(self, matmat, p, regularization, dtype, device, diagonal=None):
        d = diagonal(self.num_samples).clamp(min=0) + regularization
        floor = torch.finfo(dtype).eps * float(d.abs().max().clamp(min=1e-30))
        self.inv_diag = 1.0 / d.clamp(min=floor)
        return self

    def solve(self, R: Tensor) -> Tensor:
        return R * self.inv_diag


class NystroemPreconditioner(Preconditioner):
    def __init__(self, rank: int = 10, seed: int = 0):
        if int(rank) < 1:
            raise UserError(f"Nystroem preconditioner needs rank >= 1, got {rank}")
        self.rank, self.seed = int(rank), int(seed)
        self.U: Tensor | None = None

    def fit(self, matmat, p, regularization, dtype, device, diagonal=None):
        lr = nystroem_sketch(matmat, p, self.rank, seed=self.seed, dtype=dtype, device=device)
        self.U = lr.vectors
        self.scale = (lr.values[-1] + regularization) / (lr.values + regularization)
        if not bool(torch.isfinite(self.scale).all()):
            raise UserError("Nystroem preconditioner needs regularization > 0 when the sketch has zero eigenvalues")
        return self

    def solve(self, R: Tensor) -> Tensor:
        coef = R @ self.U
        return (coef * self.scale) @ self.U.T + R - coef @ self.U.T


def make_preconditioner(spec) -> Preconditioner | None:
    """``None``, ``"jacobi"``, ``"nystroem"``, a dict ``{"name": ..., **kwargs}`` or a Preconditioner."""
    if spec is None or isinstance(spec, Preconditioner):
        return spec
    kwargs = {}
    if isinstance(spec, dict):
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        spec = spec.get("name")
    if spec in (None, "none"):
        return None
    if spec == "jacobi":
        return JacobiPreconditioner(**kwargs)
    if spec == "nystroem":
        return NystroemPreconditioner(**kwargs)
    raise UserError(f"unknown preconditioner {spec!r}; use 'jacobi', 'nystroem' or None")
