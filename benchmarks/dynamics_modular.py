"""Modular addition dynamics benchmark: many seeds of the grokking transformer, recorded with the framework's weight
statistics, then the HMM analysis (``datamatters.dynamics.analyse_runs``), with and without LayerNorm.

All seeds of one setting train at once (``datamatters.dynamics.stacked.StackedSeeds``: torch.func over stacked
parameters, tested equal to seed-by-seed training), each with its own split, initialisation and minibatches; the
callback's statistics code writes one ``weight_stats.parquet`` per seed. ``--measure`` only times seed-steps per
second at the reference's size (written under ``throughput`` in the result).

    python benchmarks/dynamics_modular.py          # the reduced CPU setting that was run here (defaults)
    python benchmarks/dynamics_modular.py --seeds 40 --p 113 --frac 0.3 --d_model 128 --d_mlp 512 --lr 1e-3 \
        --beta2 0.999 --steps 150000 --record_every 150                        # the reference's size (GPU-sized)

The reduced setting (p = 59, 40 % train, d_model 64 with 4 heads of 16, d_mlp 256, AdamW lr 3e-3, betas (0.9, 0.98),
wd 1, batch 256, 3,000 steps, statistics every 20 steps) groks within ~2,000 steps instead of the reference's
~45,000, which is what fits 2 shared CPU cores; the HMM analysis uses the reference's settings unchanged.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from datamatters.dynamics.stacked import StackedSeeds

ROOT = Path(__file__).resolve().parent


def train_seeds(seeds, out_root: Path, p=113, frac=0.3, d_model=128, num_heads=4, d_mlp=512, layernorm=False,
                lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98), steps=20000, record_every=50, batch_size=None,
                device="cpu", log=print) -> float:
    """Train every seed together (``datamatters.dynamics.stacked``), tables under ``out_root/seed<k>/``."""
    t0 = time.perf_counter()
    StackedSeeds(seeds, p=p, frac=frac, d_model=d_model, num_heads=num_heads, d_mlp=d_mlp, layernorm=layernorm, lr=lr,
                 weight_decay=weight_decay, betas=betas, batch_size=batch_size, device=device).train(
        steps, record_every, out_root, log=lambda st, va: log(f"  step {st}: mean val_acc {va:.3f} "
                                                               f"({time.perf_counter() - t0:.0f}s)"))
    return time.perf_counter() - t0


def measure(seeds: int, steps: int, record_every: int = 150, device: str = "cpu", layernorm: bool = False) -> dict:
    """Seed-steps per second at the reference's size (p 113, d_model 128, 4 heads, MLP 512, batch 256), training
    steps and one statistics record timed apart (the reference records every 150 steps)."""
    st = StackedSeeds(list(range(seeds)), layernorm=layernorm, batch_size=256, device=device)
    st.step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        st.step()
    if device != "cpu":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    st.record()
    record_s = time.perf_counter() - t0
    per_step = step_s + record_s / record_every
    return {"seeds": seeds, "timed_steps": steps, "layernorm": layernorm, "seconds_per_step": step_s,
            "seconds_per_record": record_s, "seed_steps_per_s": seeds / per_step,
            "seed_steps_per_s_without_records": seeds / step_s}


REFERENCE = {"plain": {"k": 6, "detour_r": 0.49, "detour_p": 0.0014, "seeds": 40},
             "layernorm": {"k": 3, "seeds": 40}}


def analyse(variant_dir: Path, out_dir: Path, n_jobs: int = -1, covariance_type: str = "full") -> dict:
    """The HMM job's analysis with the reference's settings for modular addition (full covariance, K <= 8,
    5 restarts, convergence = first val_acc > 0.5) plus, per state, the mean train/val accuracy of its checkpoints
    (a memorisation state has train_acc ~ 1 and low val_acc)."""
    from datamatters.dynamics.pipeline import Convergence, HMMOptions, analyse_runs

    opts = HMMOptions(k_max=8, restarts=5, covariance_type=covariance_type, n_jobs=n_jobs,
                      convergence=Convergence("val_acc", 0.5))
    metrics, _ = analyse_runs(variant_dir, out_dir, opts)
    states = pd.read_csv(out_dir / "states.csv")
    paths = pd.read_parquet(out_dir / "state_paths.parquet")
    acc = paths.groupby("state")[["train_acc", "val_acc"]].mean()
    conv = pd.read_csv(out_dir / "convergence.csv")
    by_k = pd.read_csv(out_dir / "hmm" / "selection.csv")
    # extra (not the reference's): does the number of checkpoints spent in a state track convergence time?
    dwell = paths.groupby(["run", "state"]).size().unstack(fill_value=0).reindex(conv["run"]).fillna(0)
    from datamatters.dynamics.analysis import pearson_two_sided

    dwell_rp = {int(k): pearson_two_sided(dwell[k].to_numpy(float), conv["convergence_step"].to_numpy(float))
                for k in dwell.columns}
    return {
        "k_bic": metrics["hmm/k_bic"], "test_ll_per_sample": metrics["hmm/test_ll_per_sample"],
        "n_runs": metrics["hmm/n_runs"], "n_test_runs": metrics["hmm/n_test_runs"],
        "bic_mean_by_k": dict(zip(by_k["k"].astype(int).astype(str), by_k["bic_mean"].round(1))),
        "detour_states": metrics["hmm/detour_states"],
        "states": [{"state": int(r.state), "r": _num(r.r), "p": _num(r.p), "visited_frac": float(r.visited_frac),
                    "occupancy": float(r.occupancy), "mean_first_visit_step": _num(r.mean_first_visit_step),
                    "train_acc": float(acc.loc[r.state, "train_acc"]) if r.state in acc.index else None,
                    "val_acc": float(acc.loc[r.state, "val_acc"]) if r.state in acc.index else None,
                    "dwell_r": _num(dwell_rp.get(int(r.state), (np.nan,) * 3)[0]),
                    "dwell_p": _num(dwell_rp.get(int(r.state), (np.nan,) * 3)[2])}
                   for r in states.itertuples(index=False)],
        "convergence_step": {"mean": float(conv.convergence_step.mean()), "min": float(conv.convergence_step.min()),
                             "max": float(conv.convergence_step.max()), "converged_frac": float(conv.converged.mean())},
        "select_seconds": metrics["hmm/select_seconds"], "analysis_dir": str(out_dir),
    }


def _num(x):
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--first_seed", type=int, default=0, help="train seeds first_seed .. first_seed + seeds - 1")
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--frac", type=float, default=0.4)
    ap.add_argument("--d_model", type=int, default=64)
    ap.add_argument("--d_mlp", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--record_every", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight_decay", type=float, default=1.0)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n_jobs", type=int, default=-1, help="joblib workers for the HMM fits")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dm_dynamics_modular"))
    ap.add_argument("--variants", default="plain,layernorm")
    ap.add_argument("--covariance_types", default="full,diag", help="full (the reference) and extra analyses")
    ap.add_argument("--skip_train", action="store_true", help="analyse runs already under --out")
    ap.add_argument("--result", type=Path, default=ROOT / "results" / "dynamics_modular.json")
    ap.add_argument("--measure", default="", help="comma-separated seed counts: only time the reference's size")
    ap.add_argument("--measure_steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        _measure(args)
        return
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    result = {"setting": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "reference": REFERENCE, "variants": {}}
    for variant in args.variants.split(","):
        out = args.out / variant
        if not args.skip_train:
            print(f"training {variant}: {len(seeds)} seeds")
            sec = train_seeds(seeds, out, p=args.p, frac=args.frac, d_model=args.d_model, d_mlp=args.d_mlp,
                              layernorm=variant == "layernorm", lr=args.lr, weight_decay=args.weight_decay,
                              betas=(0.9, args.beta2), steps=args.steps, record_every=args.record_every,
                              batch_size=args.batch_size or None)
            (out / f"train_seconds_{seeds[0]}_{seeds[-1]}.json").write_text(
                json.dumps({"seconds": sec, "seeds": seeds}))
        for cov in args.covariance_types.split(","):
            res = analyse(out, args.out / f"{variant}_{cov}_analysis", n_jobs=args.n_jobs, covariance_type=cov)
            res["train_seconds"] = {f.stem: json.loads(f.read_text())["seconds"]
                                    for f in sorted(out.glob("train_seconds*.json"))}
            key = variant if cov == "full" else f"{variant}_{cov}"
            result["variants"][key] = res
            print(json.dumps({key: {k: res[k] for k in ("k_bic", "detour_states", "convergence_step")}}))
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.result}")


def _measure(args):
    runs = [measure(int(n), args.measure_steps, device=args.device) for n in args.measure.split(",")]
    best = max(runs, key=lambda r: r["seed_steps_per_s"])
    hour = best["seed_steps_per_s"] * 3600
    ref_steps = 150_000  # 10,000 epochs x 15 steps of 256 (30 % of 113^2 pairs)
    res = json.loads(args.result.read_text()) if args.result.is_file() else {}
    res["throughput"] = {
        "device": args.device, "threads": args.threads, "size": "p 113, 30/70, d_model 128, 4 heads, MLP 512, "
        "batch 256, AdamW, statistics every 150 steps", "runs": runs,
        "seed_steps_per_hour": hour, "reference_steps_per_seed": ref_steps,
        "one_hour": {"seeds_at_reference_length": hour / ref_steps,
                     "steps_per_seed_with_40_seeds": hour / 40, "epochs_per_seed_with_40_seeds": hour / 40 / 15},
        "protocol": "nice -n 10, torch.set_num_threads(1), warm-up step excluded; the 2-core machine was shared with "
                    "other jobs (load average ~10), so these are lower bounds",
    }
    args.result.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["throughput"], indent=2))


if __name__ == "__main__":
    main()
