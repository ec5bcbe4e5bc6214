"""Gaussian HMM model selection over training runs (hmmlearn), with seeds, held-out scores and plain-data storage.

For each K = 1..K_max, ``restarts`` EM fits of ``hmmlearn.hmm.GaussianHMM`` (full or diag covariance), each seeded
(the reference passed no ``random_state``), run in parallel with joblib. Every fit is scored on the held-out runs:
total log-likelihood, per checkpoint (``/ N_test``), and

    AIC = -2 LL_test + 2 p,        BIC = -2 LL_test + p ln N_test,

with ``N_test`` the number of held-out checkpoints (rows; hmmlearn's ``len(X)``) and ``p`` the free parameters as
hmmlearn counts them (``n_parameters``): (K - 1) start + K (K - 1) transition + K d means + covariances (full
K d (d + 1) / 2, diag K d, spherical K, tied d (d + 1) / 2); d = 14, K = 6 gives 749 (full) and 203 (diag). Without
held-out runs the criteria use the training runs.

K is chosen by the lowest BIC averaged over restarts (the reference's curve); for each K the kept model is the
restart with the highest *training* log-likelihood (the EM objective; the reference kept the best *test* score, which
selects on the evaluation data). States of every saved model are put in canonical order (mean first-visit time on
the training runs), so labels are comparable across restarts and K. Models are saved as ``.npz`` of their
parameters plus a ``.json`` record, never pickles.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from datamatters.errors import UserError

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def n_parameters(k: int, d: int, covariance_type: str = "full") -> int:
    """Free scalar parameters of a K-state, d-dimensional Gaussian HMM (hmmlearn's count)."""
    cov = {"full": k * d * (d + 1) // 2, "diag": k * d, "spherical": k, "tied": d * (d + 1) // 2}
    if covariance_type not in cov:
        raise UserError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
    return (k - 1) + k * (k - 1) + k * d + cov[covariance_type]


def information_criteria(log_likelihood: float, k: int, d: int, n: int, covariance_type: str) -> tuple[float, float]:
    p = n_parameters(k, d, covariance_type)
    return -2 * log_likelihood + 2 * p, -2 * log_likelihood + p * np.log(n)


# ---- one model as plain arrays ------------------------------------------------------------------------------------
@dataclass
class HMMParams:
    """A Gaussian HMM's parameters; ``covars`` in hmmlearn's per-type layout (full: (K, d, d), diag: (K, d), ...)."""

    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    covariance_type: str

    @property
    def k(self) -> int:
        return len(self.startprob)

    @classmethod
    def from_model(cls, model) -> "HMMParams":
        return cls(model.startprob_.copy(), model.transmat_.copy(), model.means_.copy(), model._covars_.copy(),
                   model.covariance_type)

    def to_model(self):
        from hmmlearn.hmm import GaussianHMM

        m = GaussianHMM(n_components=self.k, covariance_type=self.covariance_type, init_params="", params="stmc")
        m.n_features = self.means.shape[1]
        m.startprob_, m.transmat_, m.means_ = self.startprob, self.transmat, self.means
        m.covars_ = self.covars
        return m

    def full_covars(self) -> np.ndarray:
        """(K, d, d) covariance matrices whatever the type."""
        return self.to_model().covars_

    def permuted(self, order: Sequence[int]) -> "HMMParams":
        """State ``i`` of the result is state ``order[i]`` of this model."""
        o = np.asarray(order)
        cov = self.covars if self.covariance_type == "tied" else self.covars[o]
        return HMMParams(self.startprob[o], self.transmat[np.ix_(o, o)], self.means[o], cov, self.covariance_type)

    def save(self, path: str | Path, record: dict) -> Path:
        from datamatters.artifacts import atomic_write_bytes, write_json

        path = Path(path)
        atomic_write_bytes(path.with_suffix(".npz"), lambda fh: np.savez(
            fh, startprob=self.startprob, transmat=self.transmat, means=self.means, covars=self.covars))
        write_json(path.with_suffix(".json"), {**record, "covariance_type": self.covariance_type, "k": self.k})
        return path.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path) -> tuple["HMMParams", dict]:
        path = Path(path)
        if not path.with_suffix(".npz").is_file() or not path.with_suffix(".json").is_file():
            raise UserError(f"no saved HMM at {path.with_suffix('.npz')} (+ .json)")
        record = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
            p = cls(z["startprob"], z["transmat"], z["means"], z["covars"], record["covariance_type"])
        return p, record


# ---- fitting ------------------------------------------------------------------------------------------------------
def fit_seed(seed: int, k: int, restart: int) -> int:
    """The random_state of restart ``restart`` for K = ``k`` (independent streams, same for serial and parallel)."""
    return int(np.random.SeedSequence([int(seed), int(k), int(restart)]).generate_state(1)[0] % (2**31 - 1))


def fit_one(X: np.ndarray, lengths: Sequence[int], k: int, covariance_type: str = "full", n_iter: int = 32,
            tol: float = 1e-2, random_state: int = 0, min_covar: float = 1e-3):
    """One seeded EM fit (single-threaded BLAS, so parallel workers do not oversubscribe the cores)."""
    from hmmlearn.hmm import GaussianHMM
    from threadpoolctl import threadpool_limits

    model = GaussianHMM(n_components=k, covariance_type=covariance_type, n_iter=n_iter, tol=tol,
                        random_state=random_state, min_covar=min_covar)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, lengths=list(lengths))
    return model


