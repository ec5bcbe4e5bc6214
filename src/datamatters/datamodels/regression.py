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
  ``lasso_path`` at the same tolerance; per-target sequential strong-rule screening with a KKT check (exact).
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
            device=None) -> Moments:
    """One streaming pass over ``rows`` of the store; X^T X in float32 (exact for 0/1 up to 2^24 rows)."""
    p = masks.shape[1]
    T = len(range(*tslice.indices(y.shape[1])))
    f64 = dict(dtype=torch.float64, device=device)
    m = Moments(0, torch.zeros(p, **f64), torch.zeros(p, p, dtype=torch.float32, device=device) if gram else None,
                torch.zeros(T, **f64), torch.zeros(T, **f64), torch.zeros(p, T, **f64))
    for r in _rows_chunks(np.sort(rows), chunk):
        X, Y = read_block(masks, y, r, tslice, device, torch.float64)
        m.n += len(r)
        m.sx += X.sum(0)
        if gram:
            X32 = X.float()
            m.sxx += X32.T @ X32
        m.sy += Y.sum(0)
        m.syy += (Y * Y).sum(0)
        m.sxy += X.T @ Y
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
def soft(x: Tensor, thr: Tensor) -> Tensor:
    """Soft thresholding x - clip(x, -thr, thr) (thr broadcast per target)."""
    return x - torch.clamp(x, -thr, thr)


def duality_gap(Q: Tensor, q: Tensor, yy: Tensor, lam: Tensor, W: Tensor, QW: Tensor | None = None) -> Tensor:
    """sklearn's lasso duality gap per target, divided by n (the objective here is scaled by 1/n)."""
    QW = Q @ W if QW is None else QW  # pass QW when it is at hand (then Q may be None)
    qw = (q * W).sum(0)
    R2 = (yy - 2 * qw + (W * QW).sum(0)).clamp(min=0)
    dual_norm = (q - QW).abs().amax(0)
    c = torch.where(dual_norm > lam, lam / dual_norm.clamp(min=1e-30), torch.ones_like(lam))
    return 0.5 * R2 * (1 + c * c) + lam * W.abs().sum(0) - c * (yy - qw)


