"""The training map of data selection: ``python run.py +experiment=dynamics_selection``.

For each method of ``task.methods`` (default uniform and RHO-LOSS) the seeds of ``task.seeds`` train together
(``dynamics.stacked_selection.StackedSelection``: stacked parameters, the selection engine's rules) on the same noisy
target-train split, recording weight statistics every ``task.record_every`` steps into
``<run dir>/runs/<method>/seed<k>/weight_stats.parquet``. The irreducible losses RHO-LOSS needs come from the IL
model as ``task=rho`` makes it (trained on the holdout split, or reused from the cache). Then ONE HMM is selected and
fitted over all runs of all methods (the dynamics engine's pipeline, its outputs in the run dir) and read per method
(``dynamics.selection_map``): ``selection_map.json`` (the results JSON the README block is rendered from),
``selection_map.csv`` and ``selection_map.png``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datamatters.errors import UserError
from datamatters.tasks.common import job, log_image, log_metrics, make_loggers, print_summary, write_summary
from datamatters.tasks.dynamics_hmm import debug_sized, options

SUMMARY_KEYS = ["hmm/k", "hmm/n_runs", "map/occupancy_tv", "map/occupancy_tv_p", "map/skipped_states",
                "map/added_states", "time/wall_clock_s", "run_dir"]


def _task(cfg: DictConfig) -> dict:
    t = OmegaConf.to_container(cfg.task, resolve=True)
    seeds, methods = list(t.get("seeds") or []), list(t.get("methods") or [])
    if len(seeds) < 2:
        raise UserError(f"task.seeds needs at least 2 seeds per method, got {seeds}")
    if len(methods) < 2 or len(set(methods)) != len(methods):
        raise UserError(f"task.methods needs at least 2 distinct selection methods to compare, got {methods}")
    for key in ("epochs", "record_every"):
        if isinstance(t.get(key), bool) or not isinstance(t.get(key), int) or t[key] < 1:
            raise UserError(f"task.{key} must be a whole number >= 1, got {t.get(key)!r}")
    return t


def train_method(cfg: DictConfig, dm, method: str, t: dict, il, out: Path, device: str) -> dict:
    """Train every seed of ``method`` together; return its per-seed end-of-training accuracies and timing."""
    import torch

    from datamatters.dynamics.stacked_selection import StackedSelection, finite_or_raise
    from datamatters.tasks.building import build_network, build_optimizer

    _, X, y = dm.dataset("train").tensors()
    _, Xv, yv = dm.dataset("val").tensors()
    _, Xt, yt = dm.dataset("test").tensors()
    t0 = time.perf_counter()
    trainer = StackedSelection(lambda s: build_network(cfg.model, dm), t["seeds"], X, y, method=method,
                               optimizer=build_optimizer(cfg.optimizer), percent_train=cfg.selection.percent_train,
                               big_batch=int(cfg.data.batch_size), il=il,
                               corrupted=torch.as_tensor(dm.is_corrupted), eval_sets={"val": (Xv, yv)}, device=device)
    rows = trainer.train(t["epochs"], t["record_every"], out / method)
    finite_or_raise(rows, method)
    seconds = time.perf_counter() - t0
    _, test_acc = trainer.evaluate(Xt.to(device), yt.to(device))
    corrupted = float((trainer.total_corrupted / trainer.total_seen).mean())
    return {"test_acc": [float(a) for a in test_acc], "final_val_acc": [rs[-1]["val_acc"] for rs in rows.values()],
            "selected_corrupted_frac": corrupted, "steps": trainer.step_count,
            "train_seconds": seconds, "seed_steps_per_s": len(t["seeds"]) * trainer.step_count / seconds}


def training_key(cfg: DictConfig, method: str, t: dict) -> str:
    """What a method's runs depend on: data, model, optimiser, selection, IL model, seeds, length, cadence."""
    from datamatters.artifacts import config_hash

    part = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "optimizer", "selection",
                                                                      "irreducible")}
    part.update(method=method, **{k: t[k] for k in ("seeds", "epochs", "record_every")})
    return config_hash(part)


