"""The attribution job: every attribution and valuation method on the same model, scored by LDS against one
retraining ground truth, with what each cost.

    python run.py +experiment=attribution_digits           # logistic regression and an MLP on digits
    python run.py +experiment=attribution_digits attribution.methods=[direct,graddot] attribution.num_test=50

Per model (``attribution.models``), resumable stage by stage (re-run into the same run dir, or share stores):

1. **Ground truth** as dattri and Kronfluence define LDS: ``M`` subsets of exactly ``alpha * n`` training points, each
   trained with ``S`` seeds by the batched ensemble trainer, margins and losses of every test point averaged over
   the seeds, written block by block to a datamodels store (masks, margins, loss). Its metadata (data, split
   checksums, model, recipe, alpha, M, S, seed) must match on re-use; a store made for other masks or another model is
   refused with the differences.
2. **The full-data model** (seed ``seed``, the recipe of the ground truth) that every gradient method explains.
3. **Methods** (one cached row each, keyed by its settings and the ground truth): datamodels on 250..4,000 extra
   subset models (their own store), TRAK over 1/10/50 independently trained models at two projection sizes, the
   influence functions, TracIn, the curvature-free control, KNN-Shapley per test point on penultimate features, and
   global values (TMC-Shapley, Banzhaf-MSR, Data-OOB) scored as a one-target LDS on the mean test loss.

Writes ``attribution/<model>/table.md``, ``attribution.json`` (all rows), ``lds_vs_cost.png`` (logged to W&B with a
table per model) and ``summary.json`` keys ``lds/<model>/<method>``, ``cost_s/<model>/<method>``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamatters.artifacts import array_checksum, config_hash, write_json
from datamatters.errors import UserError
from datamatters.tasks.building import build_datamodule, build_network
from datamatters.tasks.common import job, log_image, log_metrics, make_loggers, print_summary, write_summary

SPECIAL = ("datamodels", "trak", "tracin", "graddot", "knn_shapley")
GLOBAL = ("tmc_shapley", "banzhaf_msr", "data_oob")


@dataclass
class TrainRecipe:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.001
    optimizer: str = "adam"


@dataclass
class GroundTruth:
    store: Optional[str] = None   # root of the ground-truth stores (one per model); null: <run dir>/ground_truth
    num_subsets: int = 100        # M
    alpha: float = 0.5
    seeds: int = 5                # S trainings per subset, outputs averaged
    seed: int = 1
    n_test: Optional[int] = None  # test points whose outputs are stored (the first n; null: the whole test split)
    block: int = 20               # subsets per store write (resume granularity)


@dataclass
class DatamodelsCfg:
    sizes: List[int] = field(default_factory=lambda: [250, 500, 1000, 2000, 4000])
    seed: int = 2
    block: int = 250
    fit: Dict[str, Any] = field(default_factory=dict)  # fit_datamodels keyword arguments


@dataclass
class TrakCfg:
    checkpoints: List[int] = field(default_factory=lambda: [1, 10, 50])
    projection_dims: List[int] = field(default_factory=lambda: [64, 512])
    seed: int = 3
    outputs: List[str] = field(default_factory=lambda: ["loss"])  # loss | margin (TRAK's margin + Q re-weighting)
    damping_factor: Optional[float] = None  # null: attribution.damping_factor; 0: traker's lambda_reg = 0
    dtype: Optional[str] = None  # compute precision: null = attribution.dtype; float32 = traker's (solve in float64)


@dataclass
class DampingSelect:
    """``regularization: select`` rows: lambda = the grid factor x mean eigenvalue with the best LDS on ``points``
    test points right after the scored ones (held out: never the scored points), same ground truth models."""
    points: int = 100
    grid: List[float] = field(default_factory=lambda: [0.01, 0.1, 0.3, 1.0, 3.0])


@dataclass
class AttributionSchema:
    models: List[Any] = field(default_factory=list)        # [{label, name, train?, tracin_epochs?, ...model config}]
    methods: List[str] = field(default_factory=list)       # rows to run (influence keys, SPECIAL, GLOBAL)
    num_test: int = 100
    dtype: str = "float64"
    n_boot: int = 1000
    damping_factor: float = 0.1                            # lambda = factor x mean curvature eigenvalue
    damping_select: DampingSelect = field(default_factory=DampingSelect)
    max_epochs: Optional[int] = None                       # caps every model's epochs and TracIn epochs (debug runs)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    ground_truth: GroundTruth = field(default_factory=GroundTruth)
    datamodels: DatamodelsCfg = field(default_factory=DatamodelsCfg)
    trak: TrakCfg = field(default_factory=TrakCfg)
    tracin_epochs: List[int] = field(default_factory=lambda: [10, 20, 30, 40, 50, 60])
    knn_k: int = 5
    influence: Dict[str, Any] = field(default_factory=dict)  # {row: {method, regularization, curvature, params}}
    valuation: Dict[str, Any] = field(default_factory=dict)  # {tmc_shapley: {max_updates, max_time_s}, ...}
    valuation_seed: int = 4


def settings(cfg: DictConfig) -> DictConfig:
    node = OmegaConf.select(cfg, "attribution")
    if node is None:
        raise UserError("no attribution config: use +experiment=attribution_digits (or attribution_mnist1d)")
    try:  # resolved against the whole config first: rows may interpolate ${attribution.train.weight_decay}
        s = OmegaConf.merge(OmegaConf.structured(AttributionSchema), OmegaConf.to_container(node, resolve=True))
    except Exception as exc:  # omegaconf's ValidationError / ConfigKeyError / InterpolationKeyError
        raise UserError(f"bad attribution config: {exc}".splitlines()[0]) from exc
    if not s.models or not all(OmegaConf.is_dict(m) and "label" in m and "name" in m for m in s.models):
        raise UserError("attribution.models must be a non-empty list of {label: ..., name: logistic|mlp|cnn, ...}")
    labels = [m.label for m in s.models]
    if len(set(labels)) != len(labels):
        raise UserError(f"attribution.models labels must be unique, got {labels}")
    for m in s.models:
        extra = set(m.get("train") or {}) - RECIPE_KEYS
        if extra:
            raise UserError(f"attribution.models[{m.label}].train: unknown keys {sorted(extra)}; known: "
                            f"{sorted(RECIPE_KEYS)}")
    known = set(s.influence) | set(SPECIAL) | set(GLOBAL)
    bad = [m for m in s.methods if m not in known]
    if bad:
        raise UserError(f"unknown attribution methods {bad}; known: {sorted(known)}")
    if s.num_test < 1 or s.ground_truth.num_subsets < 3 or s.ground_truth.seeds < 1:
        raise UserError("attribution needs num_test >= 1, ground_truth.num_subsets >= 3 and ground_truth.seeds >= 1")
    # methods that need checkpoints or extra models: refused before any training, not after the ground truth
    for m in s.models:
        E, ep = int(recipe(s, m)["epochs"]), tracin_epochs(s, m)
        if "tracin" in s.methods and (not ep or min(ep) < 1 or max(ep) > E):
            raise UserError(f"TracIn needs the checkpoints saved during training: attribution.tracin_epochs must "
                            f"list epochs in 1..{E} (the training epochs of {m.label}), got {ep}")
    if "trak" in s.methods and (not s.trak.checkpoints or min(s.trak.checkpoints) < 1 or not s.trak.projection_dims):
        raise UserError("TRAK needs independently trained checkpoints: attribution.trak.checkpoints must list counts "
                        f">= 1 and trak.projection_dims sizes, got {list(s.trak.checkpoints)} and "
                        f"{list(s.trak.projection_dims)}")
    if "trak" in s.methods and (not s.trak.outputs or set(s.trak.outputs) - {"loss", "margin"}):
        raise UserError(f"attribution.trak.outputs must list loss and/or margin, got {list(s.trak.outputs)}")
    if "trak" in s.methods and s.trak.dtype not in (None, "float32", "float64"):
        raise UserError(f"attribution.trak.dtype must be null, float32 or float64, got {s.trak.dtype!r}")
    if "datamodels" in s.methods and (not s.datamodels.sizes or min(s.datamodels.sizes) < 1):
        raise UserError(f"datamodels need subset models: attribution.datamodels.sizes must list model counts >= 1, "
                        f"got {list(s.datamodels.sizes)}")
    if s.damping_select.points < 3 or not s.damping_select.grid or min(s.damping_select.grid) <= 0:
        raise UserError("attribution.damping_select needs points >= 3 and a grid of positive factors, got "
                        f"{s.damping_select.points} and {list(s.damping_select.grid)}")
    if s.dtype not in ("float32", "float64"):
        raise UserError(f"attribution.dtype must be float32 or float64, got {s.dtype!r}")
    return s


RECIPE_KEYS = {"epochs", "batch_size", "lr", "weight_decay", "optimizer", "momentum"}


def recipe(s: DictConfig, model) -> dict:
    """The training recipe of one model: ``attribution.train`` updated by the model's own ``train`` entry (e.g. a
    converging full-batch recipe for the convex logistic model). Ground truth, full model, extra subset models, TRAK members,
    TracIn replays and utilities all train with it."""
    own = OmegaConf.to_container(model.get("train"), resolve=True) if model.get("train") else {}
    rec = {**OmegaConf.to_container(s.train, resolve=True), **own}
    if s.max_epochs is not None:
        rec["epochs"] = min(int(rec["epochs"]), int(s.max_epochs))
    return rec


def tracin_epochs(s: DictConfig, model) -> list[int]:
    """The model's TracIn checkpoints (its own list, else ``attribution.tracin_epochs``), capped by max_epochs."""
    ep = [int(e) for e in (model.get("tracin_epochs") or s.tracin_epochs)]
    return sorted({min(e, int(s.max_epochs)) for e in ep}) if s.max_epochs is not None else ep


