"""The datamodel regression (fast_l1's job, in torch, CPU or GPU): a lasso path for all targets at once.

Per target t: minimise (1/2n)||X w_t + b_t - y_t||^2 + lambda_t ||w_t||_1 with X the masks standardised by the
training models' mean and standard deviation (population, as sklearn's StandardScaler; constant columns get sd 1)
and an unpenalised bias. For each target a geometric path of ``k`` lambdas from lambda_max (= max_j |X_j^T
(y - ybar)| / n on the standardised X, the smallest lambda with w = 0, as sklearn) down to ``eps * lambda_max``,
warm-started; after each lambda converges the target's validation MSE (a seeded random split of the models) is
measured; a target stops once it has not improved for ``patience`` lambdas; the best lambda is refit on
train+val models. Weights are returned in raw mask units (``mask @ W + b`` predicts), which the reference did not
do (it saved standardised weights without the scaling).

Solvers:
* ``gram`` (when n_train fits): one streaming pass over the store builds the sufficient statistics
  (X^T X, X^T y, sums); then block coordinate descent on the Gram matrix, every target at its own lambda,
  convergence by sklearn's duality gap (gap < tol * ||y - ybar||^2 / n), so results are comparable to sklearn's
  ``lasso_path`` at the same tolerance. No screening: a sweep's cost is the batched product dW_B Q[B, :] over all
  targets, which a screening rule can only shrink by the features no target needs; on 5000 models x 900 points x
  500 targets the union of the targets' active sets (a subset of any strong set) is 94% of the features from the
  10th lambda on and 100% from the 20th, and only 16% (early stopping) / 7% (full path) of the (target, block)
  rows of dW are zero. (Sequential strong rules with a KKT check were implemented, exact, and removed: no sweeps
  saved, ~25% slower.)
* ``saga`` (when it does not): minibatch SAGA streaming rows from the store each epoch (the reference's
  algorithm), with the exact residual table initialised by one pass (the reference started from zeros) and the
  bias fixed to ybar (exact, since X is centred); convergence by glmnet's criterion max_j dw_j^2 < tol * var(y).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from datamatters.artifacts import atomic_write_bytes
from datamatters.errors import UserError


# ---- sufficient statistics ---------------------------------------------------------------------------------------
@dataclass
class Moments:
    """Sums over a set of models: n, sum x, X^T X (optional), sum y, sum y^2, X^T y (float64)."""

    n: int
    sx: Tensor
    sxx: Tensor | None
    sy: Tensor
    syy: Tensor
    sxy: Tensor

    def __add__(self, o: "Moments") -> "Moments":
        sxx = None if self.sxx is None or o.sxx is None else self.sxx + o.sxx
        return Moments(self.n + o.n, self.sx + o.sx, sxx, self.sy + o.sy, self.syy + o.syy, self.sxy + o.sxy)


def _rows_chunks(rows: np.ndarray, chunk: int):
    for s in range(0, len(rows), chunk):
        yield rows[s:s + chunk]


def read_block(masks, y, rows: np.ndarray, tslice: slice, device, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Rows of the store (memmaps) as tensors: masks (r, p) and targets (r, T) of the target slice."""
    X = torch.from_numpy(np.asarray(masks[rows], dtype=np.float32)).to(device=device, dtype=dtype)
    Y = torch.from_numpy(np.asarray(y[rows][:, tslice], dtype=np.float64)).to(device=device, dtype=dtype)
    return X, Y


def moments(masks, y, rows: np.ndarray, tslice: slice, *, gram: bool = True, chunk: int = 2048,
            device=None, xy_dtype=torch.float64) -> Moments:
    """One streaming pass over ``rows`` of the store; X^T X in float32 (exact for 0/1 up to 2^24 rows).
    ``xy_dtype=float32``: X^T y in float32 over 256 rows at a time, on y minus the chunk's mean (added back in
    float64): ~1e-6 relative, far below a float32 solve's tolerance (the float64 product was 40% of this pass)."""
    p = masks.shape[1]
    T = len(range(*tslice.indices(y.shape[1])))
    f64 = dict(dtype=torch.float64, device=device)
    m = Moments(0, torch.zeros(p, **f64), torch.zeros(p, p, dtype=torch.float32, device=device) if gram else None,
                torch.zeros(T, **f64), torch.zeros(T, **f64), torch.zeros(p, T, **f64))
    for r in _rows_chunks(np.sort(rows), chunk):
        X, Y = read_block(masks, y, r, tslice, device, torch.float64)
        X32 = X.float() if gram or xy_dtype != torch.float64 else None
        m.n += len(r)
        sx = X.sum(0)
        m.sx += sx
        if gram:
            m.sxx += X32.T @ X32
        m.sy += Y.sum(0)
        m.syy += (Y * Y).sum(0)
        if xy_dtype == torch.float64:
            m.sxy += X.T @ Y
        else:
            shift = Y.mean(0)  # the chunk's own mean, added back in float64
            Yc = (Y - shift).to(xy_dtype)
            for i in range(0, len(r), 256):  # float32 sums over at most 256 rows, float64 across them
                m.sxy += (X32[i:i + 256].T @ Yc[i:i + 256]).double()
            m.sxy += sx[:, None] * shift[None, :]
    if gram:
        m.sxx = m.sxx.double()
    return m


