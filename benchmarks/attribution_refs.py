"""The attribution job's TRAK and EK-FAC side by side with the reference libraries (traker 0.3.2, kronfluence 1.0.1)
on the same models, data and LDS masks.

Everything is read from a finished ``+experiment=attribution_digits`` (or ``_mnist1d``) run dir: its config (data,
models, recipe, seeds, damping factor) and its ground-truth store (masks and seed-averaged margins). The full-data
model and the TRAK ensemble members are retrained with the job's seeds (the batched trainer is deterministic on CPU;
the script checks that by recomputing the job's own ``ekfac``/``trak`` rows and asserting the same LDS), so both
sides explain exactly the job's models. Timings cover only the attribution work (features, kernels, factors,
scores; the model trainings are shared and not charged), alternating ours/reference per repetition, one thread.

    make bench-env-attribution      # .venv-attr-refs: this package + traker + kronfluence (their own venv)
    .venv-attr-refs/bin/python benchmarks/attribution_refs.py --run outputs/attr_conv/digits [--models logistic mlp]
    # TRAK like for like with traker's lambda_reg=0 (no reproduction check: the job's rows use its damping rule)
    .venv-attr-refs/bin/python benchmarks/attribution_refs.py --run ... --parts trak --trak-damping-factor 0 --out X
    # ours in float32 like traker (rows labelled "(k=..., float32)"), added to the model's rows already in --out
    .venv-attr-refs/bin/python benchmarks/attribution_refs.py --run ... --parts trak --trak-dtype float32 --merge

Rows (per model):
* TRAK, ``c`` members at projection ``k``: ours (``TrakInfluence``, lambda = factor x E||Pg||^2) with loss gradients
  (``trak-*``) and in TRAK's own form (``trak-margin-*``: margin gradients, columns x mean Q = 1 - p_y) vs traker's
  ``TRAKer`` with its CPU defaults (Gaussian projection, margin output, Q re-weighting, float32, ``lambda_reg=0``),
  same members. ``--trak-dtype float32``: ours computes in traker's precision (kernel solved in float64).
* EK-FAC: ours (``EkfacInfluence(update_diagonal=True)``, exact Gauss-Newton expectation) vs kronfluence
  (``strategy="ekfac"``, its default sampled-label Fisher) under the same absolute damping (the job's
  0.1 x mean Gauss-Newton eigenvalue); both with the empirical Fisher (a deterministic like-for-like check of the
  algebra); and kronfluence with its own default damping (0.1 x mean eigenvalue per layer), the number a user gets.
  kronfluence's sampled labels are drawn from torch's global generator, seeded (0) before each of its runs; runs with
  seeds 0..``--kron-seeds``-1 give its run-to-run agreement (``ekfac (kronfluence across seeds)``): if each
  sampled-label run is the expectation plus independent noise, ours-vs-kronfluence is expected at ``sqrt(r)`` of its
  seed-vs-seed ``r``, and rises towards 1 against the mean of more seeds' scores.
  Scores: ``g_test^T (F + lambda)^-1 g_train`` with loss gradients on both sides; agreement = Pearson over the whole
  test x train matrix.

Writes ``benchmarks/results/attribution_refs.json`` (``--out``); a model's entry names its run (``run``, ``tag``),
other models already in the file are kept.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "attribution_refs.json"


# ---- the job's problem ------------------------------------------------------------------------------------------
def load_problem(run: Path, label: str):
    """The job's Problem for ``label`` (ground truth read from the run's store, nothing retrained there), its
    damping rule and settings."""
    from omegaconf import OmegaConf

    from datamatters.tasks import attribution as job
    from datamatters.tasks import attribution_methods as am
    from datamatters.tasks.building import build_datamodule, build_network
    from datamatters.training.ensemble import train_ensemble

    cfg = OmegaConf.load(run / "config.yaml")
    s = job.settings(cfg)
    entry = next(m for m in s.models if m.label == label)
    rec = job.recipe(s, entry)  # the model's own recipe (e.g. the converged logistic's), else attribution.train
    model_cfg = OmegaConf.to_container(entry, resolve=True)
    for k in ("label", "train", "tracin_epochs"):
        model_cfg.pop(k, None)
    dm = build_datamodule(cfg)
    Xtr, ytr = job._tensors(dm, "train")
    Xte_all, yte_all = job._tensors(dm, "test")
    T = int(s.num_test)
    n_gt = len(yte_all) if s.ground_truth.n_test is None else min(int(s.ground_truth.n_test), len(yte_all))
    template = build_network(OmegaConf.create(model_cfg), dm)
    gt_root = Path(s.ground_truth.store) if s.ground_truth.store else run / "ground_truth"
    masks, mg, ls, gt_s = job.ground_truth(gt_root / label, dm, label, model_cfg, s, rec, template, Xtr, ytr,
                                           Xte_all[:n_gt], yte_all[:n_gt])
    if gt_s != 0:
        raise SystemExit(f"the ground-truth store {gt_root / label} was incomplete; finish the job first")
    seed = int(cfg.get("seed") or 0)
    dtype = torch.float64 if s.dtype == "float64" else torch.float32
    t = time.perf_counter()
    full = train_ensemble(template, Xtr, ytr, np.ones((1, len(ytr)), bool), seed=seed, model_ids=[0], **rec)
    train_s = time.perf_counter() - t
    p = am.Problem(label, template, Xtr, ytr, Xte_all[:T], yte_all[:T], rec, seed, dtype, None, train_s,
                   masks, mg[:, :T].astype(np.float64), ls[:, :T].astype(np.float64), int(s.n_boot), None)
    p.full = p.network(full)
    spectrum = am.curvature_spectrum(p.full, p.data)
    job_rows = {}
    for f in (run / "attribution" / label / "rows").glob("*.json"):
        for r in json.loads(f.read_text())["rows"]:
            job_rows[r["method"]] = r
    return p, s, spectrum, job_rows, {"n_train": len(ytr), "n_test": T, "M": int(masks.shape[0]),
                                      "n_parameters": int(sum(v.numel() for v in p.full.parameters())),
                                      "model": model_cfg, "recipe": rec}


def lds(p, scores) -> dict:
    res = p.lds(scores)
    return {"lds": round(float(res["mean"]), 4),
            "ci": [round(float(res["ci_low"]), 4), round(float(res["ci_high"]), 4)]}


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def timed(fn, cpu: list | None = None):
    """(result, wall seconds); the process's CPU seconds appended to ``cpu`` (less sensitive to other load)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if cpu is not None:
        cpu.append(round(time.process_time() - c, 3))
    return out, time.perf_counter() - t


