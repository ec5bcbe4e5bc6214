"""TRAK-style influence (Park et al. 2023): randomly projected per-example gradients and a projected
empirical-Fisher kernel, ``scores = phi_test (Phi^T Phi / n + lambda I)^-1 Phi_train^T``.

``phi = P g`` with a fixed random ``P`` (k, p) whose entries are Rademacher ``+-1/sqrt(k)`` (or Gaussian with
variance ``1/k``), so ``E[P^T P] = I`` and inner products of projected gradients estimate those of the full ones
(Johnson-Lindenstrauss). ``P`` is generated in column blocks from ``(seed, block index)``, so it is the same
matrix whatever the chunking, and is never stored whole for large models. This is the single-model form of
TRAK with loss gradients (the orientation and units of the other methods); TRAK's ensembling over independently
trained models is done by averaging the score matrices of the members (``trak_ensemble``).

``dtype="float32"`` (both forms) computes gradients, projections and the Gram matrix in traker's precision (about
twice as fast on CPU); the kernel is always factorized and solved in float64, and refused in float32 when it is too
ill-conditioned for it (``float32_check``). Both return the scores in the models' own dtype (the caller's precision).

``regularization`` is added to the *mean* ``Phi^T Phi / n`` like every other method here (TRAK's ``lambda`` on
the sum is ``n`` times larger). ``fit`` keeps the training features (when small), so ``influences`` against the
same training points does not recompute them. ``trak_ensemble`` scores many independently trained members in one
``vmap`` over their stacked parameters (the same numbers as one ``TrakInfluence`` per member, without the
per-member overhead).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel, reject_options
from datamatters.influence.functional import split_batch

PROJECTIONS = ("rademacher", "gaussian")
_COLS = 1 << 16  # parameters per generated column block of P


def projection_block(k: int, seed: int, j: int, start: int, stop: int, projection: str, dtype, device) -> Tensor:
    """Columns ``start:stop`` (block ``j``) of the (k, p) projection of ``seed``: generated from ``(seed, j)``."""
    gen = torch.Generator(device="cpu").manual_seed(1_000_003 * seed + j)
    shape = (k, stop - start)
    if projection == "rademacher":
        P = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(dtype) * 2 - 1
    else:
        P = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return (P / k ** 0.5).to(device)


def projection_matrix(k: int, p: int, seed: int, projection: str, dtype, device) -> Tensor:
    return torch.cat([projection_block(k, seed, j, s, min(s + _COLS, p), projection, dtype, device)
                      for j, s in enumerate(range(0, p, _COLS))], dim=1)


DTYPES = {"float32": torch.float32, "float64": torch.float64}
FLOAT32_MAX_AMPLIFICATION = 1e5  # trace(K) / lambda_min(K): float32 rounding (6e-8) x 1e5 ~ 1e-2 relative in scores


def compute_dtype(dtype, default: torch.dtype) -> torch.dtype:
    """``None`` -> ``default``; ``"float32"`` / ``"float64"`` or the torch dtypes themselves."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"TRAK dtype must be one of {sorted(DTYPES)} (or null for the model's own), got {dtype!r}")


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def float32_check(K: Tensor, L: Tensor, lam: float, n: int, iters: int = 20) -> None:
    """Refuse (C, k, k) float64 kernels ``K`` (Cholesky factors ``L``, regularization ``lam`` included) too
    ill-conditioned for float32 features: ``trace(K) / lambda_min(K)`` (>= the condition number) above
    ``FLOAT32_MAX_AMPLIFICATION``. ``lambda_min >= lam``, so ``trace / lam`` within the limit passes at once (the
    job's damping rule gives ~10 k); otherwise ``lambda_min`` by inverse iteration on the factor (``iters`` pairs of
    triangular solves; it approaches ``lambda_min`` from above, so it can only err towards passing a kernel the few
    iterations have not resolved)."""
    trace = torch.diagonal(K, dim1=1, dim2=2).sum(1)
    if lam > 0 and float(trace.max()) / lam <= FLOAT32_MAX_AMPLIFICATION:
        return
    v = torch.randn(K.shape[0], K.shape[1], 1, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(K.device)
    for _ in range(iters):
        v = _chol_solve(v / v.norm(dim=1, keepdim=True), L)
    amp = float((trace * v.norm(dim=(1, 2))).max())  # ||K^-1 u|| for the last unit u -> 1 / lambda_min
    if amp > FLOAT32_MAX_AMPLIFICATION:
        raise UserError(f"TRAK kernel too ill-conditioned for float32 (trace / smallest eigenvalue {amp:.3g} > "
                        f"{FLOAT32_MAX_AMPLIFICATION:.0e}; projection_dim={K.shape[1]}, {n} training points): use "
                        "dtype float64, a larger regularization or a smaller projection_dim")


def _chol_solve(B: Tensor, L: Tensor) -> Tensor:
    """``K^-1 B`` from ``K = L L^T`` (two triangular solves: 1.6x faster than ``cholesky_solve`` here, same numbers)."""
    return torch.linalg.solve_triangular(L.transpose(-1, -2), torch.linalg.solve_triangular(L, B, upper=False),
                                         upper=True)


class TrakInfluence(InfluenceModel):
    """``dtype`` (``None``: the model's own) is the compute precision, used on a converted copy of the model (the
    caller's is left as it is). Scores (``influences``, ``influences_from_factors``, ``self_influences``) come back
    in the caller's model's dtype, as from ``trak_ensemble``; features and factors stay in the compute dtype."""

    def __init__(self, model, loss, *, projection_dim: int = 512, regularization=0.0,
                 projection: str = "rademacher", seed: int = 0, block_structure="full", cache_limit: int = 1 << 26,
                 dtype=None, **kw):
        reject_options("TrakInfluence", kw, {"curvature": "its kernel is the projected empirical Fisher"})
        if isinstance(regularization, dict):
            raise UserError("TRAK has one projected kernel: regularization must be a single number")
        self.score_dtype = None  # None: the compute dtype is the model's own
        if dtype is not None and isinstance(model, nn.Module):
            first = next(model.parameters(), None)
            self.score_dtype = None if first is None else first.dtype
            model = copy.deepcopy(model).to(compute_dtype(dtype, torch.float64))
        super().__init__(model, loss, regularization=regularization, block_structure=block_structure,
                         curvature="empirical_fisher", **kw)
        if int(projection_dim) < 1:
            raise UserError(f"projection_dim must be >= 1, got {projection_dim}")
        if projection not in PROJECTIONS:
            raise UserError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.k, self.projection, self.seed, self.cache_limit = int(projection_dim), projection, int(seed), cache_limit
        self.lam = float(next(iter(self.regularization.values())))
        self._P: Tensor | None = None
        self._train: tuple[Tensor, Tensor, Tensor] | None = None  # training (x, y, features) kept by fit

    @property
    def feature_dim(self) -> int:
        return self.k

    # ---- the projection ------------------------------------------------------------------------------------
    def _blocks_of_P(self):
        p = self.n_parameters
        if self._P is not None:
            yield 0, p, self._P
            return
        for j, s in enumerate(range(0, p, _COLS)):
            yield s, min(s + _COLS, p), projection_block(self.k, self.seed, j, s, min(s + _COLS, p),
                                                         self.projection, self.fn.dtype, self.fn.device)

    def projection_matrix(self) -> Tensor:
        """The whole (k, p) matrix (for perturbation influences and inspection)."""
        return torch.cat([P for _, _, P in self._blocks_of_P()], dim=1)

    # ---- features ------------------------------------------------------------------------------------------
    def features(self, x: Tensor, y: Tensor) -> Tensor:
        kept = self._train
        if kept is not None and kept[0].shape == x.shape and torch.equal(kept[0], x) and torch.equal(kept[1], y):
            self.stats["reused_train_features"] += 1
            return kept[2].clone()  # a copy: callers (feature_rows, numpy views) may write into it
        self.stats["featurized_rows"] += x.shape[0]
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
        self._train = None
        K, n, kept = torch.zeros(self.k, self.k, dtype=self.fn.dtype, device=self.fn.device), 0, []
        for batch in data:
            x, y = self.fn.prepare(*split_batch(batch))
            Phi = self.features(x, y)
            K += Phi.T @ Phi
            n += x.shape[0]
            if kept is not None and n * (self.k + x.shape[1:].numel() + y.shape[1:].numel()) <= self.cache_limit:
                kept.append((x, y, Phi))
            else:
                kept = None
        K = (K / n).to(torch.float64) + self.lam * torch.eye(self.k, dtype=torch.float64, device=K.device)
        # a non-finite feature (e.g. a float32 Gram that overflows) makes its diagonal entry non-finite; Cholesky
        # would call such a kernel singular
        self._finite(torch.diagonal(K), "training features")
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            raise UserError(f"TRAK kernel is singular (projection_dim={self.k} vs {n} training points); "
                            "set regularization > 0 or a smaller projection_dim")
        if self.fn.dtype != torch.float64:
            float32_check(K[None], L[None], self.lam, n)
        self._chol = L
        if kept:  # the training features, for influences against the same points
            self._train = tuple(torch.cat(t) for t in zip(*kept))

    def _solve(self, Phi: Tensor) -> Tensor:
        return _chol_solve(Phi.T.to(torch.float64), self._chol).T.to(Phi.dtype)

    # ---- scores in the caller's dtype ----------------------------------------------------------------------
    def _scores(self, S: Tensor) -> Tensor:
        return S if self.score_dtype is None else S.to(self.score_dtype)

    def influences_from_factors(self, factors: Tensor, x: Tensor, y: Tensor, mode="up") -> Tensor:
        return self._scores(super().influences_from_factors(factors, x, y, mode))

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        return self._scores(super().self_influences(x, y))


def trak_ensemble(models: Sequence[nn.Module], loss, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, *,
                  projection_dim: int = 512, regularization: float = 0.0, seeds: Sequence[int] | None = None,
                  projection: str = "rademacher", chunk: int = 1 << 22, dtype=None) -> Tensor:
    """(C, n_test, n_train) TRAK scores of each of the C same-architecture ``models`` (member c projected with
    ``seeds[c]``, default c), equal to ``TrakInfluence(models[c], loss, seed=seeds[c]).fit([(x, y)])
    .influences(x_test, y_test, x, y)``: per-example gradients of all members in one ``vmap`` over their stacked
    parameters and buffers, projections, kernels and solves batched. ``chunk`` bounds the numbers held (per-example
    gradients, projections): members go in groups when their projections exceed it; rows are featurized
    ``chunk / (C p)`` at a time (about 4M numbers: cache-sized blocks were 1.4x faster than one big pass here).

    ``dtype`` (``None``: the models' own) is the compute precision of the gradients, projections, kernels and the
    final products, e.g. ``"float32"`` (traker's; about twice as fast on CPU as float64). The kernel is always
    factorized and solved in float64; in float32 the kernel's conditioning is checked first (``float32_check``):
    rounding in the features and the Gram matrix (relative ~6e-8) is amplified by ``trace(K) / lambda_min(K)``, and a
    kernel where that exceeds ``FLOAT32_MAX_AMPLIFICATION`` is refused. The scores come back in the models' dtype."""
    models = list(models)
    if not models:
        raise UserError("trak_ensemble needs at least one model")
    seeds = list(range(len(models))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(models):
        raise UserError(f"trak_ensemble: {len(models)} models but {len(seeds)} seeds; give one seed per model")
    k = int(projection_dim)
    if k < 1:
        raise UserError(f"projection_dim must be >= 1, got {projection_dim}")
    if projection not in PROJECTIONS:
        raise UserError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    ref = models[0]
    shapes = {n: t.shape for n, t in list(ref.named_parameters()) + list(ref.named_buffers())}
    for m in models:
        m.eval()
        if {n: t.shape for n, t in list(m.named_parameters()) + list(m.named_buffers())} != shapes:
            raise UserError("trak_ensemble: the models must share one architecture (same parameter names and shapes)")
        bad = [n for n, t in m.named_parameters() if not bool(torch.isfinite(t).all())]
        if bad:
            raise UserError(f"a model has non-finite parameters ({', '.join(bad[:5])}): retrain it before TRAK")
    names = [n for n, _ in ref.named_parameters()]
    bnames = [n for n, _ in ref.named_buffers()]
    first = next(ref.parameters())
    out_dtype, device = first.dtype, first.device
    dtype = compute_dtype(dtype, out_dtype)
    p = sum(t.numel() for t in ref.parameters())

    def prep(a, b, what):
        a, b = torch.as_tensor(a).to(device), torch.as_tensor(b).to(device)
        a = a.to(dtype) if a.is_floating_point() else a
        b = b.to(dtype) if b.is_floating_point() else b
        if a.dim() == 0 or b.dim() == 0 or a.shape[0] != b.shape[0]:
            raise UserError(f"trak_ensemble ({what}): x has shape {tuple(a.shape)} and y {tuple(b.shape)}; they "
                            "need the same number of rows")
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise UserError(f"trak_ensemble ({what}): inputs contain NaN or inf; remove or impute them")
        return a, b

    x, y = prep(x, y, "training side")
    x_test, y_test = prep(x_test, y_test, "test side")
    if x.shape[0] == 0:
        raise UserError("trak_ensemble: no training points")

    def example_loss(th, bf, x1, y1):
        return loss(functional_call(ref, {**bf, **th}, (x1.unsqueeze(0),)), y1.unsqueeze(0))

    g = vmap(vmap(grad(example_loss), in_dims=(None, None, 0, 0)), in_dims=(0, 0, None, None))
    eye = float(regularization) * torch.eye(k, dtype=torch.float64, device=device)

    def scores(group: list[nn.Module], group_seeds: list[int]) -> Tensor:
        C = len(group)
        theta = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in group]).to(dtype) for n in names}
        bufs = {n: _cast(torch.stack([dict(m.named_buffers())[n].detach() for m in group]), dtype) for n in bnames}
        P = torch.stack([projection_matrix(k, p, s, projection, dtype, device) for s in group_seeds])  # (C, k, p)
        ends = torch.tensor([0] + [theta[n][0].numel() for n in names]).cumsum(0).tolist()
        Pt = [P[:, :, a:b].transpose(1, 2).contiguous() for a, b in zip(ends[:-1], ends[1:])]  # per parameter
        rows = max(1, int(chunk) // (C * p))

        def features(X, Y):  # each parameter's gradients projected by its columns of P (no concatenated copy)
            out = []
            for s in range(0, X.shape[0], rows):
                gs = g(theta, bufs, X[s:s + rows], Y[s:s + rows])
                out.append(sum(torch.bmm(gs[n].reshape(C, gs[n].shape[1], -1).detach(), Q) for n, Q in zip(names, Pt)))
            return torch.cat(out, dim=1) if out else torch.zeros(C, 0, k, dtype=dtype, device=device)

        Phi, Phi_test = features(x, y), features(x_test, y_test)
        K = (Phi.transpose(1, 2) @ Phi / x.shape[0]).to(torch.float64) + eye  # Gram in dtype, solve in float64
        # a non-finite feature makes its column's diagonal entry of K non-finite (cheaper than scanning Phi)
        if not (bool(torch.isfinite(torch.diagonal(K, dim1=1, dim2=2)).all()) and bool(torch.isfinite(Phi_test).all())):
            raise UserError("trak_ensemble: non-finite gradients (NaN or inf); check the inputs' scale and the models")
        L, info = torch.linalg.cholesky_ex(K)
        if bool((info != 0).any()):
            raise UserError(f"TRAK kernel is singular (projection_dim={k} vs {x.shape[0]} training points); "
                            "set regularization > 0 or a smaller projection_dim")
        if dtype != torch.float64:
            float32_check(K, L, float(regularization), x.shape[0])
        Z = _chol_solve(Phi_test.transpose(1, 2).to(torch.float64), L).transpose(1, 2)
        return (Z.to(dtype) @ Phi.transpose(1, 2)).to(out_dtype)

    per = max(1, int(chunk) // (k * p))  # members per pass: their projections fit in the budget
    return torch.cat([scores(models[i:i + per], seeds[i:i + per]) for i in range(0, len(models), per)])
