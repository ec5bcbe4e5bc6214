"""RHO-LOSS speed-up with the paper's protocol, against two uniform baselines and the selection peers.

Cells: dataset (mnist1d, digits) x label noise (uniform 0/10/20 %, structured 20 %), >= 5 seeds. Methods, all on the
framework's own modules and the same Lightning loop, 32 points per gradient step:
  uniform            32 random points of each big batch of 320 (constant lr)
  uniform_lr_decay   the same with cosine decay of the lr to zero over the budget (Kaddour et al. 2023)
  reducible_loss     RHO-LOSS (IL model: the target's MLP on the holdout, all epochs, best-val-loss epoch, its cost
                     timed)
  reducible_loss_small_il   variant (--methods, not run by default): RHO-LOSS with a cheap IL model, a one-hidden-
                     layer MLP (64 units) trained briefly at a large batch (--small-il-epochs, --small-il-batch,
                     --small-il-lr) with early stopping on its val loss (--small-il-patience), best val-loss epoch,
                     trained by the engine's lean fit (--small-il-fit lean: a plain torch loop, the Lightning fit's
                     batches, steps and epoch choice); its cost timed exactly as the full IL model's (the paper's
                     section on small, briefly trained IL models)
  ce_loss, gradnorm_ub   top-32 of 320 by training loss / last-layer gradient-norm bound
  selective_backprop forward 128, keep with probability percentile^3 (about 32 kept), backprop those
  infobatch          plain minibatches of 32 with InfoBatch pruning, as many epochs as uniform's data passes
  full_data          the same loop as infobatch with prune_ratio 0 (InfoBatch's lossless baseline)
Test accuracy after every epoch (``EpochTestCurve``); per seed the target is uniform's best test accuracy; per method
epochs, gradient steps and training seconds to reach it (with and without the IL model's training + IL pass), the
speed-ups against both uniform baselines (bootstrap CIs over seeds), final test accuracy, the corrupted fraction of
the points trained on, and the selection overhead (scoring seconds / optimiser-step seconds).

Timing: training seconds count data loading, scoring and optimiser steps (the test passes and validation are
excluded); every cell starts with a warm-up fit that is not recorded; methods are interleaved within each seed, so
machine load drifts hit all of them; the seeds are the repeats. IL cost: model build, Trainer start-up, the IL fit
(its validation included) and the IL pass over target-train; building the datamodule is timed apart
(``il_data_cpu_s``), as no method's data building is in its training seconds (``sp_cpu_il_with_data`` adds it back).
Both IL fits log their metrics once per epoch (``EpochLoggedClassifier``: the same weights as per-step logging);
``--il-fit`` / ``--small-il-fit`` choose Lightning or the lean loop (same IL values; the lean one without the
trainer's per-epoch bookkeeping).

    python benchmarks/rho_speedup.py --cells mnist1d:uniform:0.1 --seeds 5       # the most important cell
    python benchmarks/rho_speedup.py --cells all --seeds 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamatters.data.digits import DigitsDataModule
from datamatters.data.mnist1d import MNIST1DDataModule
from datamatters.evaluation.speedup import EpochTestCurve, bootstrap_ci, first_reach, speedup_table
from datamatters.models import build_model
from datamatters.selection.il_fit import EpochLoggedClassifier, early_stopping, lean_fit
from datamatters.selection.il_store import ILTable
from datamatters.selection.module import SelectiveModule
from datamatters.selection.peers import build_peer
from datamatters.training.classifier import evaluate_losses
from rho_speedup_table import goals, markdown, paired

METHODS = ["uniform", "uniform_lr_decay", "reducible_loss", "infobatch", "full_data", "selective_backprop", "ce_loss",
           "gradnorm_ub"]
VARIANTS = ["reducible_loss_small_il"]  # labelled variants, run only when named in --methods
ALL_CELLS = [f"{d}:{k}:{p}" for d in ("mnist1d", "digits")
             for k, p in (("uniform", 0.1), ("uniform", 0.2), ("uniform", 0.0), ("structured", 0.2))]
N_BIG, N_SMALL, SB_FORWARD = 320, 32, 128


def make_dm(dataset: str, kind: str, noise: float, batch_size: int, data_dir: str):
    kw = dict(data_dir=data_dir, batch_size=batch_size, seed=0, eval_batch_size=2048,
              label_noise={"kind": kind if noise > 0 else "none", "pc_corrupted": noise, "seed": 0})
    dm = MNIST1DDataModule(num_samples=10000, **kw) if dataset == "mnist1d" else DigitsDataModule(**kw)
    dm.setup()
    return dm


def trainer(epochs: int, callbacks: list, val: bool = False):
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, accelerator="cpu", devices=1,
                     num_sanity_val_steps=0, limit_val_batches=1.0 if val else 0)


class BestVal(L.Callback):
    """The best val-loss weights in memory (the framework's IL job keeps them as best.ckpt)."""

    def __init__(self):
        self.best, self.state, self.acc, self.epoch = float("inf"), None, None, None

    def on_validation_end(self, trainer, module):
        v = float(trainer.callback_metrics.get("val/loss", float("inf")))
        if v < self.best:
            self.best, self.state = v, copy.deepcopy(module.model.state_dict())
            self.acc = float(trainer.callback_metrics.get("val/acc", float("nan")))
            self.epoch = int(trainer.current_epoch)


def irreducible_losses(cell, seed: int, args, small: bool = False) -> tuple[ILTable, float, dict]:
    """IL model on the holdout (best val-loss epoch), then eval-mode losses over target-train; its seconds (data
    building timed apart). ``small``: the cheap variant's IL model (MLP with one hidden layer of 64,
    ``--small-il-epochs`` at ``--small-il-batch`` and ``--small-il-lr``, early stopping after
    ``--small-il-patience`` epochs without a lower val loss)."""
    L.seed_everything(seed, verbose=False)
    t0, c0 = time.perf_counter(), time.process_time()
    dm = make_dm(*cell, args.small_il_batch if small else args.il_batch, args.data_dir)
    dm.fit_split = "holdout"
    data_s, data_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    model = build_model("mlp", dm.input_shape, dm.num_classes, hidden=[64] if small else [256, 256])
    lr = args.small_il_lr if small else args.il_lr
    opt = lambda p: torch.optim.AdamW(p, lr=lr)  # noqa: E731
    epochs, patience = (args.small_il_epochs, args.small_il_patience) if small else (args.il_epochs, None)
    how = args.small_il_fit if small else args.il_fit
    if how == "lean":
        f = lean_fit(model, opt, dm.train_dataloader(), dm.val_dataloader(), epochs, patience=patience)
        info = {"il_val_acc": f.metrics["val/acc"], "il_val_loss": f.metrics["val/loss"], "il_best_epoch": f.best_epoch,
                "il_epochs_trained": f.epochs_trained}
    else:
        best = BestVal()
        fit = trainer(epochs, [best, *early_stopping(patience)], val=True)
        fit.fit(EpochLoggedClassifier(model, opt, num_classes=dm.num_classes), datamodule=dm)
        model.load_state_dict(best.state)
        info = {"il_val_acc": best.acc, "il_val_loss": best.best, "il_best_epoch": best.epoch,
                "il_epochs_trained": int(fit.current_epoch)}
    idx, loss, _ = evaluate_losses(model, dm.loader("train"))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return ILTable(idx, loss), secs, {**info, "il_fit": how, "il_s": secs, "il_cpu_s": cpu, "il_data_s": data_s,
                                      "il_data_cpu_s": data_cpu, "loadavg_1min": os.getloadavg()[0]}


def build(method: str, cell, seed: int, args, il: ILTable | None):
    """(datamodule, module, epochs) of one method."""
    opt = lambda p: torch.optim.AdamW(p, lr=args.lr)  # noqa: E731
    if method in ("infobatch", "full_data"):
        dm = make_dm(*cell, N_SMALL, args.data_dir)
        epochs = max(1, round(args.epochs * args.percent_train))  # the same number of passes over the data
    else:
        dm = make_dm(*cell, SB_FORWARD if method == "selective_backprop" else N_BIG, args.data_dir)
        epochs = args.epochs
        if method == "selective_backprop":  # as many steps as uniform, each of about 128 / (beta + 1) = 32 points
            epochs = max(1, round(args.epochs * SB_FORWARD / N_BIG))
    train_idx = dm.split_indices("train")
    corrupted = torch.zeros(int(train_idx.max()) + 1, dtype=torch.bool)
    corrupted[torch.as_tensor(train_idx)] = torch.as_tensor(dm.is_corrupted)
    model = build_model("mlp", dm.input_shape, dm.num_classes, hidden=[256, 256])
    common = dict(num_classes=dm.num_classes, corrupted=corrupted)
    if method in ("infobatch", "full_data"):
        options = {"prune_ratio": 0.5 if method == "infobatch" else 0.0, "delta": 0.875}
        return dm, build_peer("infobatch", options, dm, epochs, seed, model, opt, **common), epochs
    if method == "selective_backprop":
        return dm, build_peer("selective_backprop", {"beta": 3.0}, dm, epochs, seed, model, opt, **common), epochs
    sched = (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs)) if method == "uniform_lr_decay" else None
    rule = {"uniform_lr_decay": "uniform", "reducible_loss_small_il": "reducible_loss"}.get(method, method)
    return dm, SelectiveModule(model, opt, sched, method=rule, percent_train=args.percent_train, seed=seed,
                               il_table=il if rule == "reducible_loss" else None, **common), epochs