def alternate(ours, ref, reps: int, cpu: dict | None = None):
    """(ours result, ref result, ours seconds per rep, ref seconds per rep), order alternating per repetition;
    CPU seconds in ``cpu["ours"]`` / ``cpu["ref"]`` when given."""
    so, sr, ro, rr = [], [], None, None
    cpu = {"ours": [], "ref": []} if cpu is None else cpu
    for i in range(reps):
        for side in (("o", "r") if i % 2 == 0 else ("r", "o")):
            if side == "o":
                ro, t = timed(ours, cpu.setdefault("ours", []))
                so.append(round(t, 3))
            else:
                rr, t = timed(ref, cpu.setdefault("ref", []))
                sr.append(round(t, 3))
    return ro, rr, so, sr


# ---- TRAK ---------------------------------------------------------------------------------------------------------
def ours_trak(p, members, k: int, lam: float, output: str, dtype: str | None = None):
    """The job's TRAK rows for 1..C members (running ensemble means; ``margin``: times the running mean of Q)."""
    from datamatters.tasks.attribution_methods import out_to_loss, trak_scores

    mats = trak_scores(p, [copy.deepcopy(m) for m in members], k, lam, output, dtype)  # all members in one pass
    counts = np.arange(1, len(mats) + 1)[:, None, None]
    means = np.cumsum(mats, axis=0) / counts
    if output == "margin":
        q = np.cumsum([out_to_loss(m, p.Xtr, p.ytr) for m in members], axis=0)[:, None, :] / counts
        means = means * q
    return means


