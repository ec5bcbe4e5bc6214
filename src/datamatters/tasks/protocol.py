"""The train job's hooks for the paper's speed-up protocol and the selection peers (kept out of tasks/rho.py):
the per-epoch test curve (``eval.test_every_epoch``), the IL model's cost, and building a peer's module."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamatters.evaluation.speedup import EpochTestCurve
from datamatters.selection.peers import PEERS, build_peer
from datamatters.tasks.building import build_network, build_optimizer, build_scheduler
from datamatters.tasks.common import RunContext


def il_seconds(il_path: Path | None, trained_s: float | None) -> float | None:
    """Seconds the IL model's training plus its loss pass took. ``trained_s``: measured by this run when it trained
    the file (kept next to it as ``<file>.seconds.json``, so a later run reusing the cached file reports the same
    cost); None when the file already existed: the record is read (None for a file made elsewhere without one)."""
    if il_path is None:
        return None
    side = Path(il_path).with_suffix(".seconds.json")
    if trained_s is not None:
        side.write_text(json.dumps({"il_s": float(trained_s)}))
        return float(trained_s)
    return float(json.loads(side.read_text())["il_s"]) if side.is_file() else None


def peer_module(cfg: DictConfig, dm, **module_kw):
    """The module of a selection peer (``selection=infobatch`` / ``selection=selective_backprop``)."""
    method = cfg.selection.method
    options = OmegaConf.to_container(cfg.selection.get(method), resolve=True) if cfg.selection.get(method) else {}
    return build_peer(method, options, dm, int(cfg.trainer.max_epochs), int(cfg.seed), build_network(cfg.model, dm),
                      build_optimizer(cfg.optimizer), build_scheduler(cfg.get("scheduler")), **module_kw)


def attach_test_curve(cfg: DictConfig, ctx: RunContext, dm, trainer) -> EpochTestCurve | None:
    """With ``eval.test_every_epoch=true``: test accuracy after every epoch into ``test_curve.csv``."""
    if not OmegaConf.select(cfg, "eval.test_every_epoch", default=False):
        return None
    cb = EpochTestCurve(dm.loader("test"), ctx.run_dir / "test_curve.csv")
    trainer.callbacks.insert(0, cb)  # before the checkpoint callbacks, so a checkpoint holds the epoch's row
    return cb


def protocol_summary(cfg: DictConfig, curve: EpochTestCurve | None, il_s: float | None) -> tuple[dict, dict]:
    """Summary metrics and artifacts: training seconds with and without the IL cost, the curve, the lr schedule."""
    sched = OmegaConf.select(cfg, "scheduler._target_", default=None)
    metrics = {"seed": int(cfg.seed), "train/lr_schedule": sched.rsplit(".", 1)[-1] if sched else "constant",
               "time/il_s": il_s, "eval/test_every_epoch": curve is not None}
    artifacts = {}
    if curve is not None:
        metrics["time/train_s"] = curve.train_s
        metrics["time/train_with_il_s"] = curve.train_s + (il_s or 0.0)
        metrics["test/best_epoch_acc"] = max((r["test_acc"] for r in curve.rows), default=None)
        artifacts["test_curve"] = curve.out
    return metrics, artifacts


__all__ = ["PEERS", "attach_test_curve", "il_seconds", "peer_module", "protocol_summary"]
