"""The method families of the attribution job, each run on one ``Problem`` (a model, its data, its full-data
network and the ground truth). Every runner returns rows for ``datamatters.evaluation.attribution``.

Damping (``damping_rule``): Kronfluence's default, ``factor * mean eigenvalue`` of the curvature (factor 0.1), with
the Gauss-Newton curvature of the full-data model (dense when small, Hutchinson's trace estimate otherwise). TRAK's
kernel is the projected empirical Fisher, whose mean eigenvalue is ``E||g||^2 / k``; DataInf keeps its own per-layer
rule (``auto``). A number in a row's ``regularization`` overrides the rule; ``select`` picks the grid factor with
the best LDS on held-out test points (never the scored ones); the table reports what was used.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datamatters.errors import UserError
from datamatters.evaluation.attribution import Measure, lds_one_target
from datamatters.evaluation.metrics import lds_from_scores


@dataclass
class Problem:
    name: str
    template: nn.Module           # architecture (weights unused)
    Xtr: torch.Tensor
    ytr: torch.Tensor
    Xte: torch.Tensor             # the scored test points (num_test)
    yte: torch.Tensor
    recipe: dict                  # train_ensemble arguments: epochs, batch_size, lr, weight_decay, optimizer
    seed: int
    dtype: torch.dtype
    full: nn.Module               # the full-data model every gradient method explains (eval, dtype)
    train_s: float                # seconds of one full-data training
    gt_masks: np.ndarray          # (M, n) ground-truth subsets
    gt_margins: np.ndarray        # (M, T) seed-averaged margins on the scored test points
    gt_loss: np.ndarray           # (M, T) seed-averaged losses
    n_boot: int
    device: Any = None
    held_out: Any = None          # (X, y, margins (M, H)): test points after the scored ones, for choosing damping

    def lds(self, scores) -> dict:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (len(self.yte), len(self.ytr)):
            raise UserError(f"attribution scores {s.shape} do not match {len(self.yte)} test x {len(self.ytr)} train")
        if not np.isfinite(s).all():
            raise UserError("attribution scores hold NaN/inf (a diverged solver or a degenerate model)")
        return lds_from_scores(s, self.gt_masks, self.gt_margins, n_boot=self.n_boot, seed=self.seed)

    def train(self, masks: np.ndarray, seed: int, ids) -> dict[str, torch.Tensor]:
        from datamatters.training.ensemble import train_ensemble

        return train_ensemble(self.template, self.Xtr, self.ytr, masks, seed=seed, model_ids=list(ids),
                              device=self.device, **self.recipe)

    def network(self, params: dict[str, torch.Tensor], k: int = 0) -> nn.Module:
        m = copy.deepcopy(self.template)
        m.load_state_dict({n: v[k].detach().cpu() for n, v in params.items()}, strict=False)
        return m.to(self.dtype).eval()

    @property
    def data(self) -> list:
        return [(self.Xtr.to(self.dtype), self.ytr)]


def row(method: str, res: dict, m: Measure, *, group: str = "per_test", trainings: int = 0,
        grad_passes: int | None = None, damping: Any = None, family: str | None = None, train_s: float = 0.0,
        **extra) -> dict:
    return {"method": method, "group": group, "lds": float(res["mean"]), "ci_low": float(res["ci_low"]),
            "ci_high": float(res["ci_high"]), "seconds": round(m.seconds, 4),
            "cost_s": round(m.seconds + train_s, 4), "trainings": int(trainings), "grad_passes": grad_passes,
            "peak_mib": round(m.peak_mib, 2), "damping": damping, "family": family, **extra}


# ---- damping -------------------------------------------------------------------------------------------------
def curvature_spectrum(model: nn.Module, data: list, dense_limit: int = 5000, samples: int = 20) -> dict:
    """Mean (and, when dense, max/min) eigenvalue of the Gauss-Newton curvature of the mean training loss."""
    from datamatters.influence.blocks import make_blocks
    from datamatters.influence.curvature import Curvature
    from datamatters.influence.functional import ModelFunction

    fn = ModelFunction(model, F.cross_entropy, make_blocks(model, "full"))
    block = fn.blocks[0]
    curv = Curvature(fn, block, data, "gauss_newton")
    if block.size <= dense_limit:
        ev = torch.linalg.eigvalsh(curv.dense())
        return {"mean": float(ev.mean()), "max": float(ev.max()), "min": float(ev.min()), "dense": True}
    return {"mean": float(curv.diagonal(samples=samples).mean()), "max": None, "min": None, "dense": False}


def neg_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Minus TRAK's output function ``log(p_y / (1 - p_y))`` (= logit_y - logsumexp of the other logits), mean over
    the batch: gradients are those of the margin with the sign of a loss, so products of two are unchanged."""
    correct = logits.gather(1, y[:, None])[:, 0]
    label = torch.arange(logits.shape[1], device=logits.device) == y[:, None]  # (no one_hot: it breaks vmap)
    others = logits.masked_fill(label, float("-inf"))
    return (torch.logsumexp(others, 1) - correct).mean()