def traker_trak(p, members, k: int, counts: list[int]):
    """traker's scores for the first c members, for every c in ``counts`` (one featurisation per member)."""
    from trak import TRAKer

    work = Path(tempfile.mkdtemp(prefix="traker_"))
    try:
        model = copy.deepcopy(members[0]).float()
        tr = TRAKer(model=model, task="image_classification", train_set_size=len(p.ytr), save_dir=str(work / "s"),
                    device="cpu", proj_dim=k, use_half_precision=False, logging_level=40)
        X, Xt = p.Xtr.float(), p.Xte.float()
        states = [{n: v.float() for n, v in m.state_dict().items()} for m in members]
        for c, sd in enumerate(states):
            tr.load_checkpoint(sd, model_id=c)
            for a in range(0, len(X), 256):
                tr.featurize(batch=(X[a:a + 256], p.ytr[a:a + 256]), num_samples=len(X[a:a + 256]))
        tr.finalize_features()
        out = {}
        for cnt in counts:
            name = f"q{cnt}"
            for c in range(cnt):
                tr.start_scoring_checkpoint(exp_name=name, checkpoint=states[c], model_id=c, num_targets=len(Xt))
                tr.score(batch=(Xt, p.yte), num_samples=len(Xt))
            out[cnt] = np.asarray(tr.finalize_scores(exp_name=name, model_ids=list(range(cnt)))).T.astype(np.float64)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def trak_side_by_side(p, s, reps: int, counts: list[int], dims: list[int], outputs: list[str],
                      factor: float | None = None, dtype: str | None = None) -> list[dict]:
    from datamatters.tasks import attribution_methods as am

    C = max(counts)
    params = p.train(np.ones((C, len(p.ytr)), bool), int(s.trak.seed), range(C))
    members = [p.network(params, c) for c in range(C)]
    rows = []
    for output, k in [(o, k) for o in outputs for k in dims]:
        g2 = am.mean_sq_grad_norm(p.full, p.Xtr.to(p.dtype), p.ytr, am.OUTPUTS[output])
        if factor is None:  # the job's own rule
            factor = float(s.damping_factor if s.trak.get("damping_factor") is None else s.trak.damping_factor)
        lam = factor * g2 / k
        cpu = {}
        mo, mr, so, sr = alternate(lambda: ours_trak(p, members, k, lam, output, dtype),
                                   lambda: traker_trak(p, members, k, counts), reps, cpu)
        tag = "trak" if output == "loss" else f"trak-{output}"
        prec = f", {dtype}" if dtype else ""  # as the job labels it (default: the problem's float64)
        for cnt in counts:
            o, r = lds(p, mo[cnt - 1]), lds(p, mr[cnt])
            rows.append({"method": f"{tag}-{cnt} (k={k}{prec})",
                         "ours": {**o, "damping": lam, "output": output, "dtype": dtype or str(p.dtype)[6:]},
                         "traker": {**r, "lambda_reg": 0.0, "projection": "normal (its CPU default)",
                                    "output": "margin, Q re-weighting", "dtype": "float32"},
                         "lds_gap": round(o["lds"] - r["lds"], 4),
                         "goal_not_below_traker_by_0.02": o["lds"] >= r["lds"] - 0.02,
                         "pearson_ours_vs_traker": round(pearson(mo[cnt - 1], mr[cnt]), 4)})
        wall, cpu_ratio = min(sr) / min(so), min(cpu["ref"]) / min(cpu["ours"])
        per = {"members": C, "ours_s": so, "traker_s": sr, "speedup_min": round(wall, 2),
               "ours_cpu_s": cpu["ours"], "traker_cpu_s": cpu["ref"], "speedup_cpu_min": round(cpu_ratio, 2),
               "goal_2x": min(wall, cpu_ratio) >= 2.0,  # both clocks: wall time under load flatters either side
               "note": f"seconds for all {C} members (features, kernel, scores of every count); trainings shared"}
        rows.append({"method": f"{tag} timing (k={k}{prec})", **per})
    return rows


# ---- EK-FAC -------------------------------------------------------------------------------------------------------
def ours_ekfac(p, lam: float, fisher: str):
    from datamatters.influence import EkfacInfluence

    inf = EkfacInfluence(copy.deepcopy(p.full), F.cross_entropy, regularization=lam, update_diagonal=True,
                         fisher=fisher).fit(p.data)
    return inf.influences(p.Xte.to(p.dtype), p.yte, p.Xtr.to(p.dtype), p.ytr).cpu().numpy()


