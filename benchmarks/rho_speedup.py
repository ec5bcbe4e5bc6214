"""RHO-LOSS speed-up on MNIST-1D: uniform vs reducible_loss (and ce_loss, gradnorm_ub), 0% and 10% label noise, 3 seeds.

Per method: gradient steps and training wall-clock to reach uniform's best test accuracy (the reference's speed-up
metric, per seed), final accuracy, selected-corrupted fraction, and the selection overhead per step (scoring time /
optimiser-step time). Test accuracy is evaluated after every epoch; evaluation time is excluded from the wall-clock.

    python benchmarks/rho_speedup.py [--seeds 3] [--epochs 60] [--out benchmarks/results/rho_speedup.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamatters.data.mnist1d import MNIST1DDataModule
from datamatters.models import build_model
from datamatters.selection.il_store import ILTable
from datamatters.selection.module import SelectiveModule
from datamatters.training.classifier import ClassifierModule, evaluate_losses

METHODS = ["uniform", "reducible_loss", "ce_loss", "gradnorm_ub"]


class Clock(L.Callback):
    """Training wall-clock (batch start to end) and test accuracy after every epoch."""

    def __init__(self, test_loader):
        self.test_loader, self.train_s, self.curve = test_loader, 0.0, []

    def on_train_batch_start(self, *a):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *a):
        self.train_s += time.perf_counter() - self.t0

    def on_train_epoch_end(self, trainer, module):
        idx, _, logits = evaluate_losses(module.model, self.test_loader)
        y = self.test_loader.dataset.label_array()
        self.curve.append((trainer.global_step, self.train_s, float((logits.argmax(-1) == y).mean())))


class BestVal(L.Callback):
    def __init__(self):
        self.best, self.state = float("inf"), None

    def on_validation_end(self, trainer, module):
        v = float(trainer.callback_metrics.get("val/loss", float("inf")))
        if v < self.best:
            self.best, self.state = v, copy.deepcopy(module.model.state_dict())


def trainer(epochs, callbacks):
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, accelerator="auto", devices=1,
                     num_sanity_val_steps=0)


def make_dm(noise, batch_size=320):
    dm = MNIST1DDataModule(data_dir="data", num_samples=10000, batch_size=batch_size, seed=0,
                           label_noise={"kind": "uniform", "pc_corrupted": noise, "seed": 0})
    dm.setup()
    return dm


def irreducible_losses(noise, seed, epochs):
    L.seed_everything(seed, verbose=False)
    dm = make_dm(noise, batch_size=64)
    dm.fit_split = "holdout"
    model = build_model("mlp", dm.input_shape, dm.num_classes, hidden=[256, 256])
    best = BestVal()
    trainer(epochs, [best]).fit(ClassifierModule(model, num_classes=10), datamodule=dm)
    model.load_state_dict(best.state)
    idx, loss, _ = evaluate_losses(model, dm.loader("train"))
    return idx, loss


def run(method, noise, seed, epochs, il):
    L.seed_everything(seed, verbose=False)
    dm = make_dm(noise)
    train_idx = dm.split_indices("train")
    corrupted = torch.zeros(int(train_idx.max()) + 1, dtype=torch.bool)
    corrupted[torch.as_tensor(train_idx)] = torch.as_tensor(dm.is_corrupted)
    model = build_model("mlp", dm.input_shape, dm.num_classes, hidden=[256, 256])
    module = SelectiveModule(model, lambda p: torch.optim.AdamW(p, lr=1e-3), num_classes=10, method=method,
                             percent_train=0.1, il_table=ILTable(*il), corrupted=corrupted, seed=seed)
    clock = Clock(dm.loader("test"))
    trainer(epochs, [clock]).fit(module, datamodule=dm)
    t = module.totals
    return {"curve": clock.curve, "final_acc": clock.curve[-1][2], "best_acc": max(c[2] for c in clock.curve),
            "corrupted_frac": t["corrupted_selected"] / max(t["examples_seen"], 1),
            "overhead": t["score_s"] / max(t["step_s"], 1e-12), "train_s": clock.train_s}


def first_reach(curve, target):
    for step, secs, acc in curve:
        if acc >= target:
            return step, secs
    return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--il-epochs", type=int, default=40)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--out", default="benchmarks/results/rho_speedup.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = []
    for noise in args.noise:
        for seed in range(args.seeds):
            il = irreducible_losses(noise, seed, args.il_epochs)
            res = {m: run(m, noise, seed, args.epochs, il) for m in METHODS}
            target = res["uniform"]["best_acc"]
            u_step, u_s = first_reach(res["uniform"]["curve"], target)
            for m, r in res.items():
                step, secs = first_reach(r["curve"], target)
                runs.append({"noise": noise, "seed": seed, "method": m, "target_acc": target, "steps_to_target": step,
                             "seconds_to_target": secs, "step_speedup": (u_step / step) if step else None,
                             "time_speedup": (u_s / secs) if secs else None, **{k: v for k, v in r.items() if k != "curve"},
                             "curve": r["curve"]})
                print(f"noise={noise} seed={seed} {m:15s} best={r['best_acc']:.3f} steps_to_target={step} "
                      f"corrupted={r['corrupted_frac']:.3f} overhead={r['overhead']:.2f}", flush=True)
    table = []
    for noise in args.noise:
        for m in METHODS:
            rs = [r for r in runs if r["noise"] == noise and r["method"] == m]
            reached = [r for r in rs if r["steps_to_target"]]
            table.append({
                "noise": noise, "method": m, "seeds": len(rs), "reached": len(reached),
                "steps_to_target_mean": float(np.mean([r["steps_to_target"] for r in reached])) if reached else None,
                "step_speedup_mean": float(np.mean([r["step_speedup"] for r in reached])) if reached else None,
                "time_speedup_mean": float(np.mean([r["time_speedup"] for r in reached])) if reached else None,
                "final_acc_mean": float(np.mean([r["final_acc"] for r in rs])),
                "corrupted_frac_mean": float(np.mean([r["corrupted_frac"] for r in rs])),
                "overhead_mean": float(np.mean([r["overhead"] for r in rs])),
            })
    out = {"benchmark": "rho_speedup", "dataset": "mnist1d (10k generated; 3.6k target-train, 3.6k holdout)",
           "model": "MLP 40-256-256-10, AdamW 1e-3, n_B=320, 10% selected", "epochs": args.epochs,
           "device": "cuda" if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, 1 thread)",
           "note": "wall-clock = time inside training steps (scoring + optimiser step), eval excluded; target = uniform's "
                   "best test accuracy for the same seed and noise", "table": table, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(runs, Path(args.out).with_suffix(".png"))
    for row in table:
        print(row)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise"] for r in runs})
    fig, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 3.5), squeeze=False)
    for ax, noise in zip(axes[0], noises):
        for m in METHODS:
            curves = [np.array(r["curve"]) for r in runs if r["noise"] == noise and r["method"] == m]
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n, 2] for c in curves], 0)
            ax.plot(curves[0][:n, 0], mean, label=m)
        ax.set_title(f"MNIST-1D, {int(noise * 100)}% label noise")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