OUTPUTS = {"loss": F.cross_entropy, "margin": neg_margin}


def mean_sq_grad_norm(model: nn.Module, X, y, loss=F.cross_entropy) -> float:
    from datamatters.influence.tracin import GradientDotInfluence

    g = GradientDotInfluence(model, loss).fit([(X, y)]).feature_rows(X, y)
    return float((g ** 2).sum(1).mean())


# ---- influence functions, TracIn, the control -------------------------------------------------------------------
def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def influence_row(p: Problem, name: str, spec: DictConfig, factor: float, spectrum: dict,
                  grid: list[float] | None = None) -> dict:
    """One influence method on the full model; ``regularization: rule`` (default) is ``factor`` (or the row's own
    ``factor``) times the mean curvature eigenvalue, a number is used as it is, ``select``: the factor of ``grid``
    whose scores have the best LDS on ``p.held_out`` (each candidate fitted; all fits are charged)."""
    from datamatters.influence import METHODS

    spec = _plain(spec) or {}
    method = spec.get("method", name)
    if method not in METHODS or method == "trak":
        raise UserError(f"attribution.influence.{name}: method must be one of "
                        f"{sorted(set(METHODS) - {'trak'})}, got {method!r}")
    cls = METHODS[method]
    accepted = inspect.signature(cls.__init__).parameters
    kw = dict(spec.get("params") or {})
    reg = spec.get("regularization", "rule")
    if reg == "select":
        if p.held_out is None or not grid:
            raise UserError(f"attribution.influence.{name}: regularization=select needs held-out test points and "
                            "attribution.damping_select.grid")
        lams = [float(f) * spectrum["mean"] for f in grid]
    else:
        lams = [float(spec.get("factor", factor)) * spectrum["mean"] if reg == "rule" else reg]
    if "curvature" in accepted:
        kw["curvature"] = spec.get("curvature", "gauss_newton")
    if "block_structure" in accepted and spec.get("block_structure"):
        kw["block_structure"] = spec["block_structure"]
    Xq, yq = p.Xte, p.yte
    if len(lams) > 1:
        Xq, yq = torch.cat([p.held_out[0], p.Xte]), torch.cat([p.held_out[1], p.yte])
    H, fits, chosen = len(yq) - len(p.yte), [], None
    with Measure() as m:
        for lam in lams:
            kw_l = {**kw, "regularization": lam}
            if method == "lissa" and spectrum.get("max") is not None and isinstance(lam, (int, float)):
                kw_l.setdefault("scale", 1.2 * (spectrum["max"] + lam))  # the Neumann series must contract
            try:
                inf = cls(copy.deepcopy(p.full), F.cross_entropy, **kw_l)
            except TypeError as exc:
                raise UserError(f"attribution.influence.{name}: {exc}") from exc
            inf.fit(p.data)
            S = inf.influences(Xq.to(p.dtype), yq, p.Xtr.to(p.dtype), p.ytr).cpu().numpy()
            held = lds_from_scores(S[:H], p.gt_masks, p.held_out[2], n_boot=1)["mean"] if H else None
            fits.append((held, lam, S[H:]))
        chosen = max(fits, key=lambda f: f[0] if np.isfinite(f[0]) else -np.inf) if H else fits[0]
    extra = {"held_out_lds": {f"{f[1]:.4g}": round(float(f[0]), 4) for f in fits}} if H else {}
    return row(name, p.lds(chosen[2]), m, trainings=1, grad_passes=len(lams), damping=chosen[1],
               train_s=p.train_s, curvature=kw.get("curvature"), family=spec.get("family"), **extra)


def graddot_row(p: Problem) -> dict:
    from datamatters.influence.tracin import GradientDotInfluence

    with Measure() as m:
        inf = GradientDotInfluence(copy.deepcopy(p.full), F.cross_entropy).fit(p.data)
        scores = inf.influences(p.Xte.to(p.dtype), p.yte, p.Xtr.to(p.dtype), p.ytr).cpu().numpy()
    return row("control: grad dot", p.lds(scores), m, trainings=1, grad_passes=1, damping=None, train_s=p.train_s)


