"""Modular addition dynamics benchmark: many seeds of the grokking transformer, recorded with the framework's weight
statistics, then the HMM analysis (``datamatters.dynamics.analyse_runs``), with and without LayerNorm.

Training all seeds of one setting at once with ``torch.func`` (vmap over stacked parameters, one AdamW over the
stacks, which is exactly one independent AdamW per seed because AdamW is elementwise) keeps the per-step Python/
Lightning overhead from multiplying by the number of seeds, which is what makes many seeds fit on 2 shared CPU cores.
Each seed has its own split (``ModularAdditionDataModule(seed=seed)``, as the reference draws the split per seed) and
its own initialisation (the model built under ``torch.manual_seed(seed)``). The same statistics code as the Lightning
callback (``StatsComputer``) writes one ``weight_stats.parquet`` per seed in the callback's format.

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
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from datamatters.data.synthetic import ModularAdditionDataModule
from datamatters.dynamics.stats import StatsComputer
from datamatters.models import build_model

ROOT = Path(__file__).resolve().parent


def seed_split(p: int, frac: float, seed: int):
    dm = ModularAdditionDataModule(p=p, train_fraction=frac, seed=seed, label_noise={})
    dm.setup()
    _, Xtr, ytr = dm.dataset("train").tensors()
    va = np.concatenate([dm.split_indices("val"), dm.split_indices("test")])  # the reference evaluates on all 70%
    X, y = dm.sources["all"].X, dm.sources["all"].y
    return Xtr, ytr, X[va], y[va]


def train_seeds(seeds, out_root: Path, p=113, frac=0.3, d_model=128, num_heads=4, d_mlp=512, layernorm=False,
                lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98), steps=20000, record_every=50, batch_size=None,
                device="cpu", log=print) -> float:
    """Train every seed (full batch unless ``batch_size``), record statistics + losses every ``record_every`` steps."""
    kw = dict(d_model=d_model, num_heads=num_heads, d_head=d_model // num_heads, d_mlp=d_mlp, layernorm=layernorm)
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(build_model("transformer", (3,), p, **kw).to(device))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    stats = StatsComputer(models[0])
    data = [seed_split(p, frac, s) for s in seeds]
    Xtr = torch.stack([d[0] for d in data]).to(device)
    ytr = torch.stack([d[1] for d in data]).to(device)
    Xva = torch.stack([d[2] for d in data]).to(device)
    yva = torch.stack([d[3] for d in data]).to(device)

    def loss_fn(pr, bu, x, y):
        return F.cross_entropy(functional_call(base, (pr, bu), (x,)), y)

    step_fn = vmap(grad_and_value(loss_fn))
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay, betas=betas)
    names = list(params)
    rows = {s: [] for s in seeds}
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if batch_size:
            idx = torch.stack([torch.randperm(Xtr.shape[1], generator=gen)[:batch_size] for _ in seeds]).to(device)
            x, y = torch.gather(Xtr, 1, idx[..., None].expand(-1, -1, 3)), torch.gather(ytr, 1, idx)
        else:
            x, y = Xtr, ytr
        grads, _ = step_fn(params, buffers, x, y)
        for n in names:
            params[n].grad = grads[n]
        opt.step()
        if step % record_every == 0 or step == 1:
            _record(rows, seeds, step, params, buffers, base, stats, Xtr, ytr, Xva, yva)
            if step % (record_every * 20) == 0:
                va = np.mean([r[-1]["val_acc"] for r in rows.values()])
                log(f"  step {step}: mean val_acc {va:.3f} ({time.perf_counter() - t0:.0f}s)")
    for s in seeds:
        d = out_root / f"seed{s}"
        d.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows[s]).to_parquet(d / "weight_stats.parquet", index=False)
    return time.perf_counter() - t0


@torch.no_grad()
def _record(rows, seeds, step, params, buffers, base, stats, Xtr, ytr, Xva, yva):
    def evaluate(pr, bu, x, y):
        logits = functional_call(base, (pr, bu), (x,))
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    tl, ta = vmap(evaluate)(params, buffers, Xtr, ytr)
    vl, vacc = vmap(evaluate)(params, buffers, Xva, yva)
    for i, s in enumerate(seeds):
        row = {"step": step, "epoch": step}
        row.update(stats({n: t[i] for n, t in params.items()}))
        row.update({"train_loss": float(tl[i]), "train_acc": float(ta[i]), "val_loss": float(vl[i]),
                    "val_acc": float(vacc[i]), "seed": s})
        rows[s].append(row)


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