@dataclass
class Standardised:
    """The lasso problem on standardised X: Q = Xs^T Xs / n, q = Xs^T (y - ybar) / n, yy = var(y)."""

    n: int
    mu: Tensor
    sd: Tensor
    Q: Tensor | None
    q: Tensor
    ybar: Tensor
    yy: Tensor


def standardise(m: Moments, dtype=torch.float32) -> Standardised:
    if m.n < 2:
        raise UserError(f"the regression needs at least 2 models, got {m.n}")
    mu = m.sx / m.n
    var = (m.sxx.diagonal() if m.sxx is not None else m.sx) / m.n - mu * mu  # masks are 0/1: sum x^2 = sum x
    sd = torch.where(var > 1e-12, var.clamp(min=0).sqrt(), torch.ones_like(var))
    ybar = m.sy / m.n
    q = (m.sxy / m.n - mu[:, None] * ybar[None, :]) / sd[:, None]
    Q = None
    if m.sxx is not None:
        Q = (m.sxx / m.n - mu[:, None] * mu[None, :]) / (sd[:, None] * sd[None, :])
        Q = Q.to(dtype)
    yy = (m.syy / m.n - ybar * ybar).clamp(min=0)
    return Standardised(m.n, mu, sd, Q, q.to(dtype), ybar, yy.to(dtype))


def lambda_path(q: Tensor, k: int, eps: float) -> Tensor:
    """(k, T) geometric path from lambda_max = max_j |q_jt| down to eps * lambda_max (sklearn's grid)."""
    lam_max = q.abs().amax(0)
    ratios = torch.logspace(0, math.log10(eps), k, dtype=torch.float64, device=q.device) if k > 1 else \
        torch.ones(1, dtype=torch.float64, device=q.device)
    return (ratios[:, None] * lam_max.double()[None, :]).to(q.dtype)


# ---- block coordinate descent on the Gram matrix -------------------------------------------------------------------
# Layout: the solvers keep one row per target ((T, p) weights, products, q): a target's data is contiguous, so
# the per-target bookkeeping (finishing a lambda, warm starts, dropping targets) gathers and scatters rows.
def soft(x: Tensor, thr: Tensor) -> Tensor:
    """Soft thresholding x - clip(x, -thr, thr) (thr broadcast per target)."""
    return x - torch.clamp(x, -thr, thr)


def gap_parts(q: Tensor, W: Tensor, QW: Tensor) -> Tensor:
    """The lambda-free parts of the duality gap per target (rows of q, W, QW): (q.w, w.(q - Qw), max|q - Qw|,
    ||w||_1) as a (4, T) tensor; ``gap_from`` finishes it at any lambda (a target moving to its next lambda from
    the same weights needs no pass over them). (torch.linalg.vector_norm is ~15x slower than abs + amax here.)"""
    G = q - QW
    return torch.stack([torch.linalg.vecdot(q, W), torch.linalg.vecdot(W, G), G.abs_().amax(1), W.abs().sum(1)])


def gap_from(parts: Tensor, yy: Tensor, lam: Tensor) -> Tensor:
    """sklearn's lasso duality gap divided by n, from ``gap_parts``. Uses w.Qw = q.w - w.(q - Qw)."""
    qw, wG, dual_norm, l1 = parts
    R2 = (yy - qw - wG).clamp(min=0)
    c = torch.where(dual_norm > lam, lam / dual_norm.clamp(min=1e-30), torch.ones_like(lam))
    return 0.5 * R2 * (1 + c * c) + lam * l1 - c * (yy - qw)


def duality_gap(q: Tensor, yy: Tensor, lam: Tensor, W: Tensor, QW: Tensor) -> Tensor:
    """sklearn's lasso duality gap per target (row of W, q, QW), divided by n."""
    return gap_from(gap_parts(q, W, QW), yy, lam)


