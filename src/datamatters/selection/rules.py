"""Selection rules: pure functions from big-batch statistics to the positions to train on.

Each rule takes ``k`` (how many to select) and the tensors it needs (``loss``: per-example train loss of the target
model, ``il``: irreducible loss, ``logits``/``targets``, ``mc_logits`` (S, n_B, C) for MC-dropout rules) and returns a
``Selection``: positions in the big batch and optional per-example loss weights (importance sampling only).
Deterministic rules break ties by position (stable sort), so results never depend on the backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from datamatters.errors import UserError


@dataclass
class Selection:
    idx: torch.Tensor
    weights: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    stats: dict | None = None  # the rule's own diagnostics (sampling entropy, IS max p...), logged as selection/<key>


def n_select(n_big: int, percent_train: float) -> int:
    """n_b = max(1, int(percent_train * n_B)), with percent_train in (0, 1]."""
    if not (0.0 < float(percent_train) <= 1.0):
        raise UserError(f"selection.percent_train must be in (0, 1], got {percent_train}")
    return min(n_big, max(1, int(percent_train * n_big)))


def _check(name: str, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise ValueError(f"this selection rule needs {name}")
    if not torch.isfinite(t).all():
        raise UserError(f"non-finite {name} in the big batch ({int((~torch.isfinite(t)).sum())} of {t.numel()} "
                        f"values): training diverged; lower the learning rate (optimizer.lr)")
    return t


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest scores; ties go to the earlier position."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def reducible_loss(k: int, *, loss, il, **_) -> Selection:
    """RHO-LOSS: the points with the highest reducible holdout loss, train loss minus irreducible loss."""
    s = _check("loss", loss) - _check("irreducible loss", il)
    return Selection(top_k(s, k), scores=s)


def uniform(k: int, *, loss=None, generator: torch.Generator | None = None, n: int | None = None, **_) -> Selection:
    n = len(loss) if loss is not None else int(n)
    return Selection(torch.randperm(n, generator=generator, device="cpu")[:k].to(loss.device if loss is not None else "cpu"))


def ce_loss(k: int, *, loss, **_) -> Selection:
    """Highest training loss (Loshchilov & Hutter / Kawaguchi & Lu style)."""
    s = _check("loss", loss)
    return Selection(top_k(s, k), scores=s)


def grad_norm_bound(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """||softmax(logits) - onehot(y)||_2: the last-layer gradient-norm upper bound (Katharopoulos & Fleuret)."""
    p = torch.softmax(logits.float(), -1)
    return torch.linalg.vector_norm(p - F.one_hot(targets, p.shape[-1]).float(), dim=-1)


def gradnorm_ub(k: int, *, logits, targets, **_) -> Selection:
    s = _check("grad-norm bound", grad_norm_bound(logits, targets))
    return Selection(top_k(s, k), scores=s)


def irreducible_loss(k: int, *, il, **_) -> Selection:
    """Smallest irreducible loss (the paper's 'IL only' ablation)."""
    s = -_check("irreducible loss", il)
    return Selection(top_k(s, k), scores=s)


def epoch_temperature(epoch: int, schedule: str = "fixed", start: float = 0.25, increment: float = 0.0,
                      factor: float = 1.0) -> float:
    """The reference's per-epoch Boltzmann temperature (``epoch`` counted from 0, so the first epoch runs at
    ``start``): fixed ``start``; linear ``start + increment * epoch``; geometric ``start * factor ** epoch``."""
    if schedule == "fixed":
        t = float(start)
    elif schedule == "linear":
        t = float(start + increment * epoch)
    elif schedule == "geometric":
        t = float(start * factor ** epoch)
    else:
        raise UserError(f"unknown temperature schedule {schedule!r}; use fixed, linear or geometric")
    if not t > 0:
        raise UserError(f"the Boltzmann temperature reached {t} at epoch {epoch}; it must stay > 0 "
                        f"(check selection.temperature)")
    return t


def temperature_at(step: int, total: int, schedule: str = "fixed", start: float = 1.0, end: float = 0.1) -> float:
    """``boltzmann_stepwise`` temperature: fixed, or linear/geometric interpolation from ``start`` to ``end`` over
    ``total`` optimiser steps (this process's steps: under DDP each rank counts its own)."""
    frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
    if schedule == "fixed":
        return float(start)
    if schedule == "linear":
        return float(start + frac * (end - start))
    if schedule == "geometric":
        return float(start * (end / start) ** frac)
    raise UserError(f"unknown temperature schedule {schedule!r}; use fixed, linear or geometric")


def _boltzmann_probs(loss, il, temperature: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if not temperature > 0:
        raise UserError("boltzmann temperature must be > 0")
    s = _check("loss", loss) - _check("irreducible loss", il)
    p = torch.softmax(s.float() / temperature, 0)
    ent = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
    return s, p, {"boltzmann_entropy": ent, "temperature": float(temperature)}


def boltzmann(k: int, *, loss, il, temperature: float = 0.25, generator=None, **_) -> Selection:
    """The reference's Boltzmann RHO-LOSS: k draws *with replacement* from softmax(reducible loss / T) (a point
    drawn twice is trained on twice)."""
    s, p, stats = _boltzmann_probs(loss, il, temperature)
    idx = torch.multinomial(p.cpu(), k, replacement=True, generator=generator).to(s.device)
    return Selection(idx, scores=s, stats=stats | {"unique": float(len(torch.unique(idx)))})


def boltzmann_stepwise(k: int, *, loss, il, temperature: float = 1.0, generator=None, **_) -> Selection:
    """This framework's earlier variant (a named option): k distinct points without replacement, the temperature
    interpolated per optimiser step (``temperature_at``)."""
    s, p, stats = _boltzmann_probs(loss, il, temperature)
    idx = torch.multinomial(p.cpu(), k, replacement=False, generator=generator).to(s.device)
    return Selection(idx, scores=s, stats=stats)


def gradnorm_is(k: int, *, logits, targets, generator=None, **_) -> Selection:
    """Importance sampling proportional to the gradient-norm bound, with replacement; weights 1 / (n_B p_i) keep the
    gradient unbiased (Katharopoulos & Fleuret 2018)."""
    g = _check("grad-norm bound", grad_norm_bound(logits, targets)).clamp_min(1e-12)
    p = g / g.sum()
    idx = torch.multinomial(p.cpu(), k, replacement=True, generator=generator).to(g.device)
    return Selection(idx, weights=1.0 / (len(g) * p[idx]), scores=g,
                     stats={"is_max_p": float(p.max()), "unique": float(len(torch.unique(idx)))})


def _mc_probs(mc_logits: torch.Tensor) -> torch.Tensor:
    _check("MC-dropout logits", mc_logits)
    return torch.softmax(mc_logits.float(), -1)  # (S, n, C)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def entropy(k: int, *, mc_logits, **_) -> Selection:
    """Predictive entropy H[E_w p(y|x,w)] over MC-dropout samples (max-entropy acquisition)."""
    s = _entropy(_mc_probs(mc_logits).mean(0))
    return Selection(top_k(s, k), scores=s)


def conditional_entropy(k: int, *, mc_logits, **_) -> Selection:
    """Expected entropy E_w H[p(y|x,w)] (aleatoric part)."""
    s = _entropy(_mc_probs(mc_logits)).mean(0)
    return Selection(top_k(s, k), scores=s)


def bald(k: int, *, mc_logits, **_) -> Selection:
    """BALD mutual information H[E_w p] - E_w H[p] (Houlsby et al. 2011)."""
    p = _mc_probs(mc_logits)
    s = _entropy(p.mean(0)) - _entropy(p).mean(0)
    return Selection(top_k(s, k), scores=s)


RULES: dict[str, Callable[..., Selection]] = {
    "reducible_loss": reducible_loss,
    "uniform": uniform,
    "ce_loss": ce_loss,
    "gradnorm_ub": gradnorm_ub,
    "irreducible_loss": irreducible_loss,
    "boltzmann": boltzmann,
    "boltzmann_stepwise": boltzmann_stepwise,
    "gradnorm_is": gradnorm_is,
    "entropy": entropy,
    "conditional_entropy": conditional_entropy,
    "bald": bald,
}
NEEDS_IL = {"reducible_loss", "irreducible_loss", "boltzmann", "boltzmann_stepwise"}
NEEDS_MC = {"entropy", "conditional_entropy", "bald"}


def get_rule(name: str) -> Callable[..., Selection]:
    if name not in RULES:
        raise UserError(f"unknown selection method {name!r}; choose one of {sorted(RULES)} (or 'svp')")
    return RULES[name]


def percentiles(x: torch.Tensor, qs=(10, 50, 90)) -> dict[str, float]:
    if x.numel() == 0:
        return {}
    q = torch.quantile(x.float().cpu(), torch.tensor([q / 100 for q in qs]))
    return {f"p{q}": float(v) for q, v in zip(qs, q)}