def _job(X, lengths, Xte, lte, k, restart, covariance_type, n_iter, tol, random_state, min_covar) -> dict:
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    model = fit_one(X, lengths, k, covariance_type, n_iter, tol, random_state, min_covar)
    with threadpool_limits(1):
        train_ll = float(model.score(X, lengths=list(lengths)))
        test_ll = float(model.score(Xte, lengths=list(lte))) if len(Xte) else float("nan")
    return {
        "k": k, "restart": restart, "random_state": random_state, "params": HMMParams.from_model(model),
        "train_ll": train_ll, "test_ll": test_ll, "em_iterations": int(model.monitor_.iter),
        "converged": bool(model.monitor_.converged), "seconds": time.perf_counter() - t0,
    }


@dataclass
class Selection:
    """Every fit (``table``), the per-K summary (``by_k``), the chosen K and each kept model (canonical order)."""

    table: pd.DataFrame
    by_k: pd.DataFrame
    k_bic: int
    models: dict[tuple[int, int], HMMParams] = field(repr=False)
    kept: dict[int, int]
    covariance_type: str
    features: list[str]
    seconds: float

    def best(self, k: int | None = None) -> HMMParams:
        k = self.k_bic if k is None else int(k)
        return self.models[(k, self.kept[k])]


def check_k_max(k_max: int, d: int, n_train_rows: int, covariance_type: str) -> None:
    """Refuse K_max for which the free parameters outnumber the training values (hmmlearn calls that degenerate)."""
    if int(k_max) < 1:
        raise UserError(f"dynamics.k_max must be >= 1, got {k_max}")
    if int(k_max) > n_train_rows:
        raise UserError(f"dynamics.k_max={k_max} exceeds the {n_train_rows} training checkpoints")
    p = n_parameters(int(k_max), d, covariance_type)
    if p > n_train_rows * d:
        raise UserError(
            f"dynamics.k_max={k_max} with {covariance_type} covariance has {p} free parameters but the training runs "
            f"hold only {n_train_rows} x {d} = {n_train_rows * d} values. Lower dynamics.k_max, use "
            "covariance_type=diag, use fewer features, or add runs/checkpoints.")