class _BlockCD:
    """Block coordinate descent on the Gram matrix, every target (row of W) at once.

    Each sweep visits blocks of ``block`` coordinates in order. A block is minimised by ``inner`` proximal-gradient
    steps on its own (small) Gram block Q_BB with step 1/L (L its top eigenvalue, about 1 + 2 sqrt(block / n) for
    standardised masks); then the maintained product QW is updated by one matmul dW_B Q[B, :]. The inner steps
    cost block/p of that update each and make the block step nearly an exact block minimisation, so fewer sweeps
    are needed (with inner = 1, block = 1 this is sklearn's Gram coordinate descent). The maintained product is
    recomputed exactly every ``refresh`` sweeps so float32 rounding cannot drift into the duality gap.

    With few models (N < p / 3) the same iteration runs in "X form": given the standardised rows ``Xs`` (N, p),
    Q = Xs^T Xs / N is never formed; the state is R = W Xs^T (T, N) and a block's gradient is R Xs_B / N, so a
    sweep costs 2 N p T instead of p^2 T.
    """

    def __init__(self, Q: Tensor | None = None, block: int = 64, refresh: int = 25, Xs: Tensor | None = None,
                 inner: int = 2):
        self.Q, self.refresh, self.inner = Q, int(refresh), max(1, int(inner))
        self.XsT = None if Xs is None else Xs.T.contiguous()  # (p, N): block rows are contiguous
        self.N = 1 if Xs is None else Xs.shape[0]
        p = Q.shape[0] if Q is not None else self.XsT.shape[0]
        self.blocks = [(s, min(s + block, p)) for s in range(0, p, block)]
        self.Qbb = [self._qbb(s, e) for s, e in self.blocks]
        self.L = [float(torch.linalg.eigvalsh(B.double())[-1].clamp(min=1e-12)) for B in self.Qbb]
        self.Qbb_L = [B / L for B, L in zip(self.Qbb, self.L)]

    def _qbb(self, s: int, e: int) -> Tensor:
        if self.Q is not None:
            return self.Q[s:e, s:e].contiguous()
        Xb = self.XsT[s:e]
        return Xb @ Xb.T / self.N

    def state(self, W: Tensor) -> Tensor:
        """W Q (Gram form) or R = W Xs^T (X form), one row per target."""
        return W @ self.Q if self.Q is not None else W @ self.XsT

    def qw(self, S: Tensor) -> Tensor:
        return S if self.Q is not None else S @ self.XsT.T / self.N

    def sweep(self, q: Tensor, lam: Tensor, W: Tensor, S: Tensor) -> None:
        """One pass over the blocks (in place on W and S)."""
        gram = self.Q is not None
        skip = W.shape[0] <= 16 and not W.is_cuda  # few targets: blocks that do not move are common, skip them
        lam = lam[:, None]
        for (s, e), L, QL in zip(self.blocks, self.L, self.Qbb_L):
            g = S[:, s:e] if gram else S @ self.XsT[s:e].T / self.N
            Wb = W[:, s:e]
            thr = lam / L
            base = Wb + (q[:, s:e] - g) / L  # the step from the block's current point
            D = soft(base, thr).sub_(Wb)
            for _ in range(self.inner - 1):  # more steps on the block's subproblem: gradient g + D Q_BB
                D = soft(torch.addmm(base + D, D, QL, alpha=-1), thr).sub_(Wb)
            if skip and not bool(D.any()):
                continue
            S.addmm_(D, self.Q[s:e] if gram else self.XsT[s:e])
            Wb += D

    def run(self, q: Tensor, yy: Tensor, lam: Tensor, W: Tensor, S: Tensor, tol: float, sweeps: int
            ) -> tuple[Tensor, Tensor]:
        """Up to ``sweeps`` sweeps until every target's duality gap is below ``tol * yy`` (in place on W; targets
        that converge drop out of the sweeps). Returns (W, converged)."""
        target = tol * yy.clamp(min=1e-30)
        conv = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
        todo = torch.arange(W.shape[0], device=W.device)
        Wa, Sa, qa, la, ta = W, S, q, lam, target
        for n in range(1, sweeps + 1):
            self.sweep(qa, la, Wa, Sa)
            if n % self.refresh == 0:
                Sa = self.state(Wa)
            c = duality_gap(qa, yy[todo], la, Wa, self.qw(Sa)) <= ta
            if bool(c.any()):
                if Wa is not W:
                    W[todo] = Wa
                conv[todo[c]] = True
                if bool(c.all()):
                    return W, conv
                todo, Wa, Sa, qa, la, ta = todo[~c], Wa[~c], Sa[~c], qa[~c], la[~c], ta[~c]
        if Wa is not W:
            W[todo] = Wa
        return W, conv


def _solve_fixed(cd: _BlockCD, q: Tensor, yy: Tensor, lam: Tensor | float, W0: Tensor | None, tol: float,
                 max_iter: int) -> tuple[Tensor, Tensor]:
    """The lasso at fixed per-target lambdas; q and W0 are (p, T) as the callers hold them, W (p, T) returned."""
    T = q.shape[1]
    lam = torch.as_tensor(lam, dtype=q.dtype, device=q.device).expand(T).clone()
    qT = q.T.contiguous()
    W = torch.zeros_like(qT) if W0 is None else W0.to(q).T.contiguous()
    W, conv = cd.run(qT, yy, lam, W, cd.state(W), tol, max_iter)
    return W.T, conv


def lasso_gram(Q: Tensor, q: Tensor, yy: Tensor, lam: Tensor | float, W0: Tensor | None = None, *, tol: float = 1e-4,
               max_iter: int = 10000, block: int = 64) -> tuple[Tensor, Tensor]:
    """Solve the standardised lasso at fixed per-target ``lam`` (T,) to duality gap ``tol`` (sklearn's criterion,
    relative to var(y)). Returns (W (p, T), converged)."""
    with _threads_for(float(Q.shape[0]) ** 2 * q.shape[1]):
        return _solve_fixed(_BlockCD(Q, block), q, yy, lam, W0, tol, max_iter)