def tracin_row(p: Problem, epochs: list[int]) -> dict:
    """TracInCP over checkpoints of the full-data run after each of ``epochs``. The batched trainer keys inits and
    batch orders by (seed, model id, epoch), so training for e epochs reproduces that run's state at epoch e; those
    replays stand in for checkpoints saved during the one run, so they are not charged (one training is)."""
    from datamatters.influence.tracin import TracInInfluence
    from datamatters.training.ensemble import train_ensemble

    E = int(p.recipe["epochs"])
    epochs = sorted({int(e) for e in epochs})
    if epochs and (epochs[0] < 1 or epochs[-1] > E):
        raise UserError(f"attribution.tracin_epochs must lie in 1..{E} (the training epochs), got {epochs}")
    ones = np.ones((1, len(p.ytr)), bool)
    ckpts = []
    for e in epochs:
        params = train_ensemble(p.template, p.Xtr, p.ytr, ones, seed=p.seed, model_ids=[0], device=p.device,
                                **{**p.recipe, "epochs": e})
        ckpts.append({k: v[0] for k, v in params.items()})
    with Measure() as m:
        inf = TracInInfluence(copy.deepcopy(p.full), F.cross_entropy, checkpoints=ckpts,
                              learning_rates=float(p.recipe["lr"])).fit(p.data)
        scores = inf.influences(p.Xte.to(p.dtype), p.yte, p.Xtr.to(p.dtype), p.ytr).cpu().numpy()
    return row(f"tracin ({len(epochs)} ckpts)", p.lds(scores), m, trainings=1, grad_passes=len(epochs),
               train_s=p.train_s)


# ---- TRAK over independently trained models --------------------------------------------------------------------
def trak_scores(p: Problem, models: list[nn.Module], k: int, lam: float, output: str, dtype=None) -> np.ndarray:
    """(C, T, n) TRAK matrices of the members (member c projected with seed c), all in one batched pass
    (``trak_ensemble``; the same numbers as one ``TrakInfluence`` per member). ``loss``: loss gradients on both sides
    (the orientation of the influence rows); ``margin``: TRAK's own form, margin gradients and each train column
    times ``Q = 1 - p_y`` (the out-to-loss factor; traker multiplies by its mean over members, ``trak_rows`` does
    the same). ``dtype``: the compute precision (``None``: the problem's)."""
    from datamatters.influence.trak import trak_ensemble

    S = trak_ensemble(models, OUTPUTS[output], p.Xtr.to(p.dtype), p.ytr, p.Xte.to(p.dtype), p.yte,
                      projection_dim=int(k), regularization=lam, seeds=range(len(models)), dtype=dtype)
    return S.cpu().numpy()


def out_to_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        prob = torch.softmax(model(X.to(next(model.parameters()).dtype)), 1).gather(1, y[:, None])[:, 0]
    return (1 - prob).cpu().numpy()


def trak_rows(p: Problem, checkpoints: list[int], dims: list[int], factor: float, seed: int, g2: dict,
              outputs: tuple[str, ...] = ("loss",), dtype: str | None = None) -> list[dict]:
    """TRAK ensembles: ``c`` models trained on all data from independent inits (ids under ``seed``), one projected
    kernel each, score matrices averaged; cost = c trainings + c TRAK fits. ``g2[output]``: E||g||^2 of the full
    model, so lambda = factor x the mean eigenvalue of the projected kernel. All C members are scored in one batched
    pass; the seconds of ``c`` members are c/C of it. ``dtype`` (e.g. ``"float32"``): the compute precision, named
    in the rows' labels when it is not the problem's."""
    import time

    C = max(checkpoints)
    ones = np.ones((C, len(p.ytr)), bool)
    t = time.perf_counter()
    params = p.train(ones, seed, range(C))
    per_train = (time.perf_counter() - t) / C
    rows = []
    prec = "" if dtype is None or str(dtype) == str(p.dtype).replace("torch.", "") else f", {dtype}"
    for output in outputs:
        tag = "trak" if output == "loss" else f"trak-{output}"
        for k in dims:
            lam = factor * g2[output] / k
            with Measure() as whole:
                nets = [p.network(params, c) for c in range(C)]
                mats = trak_scores(p, nets, k, lam, output, dtype)
                qs = [out_to_loss(net, p.Xtr, p.ytr) for net in nets] if output == "margin" else None
            for c in sorted(set(checkpoints)):
                m = Measure()
                m.seconds, m.peak_mib = whole.seconds * c / C, whole.peak_mib
                S = np.mean(mats[:c], axis=0)
                if output == "margin":
                    S = S * np.mean(qs[:c], axis=0)[None, :]
                rows.append(row(f"{tag}-{c} (k={k}{prec})", p.lds(S), m, trainings=c, grad_passes=c, damping=lam,
                                family=f"{tag} k={k}", train_s=c * per_train))
    return rows