def run_method(method: str, cell, seed: int, args, il) -> dict:
    L.seed_everything(seed, verbose=False)
    load0 = os.getloadavg()[0]
    dm, module, epochs = build(method, cell, seed, args, il)
    curve = EpochTestCurve(dm.loader("test"))
    trainer(epochs, [curve]).fit(module, datamodule=dm)
    t = module.totals
    return {"loadavg_1min": [load0, os.getloadavg()[0]],  # the machine's contention at start / end of this run
            "curve": curve.rows, "epochs": epochs, "final_acc": curve.rows[-1]["test_acc"],
            "best_acc": max(r["test_acc"] for r in curve.rows), "steps": int(module.global_step),
            "train_s": curve.train_s, "train_cpu_s": curve.train_cpu_s, "examples_seen": int(t["examples_seen"]),
            "examples_scored": int(t["examples_scored"]),
            "corrupted_frac": t["corrupted_selected"] / max(t["examples_seen"], 1),
            "overhead": t["score_s"] / max(t["step_s"], 1e-12), "score_s": t["score_s"], "step_s": t["step_s"]}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for baseline in [b for b in ("uniform", "uniform_lr_decay") if any(r["method"] == b for r in runs)]:
        table = speedup_table([{"label": r["method"], "seed": r["seed"], "curve": r["curve"], "il_s": r.get("il_s"),
                                "il_cpu_s": r.get("il_cpu_s"),
                                "final_acc": r["final_acc"], "corrupted_frac": r["corrupted_frac"],
                                "overhead": r["overhead"]} for r in runs], baseline)
        for row in table:
            rs = [r for r in runs if r["method"] == row["label"]]
            row["train_s_total"] = float(np.mean([r["train_s"] for r in rs]))
            row["train_cpu_s_total"] = float(np.mean([r["train_cpu_s"] for r in rs]))
            row["final_acc_std"] = float(np.std([r["final_acc"] for r in rs]))
            if any(r.get("il_data_cpu_s") is not None for r in rs):
                m, lo, hi = bootstrap_ci(_cpu_il_with_data(runs, rs, baseline))
                row.update(sp_cpu_il_with_data=m, sp_cpu_il_with_data_lo=lo, sp_cpu_il_with_data_hi=hi,
                           il_cpu_s=float(np.mean([r["il_cpu_s"] for r in rs])),
                           il_data_cpu_s=float(np.mean([r["il_data_cpu_s"] for r in rs])))
            if row["label"] == "infobatch" and baseline == "uniform":  # its goal: on the seeds both sides ran
                row["paired"] = {o: p for o in ("full_data", "uniform") if (p := paired(runs, "infobatch", o))}
            rows.append(row)
    return rows