# The duality gap in float32 (Gram form R^2 = yy - q.w - w.(q - Qw), a cancellation) is accurate to about 1e-6
# var(y): at tol=1e-7 float32 sweeps stall (some lambdas ran to max_iter, stopping ~1e-3 from the exact path), at
# 1e-6 and above they converge like float64 (tests/test_datamodels_regression.py). Below this tol the solver runs
# in float64.
F32_MIN_TOL = 1e-5


# ---- the path with per-target lambdas, validation and early stopping -----------------------------------------------
class _PathTracker:
    """Per-target position on the lambda path, validation MSE log, best weights (T, p) and early stopping."""

    def __init__(self, lambdas: Tensor, patience: int, val_mse: Callable[[Tensor, Tensor], Tensor]):
        K, T = lambdas.shape
        self.lambdas, self.patience, self.val_mse = lambdas, int(patience), val_mse
        dev = lambdas.device
        self.k = torch.zeros(T, dtype=torch.long, device=dev)
        self.best_mse = torch.full((T,), float("inf"), dtype=torch.float64, device=dev)
        self.best_k = torch.zeros(T, dtype=torch.long, device=dev)
        self.since_best = torch.zeros(T, dtype=torch.long, device=dev)
        self.best_W: Tensor | None = None
        self.log_mse = torch.full((K, T), float("nan"), dtype=torch.float64)
        self.log_nnz = torch.full((K, T), -1, dtype=torch.long)
        self.log_iter = torch.zeros((K, T), dtype=torch.long)
        self.unconverged = 0

    def lam(self, idx: Tensor) -> Tensor:
        return self.lambdas[self.k[idx].clamp(max=self.lambdas.shape[0] - 1), idx]

    def finish_lambda(self, idx: Tensor, W_rows: Tensor, iters: Tensor, converged: Tensor) -> Tensor:
        """Targets ``idx`` finished their current lambda with weights ``W_rows`` (one row per target): log, keep
        the best, advance. Returns a bool mask (over idx) of targets that leave the path."""
        if self.best_W is None:
            self.best_W = torch.zeros(self.lambdas.shape[1], W_rows.shape[1], dtype=W_rows.dtype,
                                      device=W_rows.device)
        mse = self.val_mse(idx, W_rows).double()
        k = self.k[idx]
        kc, ic = k.cpu(), idx.cpu()
        self.log_mse[kc, ic] = mse.cpu()
        self.log_nnz[kc, ic] = (W_rows != 0).sum(1).cpu()
        self.log_iter[kc, ic] = iters.cpu()
        self.unconverged += int((~converged).sum())
        best = self.best_mse[idx]
        better = mse < best
        self.best_mse[idx] = torch.where(better, mse, best)
        self.best_k[idx] = torch.where(better, k, self.best_k[idx])
        since = torch.where(better, torch.zeros_like(k), self.since_best[idx] + 1)
        self.since_best[idx] = since
        if bool(better.all()):
            self.best_W[idx] = W_rows
        elif bool(better.any()):
            self.best_W[idx[better]] = W_rows[better]
        self.k[idx] = k + 1
        return (k + 1 >= self.lambdas.shape[0]) | (since > self.patience)

    @property
    def chosen_lambda(self) -> Tensor:
        return self.lambdas[self.best_k, torch.arange(self.lambdas.shape[1], device=self.lambdas.device)]