def select(X: np.ndarray, lengths: Sequence[int], X_test: np.ndarray | None = None,
           lengths_test: Sequence[int] | None = None, k_max: int = 8, restarts: int = 5,
           covariance_type: str = "full", n_iter: int = 32, tol: float = 1e-2, seed: int = 0, n_jobs: int = -1,
           min_covar: float = 1e-3, features: Sequence[str] | None = None, criterion_of: str = "mean",
           backend: str = "loky") -> Selection:
    """Fit K = 1..k_max x ``restarts`` seeded HMMs (in parallel), score them on the held-out runs, choose K by BIC."""
    from joblib import Parallel, delayed

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) == 0:
        raise UserError(f"HMM training data must be a non-empty 2-D array, got shape {X.shape}")
    if sum(lengths) != len(X):
        raise UserError(f"sequence lengths sum to {sum(lengths)} but the data has {len(X)} rows")
    if covariance_type not in COVARIANCE_TYPES:
        raise UserError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
    if int(restarts) < 1:
        raise UserError(f"dynamics.restarts must be >= 1, got {restarts}")
    if criterion_of not in ("mean", "best"):
        raise UserError(f"criterion_of must be 'mean' or 'best', got {criterion_of!r}")
    d = X.shape[1]
    check_k_max(k_max, d, len(X), covariance_type)
    has_test = X_test is not None and len(X_test) > 0
    Xte = np.asarray(X_test, dtype=np.float64) if has_test else np.zeros((0, d))
    lte = list(lengths_test) if has_test else []
    t0 = time.perf_counter()
    jobs = [(k, r) for k in range(1, k_max + 1) for r in range(restarts)]
    results = Parallel(n_jobs=n_jobs, backend=backend)(
        delayed(_job)(X, list(lengths), Xte, lte, k, r, covariance_type, n_iter, tol, fit_seed(seed, k, r), min_covar)
        for k, r in jobs)
    seconds = time.perf_counter() - t0
    from datamatters.dynamics.analysis import canonical_order

    models, rows = {}, []
    eval_X, eval_len = (Xte, lte) if has_test else (X, list(lengths))
    for res in results:
        p: HMMParams = res.pop("params")
        p = p.permuted(canonical_order(p, X, lengths))
        models[(res["k"], res["restart"])] = p
        ll = res["test_ll"] if has_test else res["train_ll"]
        aic, bic = information_criteria(ll, res["k"], d, len(eval_X), covariance_type)
        rows.append({**res, "eval_ll": ll, "eval_ll_per_sample": ll / len(eval_X), "aic": aic, "bic": bic,
                     "n_params": n_parameters(res["k"], d, covariance_type), "n_eval": len(eval_X)})
    table = pd.DataFrame(rows)
    kept = {int(k): int(g.sort_values(["train_ll", "restart"], ascending=[False, True])["restart"].iloc[0])
            for k, g in table.groupby("k")}
    by_k = _summarise(table, kept)
    col = "bic_mean" if criterion_of == "mean" else "bic_kept"
    k_bic = int(by_k.loc[by_k[col].idxmin(), "k"])
    return Selection(table, by_k, k_bic, models, kept, covariance_type, list(features or range(d)), seconds)


def _summarise(table: pd.DataFrame, kept: dict[int, int]) -> pd.DataFrame:
    rows = []
    for k, g in table.groupby("k"):
        best = g[g["restart"] == kept[int(k)]].iloc[0]
        rows.append({
            "k": int(k), "n_params": int(best["n_params"]),
            "eval_ll_mean": g["eval_ll"].mean(), "eval_ll_std": g["eval_ll"].std(ddof=0),
            "eval_ll_kept": best["eval_ll"], "eval_ll_per_sample_kept": best["eval_ll_per_sample"],
            "train_ll_kept": best["train_ll"], "aic_mean": g["aic"].mean(), "bic_mean": g["bic"].mean(),
            "aic_kept": best["aic"], "bic_kept": best["bic"], "kept_restart": kept[int(k)],
            "converged_frac": g["converged"].mean(), "seconds": g["seconds"].sum(),
        })
    return pd.DataFrame(rows)


def save_selection(sel: Selection, out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Every model (``models/k{K}_r{R}.npz`` + ``.json``), the fit table and the per-K table (CSV)."""
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    for (k, r), p in sel.models.items():
        row = sel.table[(sel.table["k"] == k) & (sel.table["restart"] == r)].iloc[0].to_dict()
        p.save(out / "models" / f"k{k}_r{r}", {**{a: _plain(b) for a, b in row.items()}, "kept": sel.kept[k] == r,
                                                "features": sel.features, **(extra or {})})
    sel.table.to_csv(out / "selection_fits.csv", index=False)
    sel.by_k.to_csv(out / "selection.csv", index=False)
    return {"hmm_models": out / "models", "hmm_selection": out / "selection.csv",
            "hmm_selection_fits": out / "selection_fits.csv"}


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v
