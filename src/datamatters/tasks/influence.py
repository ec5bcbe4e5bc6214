"""The influence job: train a model on the (noisy) train split, fit an influence method, write the test x train
influence matrix (zarr), score it by LDS on held-out subset models, and detect mislabelled points by self-influence.

    python run.py +experiment=digits_influence influence=cg
    python run.py +experiment=digits_influence influence=ekfac influence.calculator=dask   # LocalCluster
    python run.py +experiment=digits_influence influence.calculator=dask influence.dask_address=tcp://host:8786

The model and the held-out subset models are trained by the same batched ensemble trainer with the same recipe
(``influence.train``), so LDS compares like with like; ``influence.lds.store`` instead reads the masks and margins
of an existing datamodels store, so influence, TRAK and datamodels are scored on the same held-out models.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamatters.artifacts import save_indexed
from datamatters.errors import UserError
from datamatters.tasks.building import build_datamodule, build_network
from datamatters.tasks.common import job, log_image, log_metrics, make_loggers, print_summary, write_summary


@dataclass
class TrainSchema:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.001
    optimizer: str = "adam"


@dataclass
class LdsSchema:
    store: Optional[str] = None  # a datamodels store (masks + margins) to score on instead of training models here
    num_models: int = 64
    alpha: float = 0.5
    seed: int = 1
    n_boot: int = 1000


@dataclass
class InfluenceSchema:
    method: str = "direct"
    regularization: Any = 0.01  # number, {block: number}, or "auto" (DataInf)
    curvature: Optional[str] = None  # hessian | gauss_newton | empirical_fisher (only methods that take it)
    block_structure: Any = None  # full | layer_wise | parameter_wise | {block: [param names]} (idem)
    params: Dict[str, Any] = field(default_factory=dict)  # method-specific arguments
    dtype: str = "float64"
    num_test: Optional[int] = None  # first n test points (all when null)
    train_chunk: int = 256
    test_chunk: int = 128
    calculator: str = "sequential"  # sequential | dask
    dask_address: Optional[str] = None  # a running scheduler (e.g. scripts/dask_cluster.py); null: a LocalCluster
    dask_workers: int = 2
    dask_processes: bool = True
    self_influence: bool = True
    train: TrainSchema = field(default_factory=TrainSchema)
    lds: LdsSchema = field(default_factory=LdsSchema)


def settings(cfg: DictConfig) -> DictConfig:
    """``cfg.influence`` checked against the schema: unknown keys and wrong types are clear errors."""
    node = OmegaConf.select(cfg, "influence")
    if node is None or "method" not in node:  # `+debug=fast` alone sets sizes, not a method
        raise UserError("no influence method selected: add influence=<method> (direct, cg, lissa, arnoldi, ekfac, "
                        "nystroem, datainf, trak) or use +experiment=digits_influence")
    try:
        s = OmegaConf.merge(OmegaConf.structured(InfluenceSchema), node)
    except Exception as exc:  # omegaconf's ValidationError / ConfigKeyError
        raise UserError(f"bad influence config: {exc}".splitlines()[0]) from exc
    from datamatters.influence import METHODS

    if s.method not in METHODS:
        raise UserError(f"unknown influence method {s.method!r}; choose one of {sorted(METHODS)}")
    if s.calculator not in ("sequential", "dask"):
        raise UserError(f"influence.calculator must be 'sequential' or 'dask', got {s.calculator!r}")
    return s


def _method(s: DictConfig, model, loss):
    import inspect

    from datamatters.influence import METHODS

    if s.method not in METHODS:
        raise UserError(f"unknown influence method {s.method!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[s.method]
    kw = dict(OmegaConf.to_container(s.params, resolve=True))
    accepted = inspect.signature(cls.__init__).parameters
    kw["regularization"] = OmegaConf.to_container(s.regularization) if OmegaConf.is_config(s.regularization) \
        else s.regularization
    for key in ("curvature", "block_structure"):
        value = s[key]
        if value is None:
            continue
        if key not in accepted:
            raise UserError(f"influence.{key}={value} is not an option of influence={s.method} (it fixes its own); "
                            f"remove it or choose a method that takes it")
        kw[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    kw.setdefault("grad_chunk", s.train_chunk)
    try:
        return cls(model, loss, **kw)
    except TypeError as exc:
        raise UserError(f"influence.params for {s.method}: {exc}") from exc


def _tensors(dm, split: str, n: int | None = None):
    ds = dm.dataset(split)
    if hasattr(ds, "tensors"):
        idx, X, y = ds.tensors()
    else:  # a disk-backed dataset: gather it (influence needs the inputs for gradients anyway)
        parts = list(dm.loader(split, batch_size=512))
        idx, X, y = (torch.cat([p[i] for p in parts]) for i in range(3))
    return (idx[:n], X[:n], y[:n]) if n else (idx, X, y)


def _batches(idx, X, y, chunk: int) -> list:
    return [(idx[s:s + chunk], X[s:s + chunk], y[s:s + chunk]) for s in range(0, len(y), chunk)]


def _train(template, X, y, masks, t: DictConfig, seed: int):
    from datamatters.training.ensemble import train_ensemble

    return train_ensemble(template, X, y, masks, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                          weight_decay=t.weight_decay, optimizer=t.optimizer, seed=seed)


def _trained_model(template, state: dict):
    """A copy of ``template`` with the trained parameters. Every parameter must be given and nothing else but
    buffers (the ensemble trainer trains parameters only and keeps the template's buffers, so the model is the one
    it trained); anything else is a mismatch between the trainer and the network, reported by name."""
    model = copy.deepcopy(template)
    params = set(dict(model.named_parameters()))
    missing = sorted(params - set(state))
    unexpected = sorted(set(state) - params - set(dict(model.named_buffers())))
    if missing or unexpected:
        raise UserError(f"the trained weights do not match the network: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}; the model config and the trainer disagree")
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return model


def _store_expect(dm) -> dict:
    """What a datamodels store's metadata must say to share its held-out models with this run."""
    from datamatters.artifacts import array_checksum

    out = {"dataset": dm.name, "data_seed": dm.seed}
    for role, split in (("train", "train"), ("target", "test")):
        out[f"{role}_indices"] = array_checksum(np.asarray(dm.split_indices(split)))
        out[f"{role}_labels"] = array_checksum(np.asarray(dm.split_targets(split)))
    out["train_split"], out["target_split"] = "train", "test"
    return out