def kronfluence_ekfac(p, damping, empirical: bool, seed: int = 0):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    f64 = torch.float64
    work = Path(tempfile.mkdtemp(prefix="kronfluence_"))
    try:
        task = Classification()
        model = prepare_model(copy.deepcopy(p.full), task)
        an = Analyzer(analysis_name="a", model=model, task=task, cpu=True, output_dir=str(work),
                      disable_tqdm=True, disable_model_save=True)
        train = torch.utils.data.TensorDataset(p.Xtr.to(p.dtype), p.ytr)
        query = torch.utils.data.TensorDataset(p.Xte.to(p.dtype), p.yte)
        fa = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical, activation_covariance_dtype=f64,
                             gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64,
                             eigendecomposition_dtype=f64)
        torch.manual_seed(seed)  # its sampled labels (torch.multinomial in the task) come from the global generator
        an.fit_all_factors(factors_name="f", dataset=train, per_device_batch_size=len(train), factor_args=fa,
                           overwrite_output_dir=True)
        sa = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                            score_dtype=f64)
        an.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=query, train_dataset=train,
                                   per_device_query_batch_size=len(query), per_device_train_batch_size=len(train),
                                   score_args=sa, overwrite_output_dir=True)
        return an.load_pairwise_scores("s")["all_modules"].cpu().numpy().astype(np.float64)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kronfluence_seeds(p, lam: float, ours, kron0, n: int) -> dict:
    """kronfluence's sampled-label EK-FAC with seeds 0..n-1 of its label sampling (``kron0``: seed 0's scores),
    against itself and against ours (the exact expectation). If each run is the expectation plus independent noise
    of equal size, with ``r`` the mean seed-vs-seed Pearson, ours vs the mean of ``m`` seeds is expected at
    ``sqrt(m r / (1 + (m - 1) r))`` (``sqrt(r)`` for one seed) and tends to 1 with ``m``."""
    runs, secs = [kron0], []
    for sd in range(1, n):
        k, t = timed(lambda: kronfluence_ekfac(p, lam, False, seed=sd))
        runs.append(k)
        secs.append(round(t, 3))
    pairs = [pearson(runs[i], runs[j]) for i in range(n) for j in range(i + 1, n)]
    r = float(np.mean(pairs))
    vs_mean = [pearson(ours, np.mean(runs[:m], axis=0)) for m in range(1, n + 1)]
    return {"method": "ekfac (kronfluence across seeds)", "damping": lam, "seeds": n,
            "note": "kronfluence's default sampled-label Fisher with seeds 0..n-1 of its label sampling, against "
                    "itself and against ours (exact expectation); expected_if_noise: ours vs the mean of m seeds if "
                    "the runs were the expectation plus independent equal noise",
            "kronfluence_lds_per_seed": [lds(p, k)["lds"] for k in runs],
            "kronfluence_mean_of_seeds": lds(p, np.mean(runs, axis=0)), "kronfluence_s": secs,
            "pearson_seed_vs_seed": [round(x, 5) for x in pairs], "pearson_seed_vs_seed_mean": round(r, 5),
            "pearson_ours_vs_each_seed": [round(pearson(ours, k), 5) for k in runs],
            "pearson_ours_vs_mean_of_m_seeds": [round(x, 5) for x in vs_mean],
            "expected_if_noise": [round(float(np.sqrt(max(m * r / (1 + (m - 1) * r), 0.0))), 5)
                                  for m in range(1, n + 1)]}


def ekfac_side_by_side(p, s, spectrum, reps: int, seeds: int = 5) -> list[dict]:
    lam = float(s.damping_factor) * spectrum["mean"]
    rows = []
    for ours_f, ref_emp, what in (("ggn", False, "default Fisher on both sides (ours exact expectation, kronfluence "
                                                  "one sampled label per example)"),
                                  ("empirical", True, "empirical Fisher on both sides (deterministic, same algebra)")):
        mo, mr, so, sr = alternate(lambda: ours_ekfac(p, lam, ours_f), lambda: kronfluence_ekfac(p, lam, ref_emp),
                                   reps)
        r = pearson(mo, mr)
        rows.append({"method": f"ekfac ({ours_f})", "fisher": what, "damping": lam, "ours": {**lds(p, mo), "s": so},
                     "kronfluence": {**lds(p, mr), "s": sr}, "pearson": round(r, 5), "goal_pearson_0.99": r >= 0.99,
                     "max_rel_diff": float(np.abs(mo - mr).max() / np.abs(mr).max()),
                     "speedup_min": round(min(sr) / min(so), 2), "goal_no_slower": min(so) <= min(sr)})
        if not ref_emp:
            ours_ggn, kron0 = mo, mr
    kd, t = timed(lambda: kronfluence_ekfac(p, None, False))
    rows.append({"method": "ekfac (kronfluence's own damping: 0.1 x mean eigenvalue per layer)",
                 "kronfluence": {**lds(p, kd), "s": [round(t, 3)]}})
    rows.append(kronfluence_seeds(p, lam, ours_ggn, kron0, seeds))
    return rows


