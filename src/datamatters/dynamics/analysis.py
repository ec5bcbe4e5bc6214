"""Reading a fitted HMM: Viterbi states, canonical state order, the training map's numbers, detour states, and which
features drive each transition.

Fixes of the reference's analysis: p-values of the state/convergence correlation are two-sided for either sign of r
(``2 * t.sf(|t|)``; the reference's ``2 * (1 - t.cdf(t))`` exceeds 1 for negative r); the feature-importance
normaliser sums the per-state gradients over states (a vector), where the reference's ``np.sum`` collapsed it to one
number. The gradient comes from torch autograd on a reimplementation of the forward filter (checked against the
closed form and finite differences in the tests).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from datamatters.dynamics.hmm import HMMParams
from datamatters.errors import UserError


def split_by_lengths(X: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    ends = np.cumsum(lengths)
    return [X[e - n:e] for n, e in zip(lengths, ends)]


def viterbi(params: HMMParams, X: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """Most likely state path of each sequence (hmmlearn's Viterbi)."""
    from threadpoolctl import threadpool_limits

    if len(X) == 0:
        return []
    with threadpool_limits(1):
        states = params.to_model().predict(np.asarray(X, dtype=np.float64), lengths=list(lengths))
    return split_by_lengths(states, lengths)


def first_visits(paths: Sequence[np.ndarray], k: int, times: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """(runs, K) time of the first visit of each state (NaN when never visited); ``times`` default to positions."""
    out = np.full((len(paths), k), np.nan)
    for r, path in enumerate(paths):
        t = np.arange(len(path)) if times is None else np.asarray(times[r])
        for s in range(k):
            hit = np.flatnonzero(path == s)
            if len(hit):
                out[r, s] = t[hit[0]]
    return out


def canonical_order(params: HMMParams, X: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """States sorted by mean first-visit checkpoint on ``X`` (unvisited states last, by index): the same dynamics
    found by two restarts get the same labels."""
    fv = first_visits(viterbi(params, X, lengths), params.k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.where(np.isnan(fv).all(0), np.inf, np.nanmean(fv, axis=0))
    return np.lexsort((np.arange(params.k), mean))


def occupancy(paths: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Fraction of all checkpoints spent in each state."""
    counts = np.bincount(np.concatenate(paths), minlength=k) if paths else np.zeros(k)
    return counts / max(counts.sum(), 1)


def transition_counts(paths: Sequence[np.ndarray], k: int) -> np.ndarray:
    """(K, K) number of observed i -> j switches (i != j) along the Viterbi paths."""
    C = np.zeros((k, k), dtype=np.int64)
    for p in paths:
        a, b = p[:-1], p[1:]
        np.add.at(C, (a[a != b], b[a != b]), 1)
    return C


def convergence_steps(tables: Sequence[pd.DataFrame], metric: str = "val_acc", threshold: float = 0.9,
                      higher_is_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """First step where ``metric`` crosses ``threshold`` (strictly, as the reference), per run, and whether it did.
    A run that never converges gets one recording interval past the longest run's last step (the reference's
    ``max_len`` in checkpoint units)."""
    for t in tables:
        if metric not in t.columns:
            raise UserError(f"convergence metric {metric!r} is not a column of the run tables "
                            f"(have {list(t.columns)[:25]}); set dynamics.convergence.metric")
    last = max(float(t["step"].iloc[-1]) for t in tables)
    intervals = np.concatenate([np.diff(t["step"].to_numpy(float)) for t in tables if len(t) > 1] or [[1.0]])
    never = last + float(np.median(intervals))
    steps, ok = [], []
    for t in tables:
        m = t[metric].to_numpy(float)
        hit = np.flatnonzero(m > threshold if higher_is_better else m < threshold)
        ok.append(len(hit) > 0)
        steps.append(float(t["step"].iloc[hit[0]]) if len(hit) else never)
    return np.asarray(steps), np.asarray(ok)


def pearson_two_sided(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(r, t, p) with the two-sided p-value of the t-test for r (NaN when x or y is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan
    r = float(np.corrcoef(x, y)[0, 1])
    r = min(max(r, -1.0), 1.0)
    if abs(r) == 1.0:
        return r, math.copysign(math.inf, r), 0.0
    t = r * math.sqrt(n - 2) / math.sqrt(1 - r * r)
    return r, t, float(2 * sps.t.sf(abs(t), df=n - 2))


def state_correlations(paths: Sequence[np.ndarray], conv: np.ndarray, k: int, alpha: float = 0.05) -> pd.DataFrame:
    """Per state: correlation of "run visited the state" with the run's convergence step (detour states: r > 0,
    p < alpha). A state visited by all runs or by none has r = NaN (obligatory / unused)."""
    rows = []
    for s in range(k):
        visited = np.array([float(np.any(p == s)) for p in paths])
        r, t, p = pearson_two_sided(visited, conv)
        rows.append({
            "state": s, "n_visited": int(visited.sum()), "visited_frac": float(visited.mean()) if len(visited) else 0.0,
            "r": r, "t": t, "p": p,
            "conv_visited": float(np.mean(conv[visited == 1])) if visited.any() else math.nan,
            "conv_not_visited": float(np.mean(conv[visited == 0])) if (visited == 0).any() else math.nan,
            "detour": bool(np.isfinite(r) and r > 0 and p < alpha),
        })
    return pd.DataFrame(rows)


# ---- feature importance of transitions ----------------------------------------------------------------------------
def _torch_params(params: HMMParams):
    dt = torch.float64
    cov = torch.as_tensor(params.full_covars(), dtype=dt)
    return (torch.as_tensor(params.startprob, dtype=dt).log(), torch.as_tensor(params.transmat, dtype=dt).log(),
            torch.as_tensor(params.means, dtype=dt), torch.linalg.cholesky(cov))


def log_emissions(z: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """(T, K) log N(z_t; mu_k, Sigma_k) from Cholesky factors."""
    d = z.shape[-1]
    diff = (z[:, None, :] - means[None]).unsqueeze(-1)  # (T, K, d, 1)
    y = torch.linalg.solve_triangular(chol.expand(z.shape[0], *chol.shape), diff, upper=False).squeeze(-1)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (d * math.log(2 * math.pi) + logdet[None] + y.square().sum(-1))


def forward_filter(params: HMMParams, z: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_alpha (T, K), log_prior (T, K))``: the forward lattice and, per step, the log predictive prior
    ``log sum_i alpha_{t-1}(i) A_ij`` (``log pi`` at t = 0), both without gradient."""
    log_pi, log_A, means, chol = _torch_params(params)
    with torch.no_grad():
        z = torch.as_tensor(z, dtype=torch.float64)
        log_b = log_emissions(z, means, chol)
        alpha, prior = torch.empty_like(log_b), torch.empty_like(log_b)
        prior[0] = log_pi
        alpha[0] = log_pi + log_b[0]
        for t in range(1, len(z)):
            prior[t] = torch.logsumexp(alpha[t - 1][:, None] + log_A, dim=0)
            alpha[t] = prior[t] + log_b[t]
    return alpha, prior


def filtered_posterior_grad(params: HMMParams, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(s_t = k | z_1:t) (T, K), d/dz_t of it (T, K, d))``; the derivative is taken w.r.t. the current
    observation with the past held fixed (torch autograd, one backward pass per state)."""
    _, _, means, chol = _torch_params(params)
    _, prior = forward_filter(params, z)
    zt = torch.as_tensor(np.asarray(z), dtype=torch.float64).clone().requires_grad_(True)
    log_alpha = prior + log_emissions(zt, means, chol)
    log_post = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
    grads = [torch.autograd.grad(log_post[:, k].sum(), zt, retain_graph=k < params.k - 1)[0] for k in range(params.k)]
    return log_post.detach().numpy(), torch.stack(grads, dim=1).numpy()


def closed_form_grad(params: HMMParams, z: np.ndarray, log_post: np.ndarray) -> np.ndarray:
    """Analytic d/dz_t log p(s_t = k | z_1:t) = P_k (mu_k - z_t) - sum_j p_tj P_j (mu_j - z_t), P = Sigma^-1 (the
    reference's formula with the sum over states kept as a vector)."""
    P = np.linalg.inv(params.full_covars())
    g = np.einsum("kde,tke->tkd", P, params.means[None] - z[:, None])
    return g - np.einsum("tk,tkd->td", np.exp(log_post), g)[:, None]


def transition_importance(params: HMMParams, seqs: Sequence[np.ndarray], paths: Sequence[np.ndarray],
                          features: Sequence[str], offset: int = 0, min_count: int = 1) -> pd.DataFrame:
    """For each observed switch i -> j: the mean over its occurrences of d log p(s_t = j | z_1:t) / dz_t, with t the
    last checkpoint in i (``offset=0``, the reference) or the first in j (``offset=1``), plus the change of the state
    means mu_j - mu_i. Long format, ranked by |importance| within each transition."""
    acc: dict[tuple[int, int], list[np.ndarray]] = {}
    for z, path in zip(seqs, paths):
        switch = np.flatnonzero(path[:-1] != path[1:])
        if not len(switch):
            continue
        _, grad = filtered_posterior_grad(params, z)
        for t in switch:
            i, j = int(path[t]), int(path[t + 1])
            acc.setdefault((i, j), []).append(grad[t + offset, j])
    rows = []
    for (i, j), gs in sorted(acc.items()):
        if len(gs) < min_count:
            continue
        mean = np.mean(gs, axis=0)
        change = params.means[j] - params.means[i]
        for rank, f in enumerate(np.argsort(-np.abs(mean), kind="stable")):
            rows.append({"from": i, "to": j, "count": len(gs), "feature": features[f], "importance": float(mean[f]),
                         "mean_change": float(change[f]), "rank": rank})
    return pd.DataFrame(rows, columns=["from", "to", "count", "feature", "importance", "mean_change", "rank"])