# ---- datamodels -------------------------------------------------------------------------------------------------
def datamodels_rows(p: Problem, store, sizes: list[int], per_model_s: float, fit_kw: dict) -> list[dict]:
    from datamatters.datamodels import fit_datamodels

    done = store.completed_rows()
    rows = []
    for mdl in sorted({int(s) for s in sizes}):
        if mdl > len(done):
            raise UserError(f"datamodels at {mdl} models: the store has {len(done)} completed rows")
        with Measure() as m:
            fit = fit_datamodels(store["masks"], store["margins"], done[:mdl], end=len(p.yte), **fit_kw)
        rows.append(row(f"datamodels-{mdl}", p.lds(fit.W.T), m, trainings=mdl, family="datamodels",
                        train_s=mdl * per_model_s))
    return rows


# ---- KNN-Shapley per test point on penultimate features ----------------------------------------------------------
def penultimate(model: nn.Module, X: torch.Tensor) -> np.ndarray:
    """Inputs of the last Linear layer (the raw flattened inputs for a linear model)."""
    last = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    if not last:
        raise UserError(f"{type(model).__name__} has no Linear layer to take penultimate features from")
    out = {}
    h = last[-1].register_forward_pre_hook(lambda mod, args: out.setdefault("z", args[0].detach()))
    try:
        with torch.no_grad():
            model(X.to(next(model.parameters()).dtype))
    finally:
        h.remove()
    return out["z"].reshape(len(X), -1).cpu().numpy()


def knn_row(p: Problem, k: int) -> dict:
    from datamatters.valuation.knn import knn_shapley_values, sorted_neighbours

    with Measure() as m:
        ztr, zte = penultimate(p.full, p.Xtr), penultimate(p.full, p.Xte)
        order = sorted_neighbours(zte, ztr)
        ytr, yte = p.ytr.numpy(), p.yte.numpy()
        scores = np.stack([knn_shapley_values(order[t:t + 1], ytr, yte[t:t + 1], int(k)) for t in range(len(yte))])
    return row(f"knn-shapley (k={k})", p.lds(scores), m, trainings=1, grad_passes=0, train_s=p.train_s,
               family="knn")


# ---- global values: one-target LDS on the mean test loss ----------------------------------------------------------
def valuation_row(p: Problem, name: str, spec: DictConfig, seed: int) -> dict:
    from datamatters.valuation import (Dataset, MaxTime, MaxUpdates, MSRBanzhafValuation, RelativeTruncation,
                                       SupervisedScorer, TMCShapleyValuation, TorchUtility)
    from datamatters.valuation.data_oob import DataOOBValuation

    spec = _plain(spec) or {}
    train = Dataset(p.Xtr.numpy(), p.ytr.numpy())
    test = Dataset(p.Xte.numpy(), p.yte.numpy())
    n_classes = int(max(int(p.ytr.max()), int(p.yte.max())) + 1)
    recipe = {k: p.recipe[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "momentum")
              if k in p.recipe}

    def utility():
        scorer = SupervisedScorer("neg_log_loss", test, default=-math.log(n_classes))
        return TorchUtility(p.template, scorer, seed=seed, max_models=int(spec.get("max_models", 256)), **recipe)

    stop = MaxUpdates(int(spec.get("max_updates", 100))) | MaxTime(float(spec.get("max_time_s", 600)))
    with Measure() as m:
        if name == "tmc_shapley":
            v = TMCShapleyValuation(utility(), RelativeTruncation(float(spec.get("rtol", 0.01)),
                                                                  float(spec.get("burn_in_fraction", 0.4))),
                                    stop, seed=seed)
        elif name == "banzhaf_msr":
            v = MSRBanzhafValuation(utility(), stop, seed=seed)
        elif name == "data_oob":
            v = DataOOBValuation(p.template, n_estimators=int(spec.get("n_estimators", 100)), seed=seed,
                                 torch_kw=recipe)
        else:  # pragma: no cover - names are checked in settings()
            raise UserError(f"unknown global value method {name!r}")
        result = v.fit(train).result
    values = np.asarray(result.values, np.float64)
    if not np.isfinite(values).all():
        raise UserError(f"{name}: {int((~np.isfinite(values)).sum())} values are NaN/inf; give it a larger budget")
    evals = int(result.meta.get("utility_evaluations", 0)) if name != "data_oob" else int(spec.get("n_estimators", 100))
    # a value predicts the utility (minus the mean test loss) of a subset as the sum of its points' values
    res = lds_one_target(p.gt_masks.astype(float) @ values, -p.gt_loss.mean(1), n_boot=p.n_boot, seed=p.seed)
    return row(name, res, m, group="global", trainings=evals, grad_passes=0, family="global")