def _path_gram(S: Standardised, tracker: _PathTracker, tol: float, max_iter: int, cd: _BlockCD,
               progress: bool) -> None:
    """Walk the path: one sweep for all targets still on it, then one duality-gap check; targets whose gap
    converged (or that hit ``max_iter`` sweeps) record their lambda and move on, warm-started from a linear
    extrapolation of their last two solutions or from the last one (see settle; checked again at once: the warm
    start is often converged already); finished targets drop out.

    Targets that leave are zeroed in place (weights, state and q: the sweep leaves such a row at 0) and the rows
    are compacted away once they are 1/16 of the rows."""
    T = S.q.shape[1]
    q = S.q.T.contiguous()  # (T, p); all per-target arrays below are compacted to the targets still on the path
    idx = torch.arange(T, device=q.device)
    yy = S.yy.clone()
    W = torch.zeros_like(q)
    St = cd.state(W)
    W_prev, St_prev = W.clone(), St.clone()  # solution at the previous lambda, for the extrapolated warm start
    lam = tracker.lam(idx)
    it_lam = torch.zeros(T, dtype=torch.long, device=W.device)
    alive = torch.ones(T, dtype=torch.bool, device=W.device)
    done, dead = 0, 0
    bar = _bar(progress, T, "lasso path (targets done)")

    def settle(f: Tensor, conv: Tensor) -> int:
        """Rows f (converged or out of sweeps; ``conv`` their gap test): record, advance,
        extrapolate; repeat on those whose new warm start is converged already. Returns how many left."""
        left = 0
        while len(f):
            lam_old = lam[f]
            Wf = W[f]
            leave = tracker.finish_lambda(idx[f], Wf, it_lam[f], conv)
            it_lam[f] = 0
            keep = ~leave
            go = f[keep]
            if bool(leave.any()):
                gone = f[leave]
                alive[gone] = False
                for X in (W, St, q, W_prev, St_prev):
                    X.index_fill_(0, gone, 0)
                lam[gone] = 1
                left += len(gone)
                if bar is not None:
                    bar.update(len(gone))
            if not len(go):
                break
            # the lasso path is piecewise linear in lambda: extrapolating the last step is exact while the active
            # set holds (W and, by linearity, its product St), but it also amplifies the previous solutions'
            # errors, which dominate where the steps get small (the end of the path: there it doubled the sweeps).
            # So the warm start is the extrapolation unless its gap is 10x that of the previous solution
            # (measured, 5000 x 900 x 500 full path: sweeps per target 305 always / 318 never / 285 (1x) / 201 (10x)).
            # The previous solution's gap at the new lambda comes from its cached parts (no pass over the rows).
            lam_new = tracker.lam(idx[go])
            yg = yy[go]
            pg = parts[:, go]
            gap = gap_from(pg, yg, lam_new)
            Wg, Sg = (Wf if len(go) == len(f) else Wf[keep]), St[go]
            w = (1 + lam_new / lam_old[keep]).to(W.dtype)[:, None]
            Wn = torch.lerp(W_prev[go], Wg, w)  # Wg + r (Wg - W_prev), r = lam_new / lam_old
            Sn = torch.lerp(St_prev[go], Sg, w)
            pn = gap_parts(q[go], Wn, cd.qw(Sn))
            gap_n = gap_from(pn, yg, lam_new)
            ext = gap_n < 10 * gap
            W_prev[go], St_prev[go] = Wg, Sg
            if bool(ext.all()):  # (the common case: no row gathers)
                W[go], St[go], gap, parts[:, go] = Wn, Sn, gap_n, pn
            elif bool(ext.any()):
                e = ext.nonzero().flatten()
                ge = go[e]
                W[ge], St[ge] = Wn[e], Sn[e]
                gap[e] = gap_n[e]
                pg[:, e] = pn[:, e]
                parts[:, go] = pg
            lam[go] = lam_new
            conv = gap <= tol * yg.clamp(min=1e-30)
            f, conv = go[conv], conv[conv]
        return left

    while True:
        parts = gap_parts(q, W, cd.qw(St))
        conv = gap_from(parts, yy, lam) <= tol * yy.clamp(min=1e-30)
        fin = (conv | (it_lam >= max_iter)) & alive
        if bool(fin.any()):
            f = fin.nonzero().flatten()
            dead += settle(f, conv[f])
            if dead == len(idx):
                break
            if dead * 16 >= len(idx):
                keep = alive
                idx, it_lam, alive, yy, lam = idx[keep], it_lam[keep], alive[keep], yy[keep], lam[keep]
                W, St, q, W_prev, St_prev = W[keep], St[keep], q[keep], W_prev[keep], St_prev[keep]
                dead = 0
        cd.sweep(q, lam, W, St)
        done += 1
        it_lam += alive
        if done % cd.refresh == 0:
            St = cd.state(W)
    if bar is not None:
        bar.close()


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