def trained_or_train(cfg: DictConfig, dm, method: str, t: dict, il, out: Path, device: str) -> dict:
    """A method's finished runs in ``out/<method>`` are reused when made with the same settings (a rerun in the
    same run dir, e.g. with another ``dynamics.k``, only redoes the analysis); otherwise they are trained."""
    from datamatters.artifacts import write_json

    key, done = training_key(cfg, method, t), out / method / "training.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("key") == key and all((out / method / f"seed{s}" / "weight_stats.parquet").is_file()
                                          for s in t["seeds"]):
            print(f"reusing the {method} runs in {out / method} (same settings)")
            return prev["result"]
    result = train_method(cfg, dm, method, t, il, out, device)
    write_json(done, {"key": key, "result": result})
    return result


def irreducible_losses(cfg: DictConfig, ctx, dm, methods):
    """IL of target-train for the methods that need it (as ``task=rho`` gets it), else None."""
    import torch

    from datamatters.selection.il_store import load_irreducible_losses
    from datamatters.selection.rules import NEEDS_IL
    from datamatters.tasks.rho import resolve_il_file

    if not set(methods) & NEEDS_IL:
        return None, None
    path, _ = resolve_il_file(cfg, ctx)
    values, meta = load_irreducible_losses(path, dm.metadata("train"), dm.split_indices("train"))
    return torch.as_tensor(values), meta


def run(cfg: DictConfig) -> dict:
    import pandas as pd
    import torch

    from datamatters.artifacts import write_json
    from datamatters.dynamics import selection_map as sm
    from datamatters.dynamics.pipeline import HMMOptions, analyse_runs
    from datamatters.tasks.building import build_datamodule

    cfg = debug_sized(cfg)
    t = _task(cfg)
    _, opts = options(cfg)
    hmm_opts = HMMOptions.from_dict(opts)
    from datamatters.selection.rules import get_rule

    for m in t["methods"]:
        get_rule(m)
    device = "cuda" if t.get("device", "auto") == "auto" and torch.cuda.is_available() else \
        ("cpu" if t.get("device", "auto") == "auto" else t["device"])
    with job(cfg, t.get("job_type", "dynamics")) as ctx:
        dm = build_datamodule(cfg)
        dm.setup()
        il, il_meta = irreducible_losses(cfg, ctx, dm, t["methods"])
        runs = ctx.run_dir / "runs"
        trained = {m: trained_or_train(cfg, dm, m, t, il, runs, device) for m in t["methods"]}
        make_loggers(ctx)
        metrics, artifacts = analyse_runs(runs, ctx.run_dir, hmm_opts)

        chosen = json.loads((ctx.run_dir / "hmm" / "chosen.json").read_text())
        k = int(chosen["k"])
        sp = pd.read_parquet(ctx.run_dir / "state_paths.parquet")
        sp["method"] = [Path(r).relative_to(runs).parts[0] for r in sp["run"]]
        paths, steps = {}, {}
        for m in t["methods"]:
            g = [d.sort_values("step") for _, d in sp[sp["method"] == m].groupby("run", sort=True)]
            paths[m], steps[m] = [d["state"].to_numpy() for d in g], [d["step"].to_numpy() for d in g]
        maps = {m: sm.method_map(paths[m], steps[m], k) for m in t["methods"]}
        for m in t["methods"]:  # from the tables, so a rerun that reuses the runs has it too
            last = [pd.read_parquet(runs / m / f"seed{x}" / "weight_stats.parquet")["train_loss"].iloc[-1]
                    for x in t["seeds"]]
            maps[m]["final_train_loss"] = sm.summary_stats(last)
        for m, tr in trained.items():
            maps[m].update(test_acc=sm.summary_stats(tr["test_acc"]),
                           final_val_acc=sm.summary_stats(tr["final_val_acc"]),
                           selected_corrupted_frac=tr["selected_corrupted_frac"], steps_per_run=tr["steps"],
                           train_seconds=tr["train_seconds"], seed_steps_per_s=tr["seed_steps_per_s"])
        comparisons = [sm.compare(t["methods"][0], m, maps, paths, k, n_perm=int(t.get("n_perm", 2000)))
                       for m in t["methods"][1:]]
        order = sm.first_visit_order([p for m in t["methods"] for p in paths[m]],
                                     [s for m in t["methods"] for s in steps[m]], k)
        results = {
            "what": "training map of data selection: one HMM over the runs of every method, read per method",
            "setting": _setting(cfg, t, trained, il_meta),
            "hmm": {"k": k, "k_bic": metrics["hmm/k_bic"], "k_max": hmm_opts.k_max,
                    "covariance_type": hmm_opts.covariance_type, "restarts": hmm_opts.restarts,
                    "normalize": hmm_opts.normalize, "n_runs": metrics["hmm/n_runs"],
                    "n_test_runs": metrics["hmm/n_test_runs"], "test_ll_per_sample": metrics["hmm/test_ll_per_sample"],
                    "select_seconds": metrics["hmm/select_seconds"], "n_fits_resumed": metrics["hmm/n_fits_resumed"],
                    "transmat": np.asarray(chosen["transmat"]).tolist(), "features": chosen["features"],
                    "state_means": np.load(chosen["model"])["means"].tolist()},  # z-scored feature means
            "state_order": order,
            "methods": maps, "comparisons": comparisons,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "device": device},
            "threads": torch.get_num_threads(),
            "note": str(t.get("note") or ""),
        }
        write_json(ctx.run_dir / "selection_map.json", results)
        _table(maps, k).to_csv(ctx.run_dir / "selection_map.csv", index=False)
        fig = sm.plot_selection_map(results, paths, steps, ctx.run_dir / "selection_map.png")
        (ctx.run_dir / "selection_map.md").write_text(sm.markdown(results) + "\n")
        log_image(ctx, "dynamics/selection_map", fig)
        c0 = comparisons[0]
        metrics.update({"map/occupancy_tv": c0["occupancy_tv"], "map/occupancy_tv_p": c0["occupancy_tv_p"],
                        "map/skipped_states": c0["skipped_states"], "map/added_states": c0["added_states"],
                        "map/convergence_mannwhitney_p": c0["convergence_mannwhitney_p"]})
        for m in t["methods"]:
            metrics[f"map/{m}/convergence_step_mean"] = maps[m]["convergence_step"]["mean"]
            metrics[f"map/{m}/test_acc_mean"] = maps[m]["test_acc"]["mean"]
        log_metrics(ctx, {k_: v for k_, v in metrics.items() if isinstance(v, (int, float))})
        artifacts.update({"selection_map": ctx.run_dir / "selection_map.json", "fig_selection_map": fig,
                          "selection_map_table": ctx.run_dir / "selection_map.csv",
                          "selection_map_markdown": ctx.run_dir / "selection_map.md"})
        summary = write_summary(ctx, metrics, artifacts)
        print_summary(summary, SUMMARY_KEYS, title="training map of data selection")
        return summary