# ---- the README table -----------------------------------------------------------------------------------------------
def markdown(res: dict, source: str = "attribution_refs.json") -> str:
    """One table per results file: per model, TRAK and EK-FAC rows with LDS and seconds on both sides and the goals."""
    def yn(ok) -> str:
        return "met" if ok else "**missed**"

    def cpu_text(t) -> str:
        return f" (CPU time {t['speedup_cpu_min']}x)" if "speedup_cpu_min" in t else ""

    lines = ["| model | method | ours: LDS | reference: LDS | ours s | reference s | goal |", "|---" * 7 + "|"]
    for label, rec in res["models"].items():
        name = f"{label} ({rec['tag']})" if rec.get("tag") else label
        timing = {r["method"].replace(" timing", ""): r for r in rec["rows"] if " timing (" in r["method"]}
        for r in rec["rows"]:
            m = r["method"]
            if m.startswith("trak") and "ours" in r:
                t = timing[m.rsplit("-", 1)[0] + " (" + m.split("(")[1]]
                lines.append(f"| {name} | {m} vs traker | {r['ours']['lds']:.3f} | {r['traker']['lds']:.3f} | "
                             f"{min(t['ours_s']):.3g} (all {t['members']} members) | {min(t['traker_s']):.3g} | "
                             f"LDS not below traker - 0.02: {yn(r['goal_not_below_traker_by_0.02'])}; "
                             f"2x faster: {t['speedup_min']}x{cpu_text(t)}, {yn(t['goal_2x'])} |")
            elif m.startswith("ekfac (") and "ours" in r:
                lines.append(f"| {name} | {m} vs kronfluence, damping {r['damping']:.3g} | "
                             f"{r['ours']['lds']:.3f} | {r['kronfluence']['lds']:.3f} | {min(r['ours']['s']):.3g} | "
                             f"{min(r['kronfluence']['s']):.3g} | Pearson {r['pearson']:.4f} >= 0.99: "
                             f"{yn(r['goal_pearson_0.99'])}; no slower: {r['speedup_min']}x, "
                             f"{yn(r['goal_no_slower'])} |")
            elif m == "ekfac (kronfluence across seeds)":
                n, ls, each = r["seeds"], r["kronfluence_lds_per_seed"], r["pearson_ours_vs_each_seed"]
                pr = r["pearson_seed_vs_seed"]
                lines.append(f"| {name} | kronfluence EK-FAC, {n} seeds of its sampled labels, damping "
                             f"{r['damping']:.3g} | - | {min(ls):.3f}-{max(ls):.3f} (mean of the {n} seeds' scores: "
                             f"{r['kronfluence_mean_of_seeds']['lds']:.3f}) | - | {min(r['kronfluence_s']):.3g} | "
                             f"Pearson seed vs seed {min(pr):.3f}-{max(pr):.3f}; ours vs one seed "
                             f"{min(each):.3f}-{max(each):.3f} (equal noise alone: {r['expected_if_noise'][0]:.3f}); "
                             f"ours vs the mean of the {n} seeds {r['pearson_ours_vs_mean_of_m_seeds'][-1]:.4f} "
                             f"(noise alone: {r['expected_if_noise'][-1]:.4f}) |")
            elif m.startswith("ekfac (kronfluence"):
                lines.append(f"| {name} | kronfluence EK-FAC, its own damping | - | {r['kronfluence']['lds']:.3f} | "
                             f"- | {min(r['kronfluence']['s']):.3g} | (the number a kronfluence user gets) |")
    runs = res.get("runs") or [{"protocol": res["protocol"], "machine": res["machine"]}]
    def load(r) -> str:
        la = (r.get("machine") or {}).get("loadavg_1min_start")
        return "load not recorded" if la is None else f"load average {la:.1f} at start"

    def what(r) -> str:
        pr = r["protocol"]
        parts = pr.get("parts", ["trak", "ekfac"])
        reps = "+".join(str(pr.get("trak_reps", pr["reps"]) if x == "trak" else pr["reps"]) for x in parts)
        names = {"trak": f"TRAK {pr.get('trak_dtype') or 'float64'}", "ekfac": "EK-FAC"}
        return (f"{'/'.join(r.get('models', [])) or 'run'} ({'+'.join(names[x] for x in parts)}): repetitions {reps}, "
                f"{load(r)}")

    per = "; ".join(what(r) for r in runs)
    cpu = any("speedup_cpu_min" in r for rec in res["models"].values() for r in rec["rows"])
    return "\n".join(lines) + (f"\n\n_From `benchmarks/results/{source}` (traker "
                               f"{res['versions']['traker']}, kronfluence {res['versions']['kronfluence']}, torch "
                               f"{res['versions']['torch']}; 1 thread on a {res['machine']['cpus']}-core machine "
                               f"shared with other sessions; seconds: min over TRAK+EK-FAC repetitions, "
                               f"ours/reference alternating, "
                               f"attribution work only"
                               + ("; TRAK speed-ups on both clocks, min wall and min process CPU time, the 2x goal "
                                  "on the lower" if cpu else "")
                               + f"; runs in order, a later run's rows replace the rows it repeats: {per})._")


