"""Gaussian HMM model selection over training runs (hmmlearn), with seeds, held-out scores and plain-data storage.

For each K = 1..K_max, ``restarts`` EM fits of ``hmmlearn.hmm.GaussianHMM`` (full or diag covariance), each seeded
(the reference passed no ``random_state``), run in parallel with joblib. Every fit is scored on the held-out runs:
total log-likelihood, per checkpoint (``/ N_test``), and

    AIC = -2 LL_test + 2 p,        BIC = -2 LL_test + p ln N_test,

with ``N_test`` the number of held-out checkpoints (rows; hmmlearn's ``len(X)``) and ``p`` the free parameters as
hmmlearn counts them (``n_parameters``): (K - 1) start + K (K - 1) transition + K d means + covariances (full
K d (d + 1) / 2, diag K d, spherical K, tied d (d + 1) / 2); d = 14, K = 6 gives 749 (full) and 203 (diag). Without
held-out runs the criteria use the training runs.

K is chosen by the lowest BIC of the kept restart (``criterion_of="best"``; ``"mean"``, the reference's curve,
averages over restarts, so one poor restart can hide the right K); for each K the kept model is the restart with the
highest *training* log-likelihood (the EM objective; the reference kept the best *test* score, which
selects on the evaluation data). States of every saved model are put in canonical order (mean first-visit time on
the training runs), so labels are comparable across restarts and K. Models are saved as ``.npz`` of their
parameters plus a ``.json`` record, never pickles. A fit that ends with a covariance hmmlearn refuses is regularised
(or dropped) with a warning instead of failing the whole selection; with ``cache_dir`` every finished fit is saved
as it completes and reused by a rerun on the same data and settings.
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


INITS = ("uniform", "dirichlet")


def fit_one(X: np.ndarray, lengths: Sequence[int], k: int, covariance_type: str = "full", n_iter: int = 32,
            tol: float = 1e-2, random_state: int = 0, min_covar: float = 1e-3, init: str = "uniform"):
    """One seeded EM fit (single-threaded BLAS, so parallel workers do not oversubscribe the cores).

    ``init="uniform"`` starts from uniform start/transition probabilities (means from k-means, covariances from the
    data, as hmmlearn). ``"dirichlet"`` is hmmlearn 0.3's default: both drawn from Dirichlet(1/K), which puts most
    transitions near zero, and EM never revives a zero transition: on the planted 5-state problem 1 in 12 such
    restarts found the true model, every uniform one did."""
    from hmmlearn.hmm import GaussianHMM
    from threadpoolctl import threadpool_limits

    if init not in INITS:
        raise UserError(f"dynamics.init must be one of {INITS}, got {init!r}")
    model = GaussianHMM(n_components=k, covariance_type=covariance_type, n_iter=n_iter, tol=tol,
                        random_state=random_state, min_covar=min_covar,
                        init_params="stmc" if init == "dirichlet" else "mc")
    if init == "uniform":
        model.startprob_ = np.full(k, 1.0 / k)
        model.transmat_ = np.full((k, k), 1.0 / k)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, lengths=list(lengths))
    return model


def regularised(params: HMMParams, min_covar: float) -> tuple[HMMParams, bool]:
    """``params`` with every covariance that hmmlearn would refuse (not symmetric positive definite) replaced by its
    symmetric part with eigenvalues clipped to ``max(min_covar, 1e-9 * largest)``, and whether any was. EM can end
    with such a state (one that lost its points, or features of very different scales)."""
    cov, kind = np.asarray(params.covars, dtype=np.float64), params.covariance_type
    if kind in ("diag", "spherical"):
        bad = ~np.isfinite(cov) | (cov <= 0)
        if not bad.any():
            return params, False
        fixed = np.where(bad, max(min_covar, 1e-9 * float(np.max(np.abs(cov), initial=0, where=~bad))), cov)
        return HMMParams(params.startprob, params.transmat, params.means, fixed, kind), True
    if not np.isfinite(cov).all():
        raise FloatingPointError("non-finite covariance")
    mats = [c.copy() for c in (cov if kind == "full" else cov[None])]
    changed = False
    for i, c in enumerate(mats):
        if np.allclose(c, c.T) and np.linalg.eigvalsh(c).min() > 0:
            continue
        w, v = np.linalg.eigh(0.5 * (c + c.T))
        c = (v * np.maximum(w, max(min_covar, 1e-9 * float(np.abs(w).max())))) @ v.T
        mats[i], changed = 0.5 * (c + c.T), True
    if not changed:
        return params, False
    fixed = np.stack(mats) if kind == "full" else mats[0]
    return HMMParams(params.startprob, params.transmat, params.means, fixed, kind), True


def _fit_key(k: int, restart: int) -> str:
    return f"k{k}_r{restart}"


def _job(X, lengths, Xte, lte, k, restart, covariance_type, n_iter, tol, random_state, min_covar, init="uniform",
         cache_dir=None, fingerprint="") -> dict:
    """One fit, scored on train and held-out runs. Never raises for a numerical failure: a singular covariance is
    regularised, a fit that still cannot be scored is returned as ``status="dropped"`` with the reason. With
    ``cache_dir`` the finished fit is written there at once (a killed selection resumes from it)."""
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    rec = {"k": k, "restart": restart, "random_state": random_state, "train_ll": float("nan"),
           "test_ll": float("nan"), "em_iterations": 0, "converged": False, "status": "ok", "reason": ""}
    params = None
    try:
        model = fit_one(X, lengths, k, covariance_type, n_iter, tol, random_state, min_covar, init)
        rec.update(em_iterations=int(model.monitor_.iter), converged=bool(model.monitor_.converged))
        params, changed = regularised(HMMParams.from_model(model), min_covar)
        if changed:
            rec.update(status="regularised", reason="covariance not positive definite; eigenvalues clipped")
        model = params.to_model()
        with threadpool_limits(1), np.errstate(all="ignore"):
            rec["train_ll"] = float(model.score(X, lengths=list(lengths)))
            rec["test_ll"] = float(model.score(Xte, lengths=list(lte))) if len(Xte) else float("nan")
        if not np.isfinite(rec["train_ll"]) or (len(Xte) and not np.isfinite(rec["test_ll"])):
            raise FloatingPointError("non-finite log-likelihood")
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
        rec.update(status="dropped", reason=f"{type(e).__name__}: {e}")
        params = None
    rec["seconds"] = time.perf_counter() - t0
    if cache_dir is not None:
        _persist(Path(cache_dir), rec, params, fingerprint)
    rec["params"] = params
    return rec


def _persist(cache: Path, rec: dict, params: HMMParams | None, fingerprint: str) -> None:
    from datamatters.artifacts import write_json

    path = cache / _fit_key(rec["k"], rec["restart"])
    if params is not None:  # arrays first: a record without its arrays is never read as finished
        params.save(path, {**rec, "fingerprint": fingerprint})
    else:
        write_json(path.with_suffix(".json"), {**rec, "fingerprint": fingerprint, "k": rec["k"]})


def _resume(cache: Path, k: int, restart: int, fingerprint: str) -> dict | None:
    """A finished fit of this very selection (same data and settings) from ``cache``, or None."""
    path = cache / _fit_key(k, restart)
    if not path.with_suffix(".json").is_file():
        return None
    try:
        rec = json.loads(path.with_suffix(".json").read_text())
        if rec.get("fingerprint") != fingerprint:
            return None
        params = None if rec["status"] == "dropped" else HMMParams.load(path)[0]
    except (OSError, ValueError, KeyError, UserError):
        return None  # half-written or foreign: fit again
    rec = {c: rec[c] for c in ("k", "restart", "random_state", "train_ll", "test_ll", "em_iterations", "converged",
                               "status", "reason", "seconds")}
    rec["params"] = params
    return rec


def fingerprint(*arrays, **settings) -> str:
    """Hash of the training/held-out data and the fit settings: cached fits are reused only for the same problem."""
    import hashlib

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


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
    n_fitted: int = 0
    n_resumed: int = 0

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
           min_covar: float = 1e-3, features: Sequence[str] | None = None, criterion_of: str = "best",
           backend: str = "loky", cache_dir: str | Path | None = None, init: str = "uniform") -> Selection:
    """Fit K = 1..k_max x ``restarts`` seeded HMMs (in parallel), score them on the held-out runs, choose K by BIC.

    Numerically failed fits are regularised or dropped with a warning (never an exception after the fits). With
    ``cache_dir`` each finished fit is saved as it completes, and fits already there for the same data and settings
    are reused, so a killed selection resumes where it stopped and a larger ``k_max``/``restarts`` adds only the new
    fits."""
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
    if init not in INITS:
        raise UserError(f"dynamics.init must be one of {INITS}, got {init!r}")
    if criterion_of not in ("mean", "best"):
        raise UserError(f"criterion_of must be 'mean' or 'best', got {criterion_of!r}")
    d = X.shape[1]
    check_k_max(k_max, d, len(X), covariance_type)
    has_test = X_test is not None and len(X_test) > 0
    Xte = np.asarray(X_test, dtype=np.float64) if has_test else np.zeros((0, d))
    lte = list(lengths_test) if has_test else []
    t0 = time.perf_counter()
    fp = fingerprint(X, lengths, Xte, lte, covariance_type=covariance_type, n_iter=int(n_iter), tol=float(tol),
                     seed=int(seed), min_covar=float(min_covar), init=init)
    cache = None if cache_dir is None else Path(cache_dir)
    results, todo = [], []
    for k in range(1, k_max + 1):
        for r in range(restarts):
            old = _resume(cache, k, r, fp) if cache is not None else None
            (results.append(old) if old is not None else todo.append((k, r)))
    n_resumed = len(results)
    results += Parallel(n_jobs=n_jobs, backend=backend)(
        delayed(_job)(X, list(lengths), Xte, lte, k, r, covariance_type, n_iter, tol, fit_seed(seed, k, r), min_covar,
                      init, cache, fp) for k, r in todo)
    seconds = time.perf_counter() - t0
    from datamatters.dynamics.analysis import canonical_order

    models, rows = {}, []
    n_eval = len(Xte) if has_test else len(X)
    for res in sorted(results, key=lambda r: (r["k"], r["restart"])):
        p: HMMParams | None = res.pop("params")
        ll = res["test_ll"] if has_test else res["train_ll"]
        aic, bic = information_criteria(ll, res["k"], d, n_eval, covariance_type)
        if p is not None:
            models[(res["k"], res["restart"])] = p.permuted(canonical_order(p, X, lengths))
        rows.append({**res, "eval_ll": ll, "eval_ll_per_sample": ll / n_eval, "aic": aic, "bic": bic,
                     "n_params": n_parameters(res["k"], d, covariance_type), "n_eval": n_eval})
    table = pd.DataFrame(rows)
    _warn_failures(table)
    ok = table[table["status"] != "dropped"]
    if ok.empty:
        raise UserError(f"every one of the {len(table)} HMM fits failed numerically ({table['reason'].iloc[0]}); "
                        "normalise the features (dynamics.normalize=global), use covariance_type=diag or raise "
                        "min_covar")
    kept = {int(k): int(g.sort_values(["train_ll", "restart"], ascending=[False, True])["restart"].iloc[0])
            for k, g in ok.groupby("k")}
    by_k = _summarise(ok, kept)
    col = "bic_mean" if criterion_of == "mean" else "bic_kept"
    k_bic = int(by_k.loc[by_k[col].idxmin(), "k"])
    return Selection(table, by_k, k_bic, models, kept, covariance_type, list(features or range(d)), seconds,
                     n_fitted=len(todo), n_resumed=n_resumed)


def _warn_failures(table: pd.DataFrame) -> None:
    for status, what in (("regularised", "had a covariance that was not positive definite; its eigenvalues were "
                                         "clipped to min_covar"),
                         ("dropped", "failed numerically and were left out of the selection")):
        bad = table[table["status"] == status]
        if len(bad):
            fits = ", ".join(f"K={k} restart {r}" for k, r in zip(bad["k"], bad["restart"]))
            warnings.warn(f"HMM selection: {len(bad)} fit(s) ({fits}) {what}: {bad['reason'].iloc[0]}", stacklevel=3)


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