def _setting(cfg: DictConfig, t: dict, trained: dict, il_meta) -> dict:
    noise = OmegaConf.to_container(cfg.data.label_noise, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    opt = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items() if not k.startswith("_")}
    steps = next(iter(trained.values()))["steps"]
    return {
        "description": (f"{cfg.data._target_.rsplit('.', 1)[-1].removesuffix('DataModule')} with "
                        f"{100 * float(noise.get('pc_corrupted') or 0):.0f}% {noise.get('kind')} label noise, "
                        f"{model['name']} {model.get('hidden', '')}, {cfg.optimizer._target_.rsplit('.', 1)[-1]} "
                        f"lr {opt.get('lr')}, n_B={cfg.data.batch_size} with {100 * cfg.selection.percent_train:.0f}% "
                        f"trained on, {t['epochs']} epochs ({steps} steps), statistics every {t['record_every']} "
                        f"steps, {len(t['seeds'])} seeds per method"),
        "data": cfg.data._target_, "label_noise": noise, "model": model, "optimizer": opt,
        "big_batch": int(cfg.data.batch_size), "percent_train": float(cfg.selection.percent_train),
        "epochs": t["epochs"], "steps": steps, "record_every": t["record_every"], "seeds": list(t["seeds"]),
        "methods": list(t["methods"]), "repetitions": len(t["seeds"]),
        "il_holdout_val_acc": None if il_meta is None else il_meta.get("holdout_val_acc"),
    }


def _table(maps: dict, k: int):
    """One row per (method, state): occupancy, runs visiting / ending there, the row of the transition matrix."""
    import pandas as pd

    rows = []
    for m, mm in maps.items():
        for s in range(k):
            row = {"method": m, "state": s, "occupancy": mm["occupancy"][s], "visited_runs": mm["visited_runs"][s],
                   "final_state_runs": mm["final_state_runs"][s], "n_runs": mm["n_runs"]}
            row.update({f"p_to_{j}": mm["transmat"][s][j] for j in range(k)})
            rows.append(row)
    return pd.DataFrame(rows)
