"""Data valuation job: ``python run.py +experiment=digits_valuation valuation=<method>``.

Values a seeded subset of ``valuation.split`` (the noisy training split) with a utility scored on
``valuation.test_split``, then reports what users value data for: noisy-label detection (ROC AUC and F1 of
flagging the flipped labels by low value) and point-removal curves on ``valuation.eval_split``. Writes

* ``values.npz``: values keyed by global dataset index (``artifacts.save_indexed``, with split metadata);
* ``valuation_result.npz``: the full result (variances, counts, sampler state) that a re-run continues from;
* ``noisy_detection.png`` and ``point_removal.png`` (logged to W&B), ``summary.json`` with ``noisy/auc``,
  ``noisy/f1``, ``utility/evaluations``, ``time/*`` and the removal summary.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from datamatters.artifacts import save_indexed
from datamatters.errors import UserError
from datamatters.tasks.building import build_datamodule, build_network
from datamatters.tasks.common import job, log_image, log_metrics, make_loggers, print_summary, write_summary

METHODS = ("loo", "tmc_shapley", "banzhaf_msr", "beta_shapley", "knn_shapley", "data_oob", "owen_shapley",
           "classwise_shapley", "least_core")


def _vcfg(cfg: DictConfig) -> DictConfig:
    v = cfg.get("valuation")
    if v is None:
        raise UserError("no valuation config: pass valuation=<method> (or use +experiment=digits_valuation); "
                        f"methods: {', '.join(METHODS)}")
    if v.method not in METHODS:
        raise UserError(f"unknown valuation method {v.method!r}; choose one of {', '.join(METHODS)}")
    return v


# ---- data --------------------------------------------------------------------------------------------------------
def _split(dm, split: str):
    ds = dm.dataset(split)
    if not hasattr(ds, "tensors"):
        raise UserError(f"valuation needs an in-memory dataset (split {split!r} of {dm.name} is not)")
    idx, X, y = ds.tensors()
    return idx.numpy(), X.numpy(), y.numpy()


def _subset(v: DictConfig, n: int) -> np.ndarray:
    if v.n_train is None or int(v.n_train) >= n:
        return np.arange(n)
    if int(v.n_train) < 2:
        raise UserError(f"valuation.n_train must be at least 2, got {v.n_train}")
    return np.sort(np.random.default_rng([int(v.seed), 0x7A1]).choice(n, size=int(v.n_train), replace=False))


def load_problem(cfg: DictConfig, v: DictConfig):
    """(train, test, eval) Datasets, the global indices valued, their corruption flags, and the datamodule."""
    from datamatters.valuation import Dataset

    dm = build_datamodule(cfg)
    g, X, y = _split(dm, v.split)
    corrupted = np.asarray(dm.is_corrupted, bool) if v.split == "train" else np.zeros(len(g), bool)
    keep = _subset(v, len(g))
    g, X, y, corrupted = g[keep], X[keep], y[keep], corrupted[keep]
    _, Xt, yt = _split(dm, v.test_split)
    _, Xe, ye = _split(dm, v.eval_split)
    return Dataset(X, y, names=g), Dataset(Xt, yt), Dataset(Xe, ye), g, corrupted, dm


# ---- utilities ---------------------------------------------------------------------------------------------------
def _sklearn_model(u: DictConfig, seed: int):
    name = u.sklearn_model
    if name == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=float(u.C), max_iter=int(u.max_iter))
    if name == "gaussian_nb":
        from sklearn.naive_bayes import GaussianNB

        return GaussianNB()
    if name == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(5)
    if name == "tree":
        from sklearn.tree import DecisionTreeClassifier

        return DecisionTreeClassifier(random_state=seed)
    raise UserError(f"unknown valuation.utility.sklearn_model {name!r}; use logistic, gaussian_nb, knn or tree")


def _flatten(data):
    """The same points with image-shaped inputs flattened (sklearn models and KNN want vectors)."""
    from datamatters.valuation import Dataset

    return Dataset(data.x.reshape(len(data.x), -1), data.y, names=data.names)


def build_utility(cfg: DictConfig, v: DictConfig, dm, test, scorer=None, classwise: bool = False):
    """The utility u(S) for the configured backend, scored on ``test``."""
    from datamatters.valuation import ModelUtility, SupervisedScorer
    from datamatters.valuation.scorers import ClasswiseScorer

    u = v.utility
    if u.backend not in ("torch", "sklearn"):
        raise UserError(f"valuation.utility.backend must be torch or sklearn, got {u.backend!r}")
    if u.backend == "sklearn":
        test = _flatten(test)
    if scorer is None:
        scorer = ClasswiseScorer(test, default=float(u.default)) if classwise else \
            SupervisedScorer(u.scoring, test, default=float(u.default))
    common = dict(cache=bool(u.cache), n_jobs=v.n_jobs, dask_address=v.dask_address)
    if u.backend == "sklearn":
        return ModelUtility(_sklearn_model(u, int(v.seed)), scorer, show_warnings=False, **common)
    from datamatters.valuation.torch_utility import TorchUtility

    if u.get("threads"):
        import torch

        torch.set_num_threads(int(u.threads))
    return TorchUtility(build_network(cfg.model, dm), scorer, epochs=int(u.epochs), batch_size=int(u.batch_size),
                        lr=float(u.lr), optimizer=u.optimizer, weight_decay=float(u.weight_decay), seed=int(v.seed),
                        device=u.device, max_models=int(u.max_models), **common)


def build_stopping(v: DictConfig):
    from datamatters.valuation import (AbsoluteStandardError, HistoryDeviation, MaxChecks, MaxTime, MaxUpdates,
                                       MinUpdates, RankCorrelation)

    s = v.stopping
    rules = []
    if s.get("max_updates"):
        rules.append(MaxUpdates(int(s.max_updates)))
    if s.get("min_updates"):
        rules.append(MinUpdates(int(s.min_updates)))
    if s.get("max_checks"):
        rules.append(MaxChecks(int(s.max_checks)))
    if s.get("max_time_s"):
        rules.append(MaxTime(float(s.max_time_s)))
    if s.get("standard_error"):
        rules.append(AbsoluteStandardError(float(s.standard_error)))
    if s.get("rank_correlation"):
        rules.append(RankCorrelation(float(s.rank_correlation), burn_in=10))
    if s.get("history_deviation"):
        rules.append(HistoryDeviation(int(s.history_deviation.n_steps), float(s.history_deviation.rtol)))
    if not rules:
        raise UserError("valuation.stopping sets no rule; set at least max_updates, max_checks or max_time_s")
    rule = rules[0]
    for r in rules[1:]:
        rule = rule | r
    return rule


def build_method(cfg: DictConfig, v: DictConfig, dm, train, test):
    """The valuation object for ``v.method`` and the (possibly flattened) training data it values."""
    from datamatters.valuation import (AntitheticOwenSampler, AntitheticPermutationSampler, AntitheticSampler,
                                       BetaShapleyValuation, HarmonicSampleSize, LOOValuation, MSRBanzhafValuation,
                                       OwenSampler, PermutationSampler, RelativeTruncation, ShapleyValuation,
                                       StratifiedSampler, TMCShapleyValuation, UniformSampler)

    m, seed, bs = v.method, int(v.seed), v.batch_size
    flat = v.utility.backend == "sklearn" or m == "knn_shapley"
    data = _flatten(train) if flat else train
    if m == "knn_shapley":
        from sklearn.neighbors import KNeighborsClassifier

        from datamatters.valuation.knn import KNNShapleyValuation

        return KNNShapleyValuation(KNeighborsClassifier(int(v.n_neighbors), metric=v.metric), _flatten(test)), data
    if m == "data_oob":
        from datamatters.valuation.data_oob import DataOOBValuation

        u = v.utility
        if u.backend == "sklearn":
            model, kw = _sklearn_model(u, seed), {}
        else:
            model = build_network(cfg.model, dm)
            kw = {"epochs": int(u.epochs), "batch_size": int(u.batch_size), "lr": float(u.lr),
                  "optimizer": u.optimizer, "weight_decay": float(u.weight_decay)}
        return DataOOBValuation(model, n_estimators=int(v.n_estimators), max_samples=float(v.max_samples), seed=seed,
                                n_jobs=v.n_jobs, dask_address=v.dask_address, torch_kw=kw), data
    if m == "classwise_shapley":
        from datamatters.valuation.classwise import ClasswiseShapleyValuation

        return ClasswiseShapleyValuation(
            build_utility(cfg, v, dm, test, classwise=True), build_stopping(v),
            n_in_class_permutations=int(v.n_in_class_permutations),
            min_elements_per_label=int(v.min_elements_per_label), batch_size=bs, seed=seed,
            normalize_values=bool(v.normalize_values)), data
    utility = build_utility(cfg, v, dm, test)
    if m == "loo":
        return LOOValuation(utility, batch_size=bs), data
    if m == "least_core":
        from datamatters.valuation.least_core import ExactLeastCoreValuation, MonteCarloLeastCoreValuation

        if v.mode == "exact":
            return ExactLeastCoreValuation(utility, bool(v.non_negative_subsidy), batch_size=bs), data
        return MonteCarloLeastCoreValuation(utility, int(v.n_samples), bool(v.non_negative_subsidy), seed=seed,
                                            batch_size=bs), data
    stopping, progress = build_stopping(v), bool(v.progress)
    if m == "tmc_shapley":
        return TMCShapleyValuation(utility, RelativeTruncation(float(v.truncation.rtol),
                                                               float(v.truncation.burn_in_fraction)),
                                   stopping, seed=seed, batch_size=bs, antithetic=bool(v.antithetic),
                                   progress=progress), data
    if m == "banzhaf_msr":
        return MSRBanzhafValuation(utility, stopping, batch_size=bs, seed=seed, progress=progress), data
    if m == "beta_shapley":
        samplers = {"permutation": lambda: PermutationSampler(batch_size=bs, seed=seed),
                    "antithetic": lambda: AntitheticPermutationSampler(batch_size=bs, seed=seed),
                    "uniform": lambda: UniformSampler(batch_size=bs, seed=seed),
                    "stratified": lambda: StratifiedSampler(HarmonicSampleSize(), batch_size=bs, seed=seed)}
        if v.sampler not in samplers:
            raise UserError(f"valuation.sampler must be one of {sorted(samplers)}, got {v.sampler!r}")
        return BetaShapleyValuation(utility, samplers[v.sampler](), stopping, float(v.alpha), float(v.beta),
                                    progress=progress), data
    # owen_shapley: one pass over the points (pyDVL's finite default), bounded by max_time_s
    cls = AntitheticOwenSampler if v.antithetic else OwenSampler
    sampler = cls(n_samples_outer=int(v.n_samples_outer), n_samples_inner=int(v.n_samples_inner), batch_size=bs,
                  seed=seed)
    return ShapleyValuation(utility, sampler, stopping, progress=progress), data


# ---- the job -----------------------------------------------------------------------------------------------------
def _resume(path: Path, v: DictConfig, data, method) -> tuple[object | None, bool]:
    """(result to continue from, already finished?) for a re-run or requeued job."""
    from datamatters.valuation import ValuationResult

    if not (v.resume and path.is_file()):
        return None, False
    prev = ValuationResult.load(path, indices=data.indices)
    if not np.array_equal(prev.names, data.names) or prev.algorithm != str(method):
        return None, False
    same_rule = prev.meta.get("stopping") == str(getattr(method, "is_done", None))
    return prev, prev.status == "converged" and (same_rule or not hasattr(method, "sampler"))


def run(cfg: DictConfig) -> dict:
    v = _vcfg(cfg)
    with job(cfg, cfg.task.get("job_type", "valuation")) as ctx:
        make_loggers(ctx)
        if not v.dask_address and v.method != "knn_shapley":  # local workers import (seconds) while data loads
            from datamatters.valuation.parallel import prestart

            prestart(v.n_jobs)
        train, test, evald, gidx, corrupted, dm = load_problem(cfg, v)
        method, data = build_method(cfg, v, dm, train, test)
        result_path = ctx.run_dir / "valuation_result.npz"
        prev, finished = _resume(result_path, v, data, method)
        t0 = time.time()
        if finished:
            result = prev
        else:
            # semivalue estimates continue exactly (sampler state saved); the others are recomputed
            result = method.fit(data, continue_from=prev if hasattr(method, "sampler") else None).result
            result.save(result_path)
        t_val = time.time() - t0
        metrics = _metrics(v, result, corrupted, resumed=prev is not None, seconds=t_val)
        t1 = time.time()
        curves = _removal(cfg, v, dm, train, evald, result.values)
        metrics["time/removal_s"] = round(time.time() - t1, 3)
        from datamatters.evaluation.removal import plot_noisy_detection, plot_removal, removal_summary

        metrics.update(removal_summary(curves))
        meta = {**dm.metadata(v.split), "n_split": len(dm.split_indices(v.split)), "n": len(gidx),
                "method": v.method, "config_hash": ctx.cfg_hash, "seed": int(v.seed)}
        artifacts = {"values": save_indexed(ctx.run_dir / "values.npz", result.values, gidx, meta),
                     "result": result_path}
        title = f"{v.method} on {dm.name}"
        artifacts["removal_plot"] = plot_removal(curves, ctx.run_dir / "point_removal.png", title)
        log_image(ctx, "valuation/point_removal", artifacts["removal_plot"])
        if corrupted.any():
            artifacts["noisy_plot"] = plot_noisy_detection(result.values, corrupted,
                                                           ctx.run_dir / "noisy_detection.png", title)
            log_image(ctx, "valuation/noisy_detection", artifacts["noisy_plot"])
        log_metrics(ctx, metrics)
        summary = write_summary(ctx, metrics, artifacts)
        print_summary(summary, ["noisy/auc", "noisy/f1", "utility/evaluations", "removal/high_mean_acc",
                                "removal/low_mean_acc", "removal/random_mean_acc", "time/valuation_s", "run_dir"],
                      title=f"valuation: {v.method}")
        return summary


def _metrics(v: DictConfig, result, corrupted: np.ndarray, resumed: bool, seconds: float) -> dict:
    from datamatters.evaluation.metrics import noisy_label_detection

    metrics = {"utility/evaluations": int(result.meta.get("utility_evaluations", 0)),
               "time/valuation_s": round(seconds, 3), "valuation/n": len(result),
               "valuation/nan_values": int(np.isnan(result.values).sum()),
               "valuation/mean_count": float(np.mean(result.counts)), "valuation/resumed": int(resumed),
               "noisy/fraction": float(np.mean(corrupted))}
    if "subsidy" in result.meta:
        metrics["least_core/subsidy"] = float(result.meta["subsidy"])
    if corrupted.any() and not corrupted.all():
        metrics.update({f"noisy/{k}": val for k, val in noisy_label_detection(result.values, corrupted).items()})
    else:
        metrics.update({"noisy/auc": float("nan"), "noisy/f1": float("nan")})
    return metrics


def _removal(cfg: DictConfig, v: DictConfig, dm, train, evald, values: np.ndarray) -> dict:
    """Point-removal curves: retrain the utility's model on what is left, accuracy on the eval split."""
    from datamatters.evaluation.removal import point_removal_curves
    from datamatters.valuation import SupervisedScorer

    r = v.removal
    scorer_data = _flatten(evald) if v.utility.backend == "sklearn" else evald
    u = build_utility(cfg, v, dm, evald, scorer=SupervisedScorer("accuracy", scorer_data))
    u = u.with_dataset(_flatten(train) if v.utility.backend == "sklearn" else train)
    with u.session():
        return point_removal_curves(values, u.evaluate, step=float(r.step), max_fraction=float(r.max_fraction),
                                    n_random=int(r.n_random), seed=int(v.seed))


__all__ = ["METHODS", "build_method", "build_stopping", "build_utility", "load_problem", "run"]