def prune_runs(runs: list[dict]) -> list[dict]:
    """The runs whose rows are still in the file: a run goes when later runs repeat each of its parts (same models;
    TRAK: same precision and damping, its outputs, sizes and counts among theirs; EK-FAC: all its rows)."""
    def parts(r) -> list[str]:
        return r["protocol"].get("parts", ["trak", "ekfac"])

    def repeats(new, old, part) -> bool:
        pn, po = new["protocol"], old["protocol"]
        if part not in parts(new) or not set(old.get("models", [])) <= set(new.get("models", [])):
            return False
        return part == "ekfac" or (
            pn.get("trak_dtype") == po.get("trak_dtype") and pn.get("trak_damping_factor") == po.get("trak_damping_factor")
            and set(po.get("trak_outputs", ["loss", "margin"])) <= set(pn.get("trak_outputs", ["loss", "margin"]))
            and set(po["trak_dims"]) <= set(pn["trak_dims"]) and set(po["trak_counts"]) <= set(pn["trak_counts"]))

    return [r for i, r in enumerate(runs)
            if not all(any(repeats(n, r, part) for n in runs[i + 1:]) for part in parts(r))]


def part_order(rows: list[dict]) -> list[dict]:
    """TRAK rows first (float64 before float32, as run), then EK-FAC."""
    return sorted(rows, key=lambda r: (not r["method"].startswith("trak"), "float32" in r["method"]))


