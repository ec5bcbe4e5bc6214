"""Config -> datamodels objects, and the three stages (train, fit, eval) that the datamodels jobs run.

Not a task itself: ``datamodels`` (all stages), ``datamodels_train``, ``datamodels_fit`` and ``datamodels_eval``
use these functions. Engines stay config-free; everything Hydra-shaped lives here.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamatters.artifacts import array_checksum, config_hash
from datamatters.datamodels import (BatchedSubsetTrainer, DatamodelFit, LightningSubsetTrainer, counterfactual,
                                    evaluate_lds, fit_datamodels, initialize_store, lds_curve, open_store,
                                    plot_lds_curve, plot_top_examples, run_worker, standard_spec)
from datamatters.datamodels.trainers import block_masks
from datamatters.errors import UserError
from datamatters.tasks.building import build_datamodule, build_network, build_optimizer
from datamatters.tasks.common import RunContext, log_image, log_metrics


def dm_cfg(cfg: DictConfig) -> DictConfig:
    d = cfg.get("datamodels")
    if d is None or "store" not in d:  # +debug=fast alone sets a few datamodels keys, not a datamodels config
        raise UserError("no datamodels config: add '+datamodels=default' (or use +experiment=digits_datamodels)")
    if d.get("threads"):
        torch.set_num_threads(int(d.threads))
    return d


def split_arrays(dm, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a whole split (fast for in-memory data, item by item otherwise)."""
    ds = dm.dataset(split)
    if hasattr(ds, "tensors"):
        _, X, y = ds.tensors()
        return X, y
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([torch.as_tensor(it[1]) for it in items]), torch.as_tensor([int(it[2]) for it in items])


def training_signature(cfg: DictConfig) -> dict:
    """What determines a row's content besides the mask: model, trainer kind and its hyperparameters."""
    d = cfg.datamodels
    sig: dict[str, Any] = {"trainer": d.trainer, "model": OmegaConf.to_container(cfg.model, resolve=True)}
    if d.trainer == "batched":
        sig.update({k: d[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "momentum")})
    else:
        sig.update({"optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
                    "max_epochs": cfg.trainer.max_epochs, "batch_size": d.batch_size})
        if cfg.trainer.get("fast_dev_run"):
            sig["fast_dev_run"] = cfg.trainer.fast_dev_run
    return sig


def import_fn(path: str):
    """``package.module:function`` -> the function."""
    import importlib

    mod, _, name = str(path).partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot import {path!r} (expected 'package.module:function'): {exc}") from exc


def store_spec(cfg: DictConfig, dm, which: str):
    d = cfg.datamodels
    if d.get("main"):  # the reference's workflow: a user main(index, logdir) and a spec.json describing its keys
        if not d.get("spec_file"):
            raise UserError("datamodels.main needs datamodels.spec_file (a spec.json with num_models and schema)")
        from datamatters.datamodels import DatamodelSpec

        spec = DatamodelSpec.from_json(d.spec_file)
        meta = {**spec.meta, "main": d.main, "id_offset": 0 if which == "train" else int(d.eval_id_offset)}
        num = spec.num_models if which == "train" else int(d.num_eval_models)
        return DatamodelSpec(num, spec.schema, meta)
    n = len(dm.split_indices(d.train_split))
    T = len(dm.split_indices(d.target_split))
    if T == 0 or n == 0:
        raise UserError(f"datamodels need non-empty splits: train_split={d.train_split!r} has {n} points, "
                        f"target_split={d.target_split!r} has {T}")
    num = int(d.num_models if which == "train" else d.num_eval_models)
    meta = {
        "dataset": dm.name, "data_seed": dm.seed, "train_split": d.train_split, "target_split": d.target_split,
        "train_indices": array_checksum(np.asarray(dm.split_indices(d.train_split))),
        "train_labels": array_checksum(np.asarray(dm.split_targets(d.train_split))),
        "target_indices": array_checksum(np.asarray(dm.split_indices(d.target_split))),
        "target_labels": array_checksum(np.asarray(dm.split_targets(d.target_split))),
        "alpha": float(d.alpha), "mask_mode": d.mask_mode, "seed": int(d.seed),
        "id_offset": 0 if which == "train" else int(d.eval_id_offset),
        "training": config_hash(training_signature(cfg)),
    }
    extra = OmegaConf.to_container(d.extra_keys, resolve=True) if d.get("extra_keys") else None
    if extra and not d.get("extra_fn"):
        raise UserError("datamodels.extra_keys needs datamodels.extra_fn to fill them")
    if extra:
        meta["extra_fn"] = d.extra_fn
    return standard_spec(num, n, T, outputs=list(d.outputs), num_classes=dm.num_classes, extra=extra, meta=meta)


