"""Data-OOB (Kwon & Zou 2023): a point's value is the average score of the bagged models for which it was out of
bag, scored on that point itself (accuracy for classifiers, negative squared error for regressors).

``model`` may be

* a fitted sklearn bagging ensemble (``BaggingClassifier``/``Regressor``: in-bag rows from
  ``estimators_samples_``, and, unlike pyDVL 0.10, each estimator sees only its ``estimators_features_``;
  ``RandomForest*``/``ExtraTrees*`` with ``bootstrap=True``: in-bag rows regenerated from each tree's seed);
* an unfitted sklearn estimator: we bag it ourselves, ``n_estimators`` bootstrap samples of ``max_samples * n``
  rows drawn with replacement, estimator b from ``default_rng([seed, b])``, fitted on the workers of
  ``n_jobs``/``dask_address`` (same values for any number of workers);
* a torch ``nn.Module`` template: the estimators are trained at once by the batched ensemble trainer. That
  trainer takes sets, not multisets, so a bootstrap sample trains on its distinct rows (documented difference).

Points that were in every bag have no estimate: their value is NaN (count 0) and a warning says how many.

A bag whose fit raises (sklearn) or whose model outputs are not finite (torch: diverged training) is a failed
fit: it is left out of the averages, counted in ``meta["failed_estimators"]`` and warned about, or raises a
``UserError`` when ``catch_errors=False``. Inputs are checked once at ``fit``: features must be finite unless the
sklearn estimator accepts missing values; torch labels must be in ``[0, n_outputs)``.
"""
from __future__ import annotations

import warnings

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.base import Valuation
from datamatters.valuation.dataset import Dataset, check_finite, check_labels
from datamatters.valuation.parallel import make_executor, resolve_n_jobs, split
from datamatters.valuation.result import ValuationResult


def point_wise_accuracy(y_true, y_pred) -> np.ndarray:
    return (np.asarray(y_pred) == np.asarray(y_true)).astype(float)


def neg_l2_distance(y_true, y_pred) -> np.ndarray:
    return -np.square(np.asarray(y_pred, float) - np.asarray(y_true, float))


def bootstrap_rows(seed: int, b: int, n: int, m: int) -> np.ndarray:
    return np.random.default_rng([int(seed), 0x00B, int(b)]).integers(0, n, size=m)


def _fit_bags(payload, bag_ids):
    """Worker task: fit one clone per bag id (single-threaded BLAS), return OOB positions and point-wise scores."""
    from datamatters.valuation.utility import limit_threads

    with limit_threads(1):
        return [_fit_bag(*payload, b) for b in bag_ids]


def _fit_bag(est, X, y, m, seed, score, b):
    """(OOB positions, their scores, None) or, when the fit or prediction raises, (empty, empty, the error)."""
    from sklearn.base import clone

    rows = bootstrap_rows(seed, b, len(y), m)
    oob = np.setdiff1d(np.arange(len(y)), rows)
    try:
        model = clone(est).fit(X[rows], y[rows])
        return oob, (score(y[oob], model.predict(X[oob])) if len(oob) else np.zeros(0)), None
    except Exception as exc:  # noqa: BLE001 - reported by the caller (catch_errors)
        return np.zeros(0, np.int64), np.zeros(0), repr(exc)


def _accepts_nan(model) -> bool:
    try:
        from sklearn.utils import get_tags

        return bool(get_tags(model).input_tags.allow_nan)
    except Exception:  # noqa: BLE001 - not an sklearn estimator: be strict
        return False


def _forest_in_bag(model, est, n: int) -> np.ndarray:
    max_samples = getattr(model, "max_samples", None)
    m = n if max_samples is None else (int(max_samples) if isinstance(max_samples, (int, np.integer))
                                       else max(round(n * float(max_samples)), 1))
    return np.random.RandomState(est.random_state).randint(0, n, m)