def step_logging_cost(args, cell=("mnist1d", "uniform", 0.2), epochs: int = 10, reps: int = 3) -> dict:
    """CPU ms per uniform step (first cell given, else mnist1d 20%) as the module runs, without its per-step
    ``self.log`` of train/loss and train/acc, and also without the accuracy metric update; interleaved per rep."""
    if args.cells and args.cells != ["all"]:
        d, k, p = args.cells[0].split(":")
        cell = (d, k, float(p))
    sub = argparse.Namespace(**{**vars(args), "epochs": epochs})

    def one(mode: str, seed: int):
        L.seed_everything(seed, verbose=False)
        dm, module, n = build("uniform", cell, seed, sub, None)
        if mode != "as_run":
            log = module.log
            module.log = lambda name, *a, **k: None if name in ("train/loss", "train/acc") else log(name, *a, **k)
        if mode == "no_log_no_metric":
            module.metrics["train_"] = type("NoMetric", (torch.nn.Module,), {"forward": lambda self, *a: None})()
        curve = EpochTestCurve(dm.loader("test"))
        trainer(n, [curve]).fit(module, datamodule=dm)
        return 1000 * curve.train_cpu_s / module.global_step, curve.rows[-1]["test_acc"]

    one("as_run", 0)  # warm-up
    modes = ("as_run", "no_step_log", "no_log_no_metric")
    res = {m: [] for m in modes}
    for rep in range(reps):
        for m in modes:
            res[m].append(one(m, rep))
    ms = {m: [v[0] for v in res[m]] for m in modes}
    return {"cell": ":".join(map(str, cell)), "epochs": epochs, "reps": reps,
            "cpu_ms_per_step": {m: [round(x, 3) for x in v] for m, v in ms.items()},
            "share_of_step_saved_median": {
                m: round(1 - float(np.median([a / b for a, b in zip(ms[m], ms["as_run"])])), 3) for m in modes[1:]},
            "same_final_test_acc": len({tuple(v[1] for v in res[m]) for m in modes}) == 1,
            "loadavg_1min": os.getloadavg()[0]}