# ---- ground truth ------------------------------------------------------------------------------------------------
def _gt_meta(dm, label: str, model_cfg: dict, s: DictConfig, n_test: int, rec: dict) -> dict:
    idx_te, lab_te = np.asarray(dm.split_indices("test"))[:n_test], np.asarray(dm.split_targets("test"))[:n_test]
    return {"kind": "attribution_ground_truth", "dataset": dm.name, "data_seed": dm.seed,
            "train_indices": array_checksum(np.asarray(dm.split_indices("train"))),
            "train_labels": array_checksum(np.asarray(dm.split_targets("train"))),
            "test_indices": array_checksum(idx_te), "test_labels": array_checksum(lab_te), "n_test": int(n_test),
            "model": json.dumps(model_cfg, sort_keys=True), "recipe": json.dumps(rec, sort_keys=True),
            "alpha": float(s.ground_truth.alpha), "seeds": int(s.ground_truth.seeds), "seed": int(s.ground_truth.seed),
            "mask_mode": "fixed", "label": label}


def _gt_masks(n: int, g: DictConfig, rows) -> np.ndarray:
    from datamatters.datamodels import block_masks

    return block_masks(n, float(g.alpha), int(g.seed), list(rows), mode="fixed")


def ground_truth(path: Path, dm, label: str, model_cfg: dict, s: DictConfig, rec: dict, template, Xtr, ytr, Xte,
                 yte, device=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(masks (M, n), margins (M, T_all), losses (M, T_all), seconds trained now): trains the missing rows."""
    from datamatters.datamodels import initialize_store, open_store, run_worker, standard_spec
    from datamatters.training.ensemble import losses, margins, predict_ensemble, train_ensemble

    g, n, T = s.ground_truth, len(ytr), len(yte)
    spec = standard_spec(int(g.num_subsets), n, T, outputs=("masks", "margins", "loss"),
                         meta=_gt_meta(dm, label, model_cfg, s, T, rec))
    if (path / "spec.json").is_file():
        on_disk = open_store(path, mode="r").spec
        if on_disk.meta.get("n_test") is not None and int(on_disk.meta["n_test"]) < T:
            raise UserError(f"the ground-truth store {path} holds {on_disk.meta['n_test']} test points, this run scores "
                            f"{T}; lower attribution.num_test or use a new ground_truth.store")
        diff = on_disk.differences(spec)
        if diff:
            raise UserError(f"the ground-truth store {path} was made for other masks, data or model ("
                            + "; ".join(diff)[:600] + "). Use another attribution.ground_truth.store or delete it.")
    store = initialize_store(path, spec, exist_ok=True)
    done = store.completed_rows()
    if len(done) and not np.array_equal(np.asarray(store["masks"][done]), _gt_masks(n, g, done)):
        raise UserError(f"the ground-truth store {path} holds masks this run would not draw (another mask seed or "
                        "mask function); use a new ground_truth.store")
    S = int(g.seeds)

    def trainer(rows):
        masks = _gt_masks(n, g, rows)
        ids = [r * S + k for r in rows for k in range(S)]
        params = train_ensemble(template, Xtr, ytr, np.repeat(masks, S, axis=0), seed=int(g.seed), model_ids=ids,
                                device=device, **rec)
        logits = predict_ensemble(template, params, Xte.to(next(iter(params.values())).device))
        mg = margins(logits, yte).float().cpu().numpy().reshape(len(rows), S, T).mean(1)
        ls = losses(logits, yte).float().cpu().numpy().reshape(len(rows), S, T).mean(1)
        return {"masks": masks, "margins": mg, "loss": ls}

    t = time.perf_counter()
    report = run_worker(store, trainer, range(int(g.num_subsets)), block_size=int(g.block))
    secs = time.perf_counter() - t if report.done else 0.0
    return np.asarray(store["masks"]), np.asarray(store["margins"]), np.asarray(store["loss"]), secs


def datamodels_store(path: Path, meta: dict, d: DictConfig, s: DictConfig, rec: dict, template, Xtr, ytr, Xte, yte,
                     device):
    """The extra subset models for the datamodels rows (one seed each, alpha of the ground truth); returns the
    store and the seconds per trained model (measured now, or recorded when the rows were trained)."""
    from datamatters.datamodels import BatchedSubsetTrainer, initialize_store, run_worker, standard_spec

    N = max(int(x) for x in d.sizes)
    spec = standard_spec(N, len(ytr), len(yte), outputs=("masks", "margins"),
                         meta={**meta, "kind": "attribution_datamodels", "seed": int(d.seed), "seeds": 1})
    store = initialize_store(path, spec, exist_ok=True)
    trainer = BatchedSubsetTrainer(template, Xtr, ytr, Xte, yte, alpha=float(s.ground_truth.alpha), seed=int(d.seed),
                                   mode="fixed", device=device, **rec)
    timing = path.parent / "datamodels_timing.json"
    t = time.perf_counter()
    report = run_worker(store, trainer, range(N), block_size=int(d.block))
    if report.done:
        prev = json.loads(timing.read_text()) if timing.is_file() else {"seconds": 0.0, "models": 0}
        prev = {"seconds": prev["seconds"] + time.perf_counter() - t, "models": prev["models"] + len(report.done)}
        write_json(timing, prev)
    if not timing.is_file():
        raise UserError(f"{timing} is missing: the datamodels store {path} was filled elsewhere; its training "
                        "cost is unknown (delete the store to retrain it here)")
    rec = json.loads(timing.read_text())
    return store, rec["seconds"] / max(rec["models"], 1)


# ---- one model ---------------------------------------------------------------------------------------------------
def _tensors(dm, split: str):
    ds = dm.dataset(split)
    if not hasattr(ds, "tensors"):
        raise UserError(f"the attribution job needs an in-memory dataset ({dm.name} {split} is not)")
    _, X, y = ds.tensors()
    return X.float(), y.long()


def _cached(path: Path, key: str, compute) -> list[dict]:
    """A stage's rows from ``path`` when its key matches (a resumed run), else computed and saved."""
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("key") == key:
            return rec["rows"]
    rows = compute()
    rows = rows if isinstance(rows, list) else [rows]
    write_json(path, {"key": key, "rows": rows})
    return rows


def run_model(label: str, model_cfg: dict, cfg: DictConfig, s: DictConfig, dm, out: Path, gt_root: Path,
              rec: dict | None = None, ckpts: list | None = None) -> dict:
    from datamatters.tasks import attribution_methods as am
    from datamatters.training.ensemble import train_ensemble

    rec = rec or OmegaConf.to_container(s.train, resolve=True)
    ckpts = list(ckpts or s.tracin_epochs)
    dtype = torch.float64 if s.dtype == "float64" else torch.float32
    device = "cuda" if torch.cuda.is_available() else None
    Xtr, ytr = _tensors(dm, "train")
    Xte_all, yte_all = _tensors(dm, "test")
    T, n_gt = int(s.num_test), len(yte_all)
    if s.ground_truth.n_test is not None:
        n_gt = min(int(s.ground_truth.n_test), n_gt)
    if T > n_gt:
        raise UserError(f"attribution.num_test={T}, but the ground truth holds {n_gt} test points (the test split "
                        f"has {len(yte_all)}, ground_truth.n_test={s.ground_truth.n_test}); lower num_test")
    H = int(s.damping_select.points)
    if _selects(s) and T + H > n_gt:
        raise UserError(f"damping chosen on held-out points (regularization: select) needs num_test + "
                        f"damping_select.points = {T} + {H} test points in the ground truth, which holds {n_gt}; "
                        "lower attribution.damping_select.points or raise ground_truth.n_test")
    template = build_network(OmegaConf.create(model_cfg), dm)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed") or 0)

    masks, mg, ls, gt_s = ground_truth(gt_root / label, dm, label, model_cfg, s, rec, template, Xtr, ytr,
                                       Xte_all[:n_gt], yte_all[:n_gt], device)
    gt_key = config_hash({"meta": _gt_meta(dm, label, model_cfg, s, n_gt, rec), "M": int(s.ground_truth.num_subsets)})

    t = time.perf_counter()
    full_params = train_ensemble(template, Xtr, ytr, np.ones((1, len(ytr)), bool), seed=seed, model_ids=[0],
                                 device=device, **rec)
    train_s = time.perf_counter() - t
    p = am.Problem(label, template, Xtr, ytr, Xte_all[:T], yte_all[:T], rec, seed, dtype, None, train_s,
                   masks, mg[:, :T].astype(np.float64), ls[:, :T].astype(np.float64), int(s.n_boot), device)
    if _selects(s):
        p.held_out = (Xte_all[T:T + H], yte_all[T:T + H], mg[:, T:T + H].astype(np.float64))
    p.full = p.network(full_params)
    with torch.no_grad():
        acc = float((p.full(p.Xte.to(dtype)).argmax(1) == p.yte).float().mean())
    spectrum = am.curvature_spectrum(p.full, p.data)
    lam = float(s.damping_factor) * spectrum["mean"]
    base = {"gt": gt_key, "seed": seed, "T": T, "dtype": s.dtype, "factor": float(s.damping_factor)}
    rows: list[dict] = []
    for name in s.methods:
        key = config_hash({**base, "name": name, **_method_cfg(s, name, rec, ckpts)})
        path = out / "rows" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        if name == "datamodels":
            store, per_model = datamodels_store(out / "datamodels_store", _gt_meta(dm, label, model_cfg, s, T, rec),
                                                s.datamodels, s, rec, template, Xtr, ytr, p.Xte, p.yte, device)
            fit_kw = OmegaConf.to_container(s.datamodels.fit, resolve=True)
            rows += _cached(path, key, lambda: am.datamodels_rows(p, store, list(s.datamodels.sizes), per_model,
                                                                  fit_kw))
        elif name == "trak":
            g2 = {o: am.mean_sq_grad_norm(p.full, p.Xtr.to(dtype), p.ytr, am.OUTPUTS[o]) for o in s.trak.outputs}
            rows += _cached(path, key, lambda: am.trak_rows(p, list(s.trak.checkpoints), list(s.trak.projection_dims),
                                                            float(s.damping_factor if s.trak.damping_factor is None
                                                                  else s.trak.damping_factor), int(s.trak.seed), g2,
                                                            tuple(s.trak.outputs), s.trak.dtype))
        elif name == "tracin":
            rows += _cached(path, key, lambda: am.tracin_row(p, ckpts))
        elif name == "graddot":
            rows += _cached(path, key, lambda: am.graddot_row(p))
        elif name == "knn_shapley":
            rows += _cached(path, key, lambda: am.knn_row(p, int(s.knn_k)))
        elif name in GLOBAL:
            rows += _cached(path, key, lambda: am.valuation_row(p, name, s.valuation.get(name), int(s.valuation_seed)))
        else:
            rows += _cached(path, key, lambda: am.influence_row(p, name, s.influence[name], float(s.damping_factor),
                                                                  spectrum, list(s.damping_select.grid)))
    return {"rows": rows, "test_acc": acc, "spectrum": spectrum, "damping_rule": lam, "train_s": train_s,
            "ground_truth_train_s": gt_s, "n_train": int(len(ytr)), "n_test": T,
            "n_parameters": int(sum(v.numel() for v in p.full.parameters()))}


def _selects(s: DictConfig) -> bool:
    return any(s.influence[m].get("regularization") == "select" for m in s.methods if m in s.influence)


def _method_cfg(s: DictConfig, name: str, rec: dict, ckpts: list) -> dict:
    node = {"datamodels": s.datamodels, "trak": s.trak, "tracin": ckpts, "knn_shapley": s.knn_k}.get(name)
    if node is None:
        node = s.valuation.get(name) if name in GLOBAL else s.influence.get(name)
    out = {"cfg": OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node, "recipe": rec}
    if name in s.influence and s.influence[name].get("regularization") == "select":
        out["select"] = OmegaConf.to_container(s.damping_select)
    return out


# ---- the job -----------------------------------------------------------------------------------------------------
def table_data(rows: list[dict]) -> list[list]:
    """Rows for a W&B table: one type per column (damping mixes numbers, per-layer dicts and 'auto': text)."""
    from datamatters.evaluation.attribution import COLUMNS

    def cell(c, v):
        if v is None:
            return None
        return str(v) if c == "damping" or isinstance(v, (dict, list)) else v

    return [[cell(c, r.get(c)) for c in COLUMNS] for r in rows]


def _log_tables(ctx, tables: dict) -> None:
    from datamatters.evaluation.attribution import COLUMNS

    for lg in ctx.loggers:
        if type(lg).__name__ == "WandbLogger":
            for label, rows in tables.items():
                lg.log_table(key=f"attribution/{label}", columns=list(COLUMNS), data=table_data(rows))


def run(cfg: DictConfig) -> dict:
    s = settings(cfg)
    with job(cfg, cfg.task.get("job_type", "attribution")) as ctx:
        from datamatters.evaluation.attribution import markdown_table, plot_lds_vs_cost

        make_loggers(ctx)
        dm = build_datamodule(cfg)
        gt_root = Path(s.ground_truth.store) if s.ground_truth.store else ctx.run_dir / "ground_truth"
        results, metrics, md = {}, {}, []
        for model_cfg in s.models:
            rec, ckpts = recipe(s, model_cfg), tracin_epochs(s, model_cfg)
            model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
            label, _ = model_cfg.pop("label"), model_cfg.pop("tracin_epochs", None)
            own = model_cfg.pop("train", None)
            res = run_model(label, model_cfg, cfg, s, dm, ctx.run_dir / "attribution" / label, gt_root, rec, ckpts)
            results[label] = {"model": model_cfg, "train": rec, **({"own_recipe": own} if own else {}), **res}
            table = markdown_table(res["rows"], title=f"{dm.name} {label} ({res['n_parameters']} parameters, test acc "
                                                      f"{res['test_acc']:.3f})")
            (ctx.run_dir / "attribution" / label / "table.md").write_text(table + "\n")
            md.append(table)
            metrics[f"test/acc/{label}"] = res["test_acc"]
            for r in res["rows"]:
                metrics[f"lds/{label}/{r['method']}"] = r["lds"]
                metrics[f"cost_s/{label}/{r['method']}"] = r["cost_s"]
        tables = {k: v["rows"] for k, v in results.items()}
        plot = plot_lds_vs_cost(tables, ctx.run_dir / "lds_vs_cost.png", title=dm.name)
        (ctx.run_dir / "attribution.md").write_text("\n\n".join(md) + "\n")
        protocol = {"dataset": dm.name, "num_test": int(s.num_test), "ground_truth": OmegaConf.to_container(
            s.ground_truth), "train": OmegaConf.to_container(s.train), "damping_factor": float(s.damping_factor),
            "damping_select": OmegaConf.to_container(s.damping_select),
            "lds": "Spearman per test point between sum of scores over a subset and the seed-averaged margin, mean "
                   "over test points, bootstrap 95% CI over test points; global values: one target (minus mean test "
                   "loss), CI over models",
            "methods": list(s.methods), "datamodels_sizes": list(s.datamodels.sizes),
            "trak": OmegaConf.to_container(s.trak), "tracin_epochs": list(s.tracin_epochs),
            "valuation": OmegaConf.to_container(s.valuation, resolve=True), "threads": torch.get_num_threads()}
        out = write_json(ctx.run_dir / "attribution.json", {"protocol": protocol, "models": results})
        _log_tables(ctx, tables)
        log_image(ctx, "attribution/lds_vs_cost", plot)
        log_metrics(ctx, metrics)
        summary = write_summary(ctx, metrics, {"results": out, "plot": plot, "tables": ctx.run_dir / "attribution.md"})
        print("\n\n".join(md))
        print_summary(summary, ["run_dir"], title="attribution")
        return summary