def _client(s: DictConfig):
    """A distributed client: the given scheduler, or a LocalCluster with one thread per worker."""
    from distributed import Client, LocalCluster

    if s.dask_address:
        return Client(s.dask_address), None
    cluster = LocalCluster(n_workers=s.dask_workers, threads_per_worker=1, processes=s.dask_processes,
                           dashboard_address=None)
    return Client(cluster), cluster


def _matrix(s: DictConfig, inf, test, train, te, tr, path, meta) -> None:
    from datamatters.influence.calculators import (DaskInfluenceCalculator, SequentialInfluenceCalculator,
                                                   write_dask)

    if s.calculator == "sequential":
        SequentialInfluenceCalculator(inf, progress=False).influences(test, train).to_zarr(path, meta=meta)
        return
    if s.calculator != "dask":
        raise UserError(f"influence.calculator must be 'sequential' or 'dask', got {s.calculator!r}")
    import dask.array as da

    client, cluster = _client(s)
    try:
        calc = DaskInfluenceCalculator(inf, client)
        arr = calc.influences(da.from_array(te[1].numpy(), chunks=s.test_chunk), da.from_array(te[2].numpy(), chunks=s.test_chunk),
                              da.from_array(tr[1].numpy(), chunks=s.train_chunk), da.from_array(tr[2].numpy(), chunks=s.train_chunk))
        write_dask(arr, path, te[0].numpy(), tr[0].numpy(), {"mode": "up", **meta})
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _plot(path, self_infl, corrupted) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.histogram_bin_edges(self_infl, bins=40)
    ax.hist(self_infl[~corrupted], bins=bins, alpha=0.6, label="clean")
    ax.hist(self_infl[corrupted], bins=bins, alpha=0.6, label="corrupted label")
    ax.set_xlabel("self-influence")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> dict:
    with job(cfg, cfg.task.get("job_type", "influence")) as ctx:
        from datamatters.influence import evaluate, store

        s = settings(cfg)
        dtype = {"float64": torch.float64, "float32": torch.float32}.get(s.dtype)
        if dtype is None:
            raise UserError(f"influence.dtype must be float32 or float64, got {s.dtype!r}")
        dm = build_datamodule(cfg)
        make_loggers(ctx)
        seed = int(cfg.get("seed") or 0)
        tr, te = _tensors(dm, "train"), _tensors(dm, "test", s.num_test)
        if len(te[2]) == 0 or len(tr[2]) < 2:
            raise UserError(f"influence needs test points and at least 2 train points (got {len(te[2])}, {len(tr[2])})")
        template = build_network(cfg.model, dm)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        params = _train(template, tr[1], tr[2], np.ones((1, len(tr[2])), dtype=bool), s.train, seed)
        model = _trained_model(template, {k: v[0] for k, v in params.items()}).to(dtype).eval()
        timings["time/train_s"] = time.perf_counter() - t
        with torch.no_grad():
            acc = float((model(te[1].to(dtype)).argmax(1) == te[2]).float().mean())

        X_tr, X_te = tr[1].to(dtype), te[1].to(dtype)
        tr, te = (tr[0], X_tr, tr[2]), (te[0], X_te, te[2])
        train, test = _batches(*tr, s.train_chunk), _batches(*te, s.test_chunk)
        inf = _method(s, model, torch.nn.functional.cross_entropy)
        t = time.perf_counter()
        inf.fit(train)
        timings["time/fit_s"] = time.perf_counter() - t

        path = ctx.run_dir / "influences.zarr"
        meta = {"dataset": dm.name, "method": s.method, "config_hash": ctx.cfg_hash,
                "test_checksum": dm.metadata("test")["targets_checksum"], "train": dm.metadata("train")}
        t = time.perf_counter()
        _matrix(s, inf, test, train, te, tr, path, meta)
        timings["time/matrix_s"] = time.perf_counter() - t
        M = np.asarray(store.open_matrix(path)[0][:], dtype=np.float64)

        t = time.perf_counter()
        if s.lds.store:
            masks, margins = evaluate.margins_from_store(s.lds.store, len(tr[2]), len(te[2]), _store_expect(dm))
        else:
            masks, margins = evaluate.heldout_margins(template, tr[1].float(), tr[2], te[1].float(), te[2],
                                                      num_models=s.lds.num_models, alpha=s.lds.alpha,
                                                      seed=s.lds.seed, epochs=s.train.epochs,
                                                      batch_size=s.train.batch_size, lr=s.train.lr,
                                                      weight_decay=s.train.weight_decay, optimizer=s.train.optimizer)
        timings["time/lds_models_s"] = time.perf_counter() - t
        lds = evaluate.lds_of(M, masks, margins, n_boot=s.lds.n_boot, seed=seed)
        metrics: dict[str, Any] = {"lds/mean": lds["mean"], "lds/ci_low": lds["ci_low"], "lds/ci_high": lds["ci_high"],
                                   "lds/num_models": int(len(masks)), "test/acc": acc,
                                   "influence/n_test": int(len(te[2])), "influence/n_train": int(len(tr[2])),
                                   "influence/n_parameters": int(inf.n_parameters),
                                   "influence/solve_calls": int(inf.stats["solve_calls"])}
        artifacts: dict[str, Any] = {"influences": path}

        if s.self_influence:
            from datamatters.influence.calculators import SequentialInfluenceCalculator

            t = time.perf_counter()
            si = SequentialInfluenceCalculator(inf).self_influences(train).cpu().numpy().astype(np.float64)
            timings["time/self_influence_s"] = time.perf_counter() - t
            artifacts["self_influence"] = save_indexed(ctx.run_dir / "self_influence.npz", si, tr[0].numpy(),
                                                       {**dm.metadata("train"), "method": s.method})
            corrupted = np.asarray(dm.is_corrupted, bool)
            if corrupted.any() and not corrupted.all():
                noisy = evaluate.self_influence_auc(si, corrupted)
                metrics.update({"noisy/auc": noisy["auc"], "noisy/f1": noisy["f1"]})
                png = _plot(ctx.run_dir / "self_influence.png", si, corrupted)
                if png is not None:
                    artifacts["self_influence_plot"] = png
                    log_image(ctx, "self_influence", png)
        metrics.update({k: round(v, 4) for k, v in timings.items()})
        log_metrics(ctx, metrics)
        summary = write_summary(ctx, metrics, artifacts)
        print_summary(summary, ["lds/mean", "noisy/auc", "test/acc", "time/fit_s", "time/matrix_s", "run_dir"],
                      title=f"influence ({s.method})")
        return summary
