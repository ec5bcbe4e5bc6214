"""The main job: RHO-LOSS target training (or a baseline rule), with the IL model trained first if needed."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamatters.errors import UserError
from datamatters.evaluation.plots import plot_learning_curves
from datamatters.selection.il_store import ILTable, load_irreducible_losses
from datamatters.selection.module import SelectiveModule
from datamatters.selection.rules import NEEDS_IL, get_rule, n_select
from datamatters.tasks.building import (build_datamodule, build_network, build_optimizer, build_scheduler,
                                        build_trainer, last_checkpoint)
from datamatters.tasks.common import RunContext, job, log_image, make_loggers, print_summary, write_summary
from datamatters.tasks.irreducible import check_il_plan, il_config_key, train_irreducible
from datamatters.tasks.protocol import PEERS, attach_test_curve, il_seconds, peer_module, protocol_summary

SUMMARY_KEYS = ["test/acc", "selection/corrupted_frac", "data/corrupted_frac", "trainer/steps", "trainer/examples_seen",
                "selection/overhead", "time/wall_clock_s", "run_dir", "wandb/run_dir"]


def resolve_il_file(cfg: DictConfig, ctx: RunContext) -> tuple[Path, float | None]:
    """The IL file to use: the configured one, else a cached file made from the same config, else train it now.
    Also returns the seconds the training took when this call trained it (None when the file already existed)."""
    il = cfg.irreducible
    if il.get("path"):
        return Path(il.path), None
    cached = Path(cfg.paths.cache_dir) / "irreducible" / f"{il_config_key(cfg)}.npz"
    if cached.is_file():
        print(f"reusing cached irreducible losses {cached}")
        return cached, None
    print(f"no irreducible-loss file configured: training the IL model on the holdout split -> {cached}")
    t0 = time.perf_counter()
    train_irreducible(cfg, ctx, cached)
    return cached, time.perf_counter() - t0


def load_il_model(cfg: DictConfig, dm) -> torch.nn.Module:
    path = Path(cfg.irreducible.checkpoint)
    if not path.is_file():
        raise UserError(f"irreducible-loss checkpoint not found: {path}. Run run_irreducible.py first or fix the path.")
    model = build_network(cfg.irreducible.model, dm)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("metrics.")}
    model.load_state_dict(state)
    return model.eval()


def validate_selection(cfg: DictConfig) -> None:
    """Every refusal that does not need data, before any training (the IL model included)."""
    sel = cfg.selection
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and int(epochs) < 1:
        raise UserError(f"trainer.max_epochs must be >= 1, got {epochs}")
    il = cfg.irreducible
    if sel.method in NEEDS_IL and not il.get("path") and not il.get("checkpoint"):
        check_il_plan(cfg)  # the IL model will be trained first
    if sel.method not in ("svp", *PEERS):
        get_rule(sel.method)
    n_select(int(cfg.data.batch_size), float(sel.percent_train))


def run(cfg: DictConfig) -> dict:
    validate_selection(cfg)
    if cfg.selection.method == "svp":
        from datamatters.tasks.svp import run_svp

        return run_svp(cfg)
    with job(cfg, "train") as ctx:
        dm = build_datamodule(cfg)
        train_idx = dm.split_indices("train")
        il_table = il_model = il_path = trained_s = None
        needs_il = cfg.selection.method in NEEDS_IL
        if cfg.irreducible.get("checkpoint"):
            il_model = load_il_model(cfg, dm)
        elif needs_il or cfg.irreducible.get("path"):
            il_path, trained_s = resolve_il_file(cfg, ctx)
            values, _ = load_irreducible_losses(il_path, dm.metadata("train"), train_idx)
            il_table = ILTable(train_idx, values)
        il_s = il_seconds(il_path, trained_s)
        make_loggers(ctx)
        corrupted = torch.zeros(int(train_idx.max()) + 1, dtype=torch.bool)
        corrupted[torch.as_tensor(train_idx)] = torch.as_tensor(dm.is_corrupted)
        sel = cfg.selection
        module = peer_module(cfg, dm, num_classes=dm.num_classes, corrupted=corrupted) if sel.method in PEERS else \
            SelectiveModule(
            build_network(cfg.model, dm), build_optimizer(cfg.optimizer), build_scheduler(cfg.get("scheduler")),
            num_classes=dm.num_classes, method=sel.method, percent_train=sel.percent_train, il_table=il_table,
            il_model=il_model, corrupted=corrupted, score_mode=sel.score_mode, update_bn_on_score=sel.update_bn_on_score,
            score_precision=sel.get("score_precision"), temperature=sel.get("temperature"),
            mc_samples=sel.get("mc_samples", 10), seed=int(cfg.seed), channels_last=bool(sel.get("channels_last", False)))
        ckpt_dir = ctx.run_dir / "checkpoints"
        trainer = build_trainer(cfg, ctx, ckpt_dir=ckpt_dir)
        curve = attach_test_curve(cfg, ctx, dm, trainer)
        trainer.fit(module, datamodule=dm, ckpt_path=last_checkpoint(ckpt_dir))
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        return finish(ctx, dm, module, trainer, test, protocol_summary(cfg, curve, il_s))


def finish(ctx: RunContext, dm, module: SelectiveModule, trainer, test: dict, protocol: tuple = ({}, {})) -> dict:
    if not trainer.is_global_zero:  # DDP: rank 0 holds the gathered totals and writes the results
        return {}
    selected = module.selected_indices()
    sel_path = ctx.run_dir / "selected_indices.npy"
    np.save(sel_path, selected)
    t = module.totals
    metrics = {
        "test/acc": test.get("test/acc"),
        "test/loss": test.get("test/loss"),
        "trainer/steps": int(trainer.global_step),
        "trainer/examples_seen": int(t["examples_seen"]),
        "selection/corrupted_frac": t["corrupted_selected"] / max(t["examples_seen"], 1),
        "data/corrupted_frac": float(np.mean(dm.is_corrupted)) if len(dm.is_corrupted) else 0.0,
        "selection/overhead": t["score_s"] / max(t["step_s"], 1e-12),
        "time/score_s": t["score_s"],
        "time/step_s": t["step_s"],
        "selection/method": module.method,
    }
    artifacts = {"selected_indices": sel_path, "checkpoint_dir": ctx.run_dir / "checkpoints"}
    metrics.update(protocol[0]), artifacts.update(protocol[1])
    curve = plot_learning_curves({module.method: ctx.run_dir / "csv" / "metrics.csv"}, ctx.run_dir / "learning_curve.png")
    if curve is not None:
        artifacts["learning_curve"] = curve
        log_image(ctx, "learning_curve", curve)
    summary = write_summary(ctx, metrics, artifacts)
    print_summary(summary, SUMMARY_KEYS, title=f"RHO-LOSS ({module.method})")
    return summary