# ---- SAGA streaming from the store -------------------------------------------------------------------------------
def _saga_solve(masks, y, rows: np.ndarray, tslice: slice, S: Standardised, tracker: _PathTracker | None,
                lam_fixed: Tensor | None, W0: Tensor | None, *, batch: int, lr: float | None, tol: float,
                max_epochs: int, seed: int, device, dtype, progress: bool) -> Tensor:
    """Minibatch SAGA over ``rows``, all (remaining) targets at once; with ``tracker`` it walks the lambda path
    (a target moves on when its epoch-to-epoch change max_j dw_j^2 < tol * var(y_t)), else solves at
    ``lam_fixed``. Returns W (p, T) on the standardised scale."""
    rows = np.sort(rows)
    N, p, T = len(rows), masks.shape[1], S.q.shape[1]
    mu, sd = S.mu.to(dtype), S.sd.to(dtype)
    ybar = S.ybar.to(dtype)
    W = torch.zeros(p, T, dtype=dtype, device=device) if W0 is None else W0.to(device=device, dtype=dtype).clone()
    starts = list(range(0, N, batch))

    def block(s):
        X, Y = read_block(masks, y, rows[s:s + batch], tslice, device, dtype)
        return (X - mu) / sd, Y - ybar

    # exact residual table and average gradient (one pass)
    A = torch.empty(N, T, dtype=dtype, device="cpu")
    G = torch.zeros(p, T, dtype=dtype, device=device)
    for s in starts:
        X, Y = block(s)
        R = X @ W - Y
        A[s:s + len(X)] = R.cpu()
        G += X.T @ R / N
    if lr is None:  # 1 / (3 L_b) with L_b the top eigenvalue of a minibatch's X^T X / b
        X, _ = block(0)
        lr = 1.0 / (3.0 * float(torch.linalg.matrix_norm(X.double(), ord=2) ** 2 / len(X)))
    idx = torch.arange(T, device=device)
    rng = np.random.default_rng([seed, 0x5A6A])
    yy = S.yy.to(device=device, dtype=dtype)
    bar = _bar(progress and tracker is not None, T, "lasso path, SAGA (targets done)")
    n_ep = torch.zeros(T, dtype=torch.long, device=device)
    for epoch in range(max_epochs * (1 if tracker is None else tracker.lambdas.shape[0])):
        if len(idx) == 0:
            break
        lam = (tracker.lam(idx) if tracker is not None else lam_fixed[idx]).to(dtype)
        W_prev = W[:, idx].clone()
        Wa, Ga, Aa = W[:, idx], G[:, idx], A[:, idx.cpu()]
        for s in rng.permutation(starts):
            X, Y = block(s)
            Y = Y[:, idx]
            R = X @ Wa - Y
            old = Aa[s:s + len(X)].to(device)
            corr = X.T @ (R - old)
            Wa = soft(Wa - lr * (corr / len(X) + Ga), lr * lam)
            Ga += corr / N
            Aa[s:s + len(X)] = R.cpu()
        W[:, idx], G[:, idx], A[:, idx.cpu()] = Wa, Ga, Aa
        n_ep[idx] += 1
        delta = ((Wa - W_prev) ** 2).amax(0)
        conv = delta < tol * yy[idx].clamp(min=1e-30)
        if tracker is None:
            idx = idx[~conv]
            continue
        fin = conv | (n_ep[idx] >= max_epochs)
        if bool(fin.any()):
            f = fin.nonzero().flatten()
            leave = tracker.finish_lambda(idx[f], Wa[:, f].T, n_ep[idx[f]], conv[f])
            n_ep[idx[f]] = 0
            if bool(leave.any()):
                keep = torch.ones(len(idx), dtype=torch.bool, device=device)
                keep[f[leave]] = False
                if bar is not None:
                    bar.update(int(leave.sum()))
                idx = idx[keep]
    if bar is not None:
        bar.close()
    return W


@contextmanager
def _threads_for(work: float):
    """One CPU thread for small problems: their ops are too small to split, and waking a thread pool per op
    costs more than the op (20x slower on a loaded machine)."""
    n = torch.get_num_threads()
    small = work < 5e6
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(n)


