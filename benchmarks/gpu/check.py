"""The GPU check: one run, at most 8 minutes on one H200, one JSON per part as soon as the part ends.

Parts: ``rho_throughput`` (benchmarks/rho_throughput.py, full size), ``il_pass`` (the irreducible-loss pass),
``ensemble`` (batched ensemble training, models/s GPU vs CPU), ``lasso`` (the datamodels lasso path, GPU vs CPU
solutions, then 50,000 models x 10,000 points x 1,000 targets), ``influence`` (CG and EK-FAC on the GPU against
Direct), ``knn_shapley`` (exact KNN-Shapley 10^6 x 10^4, extrapolated from the test points done when the budget ends).
Each part runs in its own try block under its own time budget (SIGALRM), so a failure or a slow part costs only
itself. ``--tiny`` runs every part at toy size on the CPU in seconds (tests/test_gpu_check.py).

Imports only engine modules that work without hydra, omegaconf, wandb, hmmlearn, dask, zarr or mnist1d (absent on
the GPU machine); run from the repository root with ``PYTHONPATH=src``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]

# seconds per part on the GPU (they sum to 450 s: check.sh stops the whole run at 460 s); --tiny uses TINY_BUDGET each
BUDGET = {"rho_throughput": 90, "il_pass": 30, "ensemble": 50, "lasso": 140, "influence": 50, "knn_shapley": 90}
TINY_BUDGET = 60  # a cap, not the expected time: a part takes seconds, but importing lightning can take 25 s on a
# loaded 2-core machine


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout("part ran past its time budget")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device) -> float:
    sync(device)
    return time.perf_counter()


def mlp(d_in: int, hidden: int, d_out: int, dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)).to(dtype)


def blobs(n: int, d: int, classes: int, seed: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features, labels from a fixed random linear teacher plus noise (learnable, not separable)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(d, classes, generator=g)
    x = torch.randn(n, d, generator=g)
    y = (x @ W + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x.to(device, dtype), y.to(device)


# ------------------------------------------------------------------------------------------------------------ parts
def part_rho_throughput(a, device, out: Path) -> dict:
    """benchmarks/rho_throughput.py (its own JSON layout), full size on the GPU, in this process (one import of
    lightning for every part)."""
    import importlib.util

    path = out / "rho_throughput.json"
    argv = ["--device", device.type, "--out", str(path), "--threads", str(torch.get_num_threads())]
    if a.tiny:  # its --tiny (width 16, n_B 64) takes ~20 s on a loaded 2-core CPU: smaller still here
        argv += ["--width", "4", "--n-big", "16", "--warmup", "1", "--steps", "1", "--reps", "1",
                 "--variants", "uniform", "rho_inference_fp32"]
    spec = importlib.util.spec_from_file_location("rho_throughput", ROOT / "benchmarks" / "rho_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = sys.argv
    try:
        sys.argv = [spec.origin, *argv]
        mod.main()
    finally:
        sys.argv = saved
    rec = json.loads(path.read_text())
    rho = [r for r in rec["results"] if r["variant"] != "uniform"]
    best = min(rho, key=lambda r: r["step_vs_uniform"])
    rec.update(what=f"RHO-LOSS step vs uniform step, {rec['model']}, n_B={rec['n_B']} (benchmarks/rho_throughput.py)",
               headline=f"best RHO variant {best['variant']}: {best['step_vs_uniform']:.2f}x a uniform step",
               goal=1.5, met=best["step_vs_uniform"] <= 1.5, value=best["step_vs_uniform"])
    return rec


def part_il_pass(a, device, out: Path) -> dict:
    """Irreducible losses of a whole training split: evaluate_losses of a CIFAR ResNet-18 in fp32 and bf16."""
    from datamatters.models import build_model
    from datamatters.training.classifier import evaluate_losses

    n, bs, width = (64, 32, 4) if a.tiny else (50_000, 1_000, 64)
    model = build_model("resnet18", (3, 32, 32), 10, width=width).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.arange(s, min(s + bs, n)), torch.randn(min(bs, n - s), 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (min(bs, n - s),), generator=g).to(device)) for s in range(0, n, bs)]
    def run(which, ctx):
        with torch.inference_mode(), torch.autocast(device.type, dtype=ctx, enabled=ctx is not None):
            return evaluate_losses(model, which, device=device)[1]

    res = {}
    for name, ctx in (("fp32", None), ("bf16", torch.bfloat16)):
        run(batches[:2], ctx)  # warm-up (cuDNN autotuning, allocator)
        t0 = clock(device)
        losses = run(batches, ctx)
        res[name] = {"seconds": clock(device) - t0, "losses": losses}
    rel = float(np.abs(res["bf16"]["losses"] - res["fp32"]["losses"]).max() / np.abs(res["fp32"]["losses"]).max())
    eps = {k: n / v["seconds"] for k, v in res.items()}
    return {"what": f"IL pass: per-example losses of {n:,} 32x32x3 images, CIFAR ResNet-18 width {width}, batch {bs}",
            "n": n, "seconds": {k: v["seconds"] for k, v in res.items()}, "examples_per_s": eps,
            "bf16_vs_fp32_max_rel_diff": rel, "headline": f"{eps['fp32']:,.0f} examples/s fp32, "
            f"{eps['bf16']:,.0f} bf16 (max rel. loss diff {rel:.1e})"}


def part_ensemble(a, device, out: Path) -> dict:
    """Batched ensemble training (training/ensemble.py): models/s on the device vs the CPU, same models."""
    from datamatters.training.ensemble import predict_ensemble, train_ensemble

    n, d, C, hidden, epochs, bs = (200, 16, 4, 16, 2, 32) if a.tiny else (2_000, 64, 10, 64, 10, 64)
    m_dev, m_cpu = (8, 4) if a.tiny else (4_000, 64)
    X, y = blobs(n, d, C, 1, "cpu")
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(m_dev, n, generator=g) < 0.5
    model = mlp(d, hidden, C)
    kw = dict(epochs=epochs, batch_size=bs, lr=1e-2, optimizer="adam", seed=0)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    p_cpu = train_ensemble(model, X, y, masks[:m_cpu], device="cpu", **kw)
    cpu_s = time.perf_counter() - t0
    train_ensemble(model, X, y, masks[:2], device=device, **kw)  # warm-up (kernels, allocator)
    t0 = clock(device)
    p_dev = train_ensemble(model, X, y, masks, device=device, **kw)
    dev_s = clock(device) - t0
    # the same model ids on both devices: same init and batch order, so the same models up to float rounding
    acc_cpu = (predict_ensemble(model, p_cpu, X).argmax(-1) == y).float().mean(1)
    acc_dev = (predict_ensemble(model, {k: v[:m_cpu] for k, v in p_dev.items()}, X.to(device)).argmax(-1).cpu()
               == y).float().mean(1)
    rate_cpu, rate_dev = m_cpu / cpu_s, m_dev / dev_s
    return {"what": f"batched ensemble training: MLP {d}-{hidden}-{C}, {n} points, alpha 0.5, {epochs} epochs, "
                    f"batch {bs}, Adam", "models": {"device": m_dev, "cpu": m_cpu}, "cpu_threads": threads,
            "seconds": {"device": dev_s, "cpu": cpu_s}, "models_per_s": {"device": rate_dev, "cpu": rate_cpu},
            "speedup": rate_dev / rate_cpu, "goal": 20.0, "met": rate_dev / rate_cpu >= 20.0,
            "train_acc_max_abs_diff_same_models": float((acc_cpu - acc_dev).abs().max()),
            "headline": f"{rate_dev:,.1f} models/s vs CPU ({threads} threads) {rate_cpu:,.2f}/s: "
                        f"{rate_dev / rate_cpu:,.1f}x"}


def _planted(models: int, n_train: int, targets: int, seed: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Bernoulli(0.5) masks and sparse planted linear outputs plus unit noise (made on ``device``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    masks = torch.rand(models, n_train, generator=g, device=device) < 0.5
    W = torch.randn(n_train, targets, generator=g, device=device) * (torch.rand(n_train, targets, generator=g,
                                                                                   device=device) < 0.02)
    Y = torch.empty(models, targets, device=device)
    for s in range(0, models, 4096):
        Y[s:s + 4096] = masks[s:s + 4096].float() @ W + torch.randn(min(4096, models - s), targets, generator=g,
                                                                   device=device)
    return masks.cpu().numpy(), Y.cpu().numpy()


def part_lasso(a, device, out: Path) -> dict:
    """The lasso path (datamodels/regression.py): the device's solutions against a float64 CPU fit of the same
    problem, then the goal size timed (extrapolated from the first targets when the whole would not fit)."""
    from datamatters.datamodels.regression import fit_datamodels

    small = (300, 40, 6) if a.tiny else (4_000, 500, 50)
    full = (600, 60, 12) if a.tiny else (50_000, 10_000, 1_000)
    first = 4 if a.tiny else 100
    kw = dict(k=100, eps=1e-3, patience=5, tol=1e-4)
    masks, Y = _planted(*small, seed=0, device=device)
    ref = fit_datamodels(masks, Y, device="cpu", dtype=torch.float64, **kw)
    t0 = time.perf_counter()
    fit_datamodels(masks, Y, device="cpu", **kw)  # the CPU's own (float32) run of the same problem, timed
    cpu_s = time.perf_counter() - t0
    fit_datamodels(masks[:200], Y[:200, :2], device=device, **kw)  # warm-up
    t0 = clock(device)
    got = fit_datamodels(masks, Y, device=device, **kw)
    small_s = clock(device) - t0
    pred_ref, pred_got = ref.predict(masks), got.predict(masks)
    agree = {"val_mse_max_rel_diff": float(np.abs(got.val_mse / ref.val_mse - 1).max()),
             "prediction_max_rel_diff": float(np.abs(pred_got - pred_ref).max() / np.abs(pred_ref).max()),
             "same_lambda_fraction": float(np.mean(got.lam_index == ref.lam_index))}
    del masks, Y
    masks, Y = _planted(*full, seed=1, device=device)
    M, n, T = full
    t0 = clock(device)
    fit_datamodels(masks, Y, device=device, end=first, **kw)
    first_s = clock(device) - t0
    remaining = a.deadline - time.monotonic()
    rec = {"what": f"lasso path + validation + refit on {device.type}: {M:,} models x {n:,} points x {T:,} targets "
                   "(patience 5, 100 lambdas, tol 1e-4)",
           "agreement_problem": dict(zip(("models", "points", "targets"), small)), "agreement_vs_cpu_float64": agree,
           "agreement_problem_seconds": {"device": small_s, "cpu": cpu_s, "cpu_threads": torch.get_num_threads()},
           "agreement_problem_speedup": cpu_s / small_s, "problem": {"models": M, "points": n, "targets": T},
           "first_targets": first, "first_targets_s": first_s, "goal_s": 60.0}
    if first_s * T / first < 0.8 * remaining:
        t0 = clock(device)
        fit_datamodels(masks, Y, device=device, **kw)
        rec.update(seconds=clock(device) - t0, extrapolated=False)
    else:  # fixed costs (moments, Gram) are counted in every slice: linear in targets is an upper bound
        rec.update(seconds=first_s * T / first, extrapolated=True, extrapolated_from=f"{first} of {T} targets")
    rec.update(met=rec["seconds"] <= 60.0, value=rec["seconds"],
               headline=f"{rec['seconds']:,.1f} s; {cpu_s / small_s:,.1f}x the CPU on the smaller problem; "
                        f"vs CPU float64: val MSE within {agree['val_mse_max_rel_diff']:.1e}"
                        f" rel., same lambda on {100 * agree['same_lambda_fraction']:.0f}%")
    return rec


def part_influence(a, device, out: Path) -> dict:
    """CG and EK-FAC influences on the device against Direct (Gauss-Newton curvature, float64)."""
    from torch.utils.data import DataLoader, TensorDataset

    from datamatters.influence import CgInfluence, DirectInfluence, EkfacInfluence

    d, hidden, C, n, n_test = (8, 8, 3, 200, 10) if a.tiny else (64, 128, 10, 10_000, 200)
    X, y = blobs(n + n_test, d, C, 3, device, torch.float64)
    model = mlp(d, hidden, C, torch.float64).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50 if a.tiny else 300):
        opt.zero_grad()
        F.cross_entropy(model(X[:n]), y[:n]).backward()
        opt.step()
    loader = DataLoader(TensorDataset(X[:n], y[:n]), batch_size=1_000)
    xt, yt, xs, ys = X[n:], y[n:], X[:n], y[:n]
    res, mats = {}, {}
    makers = {
        "cg": lambda: CgInfluence(model, F.cross_entropy, regularization=0.01, curvature="gauss_newton",
                                  rtol=1e-8, atol=1e-12),
        "ekfac": lambda: EkfacInfluence(model, F.cross_entropy, regularization=0.01, update_diagonal=True),
        "direct": lambda: DirectInfluence(model, F.cross_entropy, regularization=0.01, curvature="gauss_newton"),
    }
    for name, make in makers.items():  # the timed methods first: a Direct reference over budget loses only itself
        try:
            t0 = clock(device)
            inf = make().fit(loader)
            t1 = clock(device)
            mats[name] = inf.influences(xt, yt, xs, ys).reshape(n_test, n)
            res[name] = {"fit_s": t1 - t0, "influences_s": clock(device) - t1}
        except PartTimeout:
            res[name] = {"status": "timeout"}
            break
    for name in ("cg", "ekfac"):
        if name in mats and "direct" in mats:
            a_, b_ = mats[name].flatten(), mats["direct"].flatten()
            res[name]["pearson_vs_direct"] = float(torch.corrcoef(torch.stack([a_, b_]))[0, 1])
            res[name]["rel_error_vs_direct"] = float((a_ - b_).norm() / b_.norm())
    p = sum(q.numel() for q in model.parameters())
    return {"what": f"influence {n_test} test x {n:,} train, MLP {d}-{hidden}-{C} ({p:,} params, float64), "
                    "Gauss-Newton, reg 0.01", "methods": res,
            "headline": "; ".join(f"{k} timeout" if "fit_s" not in v else f"{k} {v['fit_s'] + v['influences_s']:.2f} s"
                                  + (f" (Pearson vs Direct {v['pearson_vs_direct']:.4f})"
                                     if "pearson_vs_direct" in v else "") for k, v in res.items())}


def knn_shapley_torch(x_test, y_test, x_train, y_train, k: int, chunk: int, deadline: float | None = None,
                      exact_distances: bool = False):
    """Exact KNN-Shapley (Jia et al. 2019, the recursion of valuation/knn.py) on the tensors' device, test points
    in chunks; returns (values summed over the test points done, test points done). Distances in the inputs' dtype
    (``exact_distances``: without the matrix-product shortcut, so float64 neighbour orders match scikit-learn's)."""
    mode = "donot_use_mm_for_euclid_dist" if exact_distances else "use_mm_for_euclid_dist_if_necessary"
    n = x_train.shape[0]
    dev = x_train.device
    values = torch.zeros(n, dtype=torch.float64, device=dev)
    denom = torch.maximum(torch.tensor(float(k), device=dev),
                          torch.arange(1, n, device=dev, dtype=torch.float64))
    done = 0
    for s in range(0, x_test.shape[0], chunk):
        if deadline is not None and done and time.monotonic() > deadline:
            break
        xt, yt = x_test[s:s + chunk], y_test[s:s + chunk]
        order = torch.cdist(xt, x_train, compute_mode=mode).argsort(dim=1, stable=True)
        match = (y_train[order] == yt[:, None]).to(torch.float64)
        steps = torch.empty_like(match)
        steps[:, -1] = match[:, -1] / max(k, n)
        steps[:, :-1] = (match[:, :-1] - match[:, 1:]) / denom
        s_val = steps.flip(1).cumsum(1).flip(1)
        values.index_add_(0, order.flatten(), s_val.flatten())
        done += len(xt)
    return values, done


def part_knn_shapley(a, device, out: Path) -> dict:
    """Exact KNN-Shapley on the device: checked against the engine (numpy) on a small problem, then 10^6 x 10^4."""
    from datamatters.valuation.knn import knn_shapley_values, sorted_neighbours

    k, d = 5, 32
    xs, ys = blobs(2_000 if not a.tiny else 300, d, 10, 4, "cpu")
    xq, yq = blobs(50 if not a.tiny else 20, d, 10, 5, "cpu")
    ref = knn_shapley_values(sorted_neighbours(xq.numpy(), xs.numpy()), ys.numpy(), yq.numpy(), k)
    got, _ = knn_shapley_torch(xq.to(device, torch.float64), yq.to(device), xs.to(device, torch.float64),
                               ys.to(device), k, chunk=16, exact_distances=True)
    check = float(np.abs(got.cpu().numpy() - ref).max())
    n_train, n_test = (5_000, 100) if a.tiny else (1_000_000, 10_000)
    x_train, y_train = blobs(n_train, d, 10, 6, device)
    x_test, y_test = blobs(n_test, d, 10, 7, device)
    chunk = 50 if a.tiny else 200
    knn_shapley_torch(x_test[:chunk], y_test[:chunk], x_train, y_train, k, chunk)  # warm-up
    t0 = clock(device)
    # stop starting chunks when 85% of what is left of the budget is spent; the rest is extrapolated
    values, done = knn_shapley_torch(x_test, y_test, x_train, y_train, k, chunk,
                                     deadline=time.monotonic() + 0.85 * (a.deadline - time.monotonic()))
    secs = clock(device) - t0
    total = secs * n_test / done
    rec = {"what": f"exact KNN-Shapley {n_train:,} train x {n_test:,} test, {d} features, k={k}, chunks of {chunk}, "
                   "float32 distances, float64 values",
           "n_train": n_train, "n_test": n_test, "k": k, "test_points_done": done, "seconds_done": secs,
           "seconds": total, "extrapolated": done < n_test, "values_sum_per_test_point": float(values.sum()) / done,
           "max_abs_diff_vs_engine_small": check, "goal_s": 600.0, "met": total <= 600.0, "value": total}
    if done < n_test:
        rec["extrapolated_from"] = f"{done} of {n_test} test points"
    rec["headline"] = f"{total:,.1f} s; equals the engine's values to {check:.1e} on a small problem"
    return rec


PARTS = {"rho_throughput": part_rho_throughput, "il_pass": part_il_pass, "ensemble": part_ensemble,
         "lasso": part_lasso, "influence": part_influence, "knn_shapley": part_knn_shapley}
GOALS = {"rho_throughput": ("<=", "x"), "ensemble": (">=", "x"), "lasso": ("<=", " s"), "knn_shapley": ("<=", " s")}


def goal_text(name: str, rec: dict) -> str | None:
    if name not in GOALS or "goal" not in rec and "goal_s" not in rec:
        return None
    op, unit = GOALS[name]
    g = rec.get("goal_s", rec.get("goal"))
    v = rec.get("value", rec.get("speedup"))
    if not isinstance(v, (int, float)):
        return None
    text = f"goal {op} {g:g}{unit}: {v:,.2f}{unit} — {'met' if rec.get('met') else 'missed'}"
    return text + (f" (extrapolated from {rec['extrapolated_from']})" if rec.get("extrapolated") else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, seconds (the test suite's run)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.tiny else "cpu"))
    if a.tiny:
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the agreement checks compare float32 results with float64
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.budget_of = lambda name: max(1, int((TINY_BUDGET if a.tiny else BUDGET[name]) * a.budget_scale))
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpus": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"}
    signal.signal(signal.SIGALRM, _alarm)
    failed = 0
    for name in a.parts:
        budget = a.budget_of(name)
        a.deadline = time.monotonic() + budget
        t0 = time.perf_counter()
        torch.manual_seed(0)
        signal.alarm(budget)
        try:
            rec = {"part": name, "status": "ok", **PARTS[name](a, device, out)}
        except PartTimeout:
            rec, failed = {"part": name, "status": "timeout", "error": f"over its {budget} s budget"}, failed + 1
        except Exception as e:  # noqa: BLE001 -- one part's failure must not lose the others' results
            rec = {"part": name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
            failed += 1
        finally:
            signal.alarm(0)
        rec.update(device=machine["device"], machine=machine, tiny=a.tiny, budget_s=budget,
                   wall_s=time.perf_counter() - t0, threads=machine["cpu_threads"], repetitions=1)
        rec["goal_text"] = goal_text(name, rec) if rec["status"] == "ok" else None
        (out / f"{name}.json").write_text(json.dumps(rec, indent=1, default=float))
        print(f"{name:15s} {rec['status']:8s} {rec['wall_s']:7.1f} s  {rec.get('headline') or rec.get('error')}",
              flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
