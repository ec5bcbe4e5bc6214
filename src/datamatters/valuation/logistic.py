"""u(S) for scikit-learn's ``LogisticRegression``, fitted for a whole batch of subsets at once.

The model is the user's: the same objective as scikit-learn's lbfgs/newton solvers (``sklearn/linear_model/
_logistic.py``), per subset S with its classes K_S = unique(y_S):

    mean over i in S of the cross-entropy of softmax(W x_i + b) restricted to K_S  +  ||W||^2 / (2 C |S|)

with the intercept unpenalised; for |K_S| = 2 scikit-learn fits one binary weight vector w, which is the
symmetric softmax pair (W_1 = -W_0 = w / 2) with twice the penalty, so that is what we do. |K_S| = 1 fails as in
scikit-learn (the default score). Only the solver differs: a vectorised L-BFGS (memory 10, backtracking Armijo
line search) runs on all subsets of a batch together, with scikit-learn's own stopping rule (max |gradient| <=
``tol``, at most ``max_iter`` iterations), so each model equals scikit-learn's within the solver's tolerance. What
it saves is scikit-learn's per-iteration Python overhead (~1 ms, for microseconds of arithmetic on small
subsets): with several permutations walked side by side (``TMCShapleyValuation(batch_size=P, prefix_block=1)``:
nothing is fitted after a truncation), each step fits one prefix of every permutation in one call, each started
from its previous prefix's solution (a warm start: the same optimum, fewer iterations).
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.utility import FIT_FAILED, OK, Utility


def _check_model(model) -> dict:
    from sklearn.linear_model import LogisticRegression

    if not isinstance(model, LogisticRegression):
        raise UserError(f"LogisticUtility needs an sklearn LogisticRegression, got {type(model).__name__}")
    p = model.get_params()
    unsupported = {"penalty": p["penalty"] not in ("deprecated", "l2"), "l1_ratio": p["l1_ratio"] not in (0, 0.0, None),
                   "class_weight": p["class_weight"] is not None, "dual": bool(p["dual"]),
                   "solver": p["solver"] == "liblinear"}  # liblinear penalises the intercept: another model
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"LogisticUtility fits L2-penalised (multinomial) logistic regression; the model sets "
                        f"{', '.join(f'{k}={p[k]!r}' for k in bad)}: use ModelUtility for it")
    if not float(p["C"]) > 0:
        raise UserError(f"LogisticRegression needs C > 0, got {p['C']}")
    return p


class _Problems:
    """Objective and gradient of B subset problems (parameters (B, d + 1, K), the last row the intercept)."""

    def __init__(self, Xa, y, masks, classes, C, fit_intercept):
        self.Xa, self.K = Xa, len(classes)
        n_s = masks.sum(1)
        self.w = masks / n_s[:, None]  # (B, n): the mean over S
        self.onehot = (y[None, :] == classes[:, None]).T.astype(float)  # (n, K)
        present = (masks.astype(float) @ self.onehot) > 0  # (B, K): the subset's classes
        self.absent = np.where(present, 0.0, -np.inf)[:, None, :]
        factor = np.where(present.sum(1) == 2, 2.0, 1.0)  # binary: one vector w = the symmetric pair
        self.lam = factor / (C * n_s)  # (B,)
        self.pen = np.ones((Xa.shape[1], 1))
        if fit_intercept:
            self.pen[-1] = 0.0
        self.n_present = present.sum(1)

    def __call__(self, W, sel):
        b, dp, K = W.shape  # one GEMM for all problems: (n, d') @ (d', b K)
        Z = (self.Xa @ W.transpose(1, 0, 2).reshape(dp, b * K)).reshape(-1, b, K).transpose(1, 0, 2)
        Z = Z + self.absent[sel]  # (b, n, K)
        m = Z.max(-1, keepdims=True)
        E = np.exp(Z - m)
        tot = E.sum(-1, keepdims=True)
        lse = m + np.log(tot)
        w = self.w[sel]
        zy = (np.where(np.isfinite(Z), Z, 0.0) * self.onehot).sum(-1)  # rows outside S may have absent labels
        ce = (lse[..., 0] - zy) * w
        PW = self.pen[None] * W
        lam = self.lam[sel]
        f = ce.sum(1) + 0.5 * lam * (PW * W).sum((1, 2))
        dZ = (E / tot - self.onehot[None]) * w[..., None]
        G = (self.Xa.T @ dZ.transpose(1, 0, 2).reshape(-1, b * K)).reshape(dp, b, K).transpose(1, 0, 2)
        G = G + lam[:, None, None] * PW
        return f, G


def fit_logistic_batch(X, y, masks, classes, *, C=1.0, fit_intercept=True, tol=1e-4, max_iter=100,
                       memory=10, init=None) -> np.ndarray:
    """Parameters (B, d + 1, K) of the logistic regressions on the row subsets ``masks`` (B, n), starting from
    ``init`` (same shape; zeros, scikit-learn's start, if None).

    The working arrays hold the problems still iterating only (a finished problem never resumes), so every
    active problem has the same history length and all updates are plain slices."""
    X = np.asarray(X, float).reshape(len(X), -1)
    Xa = np.hstack([X, np.ones((len(X), 1))]) if fit_intercept else X
    prob = _Problems(Xa, np.asarray(y), np.asarray(masks, bool), np.asarray(classes), float(C), fit_intercept)
    B, shape = len(masks), (Xa.shape[1], prob.K)
    P = shape[0] * shape[1]
    out = np.zeros((B, P)) if init is None else np.array(init, float).reshape(B, P)
    ids = np.arange(B)  # which problem each working row is
    f, G = prob(out.reshape(B, *shape), ids)
    x, g = out.copy(), G.reshape(B, P)
    S, Yh, rho = np.zeros((memory, B, P)), np.zeros((memory, B, P)), np.zeros((memory, B))
    keep = np.abs(g).max(1) > tol
    for k in range(int(max_iter) + 1):
        if not keep.all():  # retire finished problems
            out[ids[~keep]] = x[~keep]
            ids, x, g, f = ids[keep], x[keep], g[keep], f[keep]
            S, Yh, rho = S[:, keep], Yh[:, keep], rho[:, keep]
        if not len(ids) or k == int(max_iter):
            break
        slots = [(k - 1 - j) % memory for j in range(min(k, memory))]  # newest pair first
        q, alphas = g.copy(), []
        for sl in slots:  # two-loop recursion
            a = rho[sl] * np.einsum("bp,bp->b", S[sl], q)
            q -= a[:, None] * Yh[sl]
            alphas.append(a)
        if slots:
            sy = np.einsum("bp,bp->b", S[slots[0]], Yh[slots[0]])
            yy = np.einsum("bp,bp->b", Yh[slots[0]], Yh[slots[0]])
            gamma = np.where((sy > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
        else:
            gamma = 1.0 / np.maximum(1.0, np.abs(g).sum(1))
        q *= gamma[:, None]
        for sl, a in zip(reversed(slots), reversed(alphas)):
            q += S[sl] * (a - rho[sl] * np.einsum("bp,bp->b", Yh[sl], q))[:, None]
        d = -q
        gd = np.einsum("bp,bp->b", g, d)
        uphill = gd >= 0
        if uphill.any():  # not a descent direction: restart along the gradient
            d[uphill] = -g[uphill]
            gd[uphill] = -np.einsum("bp,bp->b", g[uphill], g[uphill])
        t = np.ones(len(ids))
        xn, fn, gn = x + d, np.empty(len(ids)), np.empty_like(g)
        todo = np.arange(len(ids))
        for _ls in range(40):  # backtracking until Armijo holds, for the problems still searching
            ft, Gt = prob(xn[todo].reshape(len(todo), *shape), ids[todo])
            ok = ft <= f[todo] + 1e-4 * t[todo] * gd[todo]
            fn[todo[ok]], gn[todo[ok]] = ft[ok], Gt.reshape(len(todo), P)[ok]
            todo = todo[~ok]
            if not len(todo):
                break
            t[todo] *= 0.5
            xn[todo] = x[todo] + t[todo, None] * d[todo]
        stuck = np.zeros(len(ids), bool)
        if len(todo):  # no decrease at machine precision: these stop where they are
            stuck[todo] = True
            xn[todo], fn[todo], gn[todo] = x[todo], f[todo], g[todo]
        s, yv = xn - x, gn - g
        sy = np.einsum("bp,bp->b", s, yv)
        sl = k % memory
        S[sl], Yh[sl] = s, yv
        rho[sl] = np.where(sy > 1e-12, 1.0 / np.where(sy > 1e-12, sy, 1.0), 0.0)
        small = (f - fn) <= 64 * np.finfo(float).eps * np.maximum(np.maximum(np.abs(f), np.abs(fn)), 1.0)
        x, f, g = xn, fn, gn
        keep = (np.abs(g).max(1) > tol) & ~small & ~stuck
    out[ids] = x
    return out.reshape(B, *shape)


class _Fitted:
    """A fitted model of one subset, for scorers that need ``predict`` / ``predict_proba``."""

    def __init__(self, W, classes, present, fit_intercept):
        self.W, self.classes_all, self.present, self.fit_intercept = W, classes, present, fit_intercept
        self.classes_ = classes[present]

    def decision(self, X):
        X = np.asarray(X, float).reshape(len(X), -1)
        Z = X @ self.W[:-1] + self.W[-1] if self.fit_intercept else X @ self.W
        return Z[:, self.present]

    def predict(self, X):
        return self.classes_[self.decision(X).argmax(1)]

    def predict_proba(self, X):
        Z = self.decision(X)
        E = np.exp(Z - Z.max(1, keepdims=True))
        return E / E.sum(1, keepdims=True)


class LogisticUtility(Utility):
    """u(S) = scorer(``LogisticRegression`` fitted on S), the fits of a batch done together (module docstring).
    Reads ``C``, ``fit_intercept``, ``tol`` and ``max_iter`` from ``model``; ``max_batch`` subsets per call."""

    batches_models = True

    def __init__(self, model, scorer, *, max_batch: int = 256, **kw):
        super().__init__(scorer, **kw)
        p = _check_model(model)
        self.model, self.max_batch = model, int(max_batch)
        self.C, self.fit_intercept = float(p["C"]), bool(p["fit_intercept"])
        self.tol, self.max_iter = float(p["tol"]), int(p["max_iter"])

    @property
    def preferred_batch(self) -> int:
        return self.max_batch

    def _bind(self, data) -> None:
        if data.is_grouped:
            raise UserError("LogisticUtility values single points; pass an ungrouped Dataset")
        self._classes = np.unique(np.asarray(data.y))
        self._last = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_last"] = None
        return state

    def worker_copy(self):
        u = super().worker_copy()
        u._last = None
        return u

    def _warm_init(self, masks, shape):
        """Start each subset from the last call's solution of its largest subset (along a permutation: the
        previous prefix), zeros otherwise; the optimum is the same, it is reached in fewer iterations."""
        init = np.zeros((len(masks),) + shape)
        if self._last is None:
            return init
        prev, W = self._last
        size = prev.sum(1)
        inside = (masks.astype(np.float32) @ prev.T.astype(np.float32)) == size[None, :]  # prev subset of new
        best = np.where(inside, size[None, :], -1).argmax(1)
        has = inside[np.arange(len(masks)), best]
        init[has] = W[best[has]]
        return init

    def _compute(self, masks):
        X, y = np.asarray(self.data.x), np.asarray(self.data.y)
        onehot = y[None, :] == self._classes[:, None]
        present = (masks.astype(float) @ onehot.T.astype(float)) > 0
        ok = present.sum(1) >= 2
        scores = np.zeros((len(masks),) + (() if self.n_outputs is None else (self.n_outputs,)))
        status = np.where(ok, OK, FIT_FAILED).astype(np.int8)
        if not self.catch_errors and not ok.all():
            raise UserError(f"fitting {self} on a subset of {int(masks[~ok][0].sum())} points failed: "
                            "it has one class only. Pass catch_errors=True to score such subsets with the default")
        idx = np.flatnonzero(ok)
        shape = (X.reshape(len(X), -1).shape[1] + int(self.fit_intercept), len(self._classes))
        for s in range(0, len(idx), self.max_batch):
            part = idx[s:s + self.max_batch]
            W = fit_logistic_batch(X, y, masks[part], self._classes, C=self.C, fit_intercept=self.fit_intercept,
                                   tol=self.tol, max_iter=self.max_iter, init=self._warm_init(masks[part], shape))
            for j, b in enumerate(part):
                scores[b] = self.scorer(_Fitted(W[j], self._classes, present[b], self.fit_intercept))
            self._last = (masks[part], W)
        nan = ~np.isfinite(scores.reshape(len(masks), -1)).all(1) & ok  # NaN or inf, as in ModelUtility
        if np.count_nonzero(nan):
            status[nan] = self._nan_status(int(masks[int(np.argmax(nan))].sum()))
        return scores, status

    def __str__(self):
        return "LogisticUtility(LogisticRegression)"