class _BlockCD:
    """Block coordinate descent on the Gram matrix, every target (column) at once.

    Each sweep visits blocks of ``block`` coordinates in order; a block takes one proximal-gradient step with its
    own Lipschitz constant (the top eigenvalue of Q_BB, about 1 for standardised masks, so each step is nearly an
    exact coordinate minimisation) and the maintained product QW is updated by one matmul Q[:, B] @ dW_B, skipped
    when the block did not move (most blocks, early on the path). With block = 1 this is sklearn's Gram coordinate
    descent; blocks turn its p rank-1 updates into a few BLAS-3 products. The maintained product is recomputed
    exactly every ``refresh`` sweeps so float32 rounding cannot drift into the duality gap.

    With few models (N < p / 3) the same iteration runs in "X form": given the standardised rows ``Xs`` (N, p),
    Q = Xs^T Xs / N is never formed; the state is R = Xs W (N, T) and a block's gradient is Xs_B^T R / N, so a
    sweep costs 2 N p T instead of p^2 T.
    """

    def __init__(self, Q: Tensor | None = None, block: int = 64, refresh: int = 25, Xs: Tensor | None = None):
        self.Q, self.refresh = Q, int(refresh)
        self.XsT = None if Xs is None else Xs.T.contiguous()  # (p, N): block rows are contiguous
        self.N = 1 if Xs is None else Xs.shape[0]
        p = Q.shape[0] if Q is not None else self.XsT.shape[0]
        self.blocks = [(s, min(s + block, p)) for s in range(0, p, block)]
        self.L = [float(torch.linalg.eigvalsh(self._qbb(s, e).double())[-1].clamp(min=1e-12)) for s, e in self.blocks]

    def _qbb(self, s: int, e: int) -> Tensor:
        if self.Q is not None:
            return self.Q[s:e, s:e]
        Xb = self.XsT[s:e]
        return Xb @ Xb.T / self.N

    def state(self, W: Tensor) -> Tensor:
        """QW (Gram form) or R = Xs W (X form)."""
        return self.Q @ W if self.Q is not None else self.XsT.T @ W

    def qw(self, S: Tensor) -> Tensor:
        return S if self.Q is not None else self.XsT @ S / self.N

    def sweep(self, q: Tensor, lam: Tensor, W: Tensor, S: Tensor, frozen: Tensor | None = None) -> None:
        """One pass over the blocks; coordinates where ``frozen`` (p, T) is set (screened out) stay at 0."""
        always = W.is_cuda  # a host sync per block costs more than the product on a GPU
        gram = self.Q is not None
        for (s, e), L in zip(self.blocks, self.L):
            g = S[s:e] if gram else self.XsT[s:e] @ S / self.N
            V = W[s:e] - (g - q[s:e]) / L
            D = soft(V, lam / L).sub_(W[s:e])
            if frozen is not None:
                D.masked_fill_(frozen[s:e], 0)
            if always or bool(D.any()):
                if gram:
                    S.addmm_(self.Q[s:e].T, D)
                else:
                    S.addmm_(self.XsT[s:e].T, D)
                W[s:e] += D

    def run(self, q, yy, lam, W, S, tol: float, sweeps: int, done: int = 0, check: bool = True
            ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Up to ``sweeps`` sweeps (in place on W and the state S); returns (W, S, converged, sweeps done);
        ``check=False``: no duality gap (the caller checks it)."""
        target = tol * yy.clamp(min=1e-30)
        conv = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
        n = 0
        for n in range(1, sweeps + 1):
            self.sweep(q, lam, W, S)
            if (done + n) % self.refresh == 0:
                S = self.state(W)
            if not check:
                continue
            conv = duality_gap(None, q, yy, lam, W, self.qw(S)) <= target
            if bool(conv.all()):
                break
        return W, S, conv, n


def _solve_fixed(cd: _BlockCD, q: Tensor, yy: Tensor, lam: Tensor | float, W0: Tensor | None, tol: float,
                 max_iter: int) -> tuple[Tensor, Tensor]:
    T = q.shape[1]
    lam = torch.as_tensor(lam, dtype=q.dtype, device=q.device).expand(T).clone()
    W = torch.zeros_like(q) if W0 is None else W0.to(q).clone()
    W, _, conv, _ = cd.run(q, yy, lam, W, cd.state(W), tol, max_iter)
    return W, conv


def lasso_gram(Q: Tensor, q: Tensor, yy: Tensor, lam: Tensor | float, W0: Tensor | None = None, *, tol: float = 1e-4,
               max_iter: int = 10000, block: int = 64) -> tuple[Tensor, Tensor]:
    """Solve the standardised lasso at fixed per-target ``lam`` (T,) to duality gap ``tol`` (sklearn's criterion,
    relative to var(y)). Returns (W, converged)."""
    with _threads_for(float(Q.shape[0]) ** 2 * q.shape[1]):
        return _solve_fixed(_BlockCD(Q, block), q, yy, lam, W0, tol, max_iter)


# The duality gap in float32 (Gram form R^2 = yy - 2 q.w + w.Qw, a cancellation) is accurate to about 1e-6 var(y):
# at tol=1e-7 float32 sweeps stall (some lambdas ran to max_iter, stopping ~1e-3 from the exact path), at 1e-6 and
# above they converge like float64 (tests/test_datamodels_regression.py). Below this tol the solver runs in float64.
F32_MIN_TOL = 1e-5


# ---- the path with per-target lambdas, validation and early stopping -----------------------------------------------
class _PathTracker:
    """Per-target position on the lambda path, validation MSE log, best weights and early stopping."""

    def __init__(self, lambdas: Tensor, patience: int, val_mse: Callable[[Tensor, Tensor], Tensor]):
        K, T = lambdas.shape
        self.lambdas, self.patience, self.val_mse = lambdas, int(patience), val_mse
        dev = lambdas.device
        self.k = torch.zeros(T, dtype=torch.long, device=dev)
        self.active = torch.ones(T, dtype=torch.bool, device=dev)
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

    def finish_lambda(self, idx: Tensor, W_cols: Tensor, iters: Tensor, converged: Tensor) -> Tensor:
        """Targets ``idx`` finished their current lambda with weights ``W_cols``: log, keep the best, advance.
        Returns a bool mask (over idx) of targets that leave the path."""
        if self.best_W is None:
            self.best_W = torch.zeros(W_cols.shape[0], self.lambdas.shape[1], dtype=W_cols.dtype, device=W_cols.device)
        mse = self.val_mse(idx, W_cols).double()
        k = self.k[idx]
        kc, ic = k.cpu(), idx.cpu()
        self.log_mse[kc, ic] = mse.cpu()
        self.log_nnz[kc, ic] = (W_cols != 0).sum(0).cpu()
        self.log_iter[kc, ic] = iters.cpu()
        self.unconverged += int((~converged).sum())
        better = mse < self.best_mse[idx]
        self.best_mse[idx] = torch.where(better, mse, self.best_mse[idx])
        self.best_k[idx] = torch.where(better, k, self.best_k[idx])
        self.since_best[idx] = torch.where(better, torch.zeros_like(k), self.since_best[idx] + 1)
        if bool(better.any()):
            self.best_W.index_copy_(1, idx[better], W_cols[:, better])
        self.k[idx] = k + 1
        leave = (self.k[idx] >= self.lambdas.shape[0]) | (self.since_best[idx] > self.patience)
        self.active[idx[leave]] = False
        return leave

    @property
    def chosen_lambda(self) -> Tensor:
        return self.lambdas[self.best_k, torch.arange(self.lambdas.shape[1], device=self.lambdas.device)]


def _path_gram(S: Standardised, tracker: _PathTracker, tol: float, max_iter: int, cd: _BlockCD,
               progress: bool, screen: bool = True) -> None:
    """Walk the path: one sweep for all targets still on it, then one duality-gap check; targets whose gap
    converged (or that hit ``max_iter`` sweeps) record their lambda and move on, warm-started from a linear
    extrapolation of their last two solutions (checked again at once: the warm start is often converged already);
    finished targets drop out.

    Screening (``screen``): per target, the sequential strong rule (Tibshirani et al. 2012) freezes at 0 every
    coordinate with |c_j| < 2 lambda_k - lambda_{k-1} (c = q - Q w at the previous lambda's solution) that is 0 in
    the warm start. The rule can be wrong, so every gap check is also a KKT check over the frozen coordinates
    (|c_j| > lambda_k unfreezes them), and convergence is sklearn's duality gap over all coordinates: the solution
    is the unscreened one. The sweeps stay dense (p^2 T flops: per-target supports differ, so no block is free
    for all targets); screening saves the moves of coordinates that would enter and leave again.

    Column gathers and scatters of (p, T) arrays are strided, so the full-width work is one sweep and one gap
    check per iteration; finishing targets are gathered (a few columns); targets that leave are frozen in place
    (weights, state and q set to 0: the sweep leaves such a column at 0) and compacted away only once they are
    1/8 of the columns."""
    T = S.q.shape[1]
    idx = torch.arange(T, device=S.q.device)
    W = torch.zeros_like(S.q)
    St = cd.state(W)
    q, yy = S.q.clone(), S.yy  # compacted to the targets still on the path
    W_prev, St_prev = W.clone(), St.clone()  # solution at the previous lambda, for the extrapolated warm start
    lam0 = tracker.lam(idx)
    frozen = (q.abs() < lam0) if screen else None  # the strong rule at lambda_max (W = 0, c = q)
    it_lam = torch.zeros(T, dtype=torch.long, device=W.device)
    alive = torch.ones(T, dtype=torch.bool, device=W.device)
    done = 0
    bar = _bar(progress, T, "lasso path (targets done)")
    one = torch.ones((), dtype=q.dtype, device=q.device)

    def settle(f: Tensor, qw: Tensor, conv: Tensor) -> None:
        """Columns f (converged or out of sweeps; ``qw``/``conv`` their Q w and gap test): record, advance,
        extrapolate; repeat on those whose new warm start is converged already."""
        while len(f):
            lam_old = tracker.lam(idx[f])
            leave = tracker.finish_lambda(idx[f], W.index_select(1, f), it_lam[f], conv)
            it_lam[f] = 0
            go, keep = f[~leave], ~leave
            if bool(leave.any()):
                gone = f[leave]
                alive[gone] = False
                for A in (W, St, q, W_prev, St_prev):
                    A.index_fill_(1, gone, 0)
                if bar is not None:
                    bar.update(len(gone))
            if not len(go):
                return
            # the lasso path is piecewise linear in lambda: extrapolate the last step (exact while the active set
            # holds), for W and, by linearity, for its product St; about a third fewer sweeps per lambda
            lam_new = tracker.lam(idx[go])
            r = (lam_new / lam_old[keep]).to(W.dtype)
            Wg, Sg, qg = (A.index_select(1, go) for A in (W, St, q))
            c_old = (qg - qw[:, keep]).abs()
            Wn, Sn = Wg + (Wg - W_prev.index_select(1, go)) * r, Sg + (Sg - St_prev.index_select(1, go)) * r
            for A, V in ((W_prev, Wg), (St_prev, Sg), (W, Wn), (St, Sn)):
                A.index_copy_(1, go, V)
            if frozen is not None:  # sequential strong rule for the new lambda
                frozen.index_copy_(1, go, (Wn == 0) & (c_old < 2 * lam_new - lam_old[keep]))
            qw = cd.qw(Sn)
            conv = duality_gap(None, qg, yy[go], lam_new, Wn, qw) <= tol * yy[go].clamp(min=1e-30)
            if frozen is not None:  # KKT on the screened coordinates: a violator is not converged
                viol = frozen[:, go] & ((qg - qw).abs() > lam_new)
                conv &= ~viol.any(0)
            f, qw, conv = go[conv], qw[:, conv], conv[conv]

    while True:
        lam = torch.where(alive, tracker.lam(idx), one)
        qw = cd.qw(St)
        conv = duality_gap(None, q, yy, lam, W, qw) <= tol * yy.clamp(min=1e-30)
        if frozen is not None:  # KKT check: screened coordinates that violate |c_j| <= lambda are unfrozen
            viol = frozen & ((q - qw).abs() > lam)
            if bool(viol.any()):
                frozen &= ~viol
                conv &= ~viol.any(0)
        fin = (conv | (it_lam >= max_iter)) & alive
        if bool(fin.any()):
            f = fin.nonzero().flatten()
            settle(f, qw.index_select(1, f), conv[f])
            if not bool(alive.any()):
                break
            if (~alive).sum() * 8 >= len(idx):
                keep = alive
                idx, it_lam, alive, yy = idx[keep], it_lam[keep], alive[keep], yy[keep]
                W, St, q, W_prev, St_prev = (A[:, keep].contiguous() for A in (W, St, q, W_prev, St_prev))
                if frozen is not None:
                    frozen = frozen[:, keep].contiguous()
            lam = torch.where(alive, tracker.lam(idx), one)
        cd.sweep(q, lam, W, St, frozen)
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
            leave = tracker.finish_lambda(idx[f], Wa[:, f], n_ep[idx[f]], conv[f])
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
    if dtype is None:  # SAGA's own criterion (saga_tol on the step) does not need a float64 gap
        dtype = torch.float32 if tol >= F32_MIN_TOL or solver == "saga" else torch.float64
    device = torch.device(device) if device is not None else torch.device("cpu")
    tslice = slice(start, end)
    tr, va = split_models(rows, val_fraction, seed)
    gram = solver == "gram"
    x_form = gram and 3 * (len(tr) + len(va)) < p  # few models: never form the p x p Gram matrix
    m_tr = moments(masks, outputs, tr, tslice, gram=gram and not x_form, chunk=chunk, device=device)
    m_va = moments(masks, outputs, va, tslice, gram=gram and not x_form, chunk=chunk, device=device)
    S = standardise(m_tr, dtype)
    lambdas = lambda_path(S.q, k, eps)

    Xv, Yv = read_block(masks, outputs, va, tslice, device, dtype) if gram else (None, None)
    if gram:
        XvT = ((Xv - S.mu.to(dtype)) / S.sd.to(dtype)).T.contiguous()  # standardised once, rows = features

    def val_mse(idx: Tensor, W_cols: Tensor) -> Tensor:
        """Validation MSE of standardised weights (bias ybar_train) for targets idx."""
        mu, sd, ybar = S.mu.to(dtype), S.sd.to(dtype), S.ybar.to(dtype)[idx]
        if gram:
            rows = W_cols.any(1).nonzero().flatten()  # only the features some target uses (sparse on the path)
            pred = W_cols.index_select(0, rows).T @ XvT.index_select(0, rows)
            return ((pred.T + ybar - Yv[:, idx]) ** 2).mean(0)
        tot = torch.zeros(len(idx), dtype=torch.float64, device=device)
        for r in _rows_chunks(va, chunk):
            X, Y = read_block(masks, outputs, r, tslice, device, dtype)
            tot += (((X - mu) / sd @ W_cols + ybar - Y[:, idx]) ** 2).double().sum(0)
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
    W_best = tracker.best_W
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
            "val_fraction": val_fraction, "k": k, "eps": eps, "patience": patience, "tol": tol, "solver": solver + ("-xform" if x_form else ""),
            "refit": refit, "n_train": p, "block": block, "dtype": str(dtype).replace("torch.", ""), "unconverged_lambdas": tracker.unconverged,
            "seconds": round(time.time() - t0, 3), "device": str(device)}
    return DatamodelFit(W=W_raw.cpu().numpy(), b=b.cpu().numpy(), lam=lam.double().cpu().numpy(),
                        lam_index=tracker.best_k.cpu().numpy(), val_mse=tracker.best_mse.cpu().numpy(),
                        nonzeros=(W_std != 0).sum(0).cpu().numpy(), path=path, meta=meta)