# ---- result ------------------------------------------------------------------------------------------------------
@dataclass
class DatamodelFit:
    """Datamodels for targets [start, end): ``predict(masks) = masks @ W + b``."""

    W: np.ndarray            # (n_train, T) raw mask units
    b: np.ndarray            # (T,)
    lam: np.ndarray          # (T,) chosen lambda (standardised scale)
    lam_index: np.ndarray    # (T,) its position on the path
    val_mse: np.ndarray      # (T,) validation MSE at the chosen lambda
    nonzeros: np.ndarray     # (T,) non-zero weights after the refit
    path: dict[str, np.ndarray] = field(default_factory=dict)  # lambdas, val_mse, nnz, iters: (k, T)
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, masks) -> np.ndarray:
        return np.asarray(masks, dtype=np.float32) @ self.W + self.b

    def save(self, path: str | Path) -> Path:
        import json

        arrays = {"W": self.W, "b": self.b, "lam": self.lam, "lam_index": self.lam_index, "val_mse": self.val_mse,
                  "nonzeros": self.nonzeros, **{f"path_{k}": v for k, v in self.path.items()}}
        meta = json.dumps(self.meta, sort_keys=True, default=str)
        path = Path(path)
        atomic_write_bytes(path, lambda fh: np.savez(fh, meta=np.array(meta), **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None) -> "DatamodelFit":
        import json

        path = Path(path)
        if not path.is_file():
            raise UserError(f"datamodel weights not found: {path}; run the regression (task=datamodels_fit) first")
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        meta = json.loads(str(d.pop("meta")))
        for k, v in (expect or {}).items():
            if str(meta.get(k)) != str(v):
                raise UserError(f"datamodel weights {path} were fit for {k}={meta.get(k)!r}, this run needs {v!r}")
        path_log = {k[5:]: d.pop(k) for k in list(d) if k.startswith("path_")}
        return cls(path=path_log, meta=meta, **d)


# ---- entry point -------------------------------------------------------------------------------------------------
def split_models(rows: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of model rows into (train, val)."""
    rows = np.asarray(rows, dtype=np.int64)
    n_val = int(round(val_fraction * len(rows)))
    if not 0 < val_fraction < 1 or n_val < 2 or len(rows) - n_val < 2:
        raise UserError(f"need a validation split of at least 2 models and 2 training models; got {len(rows)} "
                        f"models with val_fraction={val_fraction}")
    perm = np.random.default_rng([int(seed), 0xDA7A]).permutation(len(rows))
    return np.sort(rows[perm[n_val:]]), np.sort(rows[perm[:n_val]])


def fit_datamodels(masks, outputs, rows: Sequence[int] | None = None, **kw) -> DatamodelFit:
    """Fit datamodels for targets ``start:end`` of ``outputs`` (N, T) from ``masks`` (N, n_train), reading the
    given model ``rows`` (default: all) straight from the arrays (memmaps of a store work as they are).

    ``masks``/``outputs`` may also be a ``DatamodelStore`` and a key (``fit_datamodels(store, "margins")``), in
    which case ``rows`` defaults to the completed rows. Keyword arguments: see ``_fit``.
    """
    X, Y = (masks["masks"], masks[outputs]) if hasattr(masks, "spec") else (masks, outputs)
    end = kw.get("end")
    T = (Y.shape[1] if end is None or end < 0 else end) - kw.get("start", 0)
    with _threads_for(float(X.shape[1]) ** 2 * max(T, 1)):
        return _fit(masks, outputs, rows, **kw)


def _fit(masks, outputs, rows: Sequence[int] | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                   k: int = 100, eps: float = 1e-3, patience: int = 5, tol: float = 1e-4, max_iter: int = 5000,
                   block: int | None = None, start: int = 0, end: int | None = None, solver: str = "auto",
                   gram_max_features: int = 20000, refit: bool = True, device=None, dtype=None,
                   saga_batch: int = 256, saga_lr: float | None = None, saga_tol: float = 1e-6,
                   saga_max_epochs: int = 200, chunk: int = 2048, progress: bool = False) -> DatamodelFit:
    """The regression (see the module docstring); ``k`` lambdas from lambda_max to ``eps * lambda_max``, solved to
    duality gap ``tol`` by block coordinate descent (``block`` coordinates per block, default min(64, N/8); at most
    ``max_iter`` sweeps per lambda) or by SAGA. ``dtype=None``: float32 sweeps when ``tol >= F32_MIN_TOL``, else
    float64 (float32's duality gap is only accurate to ~1e-6 var(y): below that it stalls, see ``F32_MIN_TOL``)."""
    from datamatters.datamodels.store import DatamodelStore

    t0 = time.time()
    if isinstance(masks, DatamodelStore):
        store, key = masks, outputs
        masks, outputs = store["masks"], store[key]
        rows = store.completed_rows(rows)
    rows = np.arange(masks.shape[0]) if rows is None else np.asarray(list(rows), dtype=np.int64)
    if masks.ndim != 2 or outputs.ndim != 2 or masks.shape[0] != outputs.shape[0]:
        raise UserError(f"masks {masks.shape} and outputs {outputs.shape} must be (models, n_train) and "
                        "(models, targets) with the same number of models")
    T_all = outputs.shape[1]
    end = T_all if end is None or end < 0 else int(end)
    if not 0 <= start < end <= T_all:
        raise UserError(f"target slice [{start}, {end}) is outside 0..{T_all}")
    if k < 1 or not 0 < eps < 1 or patience < 0:
        raise UserError(f"need k >= 1, 0 < eps < 1 and patience >= 0 (got k={k}, eps={eps}, patience={patience})")
    p = masks.shape[1]
    solver = ("gram" if p <= gram_max_features else "saga") if solver == "auto" else solver
    if solver not in ("gram", "saga"):
        raise UserError(f"solver must be auto, gram or saga, got {solver!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):  # moments and sweeps assume one of them
        raise UserError(f"dtype must be torch.float32 or torch.float64 (or None), got {dtype!r}")
    if dtype is None:  # SAGA's own criterion (saga_tol on the step) does not need a float64 gap
        dtype = torch.float32 if tol >= F32_MIN_TOL or solver == "saga" else torch.float64
    elif dtype == torch.float32 and solver == "gram" and tol < F32_MIN_TOL:
        raise UserError(f"tol={tol} is below what float32 sweeps can reach (a duality gap of {F32_MIN_TOL} var(y)); "
                        "leave dtype unset (float64 is then chosen) or pass dtype=torch.float64")
    device = torch.device(device) if device is not None else torch.device("cpu")
    tslice = slice(start, end)
    tr, va = split_models(rows, val_fraction, seed)
    gram = solver == "gram"
    x_form = gram and 3 * (len(tr) + len(va)) < p  # few models: never form the p x p Gram matrix
    mkw = dict(gram=gram and not x_form, chunk=chunk, device=device, xy_dtype=dtype)
    m_tr, m_va = moments(masks, outputs, tr, tslice, **mkw), moments(masks, outputs, va, tslice, **mkw)
    finite = torch.isfinite(torch.stack([m_tr.sy, m_tr.syy, m_va.sy, m_va.syy])).all(0)  # NaN/inf outputs reach these
    if not bool(finite.all()):
        bad = (start + (~finite).nonzero().flatten()).tolist()
        raise UserError(f"outputs hold NaN or inf for targets {bad[:10]} (in the {len(tr) + len(va)} models fitted): "
                        "drop those models' rows or recompute their outputs")
    S = standardise(m_tr, dtype)
    lambdas = lambda_path(S.q, k, eps)

    if gram:  # the validation models, standardised once: (p, N_val) and targets (T, N_val)
        Xv, Yv = read_block(masks, outputs, va, tslice, device, dtype)
        XvT, YvT = ((Xv - S.mu.to(dtype)) / S.sd.to(dtype)).T.contiguous(), Yv.T.contiguous()

    def val_mse(idx: Tensor, W_rows: Tensor) -> Tensor:
        """Validation MSE of standardised weights (one row per target, bias ybar_train) for targets idx."""
        mu, sd, ybar = S.mu.to(dtype), S.sd.to(dtype), S.ybar.to(dtype)[idx]
        if gram:
            cols = W_rows.any(0).nonzero().flatten()  # only the features some target uses (sparse on the path)
            if not W_rows.is_cuda and int(torch.count_nonzero(W_rows)) * 20 < W_rows.numel():
                # below 5% non-zeros a sparse product is up to 4x cheaper (the first ~25 lambdas; measured on CPU)
                pred = torch.sparse.mm(W_rows.to_sparse(), XvT)
            elif len(cols) * 2 < len(XvT):
                pred = W_rows.index_select(1, cols) @ XvT.index_select(0, cols)
            else:
                pred = W_rows @ XvT
            return (pred.add_(ybar[:, None]).sub_(YvT[idx]) ** 2).mean(1)
        tot = torch.zeros(len(idx), dtype=torch.float64, device=device)
        for r in _rows_chunks(va, chunk):
            X, Y = read_block(masks, outputs, r, tslice, device, dtype)
            tot += (((X - mu) / sd @ W_rows.T + ybar - Y[:, idx]) ** 2).double().sum(0)
        return tot / len(va)

    def solver_for(St: Standardised, rows_: np.ndarray) -> _BlockCD:
        # blocks much smaller than N keep each block's Lipschitz constant near 1 (near-exact coordinate steps)
        b = int(block) if block else min(64, max(8, St.n // 8))
        if not x_form:
            return _BlockCD(St.Q, b)
        X, _ = read_block(masks, outputs, rows_, tslice, device, dtype)
        return _BlockCD(None, b, Xs=(X - St.mu.to(dtype)) / St.sd.to(dtype))

    tracker = _PathTracker(lambdas, patience, val_mse)
    if gram:
        _path_gram(S, tracker, tol, max_iter, solver_for(S, tr), progress)
    else:
        _saga_solve(masks, outputs, tr, tslice, S, tracker, None, None, batch=saga_batch, lr=saga_lr, tol=saga_tol,
                    max_epochs=saga_max_epochs, seed=seed, device=device, dtype=dtype, progress=progress)
    lam = tracker.chosen_lambda
    W_best = tracker.best_W.T  # (p, T)
    if refit:
        S_all = standardise(m_tr + m_va, dtype)
        W0 = W_best * (S_all.sd / S.sd).to(dtype)[:, None]
        if gram:
            W_std, _ = _solve_fixed(solver_for(S_all, np.concatenate([tr, va])), S_all.q, S_all.yy, lam, W0, tol,
                                    max_iter)
        else:
            W_std = _saga_solve(masks, outputs, np.concatenate([tr, va]), tslice, S_all, None, lam, W0,
                                batch=saga_batch, lr=saga_lr, tol=saga_tol, max_epochs=saga_max_epochs, seed=seed,
                                device=device, dtype=dtype, progress=False)
        final = S_all
    else:
        W_std, final = W_best, S
    W_raw = (W_std.double() / final.sd[:, None]).float()
    b = (final.ybar - final.mu @ W_raw.double()).float()
    path = {"lambdas": lambdas.double().cpu().numpy(), "val_mse": tracker.log_mse.numpy(),
            "nnz": tracker.log_nnz.numpy(), "iters": tracker.log_iter.numpy()}
    meta = {"start": start, "end": end, "n_train_models": len(tr), "n_val_models": len(va), "seed": seed,
            "val_fraction": val_fraction, "k": k, "eps": eps, "patience": patience, "tol": tol,
            "solver": solver + ("-xform" if x_form else ""), "refit": refit, "n_train": p, "block": block,
            "dtype": str(dtype).replace("torch.", ""), "unconverged_lambdas": tracker.unconverged,
            "seconds": round(time.time() - t0, 3), "device": str(device)}
    return DatamodelFit(W=W_raw.cpu().numpy(), b=b.cpu().numpy(), lam=lam.double().cpu().numpy(),
                        lam_index=tracker.best_k.cpu().numpy(), val_mse=tracker.best_mse.cpu().numpy(),
                        nonzeros=(W_std != 0).sum(0).cpu().numpy(), path=path, meta=meta)