def store_path(cfg: DictConfig, which: str) -> Path:
    return Path(cfg.datamodels.store if which == "train" else cfg.datamodels.eval_store)


def build_trainer(cfg: DictConfig, dm, id_offset: int):
    d = cfg.datamodels
    if d.get("main"):
        from datamatters.datamodels import per_index

        root = store_path(cfg, "train" if id_offset == 0 else "eval")
        return per_index(import_fn(d.main), logdir=root, id_offset=int(id_offset))
    common = dict(alpha=float(d.alpha), seed=int(d.seed), mode=d.mask_mode, outputs=tuple(d.outputs),
                  id_offset=int(id_offset), extra_fn=import_fn(d.extra_fn) if d.get("extra_fn") else None)
    if d.trainer == "batched":
        Xtr, ytr = split_arrays(dm, d.train_split)
        Xt, yt = split_arrays(dm, d.target_split)
        return BatchedSubsetTrainer(build_network(cfg.model, dm), Xtr, ytr, Xt, yt, epochs=int(d.epochs),
                                    batch_size=int(d.batch_size), lr=float(d.lr), weight_decay=float(d.weight_decay),
                                    optimizer=d.optimizer, momentum=float(d.momentum), device=d.device,
                                    chunk=d.chunk, **common)
    if d.trainer == "lightning":
        tk = {"max_epochs": int(cfg.trainer.max_epochs), "accelerator": cfg.trainer.accelerator, "devices": 1,
              "precision": cfg.trainer.precision}
        if cfg.trainer.get("fast_dev_run"):  # +debug=fast: one batch per model
            tk["fast_dev_run"] = cfg.trainer.fast_dev_run
        return LightningSubsetTrainer(dm.dataset(d.train_split), dm.dataset(d.target_split),
                                      lambda: build_network(cfg.model, dm), build_optimizer(cfg.optimizer),
                                      batch_size=int(d.batch_size), trainer_kwargs=tk, **common)
    raise UserError(f"datamodels.trainer must be 'batched' or 'lightning', got {d.trainer!r}")


def job_indices(d: DictConfig, num_models: int) -> list[int] | None:
    """Rows of a chunked sweep job (``jobs`` an int or a list of ints), or None for all rows."""
    jobs = d.get("jobs")
    if jobs is None:
        return None
    per = int(d.models_per_job)
    if per < 1:
        raise UserError(f"datamodels.models_per_job must be >= 1, got {per}")
    jobs = [int(jobs)] if isinstance(jobs, (int, str)) else [int(j) for j in jobs]
    rows: list[int] = []
    for j in jobs:
        if j < 0 or j * per >= num_models:
            raise UserError(f"datamodels.jobs={j} with models_per_job={per} starts beyond the store's "
                            f"{num_models} models; use jobs in range(0, {-(-num_models // per)})")
        rows.extend(range(j * per, min((j + 1) * per, num_models)))
    return rows


# ---- stages ------------------------------------------------------------------------------------------------------
def train_stage(cfg: DictConfig, ctx: RunContext, dm, which: str) -> dict:
    """Create (or open, if identical) the store and fill this job's rows."""
    d = cfg.datamodels
    spec = store_spec(cfg, dm, which)
    store = initialize_store(store_path(cfg, which), spec, force=bool(d.force), exist_ok=not d.force)
    offset = spec.meta["id_offset"]
    rows = None if d.pool else job_indices(d, spec.num_models)
    if rows is None and not d.pool:
        rows = list(range(spec.num_models))
    t0 = time.time()
    block = None if d.get("block_size") is None else int(d.block_size)
    rep = run_worker(store, build_trainer(cfg, dm, offset), rows, pool=bool(d.pool), block_size=block,
                     timeout_s=d.timeout_s, claim_timeout_s=float(d.claim_timeout_s), progress=True)
    secs = time.time() - t0
    out = {f"{which}/models_trained": len(rep.done), f"{which}/models_skipped": len(rep.skipped),
           f"{which}/rows_completed": int(store.completed.sum()), f"time/{which}_s": round(secs, 3),
           f"{which}/models_per_s": len(rep.done) / secs if rep.done and secs > 0 else 0.0}
    log_metrics(ctx, out)
    return out