class DataOOBValuation(Valuation):
    algorithm_name = "data_oob"

    def __init__(self, model, n_estimators: int = 100, max_samples: float = 1.0, score=None, *, seed: int = 0,
                 n_jobs: int = 1, dask_address=None, torch_kw: dict | None = None, catch_errors: bool = True):
        super().__init__()
        if int(n_estimators) < 1 or not 0 < float(max_samples) <= 1:
            raise UserError(f"Data-OOB needs n_estimators >= 1 and 0 < max_samples <= 1, "
                            f"got {n_estimators}, {max_samples}")
        resolve_n_jobs(n_jobs)
        self.model, self.n_estimators, self.max_samples = model, int(n_estimators), float(max_samples)
        self.score, self.seed, self.n_jobs, self.dask_address = score, int(seed), n_jobs, dask_address
        self.torch_kw, self.catch_errors = dict(torch_kw or {}), bool(catch_errors)
        self._failed: list[str] = []

    def _score_fn(self, classifier: bool):
        return self.score or (point_wise_accuracy if classifier else neg_l2_distance)

    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "DataOOBValuation":
        if data.is_grouped:
            raise UserError("Data-OOB values single points; pass an ungrouped Dataset")
        result = self._init_result(data, continue_from)
        X, y = data.data()
        self._failed = []
        if hasattr(self.model, "fit") and not _accepts_nan(self.model):
            check_finite(data, "training set")
        if hasattr(self.model, "estimators_"):
            pos, vals = self._from_fitted(np.asarray(X), np.asarray(y))
        elif hasattr(self.model, "fit"):
            pos, vals = self._bag_sklearn(np.asarray(X), np.asarray(y))
        else:
            pos, vals = self._bag_torch(X, y)
        self._report_failures()
        result.update(pos, vals)
        never = result.counts == 0
        if never.any():
            warnings.warn(f"{int(never.sum())} points were in every bag and have no Data-OOB estimate (NaN); "
                          "use more estimators or a smaller max_samples", RuntimeWarning, stacklevel=2)
            result.values[never] = np.nan
        result.status = "converged"
        n_models = len(self.model.estimators_) if hasattr(self.model, "estimators_") else self.n_estimators
        result.meta.update({"utility_evaluations": int(result.meta.get("utility_evaluations", 0)) + n_models,
                            "n_estimators": n_models, "seed": self.seed, "failed_estimators": len(self._failed)})
        self._result = result
        return self

    def _report_failures(self) -> None:
        if not self._failed:
            return
        n, first = len(self._failed), self._failed[0]
        if not self.catch_errors or n == self.n_estimators:
            raise UserError(f"{n} of {self.n_estimators} Data-OOB estimators failed, the first with: {first}. "
                            + ("" if n == self.n_estimators else "Pass catch_errors=True to leave them out."))
        warnings.warn(f"{n} of {self.n_estimators} Data-OOB estimators failed and are left out "
                      f"(meta['failed_estimators']); the first: {first}", RuntimeWarning, stacklevel=3)

    def _from_fitted(self, X, y):
        from sklearn.base import is_classifier

        score, n = self._score_fn(is_classifier(self.model)), len(y)
        samples = getattr(self.model, "estimators_samples_", None)
        if samples is None and not getattr(self.model, "bootstrap", False):
            raise UserError("the fitted ensemble does not bootstrap (bootstrap=False): it has no out-of-bag points")
        features = getattr(self.model, "estimators_features_", None)
        pos, vals = [], []
        for b, est in enumerate(self.model.estimators_):
            inbag = samples[b] if samples is not None else _forest_in_bag(self.model, est, n)
            oob = np.setdiff1d(np.arange(n), inbag)
            if not len(oob):
                continue
            Xo = X[oob] if features is None else X[oob][:, features[b]]
            pos.append(oob)
            vals.append(score(y[oob], est.predict(Xo)))
        return np.concatenate(pos) if pos else np.zeros(0, int), np.concatenate(vals) if vals else np.zeros(0)

    def _bag_sklearn(self, X, y):
        from sklearn.base import is_classifier

        m = max(1, round(self.max_samples * len(y)))
        payload = (self.model, X, y, m, self.seed, self._score_fn(is_classifier(self.model)))
        with make_executor(self.n_jobs, self.dask_address) as ex:
            ex.bind(payload)
            chunks = ex.map(_fit_bags, split(np.arange(self.n_estimators), 2 * ex.n_workers))
        bags = [bag for chunk in chunks for bag in chunk]
        self._failed = [err for _, _, err in bags if err is not None]
        return np.concatenate([p for p, _, _ in bags]), np.concatenate([v for _, v, _ in bags])

    def _bag_torch(self, X, y):
        import torch

        from datamatters.training.ensemble import predict_ensemble, train_ensemble
        from datamatters.valuation.torch_utility import model_outputs

        if not isinstance(self.model, torch.nn.Module):
            raise UserError(f"Data-OOB needs an sklearn estimator or a torch.nn.Module, got {type(self.model)}")
        data = Dataset(X, y)
        check_finite(data, "training set")
        check_labels(data, model_outputs(self.model, np.asarray(X)[:1]), "training set")
        X, y = torch.as_tensor(np.asarray(X)).float(), torch.as_tensor(np.asarray(y)).long()
        n, m = len(y), max(1, round(self.max_samples * len(y)))
        inbag = np.zeros((self.n_estimators, n), bool)
        for b in range(self.n_estimators):
            inbag[b, bootstrap_rows(self.seed, b, n, m)] = True
        kw = {"epochs": 20, "batch_size": 32, "lr": 1e-2, **self.torch_kw}
        params = train_ensemble(self.model, X, y, torch.as_tensor(inbag), seed=self.seed, **kw)
        logits = predict_ensemble(self.model, params, X)
        finite = torch.isfinite(logits).flatten(1).all(1).cpu().numpy()
        self._failed = [f"non-finite outputs of estimator {b} (diverged training: lower the learning rate)"
                        for b in np.flatnonzero(~finite)]
        pred = logits.argmax(-1).cpu().numpy()
        b, i = np.nonzero(~inbag & finite[:, None])
        return i, self._score_fn(True)(y.numpy()[i], pred[b, i])
