"""Influence functions: this engine vs pyDVL 0.10 on the same model, data and regularisation.

Problem: MNIST-1D (generated, 40 features, 10 classes), an MLP 40-32-10 (1,642 parameters) trained with Adam,
a test x train influence matrix (default 500 x 5,000), Hessian of the mean cross-entropy + lambda I, float64 on
both sides so that agreement is limited by the methods, not by round-off. For each method (Direct, CG, Arnoldi,
EK-FAC) and each side the fit and the matrix are timed separately, in fresh processes: ours with ``.venv``, pyDVL
with ``.venv-ref`` (same torch build), interleaved ours/pyDVL with the order alternating per repetition, one BLAS
thread each (the benchmark machine is shared and oversubscribed), after a warm-up that pays torch.func's one-off
import cost on both sides. pyDVL is timed twice: through its ``SequentialInfluenceCalculator`` with the same chunks
as ours (its documented way to build a matrix), and as one in-memory ``influences(x_test, y_test, x, y)`` call (its
fastest path, when everything fits in memory).

    python benchmarks/influence_vs_pydvl.py [--quick] [--reps 2] [--methods direct cg arnoldi ekfac cg_all]
    python benchmarks/influence_vs_pydvl.py --evaluate   # all 8 methods on digits: LDS, noisy AUC, vs Direct

Writes ``benchmarks/results/influence_vs_pydvl.json`` (and prints a markdown table), or
``benchmarks/results/influence_digits_methods.json`` with ``--evaluate``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OURS_PY = ROOT / ".venv" / "bin" / "python"
REF_PY = ROOT / ".venv-ref" / "bin" / "python"
METHODS = ("direct", "cg", "arnoldi", "ekfac")
# row-by-row CG like pyDVL's; CG on every test point (pyDVL: hours); EK-FAC with the exact expected GGN factors
OURS_ONLY = ("cg_plain", "cg_all", "ekfac_ggn")


# ---- the shared problem (built once, by our side) --------------------------------------------------------------
def make_problem(work: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    import torch
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = n_train + n_test, n_train / (n_train + n_test), seed
    d = make_dataset(args)
    X, Xt = d["x"].astype(np.float64), d["x_test"].astype(np.float64)
    mu, sd = X.mean(0), X.std(0) + 1e-8
    X, Xt = (X - mu) / sd, (Xt - mu) / sd
    y, yt = d["y"].astype(np.int64), d["y_test"].astype(np.int64)
    torch.manual_seed(seed)
    model = _mlp().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tX), ty).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(Xt)).argmax(1) == torch.from_numpy(yt)).float().mean())
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "data.npz", X=X, y=y, Xt=Xt, yt=yt)
    torch.save(model.state_dict(), work / "model.pt")
    return {"test_acc": acc, "n_parameters": sum(p.numel() for p in model.parameters())}


def _mlp():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def _load(work: Path):
    import torch

    z = np.load(work / "data.npz")
    model = _mlp().double()
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    model.eval()
    t = {k: torch.from_numpy(z[k]) for k in ("X", "y", "Xt", "yt")}
    return model, t


def _loaders(t, train_bs: int, test_bs: int):
    from torch.utils.data import DataLoader, TensorDataset

    return (DataLoader(TensorDataset(t["X"], t["y"]), batch_size=train_bs),
            DataLoader(TensorDataset(t["Xt"], t["yt"]), batch_size=test_bs))


# ---- one side, one method (runs in a fresh process) ------------------------------------------------------------
def _ours(method: str, model, loss, cfg: dict):
    from datamatters.influence import ArnoldiInfluence, CgInfluence, DirectInfluence, EkfacInfluence

    lam = cfg["regularization"]
    if method == "direct":
        return DirectInfluence(model, loss, regularization=lam)
    if method in ("cg", "cg_all", "cg_plain"):
        # per-row ||r_j|| <= max(rtol ||b_j||, atol) with rtol = atol = cg_tol; default block CG
        return CgInfluence(model, loss, regularization=lam, rtol=cfg["cg_tol"], atol=cfg["cg_tol"],
                           block_cg=method != "cg_plain")
    if method == "arnoldi":
        return ArnoldiInfluence(model, loss, regularization=lam, rank=cfg["rank"], tol=cfg["arnoldi_tol"])
    # like for like: pyDVL's approximation (one summed pseudo-gradient per example); ekfac_ggn: our default
    return EkfacInfluence(model, loss, regularization=lam, update_diagonal=True,
                          fisher="ggn" if method == "ekfac_ggn" else "summed")


def _pydvl(method: str, model, loss, cfg: dict):
    from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence, EkfacInfluence

    lam = cfg["regularization"]
    if method == "direct":
        return DirectInfluence(model, loss, regularization=lam)
    if method == "cg":
        # pyDVL 0.10 stops at ||r|| < max(rtol^2 * (a column norm), atol^2): sqrt(cg_tol) gives the same
        # absolute stopping point as ours (the rtol term is negligible here)
        return CgInfluence(model, loss, regularization=lam, rtol=cfg["cg_tol"] ** 0.5, atol=cfg["cg_tol"] ** 0.5,
                           warn_on_max_iteration=False)
    if method == "arnoldi":
        return ArnoldiInfluence(model, loss, regularization=lam, rank=cfg["rank"], tol=cfg["arnoldi_tol"])
    return EkfacInfluence(model, update_diagonal=True, hessian_regularization=lam)


def run_side(side: str, method: str, work: Path, cfg: dict, out: Path) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    if side == "pydvl" and method == "ekfac":
        torch.set_default_dtype(torch.float64)  # pyDVL's EK-FAC allocates its factors in the default dtype
    model, t = _load(work)
    loss = torch.nn.functional.cross_entropy
    n_test = cfg["n_test_cg"] if method in ("cg", "cg_plain") else len(t["Xt"])
    t = {**t, "Xt": t["Xt"][:n_test], "yt": t["yt"][:n_test]}
    train, test = _loaders(t, cfg["train_chunk"], cfg["test_chunk"])
    make = _ours if side == "ours" else _pydvl
    # warm-up: torch.func pulls in torch._dynamo on first use (seconds); pay it before the clock starts
    warm_train, warm_test = _loaders({k: v[:8] for k, v in t.items()}, 4, 4)
    make(method, model, loss, {**cfg, "rank": 2}).fit(warm_train).influences(t["Xt"][:2], t["yt"][:2], t["X"][:2],
                                                                             t["y"][:2])
    res: dict = {"side": side, "method": method, "n_test": n_test, "n_train": len(t["X"])}
    t0 = time.perf_counter()
    inf = make(method, model, loss, cfg).fit(train)
    res["fit_s"] = time.perf_counter() - t0
    # one-shot on our side too where pyDVL has it: each side's in-memory call against the other's (same work)
    modes = ["calculator", "one_shot"] if side == "pydvl" or method in ("direct", "arnoldi", "ekfac") else ["calculator"]
    if side == "pydvl" and method == "cg":
        modes = ["one_shot"]  # pyDVL's calculator repeats every CG solve for each of the train chunks
    for mode in modes:
        t0 = time.perf_counter()
        if mode == "one_shot":
            M = inf.influences(t["Xt"], t["yt"], t["X"], t["y"])
        elif side == "ours":
            from datamatters.influence.calculators import SequentialInfluenceCalculator

            M = SequentialInfluenceCalculator(inf).influences(test, train).to_tensor()
        else:
            from pydvl.influence import SequentialInfluenceCalculator
            from pydvl.influence.torch.util import NestedTorchCatAggregator

            M = SequentialInfluenceCalculator(inf).influences(test, train).compute(
                aggregator=NestedTorchCatAggregator())
        res[f"{mode}_s"] = time.perf_counter() - t0
        np.save(out.with_name(f"{out.stem}_{mode}.npy"), M.detach().cpu().numpy())
    if side == "ours" and method in ("cg", "cg_all", "cg_plain"):
        info = inf.last_info["full"]
        res["cg_iterations_max"] = int(info["iterations"].max())
        res["cg_converged"] = bool(info["converged"].all())
        res["cg_materialized"] = bool(info["materialized"])
    out.write_text(json.dumps(res))


# ---- the driver ---------------------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _timing(runs: dict) -> dict:
    """Per side and matrix path: ``min`` and ``median`` over repetitions of fit + matrix (each repetition's own sum;
    the ``*_total_s`` fields add the best fit and the best matrix time of any repetitions)."""
    out = {}
    for side, mode in (("ours", "calculator"), ("ours", "one_shot"), ("pydvl", "calculator"), ("pydvl", "one_shot")):
        tot = [r["fit_s"] + r[f"{mode}_s"] for r in runs[side] if f"{mode}_s" in r]
        if tot:
            key = "ours" if (side, mode) == ("ours", "calculator") else f"{side}_{mode}"
            out[key] = {"min": min(tot), "median": float(np.median(tot)), "repetitions": len(tot)}
    return out


def _corr(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("ours", "pydvl"))
    ap.add_argument("--method", choices=METHODS + OURS_ONLY)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "influence_vs_pydvl.json")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "datamatters_influence_bench")
    ap.add_argument("--methods", nargs="+", default=list(METHODS + OURS_ONLY), choices=METHODS + OURS_ONLY)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-test-cg", type=int, default=20, help="test points for CG (pyDVL solves them one by one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke run)")
    ap.add_argument("--merge", action="store_true", help="keep the other methods' entries of an existing --out file")
    ap.add_argument("--note", type=str, default=None, help="a note stored in every entry of this run (e.g. the load)")
    ap.add_argument("--cfg", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--evaluate", action="store_true",
                    help="instead: every method on digits (LDS, noisy-label AUC, agreement with Direct)")
    a = ap.parse_args()
    if a.evaluate:
        evaluate_methods(a.out.with_name("influence_digits_methods.json"), threads=a.threads)
        return
    if a.side:  # child process
        run_side(a.side, a.method, a.work, json.loads(a.cfg), a.out)
        return
    if a.quick:
        a.n_train, a.n_test, a.n_test_cg, a.reps = 500, 50, 10, 1
        if a.out.name == "influence_vs_pydvl.json":
            a.out = a.out.with_name("influence_vs_pydvl_quick.json")
    cfg = {"regularization": 0.01, "cg_tol": 1e-8, "rank": 10, "arnoldi_tol": 1e-6,
           "threads": a.threads, "train_chunk": 1000 if a.n_train >= 1000 else 100, "test_chunk": 100 if a.n_test >= 100 else 10,
           "n_test_cg": a.n_test_cg}
    problem = make_problem(a.work, a.n_train, a.n_test)
    load = {"loadavg_1_5_15_at_start": list(os.getloadavg()), "run_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "note": "shared 2-core machine: other jobs ran alongside (both sides equally, interleaved)"}
    runs: dict = {m: {"ours": [], "pydvl": []} for m in a.methods}
    for rep in range(a.reps):
        for m in a.methods:
            order = ("ours", "pydvl") if rep % 2 == 0 else ("pydvl", "ours")
            for side in order:
                if side == "pydvl" and m in OURS_ONLY:
                    continue
                out = a.work / f"{m}_{side}.json"
                py = OURS_PY if side == "ours" else REF_PY
                t0 = time.perf_counter()
                subprocess.run([str(py), __file__, "--side", side, "--method", m, "--work", str(a.work), "--out",
                                str(out), "--cfg", json.dumps(cfg)], check=True, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
                r = json.loads(out.read_text())
                r["process_s"] = time.perf_counter() - t0
                r["loadavg_1_5_15_after"] = list(os.getloadavg())
                runs[m][side].append(r)
                print(f"rep {rep} {m:8s} {side:5s} " + " ".join(f"{k}={v:.2f}" for k, v in r.items()
                                                               if isinstance(v, float)), flush=True)
    direct_file = a.work / "direct_ours_calculator.npy"
    direct = np.load(direct_file) if "direct" in a.methods or (a.merge and direct_file.exists()) else None
    results = {}
    for m in a.methods:
        ours = np.load(a.work / f"{m}_ours_calculator.npy")
        best = lambda side, key: min(r[key] for r in runs[m][side] if key in r)  # noqa: E731
        o_total = best("ours", "fit_s") + best("ours", "calculator_s")
        entry = {"ours": runs[m]["ours"], "pydvl": runs[m]["pydvl"], "ours_total_s": o_total,
                 "timing_s": _timing(runs[m])}
        o_one = o_total  # pyDVL's one-shot call against ours (our calculator where ours was not run one-shot)
        if all("one_shot_s" in r for r in runs[m]["ours"]):
            o_one = entry["ours_one_shot_total_s"] = best("ours", "fit_s") + best("ours", "one_shot_s")
            entry["ours_one_shot_vs_calculator_rel_error"] = _rel(np.load(a.work / f"{m}_ours_one_shot.npy"), ours)
        if m == "cg_plain" and "cg" in results and "pydvl_one_shot_total_s" in results["cg"]:
            entry["speedup_vs_pydvl_one_shot"] = results["cg"]["pydvl_one_shot_total_s"] / o_total
            entry["agreement_vs_cg"] = {"rel_error": _rel(ours, np.load(a.work / "cg_ours_calculator.npy")),
                                        "pearson": _corr(ours, np.load(a.work / "cg_ours_calculator.npy"))}
        if m == "ekfac_ggn" and (a.work / "ekfac_pydvl_calculator.npy").exists():
            ref = np.load(a.work / "ekfac_pydvl_calculator.npy")
            entry["agreement_vs_pydvl_ekfac"] = {"rel_error": _rel(ours, ref), "pearson": _corr(ours, ref)}
            entry["note"] = ("ours only: EK-FAC on the exact expected Gauss-Newton factors (fisher='ggn', C backward "
                             "passes per batch); a different approximation from pyDVL's summed pseudo-gradient")
        if m == "cg_all" and "cg" in results and "pydvl_one_shot_total_s" in results["cg"]:
            per_row = results["cg"]["pydvl_one_shot_total_s"] / results["cg"]["ours"][0]["n_test"]
            entry["pydvl_one_shot_extrapolated_s"] = per_row * ours.shape[0]
            entry["note"] = "pyDVL not run: its estimate is its per-row CG time on the cg entry times the rows"
        for mode in ("calculator", "one_shot"):
            f = a.work / f"{m}_pydvl_{mode}.npy"
            if not f.exists():
                continue
            ref = np.load(f)
            p_total = best("pydvl", "fit_s") + best("pydvl", f"{mode}_s")
            entry[f"pydvl_{mode}_total_s"] = p_total
            entry[f"speedup_vs_pydvl_{mode}"] = p_total / (o_one if mode == "one_shot" else o_total)
            entry[f"agreement_vs_pydvl_{mode}"] = {"rel_error": _rel(ours, ref), "pearson": _corr(ours, ref)}
            if direct is not None and m != "direct" and ref.shape == direct.shape:
                entry[f"pydvl_{mode}_vs_direct"] = {"rel_error": _rel(ref, direct), "pearson": _corr(ref, direct)}
        if direct is not None and m != "direct" and ours.shape[1] == direct.shape[1]:
            d = direct[: ours.shape[0]]
            entry["ours_vs_direct"] = {"rel_error": _rel(ours, d), "pearson": _corr(ours, d)}
            if m == "cg":
                ref = np.load(a.work / "cg_pydvl_one_shot.npy")
                entry["pydvl_one_shot_vs_direct"] = {"rel_error": _rel(ref, d), "pearson": _corr(ref, d)}
        entry["machine_load"] = {**load, "loadavg_1_5_15_at_end": list(os.getloadavg())}
        if a.note:
            entry["note"] = a.note
        results[m] = entry
    doc = {
        "benchmark": "influence_vs_pydvl",
        "problem": {"data": "MNIST-1D (generated, standardised)", "model": "MLP 40-32-10, tanh, float64",
                    "n_train": a.n_train, "n_test": a.n_test, "n_test_cg": a.n_test_cg, **problem, **cfg,
                    "curvature": "Hessian of the mean cross-entropy + regularization * I"},
        "protocol": ("fresh process per (method, side); ours in .venv, pyDVL 0.10 in .venv-ref (same torch); "
                     "interleaved, order alternating per repetition; best of reps; one BLAS thread each on a shared, "
                     "oversubscribed 2-core machine (noisy); warm-up excluded; totals are fit + matrix; calculator "
                     "speed-ups compare both sides' SequentialInfluenceCalculator (same chunks), one-shot speed-ups "
                     "both sides' in-memory influences(x_test, y_test, x, y) call (entries without "
                     "ours_one_shot_total_s: pyDVL's one-shot against our calculator)"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "reps": a.reps, "results": results,
    }
    if a.merge and a.out.exists():
        old = json.loads(a.out.read_text())
        doc["results"] = {**old.get("results", {}), **results}
        doc["reps"] = {**({m: old.get("reps") for m in old.get("results", {})} if not isinstance(old.get("reps"), dict)
                          else old["reps"]), **{m: a.reps for m in results}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2))
    print(table(doc))


def evaluate_methods(out: Path, num_models: int = 100, threads: int = 1) -> dict:
    """Every method of this engine on one digits model (10% label noise): LDS on the same held-out subset models,
    noisy-label AUC from self-influence, agreement with Direct, timings. Writes ``influence_digits_methods.json``."""
    import torch

    from datamatters.data.digits import DigitsDataModule
    from datamatters.influence import METHODS, evaluate
    from datamatters.influence.calculators import SequentialInfluenceCalculator
    from datamatters.models import build_model
    from datamatters.training.ensemble import train_ensemble

    torch.set_num_threads(threads)
    dm = DigitsDataModule(label_noise={"kind": "uniform", "pc_corrupted": 0.1})
    dm.setup()
    _, X, y = dm.dataset("train").tensors()
    _, Xt, yt = dm.dataset("test").tensors()
    Xt, yt = Xt[:100], yt[:100]
    arch = build_model("mlp", dm.input_shape, dm.num_classes, hidden=[32])
    recipe = dict(epochs=60, batch_size=64, lr=0.01, weight_decay=1e-3, optimizer="adam")
    params = train_ensemble(arch, X, y, np.ones((1, len(y)), dtype=bool), seed=0, **recipe)
    import copy

    model = copy.deepcopy(arch)
    model.load_state_dict({k: v[0] for k, v in params.items()})
    model = model.double().eval()
    t0 = time.perf_counter()
    masks, margins = evaluate.heldout_margins(arch, X, y, Xt, yt, num_models=num_models, alpha=0.5, seed=1,
                                              **recipe)
    heldout_s = time.perf_counter() - t0
    Xd, Xtd = X.double(), Xt.double()
    train = [(Xd[s:s + 256], y[s:s + 256]) for s in range(0, len(y), 256)]
    test = [(Xtd[s:s + 128], yt[s:s + 128]) for s in range(0, len(yt), 128)]
    gn = {"regularization": 0.01, "curvature": "gauss_newton"}  # the configs' choice (see configs/influence)
    settings = {
        "direct": gn,
        "direct_hessian": {"regularization": 0.01},
        "cg": gn,
        "lissa": {**gn, "scale": 10.0, "maxiter": 300, "repetitions": 4},
        "arnoldi": {**gn, "rank": 10},
        "arnoldi_woodbury": {**gn, "rank": 10, "use_woodbury": True},
        "ekfac": {"regularization": 0.01, "update_diagonal": True},
        "nystroem": {**gn, "rank": 64},
        "datainf": {"regularization": "auto", "block_structure": "layer_wise"},
        "trak": {"regularization": 1e-3, "projection_dim": 512},
    }
    loss = torch.nn.functional.cross_entropy
    res, ref = {}, None
    for name, kw in settings.items():
        cls = METHODS[name.split("_")[0]]
        t0 = time.perf_counter()
        inf = cls(model, loss, **kw).fit(train)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        M = SequentialInfluenceCalculator(inf).influences(test, train).to_numpy()
        matrix_s = time.perf_counter() - t0
        si = SequentialInfluenceCalculator(inf).self_influences(train).numpy()
        lds = evaluate.lds_of(M, masks, margins)
        ref = M if name == "direct" else ref
        res[name] = {"settings": {k: v for k, v in kw.items()}, "fit_s": fit_s, "matrix_s": matrix_s,
                     "lds_mean": lds["mean"], "lds_ci": [lds["ci_low"], lds["ci_high"]],
                     "noisy_auc": evaluate.self_influence_auc(si, dm.is_corrupted)["auc"],
                     "vs_direct": evaluate.agreement(M, ref)}
        print(name, {k: v for k, v in res[name].items() if k != "settings"}, flush=True)
    doc = {"benchmark": "influence_digits_methods",
           "problem": {"data": "sklearn digits, 10% uniform label noise on train", "model": "MLP 64-32-10 (ReLU), float64 for "
                       "influence", "n_train": int(len(y)), "n_test": int(len(yt)),
                       "heldout_models": num_models, "alpha": 0.5, "train_recipe": recipe,
                       "heldout_training_s": heldout_s},
           "protocol": ("one process, one BLAS thread, shared noisy 2-core machine; LDS with 1000 bootstrap CI; "
                        "vs_direct compares with Direct on the Gauss-Newton curvature (row 'direct')"),
           "results": res}
    out.write_text(json.dumps(doc, indent=2, default=float))
    return doc


def table(doc: dict) -> str:
    rows = ["| method | test x train | ours (s) | pyDVL calculator (s) | pyDVL one-shot (s) | speed-up (calc / one-shot) "
            "| rel. error vs pyDVL | ours vs Direct (pearson) |", "|" + "---|" * 8]
    for m, e in doc["results"].items():
        n = e["ours"][0]["n_test"], e["ours"][0]["n_train"]
        f = lambda k: f"{e[k]:.1f}" if k in e else "-"  # noqa: E731
        sp = "/".join(f"{e[k]:.1f}x" if k in e else "-" for k in ("speedup_vs_pydvl_calculator",
                                                                   "speedup_vs_pydvl_one_shot"))
        ag = e.get("agreement_vs_pydvl_one_shot", e.get("agreement_vs_pydvl_calculator", {}))
        dv = e.get("ours_vs_direct", {}).get("pearson")
        rows.append(f"| {m} | {n[0]} x {n[1]} | {e['ours_total_s']:.1f} | {f('pydvl_calculator_total_s')} | "
                    f"{f('pydvl_one_shot_total_s')} | {sp} | {ag.get('rel_error', float('nan')):.1e} | "
                    f"{'-' if dv is None else f'{dv:.4f}'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