def _cpu_il_with_data(runs: list[dict], rs: list[dict], baseline: str) -> list[float]:
    """Per seed that reached the baseline's best test accuracy: baseline CPU seconds / (method CPU seconds + IL CPU
    seconds + the IL's data building)."""
    base = {r["seed"]: r for r in runs if r["method"] == baseline}
    out = []
    for r in rs:
        b = base.get(r["seed"])
        target = max(row["test_acc"] for row in b["curve"]) if b else None
        hit = first_reach(r["curve"], target) if b else None
        if hit is not None:
            extra = (r.get("il_cpu_s") or 0.0) + (r.get("il_data_cpu_s") or 0.0)
            out.append(first_reach(b["curve"], target)["train_cpu_s"] / max(hit["train_cpu_s"] + extra, 1e-12))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", nargs="+", default=["mnist1d:uniform:0.1"], help="dataset:kind:noise, or 'all'")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed-start", type=int, default=0, help="first seed (split a grid over processes; --merge)")
    ap.add_argument("--merge", nargs="+", default=None, help="merge result JSONs (same setup) into --out and exit")
    ap.add_argument("--extra", default=None, help="with --merge: a JSON file whose keys are added to the output")
    ap.add_argument("--epochs", type=int, default=60, help="big-batch epochs (10%% of the data trained on per epoch)")
    ap.add_argument("--percent-train", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--il-epochs", type=int, default=40)
    ap.add_argument("--il-batch", type=int, default=64)
    ap.add_argument("--il-lr", type=float, default=1e-3)
    ap.add_argument("--small-il-epochs", type=int, default=30, help="most IL epochs of reducible_loss_small_il")
    ap.add_argument("--small-il-batch", type=int, default=1024)
    ap.add_argument("--small-il-lr", type=float, default=5e-2)
    ap.add_argument("--small-il-patience", type=int, default=2, help="early stopping: epochs without a lower val loss")
    ap.add_argument("--il-fit", choices=["lightning", "lean"], default="lightning", help="how the full IL model trains")
    ap.add_argument("--small-il-fit", choices=["lightning", "lean"], default="lean",
                    help="how reducible_loss_small_il's IL model trains (lean: plain torch loop, same IL values)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="benchmarks/results/rho_speedup.json")
    ap.add_argument("--budget-min", type=float, default=1e9, help="stop starting new cells after this many minutes")
    ap.add_argument("--table", default=None, help="print the README table of an existing results JSON and exit")
    ap.add_argument("--step-logging", action="store_true",
                    help="print the CPU share of Lightning's per-step train/loss + train/acc logging in a uniform step")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if args.step_logging:
        torch.set_num_threads(1)
        print(json.dumps(step_logging_cost(args), indent=1))
        return
    if args.merge:
        return merge(args.merge, Path(args.out), json.loads(Path(args.extra).read_text()) if args.extra else None)
    cells = ALL_CELLS if args.cells == ["all"] else args.cells
    torch.set_num_threads(1)
    started = time.time()
    out = {
        "benchmark": "rho_speedup", "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": 1, "torch": torch.__version__, "reps": args.seeds,
        "protocol": ("eval.test_every_epoch (the paper's protocol): test accuracy after every epoch; per seed the "
                     "target is uniform's best test accuracy; epochs/steps/training seconds to first reach it; "
                     "speed-up = baseline / method per seed, mean and 95% percentile bootstrap CI over seeds. Training "
                     "seconds exclude test passes and validation; a warm-up fit precedes each cell; methods are "
                     "interleaved within a seed; seeds are the repeats. IL cost = IL model training + IL pass. sp_cpu*: the "
                     "same spans in process CPU seconds (robust to other jobs' load on this shared machine)."),
        "note": ("CPU timings on a loaded shared machine (2 cores, other jobs running): wall-clock ratios are indicative "
                 "only"),
        "setup": {"model": "MLP in-256-256-10, AdamW", "lr": args.lr, "n_B": N_BIG, "n_b": N_SMALL,
                  "percent_train": args.percent_train, "epochs": args.epochs, "il": {"epochs": args.il_epochs,
                  "batch": args.il_batch, "lr": args.il_lr, "fit": args.il_fit, "model": "MLP in-256-256-10, best val-loss epoch"},
                  "il_small (reducible_loss_small_il)": {
                      "epochs": args.small_il_epochs, "batch": args.small_il_batch, "lr": args.small_il_lr,
                      "patience": args.small_il_patience, "fit": args.small_il_fit,
                      "model": "MLP in-64-10, early stopping on val loss (patience), best val-loss epoch"},
                  "il_logging": ("a Lightning IL fit logs once per epoch (EpochLoggedClassifier; same weights as per "
                                 "step); the lean fit (plain torch loop) logs nothing"),
                  "selective_backprop": f"beta 3, forward batch {SB_FORWARD}, history 1024, 1 primed epoch",
                  "infobatch": f"prune_ratio 0.5, delta 0.875, batch {N_SMALL}, epochs = epochs * percent_train"},
        "cells_requested": cells, "methods": args.methods, "cells_run": [], "cells_not_run": [],
        "summary": {}, "goals": {}, "il": {}, "runs": [],
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for cell_s in cells:
        if (time.time() - started) / 60 > args.budget_min:
            out["cells_not_run"].append(cell_s)
            continue
        dataset, kind, noise = cell_s.split(":")
        cell = (dataset, kind, float(noise))
        run_method("uniform", cell, 0, argparse.Namespace(**{**vars(args), "epochs": 2}), None)  # warm-up
        runs = []
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            ils = {}  # method -> (IL table, seconds, info): each RHO-LOSS method pays for its own IL model
            if "reducible_loss" in args.methods:
                ils["reducible_loss"] = irreducible_losses(cell, seed, args)
                out["il"][f"{cell_s}:{seed}"] = ils["reducible_loss"][2]
            if "reducible_loss_small_il" in args.methods:
                ils["reducible_loss_small_il"] = irreducible_losses(cell, seed, args, small=True)
                out.setdefault("il_small", {})[f"{cell_s}:{seed}"] = ils["reducible_loss_small_il"][2]
            for m in args.methods:
                il, il_s, il_info = ils.get(m, (None, None, {}))
                r = run_method(m, cell, seed, args, il)
                r.update(cell=cell_s, method=m, seed=seed, il_s=il_s, il_cpu_s=il_info.get("il_cpu_s"),
                         il_data_cpu_s=il_info.get("il_data_cpu_s"))
                runs.append(r)
                print(f"{cell_s} seed={seed} {m:18s} best={r['best_acc']:.3f} final={r['final_acc']:.3f} "
                      f"steps={r['steps']} train_s={r['train_s']:.1f} corrupted={r['corrupted_frac']:.3f} "
                      f"overhead={r['overhead']:.2f}", flush=True)
            out["partial"] = {"cell": cell_s, "runs": runs}  # every finished seed is on disk
            path.write_text(json.dumps(out, indent=1))
        out.pop("partial", None)
        out["runs"] += runs
        out["summary"][cell_s] = summarise(runs)
        out["cells_run"].append(cell_s)
        out["goals"] = goals(out["summary"])
        out["elapsed_min"] = (time.time() - started) / 60
        path.write_text(json.dumps(out, indent=1))  # after every cell: a cut-short run still leaves its results
        for row in out["summary"][cell_s]:
            print(f"  vs {row['baseline']:16s} {row['label']:18s} reached {row['reached']}/{row['seeds']} "
                  f"steps x{row['sp_steps']:.2f} [{row['sp_steps_lo']:.2f}, {row['sp_steps_hi']:.2f}] "
                  f"time x{row['sp_secs']:.2f} with IL x{row['sp_secs_il']:.2f} final {row['final_acc']:.3f}", flush=True)
    plot(out, path.with_suffix(".png"))
    print(json.dumps(out["goals"], indent=1))


def merge(paths: list[str], dest: Path, extra: dict | None = None) -> None:
    """One results JSON from several processes' (e.g. seeds 0-2 and 3-4 of a cell run side by side); a cut-short
    part contributes its finished seeds. ``extra``: keys added as they are (e.g. what a reduced run left out)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in parts[0].items() if k not in ("runs", "summary", "goals", "il", "partial")}
    keyed = {}  # a later part's run replaces an earlier one of the same cell, method and seed (a re-run)
    for r in (r for p in parts for r in p["runs"] + (p.get("partial") or {}).get("runs", [])):
        keyed[(r["cell"], r["method"], r["seed"])] = r
    runs = list(keyed.values())
    out.update(runs=runs, il={k: v for p in parts for k, v in p["il"].items()}, merged_from=list(paths))
    out["il_small"] = {k: v for p in parts for k, v in p.get("il_small", {}).items()}
    out["methods"] = [m for m in METHODS + VARIANTS if any(r["method"] == m for r in runs)]
    out["methods_per_cell"] = {c: [m for m in out["methods"] if any(r["cell"] == c and r["method"] == m for r in runs)]
                               for c in sorted({r["cell"] for r in runs})}
    out.update(extra or {})
    out["cells_run"] = sorted({r["cell"] for r in runs})
    requested = set(out["cells_requested"]) | {c for p in parts for c in p["cells_requested"]}
    out["cells_not_run"] = sorted(requested - set(out["cells_run"]))
    out["cells_requested"] = sorted({c for p in parts for c in p["cells_requested"]})
    out["summary"] = {c: summarise([r for r in runs if r["cell"] == c]) for c in out["cells_run"]}
    out["seeds_per_cell"] = {c: sorted({r["seed"] for r in runs if r["cell"] == c}) for c in out["cells_run"]}
    out["reps"] = min(len(v) for v in out["seeds_per_cell"].values())
    out["goals"] = goals(out["summary"])
    dest.write_text(json.dumps(out, indent=1))
    plot(out, dest.with_suffix(".png"))
    print(markdown(out))
    print(json.dumps(out["goals"], indent=1))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = out["cells_run"]
    if not cells:
        return
    fig, axes = plt.subplots(2, len(cells), figsize=(5 * len(cells), 7), squeeze=False)
    for j, cell in enumerate(cells):
        for m in out["methods"]:
            curves = [r["curve"] for r in out["runs"] if r["cell"] == cell and r["method"] == m]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            acc = np.mean([[row["test_acc"] for row in c[:n]] for c in curves], 0)
            for i, key in enumerate(("step", "train_s")):
                x = np.mean([[row[key] for row in c[:n]] for c in curves], 0)
                axes[i, j].plot(x, acc, label=m, marker="." if n < 15 else None)
        axes[0, j].set_title(cell)
        axes[0, j].set_xlabel("gradient steps")
        axes[1, j].set_xlabel("training seconds (no IL cost)")
        for i in range(2):
            axes[i, j].set_ylabel("test accuracy (mean over seeds)")
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
