"""Data valuation: this engine vs pyDVL 0.10 on the same utility (data, model, scorer, budget of samples).

Both sides run in the same interpreter (``.venv-ref``, which holds pyDVL 0.10 and this package), so numpy,
scikit-learn and torch are the same builds; BLAS and torch use one thread each (the benchmark machine is shared
and oversubscribed, and one thread is the fastest setting for these small fits on both sides); every case is
repeated with pyDVL and ours interleaved and the median time is reported.

Cases (digits, pixels / 16, a stratified subset; 300 held-out digits score the utility):

* ``tmc_sklearn``   TMC-Shapley, GaussianNB, pyDVL's defaults (RelativeTruncation(0.01, 0.4)), MaxUpdates(P).
* ``tmc_sklearn_jobs2`` the same with 2 worker processes on each side (pyDVL: joblib/loky ``parallel_config``;
                    ours: a loky pool that receives the utility once). The utility-evaluation count is not
                    available for pyDVL here (its counter lives in the workers).
* ``tmc_torch``     the same with a torch logistic regression (Adam, fixed epochs/batch/lr). pyDVL trains one
                    model per utility call through an sklearn-style wrapper (plain torch loop); ours trains the
                    prefixes of a batch of permutations at once with the batched ensemble trainer.
* ``msr_sklearn``   MSR-Banzhaf, GaussianNB, MaxUpdates(K) on both sides (same number of sets).
* ``msr_torch``     MSR-Banzhaf with the torch logistic regression.
* ``knn``           KNN-Shapley (K = 5) on continuous features (digits + PCA, so no distance ties): values must
                    be identical.

Accuracy: for the sampling cases, a reference is computed with our engine at ``ref_factor`` times the budget (other
seed); both sides report Spearman correlation and max abs difference to it, and to each other.

    .venv-ref/bin/python benchmarks/valuation_vs_pydvl.py [--quick] [--reps 3] [--cases tmc_sklearn ...]

Writes ``benchmarks/results/valuation_vs_pydvl.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parents[1]
CASES = ("tmc_sklearn", "tmc_sklearn_jobs2", "tmc_torch", "msr_sklearn", "msr_torch", "knn")


# ---- data and models -------------------------------------------------------------------------------------------
def digits(n_train: int, n_test: int = 300, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=n_train, test_size=n_test, stratify=y, random_state=seed)
    return Xtr, ytr, Xte, yte


def _sk_bases():
    from sklearn.base import BaseEstimator, ClassifierMixin

    return ClassifierMixin, BaseEstimator


class TorchLogReg(*_sk_bases()):
    """An sklearn-style torch logistic regression for pyDVL's ModelUtility: a plain training loop, one model per
    fit, the same architecture/optimiser/epochs/batch size/learning rate as our TorchUtility."""

    def __init__(self, epochs=10, batch_size=32, lr=0.05, seed=0):
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed

    def fit(self, X, y):
        import torch

        from datamatters.models import build_model

        self.classes_ = np.arange(10)
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.model_ = build_model("logistic", (64,), 10)
        X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y).long()
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            perm = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), self.batch_size):
                idx = perm[s:s + self.batch_size]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(self.model_(X[idx]), y[idx]).backward()
                opt.step()
        return self

    def predict(self, X):
        import torch

        with torch.inference_mode():
            return self.model_(torch.as_tensor(X, dtype=torch.float32)).argmax(-1).numpy()



TORCH_KW = dict(epochs=10, batch_size=32, lr=0.05)


# ---- the two sides ---------------------------------------------------------------------------------------------
def pydvl_side(case: str, data, budget: int, seed: int) -> dict:
    import pydvl.valuation as pv
    from joblib import parallel_config
    from sklearn.naive_bayes import GaussianNB

    Xtr, ytr, Xte, yte = data
    train, test = pv.Dataset(Xtr, ytr), pv.Dataset(Xte, yte)
    calls = {"n": 0}

    class Counting(pv.ModelUtility):
        def _utility(self, sample):
            calls["n"] += 1
            return super()._utility(sample)

    model = GaussianNB() if "sklearn" in case else TorchLogReg(**TORCH_KW)
    n_jobs = 2 if case.endswith("jobs2") else 1
    utility = Counting(model, pv.SupervisedScorer("accuracy", test, default=0.0, range=(0, 1)), show_warnings=False)
    t = time.perf_counter()
    with parallel_config(n_jobs=n_jobs):
        if case.startswith("tmc"):
            v = pv.TMCShapleyValuation(utility, is_done=pv.MaxUpdates(budget), seed=seed, progress=False)
        else:
            v = pv.MSRBanzhafValuation(utility, is_done=pv.MaxUpdates(budget), seed=seed, progress=False)
        v.fit(train)
    return {"seconds": time.perf_counter() - t, "evaluations": calls["n"] if n_jobs == 1 else None,
            "values": v.result.values.tolist()}


def our_side(case: str, data, budget: int, seed: int) -> dict:
    import datamatters.valuation as dv

    Xtr, ytr, Xte, yte = data
    train, test = dv.Dataset(Xtr, ytr), dv.Dataset(Xte, yte)
    scorer = dv.SupervisedScorer("accuracy", test, default=0.0)
    if "sklearn" in case:
        from sklearn.naive_bayes import GaussianNB

        n_jobs = 2 if case.endswith("jobs2") else 1
        utility = dv.ModelUtility(GaussianNB(), scorer, show_warnings=False, n_jobs=n_jobs)
    else:
        from datamatters.models import build_model
        from datamatters.valuation.torch_utility import TorchUtility

        utility = TorchUtility(build_model("logistic", (64,), 10), scorer, seed=seed, max_models=512, **TORCH_KW)
    torch_case = "torch" in case
    t = time.perf_counter()
    if case.startswith("tmc"):  # permutations per batch: pyDVL's 1, one per worker, or a few for batched torch
        perms = min(budget, 4) if torch_case else (2 if case.endswith("jobs2") else 1)
        v = dv.TMCShapleyValuation(utility, is_done=dv.MaxUpdates(budget), seed=seed, batch_size=perms)
    else:  # MaxUpdates(K) needs about 2K sets: batches of at most K/2 keep the overshoot small
        v = dv.MSRBanzhafValuation(utility, is_done=dv.MaxUpdates(budget), seed=seed,
                                   batch_size=max(8, min(128, budget // 2)) if torch_case else None)
    r = v.fit(train).result
    return {"seconds": time.perf_counter() - t, "evaluations": int(r.meta["utility_evaluations"]),
            "values": r.values.tolist()}


def knn_case(reps: int, n_train: int, n_test: int) -> dict:
    import pydvl.valuation as pv
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    import datamatters.valuation as dv
    from datamatters.valuation.knn import KNNShapleyValuation

    X, y = load_digits(return_X_y=True)
    X = PCA(16, random_state=0).fit_transform(X / 16.0)
    X = np.concatenate([X, X[:, ::-1] * 0.5 + 0.01])  # 3,594 points (two views), continuous: no distance ties
    y = np.concatenate([y, y])
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, te = idx[:n_train], idx[n_train:n_train + n_test]
    times = {"pydvl": [], "ours": []}
    for _ in range(reps):
        t = time.perf_counter()
        from joblib import parallel_config

        with parallel_config(n_jobs=1):
            p = pv.KNNShapleyValuation(KNeighborsClassifier(5), pv.Dataset(X[te], y[te]), progress=False)
            p.fit(pv.Dataset(X[tr], y[tr]))
        times["pydvl"].append(time.perf_counter() - t)
        t = time.perf_counter()
        o = KNNShapleyValuation(KNeighborsClassifier(5), dv.Dataset(X[te], y[te])).fit(dv.Dataset(X[tr], y[tr]))
        times["ours"].append(time.perf_counter() - t)
    pv_vals, our_vals = p.result.values, o.result.values
    return {"n_train": n_train, "n_test": n_test, "k": 5,
            "pydvl_seconds": statistics.median(times["pydvl"]), "ours_seconds": statistics.median(times["ours"]),
            "all_seconds": times, "speedup": statistics.median(times["pydvl"]) / statistics.median(times["ours"]),
            "max_abs_diff": float(np.max(np.abs(pv_vals - our_vals))),
            "identical_to_1e-12": bool(np.allclose(pv_vals, our_vals, atol=1e-12, rtol=0))}


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def warm_up() -> None:
    """Pay torch.func's one-off start-up (seconds) outside the timings."""
    import datamatters.valuation as dv
    from datamatters.models import build_model
    from datamatters.valuation.torch_utility import TorchUtility

    Xtr, ytr, Xte, yte = digits(20, 20)
    u = TorchUtility(build_model("logistic", (64,), 10), dv.SupervisedScorer("accuracy", dv.Dataset(Xte, yte)),
                     epochs=1).with_dataset(dv.Dataset(Xtr, ytr))
    u.evaluate(np.ones((2, 20), bool))
    TorchLogReg(epochs=1).fit(Xtr, ytr)