def _slice_name(start: int, end: int | None) -> str:
    return "" if start == 0 and end is None else f"_{start}_{end}"


def weights_path(cfg: DictConfig) -> Path:
    r = cfg.datamodels.regression
    base = Path(cfg.datamodels.weights)
    end = None if r.end is None or int(r.end) < 0 else int(r.end)
    return base.with_name(base.stem + _slice_name(int(r.start), end) + base.suffix)


def regression_kwargs(cfg: DictConfig) -> dict:
    r = cfg.datamodels.regression
    return dict(k=int(r.k), eps=float(r.eps), patience=int(r.patience), tol=float(r.tol),
                val_fraction=float(r.val_fraction), seed=int(cfg.datamodels.seed), solver=r.solver,
                block=int(r.block), device=r.device)


def fit_stage(cfg: DictConfig, ctx: RunContext) -> tuple[DatamodelFit, dict]:
    d = cfg.datamodels
    store = open_store(store_path(cfg, "train"), mode="r")
    rows = store.completed_rows()
    if len(rows) < store.num_models:
        print(f"warning: store {store.path} has {len(rows)}/{store.num_models} completed rows; fitting on those")
    r = d.regression
    end = None if r.end is None or int(r.end) < 0 else int(r.end)
    fit = fit_datamodels(store, r.key, rows, start=int(r.start), end=end, progress=True, **regression_kwargs(cfg))
    fit.meta.update({"store": str(store.path), "store_spec": config_hash(store.spec.to_dict()), "key": r.key})
    path = fit.save(weights_path(cfg))
    out = {"fit/seconds": fit.meta["seconds"], "fit/models": len(rows), "fit/mean_nonzeros": float(fit.nonzeros.mean()),
           "fit/mean_val_mse": float(np.mean(fit.val_mse)), "fit/mean_lambda_index": float(fit.lam_index.mean()),
           "fit/targets": int(fit.W.shape[1])}
    log_metrics(ctx, out)
    return fit, {**out, "_weights": path}


def load_weights(cfg: DictConfig, store) -> DatamodelFit:
    """The full-target weights file, or target-slice files (weights_<start>_<end>.npz) stitched together."""
    expect = {"store_spec": config_hash(store.spec.to_dict())}
    base = Path(cfg.datamodels.weights)
    if base.is_file():
        return DatamodelFit.load(base, expect=expect)
    parts = sorted(base.parent.glob(base.stem + "_*_*" + base.suffix))
    if not parts:
        raise UserError(f"no datamodel weights at {base} (or slices next to it); run task=datamodels_fit first")
    fits = sorted((DatamodelFit.load(p, expect=expect) for p in parts), key=lambda f: f.meta["start"])
    pos = 0
    for f in fits:
        if f.meta["start"] != pos:
            raise UserError(f"weight slices in {base.parent} leave targets {pos}..{f.meta['start']} uncovered")
        pos = f.meta["end"]
    cat = lambda k: np.concatenate([getattr(f, k) for f in fits], axis=-1)  # noqa: E731
    meta = {**fits[0].meta, "start": 0, "end": pos}
    return DatamodelFit(W=cat("W"), b=cat("b"), lam=cat("lam"), lam_index=cat("lam_index"), val_mse=cat("val_mse"),
                        nonzeros=cat("nonzeros"), path={k: np.concatenate([f.path[k] for f in fits], axis=1)
                                                        for k in fits[0].path}, meta=meta)


