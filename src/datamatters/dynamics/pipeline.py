"""The whole HMM analysis of a set of run tables, as one plain function (usable from a notebook; the Hydra job
``tasks/dynamics_hmm.py`` only maps the config onto ``HMMOptions``).

gather -> sort/drop NaN runs -> seeded run split -> normalise -> select K (parallel restarts, held-out LL, AIC/BIC)
-> save every model + the selection tables -> Viterbi states of all runs with the chosen model -> training map,
detour-state correlations, transition feature importance, loss curves by state.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from datamatters.artifacts import write_json
from datamatters.dynamics import analysis, plots
from datamatters.dynamics.hmm import save_selection, select
from datamatters.dynamics.stats import FEATURES
from datamatters.dynamics.tables import Normalizer, find_run_tables, load_runs, split_runs, stack
from datamatters.errors import UserError


@dataclass
class Convergence:
    metric: str = "val_acc"
    threshold: float = 0.9
    higher_is_better: bool = True


@dataclass
class HMMOptions:
    """Defaults follow the reference (14 features, full covariance, K <= 8, 5 restarts, 32 EM iterations, 80/20 run
    split with seed 0) except three, chosen on planted data where the reference's choices miss the true K = 5 and
    its detour state (tests/test_dynamics_planted.py): global z-scoring (``normalize="run"``, the reference, gives
    each run its own scale, so a run with a detour state sees every other state shifted), K by the BIC of the kept
    restart (``criterion_of="mean"``, the reference, lets poor restarts pull a K down) and uniform initial
    transitions (``init="dirichlet"``, hmmlearn 0.3's default, traps EM at sparse transitions)."""

    features: Sequence[str] = tuple(FEATURES)
    k_max: int = 8
    restarts: int = 5
    covariance_type: str = "full"
    n_iter: int = 32
    tol: float = 1e-2
    min_covar: float = 1e-3
    test_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    n_jobs: int = -1
    normalize: str = "global"
    difference: bool = False
    max_checkpoints: int | None = None
    criterion_of: str = "best"
    init: str = "uniform"
    k: int | None = None
    convergence: Convergence = field(default_factory=Convergence)
    alpha: float = 0.05
    importance_offset: int = 0
    max_plot_runs: int = 12
    figures: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HMMOptions":
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown dynamics options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        if isinstance(d.get("convergence"), dict):
            d["convergence"] = Convergence(**d["convergence"])
        if d.get("features") is not None:
            d["features"] = tuple(d["features"])
        else:
            d.pop("features", None)
        for name, typ in (("k_max", int), ("restarts", int), ("n_iter", int), ("seed", int), ("split_seed", int),
                          ("n_jobs", int), ("tol", float), ("min_covar", float), ("test_fraction", float),
                          ("alpha", float)):
            if name in d:
                try:
                    ok = typ(d[name]) == d[name] and not isinstance(d[name], (bool, str))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise UserError(f"dynamics.{name} must be {typ.__name__}, got {d[name]!r}")
        if not 0 <= float(d.get("test_fraction", 0.2)) < 1:
            raise UserError(f"dynamics.test_fraction must be in [0, 1), got {d['test_fraction']}")
        return cls(**d)


def analyse_runs(runs: str | Path | Sequence[str | Path], out_dir: str | Path,
                 opts: HMMOptions | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the analysis; write tables, models and figures under ``out_dir``; return ``(metrics, artifacts)``."""
    opts = opts or HMMOptions()
    if opts.importance_offset not in (0, 1):
        raise UserError(f"dynamics.importance_offset must be 0 or 1, got {opts.importance_offset}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rs = load_runs(find_run_tables(runs), opts.features, opts.max_checkpoints,
                   min_length=3 if opts.difference else 2)
    split_runs(rs, opts.test_fraction, opts.split_seed)  # a killed job resumes from hmm/fits (same data)
    norm = Normalizer(opts.normalize, opts.difference).fit([rs.tables[i] for i in rs.train], rs.features)
    X, lengths = stack(rs, rs.train, norm)
    X_te, lengths_te = stack(rs, rs.test, norm)
    sel = select(X, lengths, X_te, lengths_te, k_max=opts.k_max, restarts=opts.restarts,
                 covariance_type=opts.covariance_type, n_iter=opts.n_iter, tol=opts.tol, seed=opts.seed,
                 n_jobs=opts.n_jobs, min_covar=opts.min_covar, features=rs.features, criterion_of=opts.criterion_of,
                 init=opts.init, cache_dir=out / "hmm" / "fits")
    artifacts = save_selection(sel, out / "hmm", extra={"normalize": opts.normalize, "difference": opts.difference})
    k = sel.k_bic if opts.k is None else int(opts.k)
    if not 1 <= k <= opts.k_max:
        raise UserError(f"dynamics.k={k} is outside 1..k_max={opts.k_max}")
    params = sel.best(k)

    # states of every run (train and test) under the chosen model
    order = rs.train + rs.test
    seqs = [norm.transform(rs.tables[i], rs.features) for i in order]
    paths = analysis.viterbi(params, np.vstack(seqs), [len(s) for s in seqs])
    offset = 1 if opts.difference else 0
    tables = [rs.tables[i].iloc[offset:].reset_index(drop=True) for i in order]
    names = [rs.names[i] for i in order]
    conv, converged = analysis.convergence_steps(tables, opts.convergence.metric, opts.convergence.threshold,
                                                 opts.convergence.higher_is_better)
    corr = analysis.state_correlations(paths, conv, k, opts.alpha)
    occ = analysis.occupancy(paths, k)
    counts = analysis.transition_counts(paths, k)
    fv = analysis.first_visits(paths, k, [t["step"].to_numpy() for t in tables])
    with np.errstate(all="ignore"):
        mean_fv = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in fv.T])
    imp = analysis.transition_importance(params, seqs, paths, list(rs.features), opts.importance_offset)

    # tables
    corr.assign(occupancy=occ, mean_first_visit_step=mean_fv).to_csv(out / "states.csv", index=False)
    imp.to_csv(out / "transitions.csv", index=False)
    _state_paths(names, tables, paths, set(rs.names[i] for i in rs.test)).to_parquet(out / "state_paths.parquet")
    pd.DataFrame({"run": names, "convergence_step": conv, "converged": converged}).to_csv(
        out / "convergence.csv", index=False)
    write_json(out / "hmm" / "chosen.json", {
        "k": k, "k_bic": sel.k_bic, "restart": sel.kept[k],
        "model": str(out / "hmm" / "models" / f"k{k}_r{sel.kept[k]}.npz"),
        "transmat": params.transmat, "startprob": params.startprob, "features": list(rs.features),
        "options": _jsonable(asdict(opts)), "runs": names, "test_runs": [rs.names[i] for i in rs.test],
        "dropped_runs": rs.dropped,
    })

    # figures (off: the numbers and tables only, e.g. under +debug=fast where drawing them is most of the time)
    figs = {} if not opts.figures else {
        "selection": plots.plot_selection(sel.by_k, sel.k_bic, out / "selection.png"),
        "training_map": plots.plot_training_map(params.transmat, counts, occ, mean_fv, out / "training_map.png",
                                                detour=list(corr.loc[corr["detour"], "state"])),
        "curves_by_state": plots.plot_curves_by_state(tables, paths, k, out / "curves_by_state.png",
                                                      max_runs=opts.max_plot_runs),
        "transition_importance": plots.plot_transition_importance(imp, out / "transition_importance.png"),
    }
    artifacts.update({f"fig_{n}": p for n, p in figs.items() if p is not None})
    artifacts.update({"states": out / "states.csv", "transitions": out / "transitions.csv",
                      "state_paths": out / "state_paths.parquet", "convergence": out / "convergence.csv",
                      "hmm_chosen": out / "hmm" / "chosen.json"})
    return _metrics(sel, k, rs, corr, occ, conv, converged), artifacts


def _state_paths(names, tables, paths, test_names) -> pd.DataFrame:
    keep = ("train_loss", "train_acc", "val_loss", "val_acc")
    parts = []
    for n, t, p in zip(names, tables, paths):
        d = pd.DataFrame({"run": n, "split": "test" if n in test_names else "train", "step": t["step"].to_numpy(),
                          "state": p})
        for c in keep:
            d[c] = t[c].to_numpy(float) if c in t else np.nan
        parts.append(d)
    return pd.concat(parts, ignore_index=True)


def _metrics(sel, k, rs, corr, occ, conv, converged) -> dict[str, Any]:
    row = sel.by_k[sel.by_k["k"] == k].iloc[0]
    m: dict[str, Any] = {
        "hmm/k_bic": int(sel.k_bic), "hmm/k": int(k),
        "hmm/test_ll": float(row["eval_ll_kept"]), "hmm/test_ll_per_sample": float(row["eval_ll_per_sample_kept"]),
        "hmm/bic": float(row["bic_kept"]), "hmm/bic_mean": float(row["bic_mean"]), "hmm/aic": float(row["aic_kept"]),
        "hmm/n_runs": len(rs.tables), "hmm/n_train_runs": len(rs.train), "hmm/n_test_runs": len(rs.test),
        "hmm/n_dropped_runs": len(rs.dropped), "hmm/select_seconds": float(sel.seconds),
        "hmm/n_fits_resumed": int(sel.n_resumed),
        "hmm/n_fits_dropped": int((sel.table["status"] == "dropped").sum()),
        "hmm/n_fits_regularised": int((sel.table["status"] == "regularised").sum()),
        "hmm/converged_frac": float(np.mean(converged)), "hmm/convergence_step_mean": float(np.mean(conv)),
        "hmm/detour_states": [int(s) for s in corr.loc[corr["detour"], "state"]],
    }
    for r in corr.itertuples(index=False):
        m[f"hmm/state{r.state}/r"] = _f(r.r)
        m[f"hmm/state{r.state}/p"] = _f(r.p)
        m[f"hmm/state{r.state}/visited_frac"] = float(r.visited_frac)
        m[f"hmm/state{r.state}/occupancy"] = float(occ[r.state])
    return m


def _f(x) -> float | None:
    """NaN as null in JSON (an obligatory state has no correlation)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d