# ---- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished attribution job's run dir")
    ap.add_argument("--models", nargs="+", default=None, help="model labels (default: all of the run's)")
    ap.add_argument("--trak-counts", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--trak-dims", type=int, nargs="+", default=[512])
    ap.add_argument("--trak-outputs", nargs="+", default=["loss", "margin"], choices=["loss", "margin"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--trak-reps", type=int, default=None, help="repetitions of the TRAK timings (default --reps)")
    ap.add_argument("--parts", nargs="+", default=["trak", "ekfac"], choices=["trak", "ekfac"])
    ap.add_argument("--kron-seeds", type=int, default=5, help="seeds of kronfluence's label sampling compared")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="")
    ap.add_argument("--tag", default="", help="a short name for the model's run/recipe, shown in the table")
    ap.add_argument("--trak-damping-factor", type=float, default=None,
                    help="our TRAK's damping factor instead of the run's (0 = traker's lambda_reg=0); the rows "
                         "then differ from the job's, so the reproduction check is skipped")
    ap.add_argument("--trak-dtype", default=None, choices=["float32", "float64"],
                    help="our TRAK's compute precision (default: the run's); float32 = traker's, rows labelled so")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's rows to the model's rows already in --out (same method names replaced)")
    ap.add_argument("--markdown", action="store_true", help="print the README table of --out and exit")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(a.out.read_text()), a.out.name))
        return
    torch.set_num_threads(1)
    from importlib.metadata import version

    from omegaconf import OmegaConf

    labels = a.models or [m["label"] for m in OmegaConf.load(a.run / "config.yaml").attribution.models]
    prev = json.loads(a.out.read_text()) if a.out.is_file() else {}
    res = {"benchmark": "attribution job's TRAK and EK-FAC vs traker and kronfluence, same models/data/LDS masks",
           "protocol": {"run": str(a.run), "reps": a.reps, "trak_reps": a.trak_reps or a.reps,
                        "trak_counts": a.trak_counts, "trak_dims": a.trak_dims, "parts": a.parts,
                        "trak_outputs": a.trak_outputs, "trak_dtype": a.trak_dtype,
                        "trak_damping_factor": a.trak_damping_factor, "kron_seeds": a.kron_seeds,
                        "threads": 1, "timing": "min over reps, ours/reference alternating; attribution work only "
                        "(model trainings shared)", "note": a.note},
           "versions": {k: version(k) for k in ("traker", "kronfluence", "torch")},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_1min_start": os.getloadavg()[0]},
           "command": " ".join(["benchmarks/attribution_refs.py", *sys.argv[1:]]),
           "models": dict(prev.get("models", {})), "runs": []}
    for k in ("runs", *(("earlier_adam60_logistic",) if "earlier_adam60_logistic" in prev else ())):
        res[k] = list(prev.get(k, [])) if k == "runs" else prev[k]
    run_rec = {"source": res["command"], "models": [], "protocol": res["protocol"], "machine": dict(res["machine"])}
    if not a.merge:  # this run replaces its models' entries: runs that only covered them go
        res["runs"] = [r for r in res["runs"] if set(r.get("models", [])) - set(labels)]
    res["runs"] = prune_runs(res["runs"] + [run_rec])
    for label in labels:
        p, s, spectrum, job_rows, info = load_problem(a.run, label)
        rec = {"run": str(a.run), "tag": a.tag, "problem": info, "spectrum": spectrum, "rows": []}
        if "trak" in a.parts:
            rec["rows"] += trak_side_by_side(p, s, a.trak_reps or a.reps, a.trak_counts, a.trak_dims, a.trak_outputs,
                                             a.trak_damping_factor, a.trak_dtype)
            # the same models as the job: our TRAK here must reproduce the job's rows (at the job's damping; float32
            # rows to the float64 row's LDS within 1e-3)
            for r in rec["rows"]:
                base = r["method"].replace(f", {a.trak_dtype})", ")") if a.trak_dtype else r["method"]
                if base in job_rows and "ours" in r and a.trak_damping_factor is None:
                    r["job_lds"] = round(job_rows[base]["lds"], 4)
                    assert abs(r["job_lds"] - r["ours"]["lds"]) < 1e-3, (r["method"], r["job_lds"], r["ours"]["lds"])
        if "ekfac" in a.parts:
            rec["rows"] += ekfac_side_by_side(p, s, spectrum, a.reps, a.kron_seeds)
            # the job's ``ekfac`` row is ours with the default (Gauss-Newton) Fisher at the same damping rule
            ours_ggn = next(r for r in rec["rows"] if r["method"] == "ekfac (ggn)")
            if "ekfac" in job_rows:
                ours_ggn["job_lds"] = round(job_rows["ekfac"]["lds"], 4)
                assert abs(ours_ggn["job_lds"] - ours_ggn["ours"]["lds"]) < 1e-3, (ours_ggn, job_rows["ekfac"])
        rec["machine_loadavg_1min_end"] = run_rec["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
        run_rec["models"].append(label)
        old = res["models"].get(label)
        if a.merge and old is not None:  # keep the earlier rows of other methods (EK-FAC: all replaced), then these
            new = {r["method"] for r in rec["rows"]}
            gone = lambda m: m in new or ("ekfac" in a.parts and m.startswith("ekfac ("))  # noqa: E731
            rec = {**old, "rows": part_order([r for r in old["rows"] if not gone(r["method"])] + rec["rows"]),
                   "machine_loadavg_1min_end": rec["machine_loadavg_1min_end"]}
        res["models"][label] = rec
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(rec, indent=1), file=sys.stderr)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