def sampling_case(case: str, reps: int, n_train: int, budget: int, ref_factor: int) -> dict:
    data = digits(n_train)
    if "torch" in case:
        warm_up()
    times = {"pydvl": [], "ours": []}
    evals = {"pydvl": [], "ours": []}
    last = {}
    for rep in range(reps):
        order = (("pydvl", pydvl_side), ("ours", our_side)) if rep % 2 == 0 else \
            (("ours", our_side), ("pydvl", pydvl_side))
        for name, fn in order:
            out = fn(case, data, budget, seed=rep)
            times[name].append(out["seconds"])
            evals[name].append(out["evaluations"])
            last[name] = np.asarray(out["values"])
    ref = np.asarray(our_side(case, data, budget * ref_factor, seed=12345)["values"])
    acc = {}
    for name in ("pydvl", "ours"):
        v = last[name]
        ok = np.isfinite(v)
        acc[name] = {"spearman_to_reference": spearman(v[ok], ref[ok]),
                     "max_abs_diff_to_reference": float(np.max(np.abs(v[ok] - ref[ok])))}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n_train": n_train, "budget": budget, "budget_unit": "MaxUpdates (permutations for TMC, min(in, out) "
            "updates per point for MSR)", "reference": f"ours, {ref_factor}x budget, other seed",
            "pydvl_seconds": med["pydvl"], "ours_seconds": med["ours"], "speedup": med["pydvl"] / med["ours"],
            "all_seconds": times, "evaluations": evals, "accuracy": acc,
            "spearman_between_sides": spearman(np.nan_to_num(last["pydvl"]), np.nan_to_num(last["ours"]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small budgets (a smoke run)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "valuation_vs_pydvl.json"))
    args = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    q = args.quick
    settings = {  # (n_train, budget, reference factor)
        "tmc_sklearn": (60, 6, 5) if q else (100, 30, 8),
        "tmc_sklearn_jobs2": (60, 6, 5) if q else (100, 30, 8),
        "tmc_torch": (40, 3, 4) if q else (100, 10, 8),
        "msr_sklearn": (60, 50, 5) if q else (200, 300, 10),
        "msr_torch": (60, 30, 4) if q else (200, 150, 10),
    }
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "note": "2 shared CPU cores under heavy load from other jobs; 1 BLAS/torch thread; "
                                   "pyDVL and ours interleaved, alternating order, median of reps"},
               "reps": args.reps, "quick": q, "cases": {}}
    out = Path(args.out)
    if out.is_file() and set(args.cases) != set(CASES):  # re-running some cases keeps the others' results
        results["cases"] = json.loads(out.read_text()).get("cases", {})
    import pydvl

    results["pydvl_version"] = pydvl.__version__
    for case in args.cases:
        t = time.perf_counter()
        if case == "knn":
            results["cases"][case] = knn_case(args.reps, 1500 if q else 3000, 200 if q else 500)
        else:
            n, budget, ref = settings[case]
            results["cases"][case] = sampling_case(case, args.reps, n, budget, ref)
        print(f"{case}: done in {time.perf_counter() - t:.0f}s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def _med(xs) -> str:
    xs = [x for x in xs if x is not None]
    return str(int(np.median(xs))) if xs else "n/a"


def table(results: dict) -> str:
    rows = ["| case | n | budget | pyDVL s | ours s | speed-up | evals pyDVL / ours | Spearman to ref pyDVL / ours "
            "| max abs diff to ref pyDVL / ours |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in results["cases"].items():
        if name == "knn":
            rows.append(f"| knn (K=5, {c['n_test']} test) | {c['n_train']} | exact | {c['pydvl_seconds']:.2f} | "
                        f"{c['ours_seconds']:.3f} | {c['speedup']:.0f}x | - | identical: {c['identical_to_1e-12']} "
                        f"| {c['max_abs_diff']:.1e} (between sides) |")
            continue
        a = c["accuracy"]
        rows.append(
            f"| {name} | {c['n_train']} | {c['budget']} | {c['pydvl_seconds']:.1f} | {c['ours_seconds']:.1f} | "
            f"{c['speedup']:.1f}x | {_med(c['evaluations']['pydvl'])} / "
            f"{_med(c['evaluations']['ours'])} | {a['pydvl']['spearman_to_reference']:.3f} / "
            f"{a['ours']['spearman_to_reference']:.3f} | {a['pydvl']['max_abs_diff_to_reference']:.3f} / "
            f"{a['ours']['max_abs_diff_to_reference']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