def eval_stage(cfg: DictConfig, ctx: RunContext, dm, fit: DatamodelFit | None = None) -> tuple[dict, dict]:
    """LDS on held-out models, LDS curve, counterfactual removal, plots. Returns (metrics, artifacts)."""
    d = cfg.datamodels
    train_store = open_store(store_path(cfg, "train"), mode="r")
    eval_store = open_store(store_path(cfg, "eval"), mode="r")
    fit = fit if fit is not None else load_weights(cfg, train_store)
    key = fit.meta.get("key", d.regression.key)
    ev_rows = eval_store.completed_rows()
    res = evaluate_lds(fit, eval_store["masks"], eval_store[key], ev_rows, n_boot=int(d.n_boot))
    metrics: dict[str, Any] = {"lds/mean": res["mean"], "lds/ci_low": res["ci_low"], "lds/ci_high": res["ci_high"],
                               "lds/eval_models": res["n_models"]}
    artifacts: dict[str, Any] = {}
    tr_rows = train_store.completed_rows()
    sizes = [int(s) for s in (d.lds_curve or []) if int(s) <= len(tr_rows) and int(s) >= 20]
    if sizes:
        kw = regression_kwargs(cfg)
        kw.update(start=int(fit.meta["start"]), end=int(fit.meta["end"]))
        same = [s for s in sizes if s == len(tr_rows) and fit.meta.get("n_train_models", 0)
                 + fit.meta.get("n_val_models", 0) == len(tr_rows)]
        curve = lds_curve(train_store["masks"], train_store[key], tr_rows, eval_store["masks"],
                          eval_store[key][:, fit.meta["start"]:fit.meta["end"]],
                          [s for s in sizes if s not in same], eval_rows=ev_rows, n_boot=200, **kw)
        if same:  # the fit on all rows is the main fit: reuse it
            curve.append({"n_models": same[0], "lds": res["mean"], "ci_low": res["ci_low"],
                          "ci_high": res["ci_high"], "fit_seconds": fit.meta["seconds"]})
        for c in curve:
            log_metrics(ctx, {"lds_curve/lds": c["lds"]}, step=c["n_models"])
        metrics["lds_curve"] = curve
        artifacts["lds_curve"] = plot_lds_curve(curve, ctx.run_dir / "lds_curve.png")
        log_image(ctx, "lds_curve", artifacts["lds_curve"])
    cf = d.counterfactual
    if cf and int(cf.targets) > 0 and d.trainer == "batched" and key == "margins" and not d.get("main"):
        trainer = build_trainer(cfg, dm, 0)
        T = fit.W.shape[1]
        targets = np.unique(np.linspace(0, T - 1, min(int(cf.targets), T)).round().astype(int)).tolist()
        ids = list(range(int(cf.id_offset), int(cf.id_offset) + int(cf.seeds)))
        base = block_masks(fit.W.shape[0], float(d.alpha), int(d.seed), ids, d.mask_mode)
        start, end = int(fit.meta["start"]), int(fit.meta["end"])
        res_cf = counterfactual(fit, lambda m, i: trainer.train_masks(m, i)["margins"][:, start:end], targets,
                                base, ids, k=int(cf.k))
        metrics.update({"counterfactual/pearson": res_cf["pearson"],
                        "counterfactual/mean_predicted_drop": res_cf["mean_predicted_drop"],
                        "counterfactual/mean_actual_drop": res_cf["mean_actual_drop"]})
        metrics["counterfactual"] = res_cf["per_target"]
    pl = d.plots
    if pl and int(pl.targets) > 0:
        Xtr, ytr = split_arrays(dm, d.train_split)
        Xt, yt = split_arrays(dm, d.target_split)
        start = int(fit.meta["start"])
        tsel = np.linspace(0, fit.W.shape[1] - 1, min(int(pl.targets), fit.W.shape[1])).round().astype(int)
        artifacts["top_examples"] = plot_top_examples(fit.W, Xtr.numpy(), Xt[start:].numpy(), tsel.tolist(),
                                                      ctx.run_dir / "top_examples.png", k=int(pl.k),
                                                      train_y=ytr.numpy(), target_y=yt[start:].numpy())
        log_image(ctx, "top_examples", artifacts["top_examples"])
    log_metrics(ctx, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics, artifacts


def datamodule(cfg: DictConfig):
    return build_datamodule(cfg)


def split_details(metrics: dict) -> tuple[dict, dict]:
    """Scalars stay in summary.json; lists (the LDS curve, per-target counterfactuals) go to a details file."""
    flat = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    return flat, {k: v for k, v in metrics.items() if isinstance(v, (list, dict))}
