"""The run harness every job shares: run directory, loggers, W&B lifecycle, summary.json, clear errors."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datamatters.artifacts import config_hash, write_json
from datamatters.errors import UserError


@dataclass
class RunContext:
    """What a job knows about where it runs."""

    cfg: DictConfig
    run_dir: Path
    cfg_hash: str
    job_type: str
    started: float = field(default_factory=time.time)
    loggers: list = field(default_factory=list)

    @property
    def wandb_dir(self) -> Path | None:
        for lg in self.loggers:
            exp = getattr(lg, "experiment", None) if type(lg).__name__ == "WandbLogger" else None
            if exp is not None and getattr(exp, "dir", None):
                return Path(exp.dir).parent
        return None


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def run_dir_of(cfg: DictConfig) -> Path:
    """The job's run directory: Hydra's output dir when run through Hydra, else ``cfg.paths.output_dir``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # pragma: no cover - hydra absent or not initialised
        pass
    out = Path(OmegaConf.select(cfg, "paths.output_dir", default="outputs/notebook"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def hash_of(cfg: DictConfig) -> str:
    """Config hash without the parts that do not change results (paths, logging, hydra)."""
    c = resolved(cfg)
    for k in ("paths", "logger", "hydra", "callbacks"):
        c.pop(k, None)
    return config_hash(c)


def seed_everything(seed: int | None) -> int:
    import lightning as L

    seed = 0 if seed is None else int(seed)
    L.seed_everything(seed, workers=True, verbose=False)
    return seed


def make_loggers(ctx: RunContext) -> list:
    """W&B (offline unless the user is logged in / WANDB_MODE says otherwise) plus a local CSV logger.

    The W&B run id is stored in the run directory so a requeued job reattaches to the same run.
    """
    from lightning.pytorch.loggers import CSVLogger

    cfg = ctx.cfg
    # a resumed job writes a new CSV part instead of overwriting the metrics of the earlier attempt
    parts = sorted((ctx.run_dir / "csv").glob("**/metrics.csv"))
    version = "" if not parts else f"resume_{len(parts)}"
    loggers: list = [CSVLogger(save_dir=str(ctx.run_dir), name="csv", version=version)]
    wb = OmegaConf.select(cfg, "logger.wandb")
    if wb is not None and wb.get("enabled", True):
        from lightning.pytorch.loggers import WandbLogger
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        id_file = ctx.run_dir / "wandb_id.txt"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            import secrets

            run_id = secrets.token_hex(4)
            if rank_zero_only.rank == 0:  # DDP ranks started together (SLURM tasks) must not race; only rank 0 logs
                id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or wb.get("mode", "offline")
        loggers.append(
            WandbLogger(
                project=wb.get("project", "datamatters"),
                entity=wb.get("entity"),
                group=wb.get("group") or OmegaConf.select(cfg, "experiment_name", default=None) or ctx.job_type,
                job_type=ctx.job_type,
                tags=list(wb.get("tags") or []),
                save_dir=str(ctx.run_dir),
                id=run_id,
                resume="allow",
                offline=(mode == "offline"),
                mode=None if mode == "offline" else mode,
                config=resolved(cfg),
            )
        )
        loggers[-1]._wandb_init.pop("anonymous", None)  # Lightning passes None, W&B warns about any value
    ctx.loggers = loggers
    return loggers


def log_metrics(ctx: RunContext, metrics: dict[str, float], step: int | None = None) -> None:
    """Log flat ``split/metric`` numbers to every logger (for jobs without a Lightning trainer)."""
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))}
    for lg in ctx.loggers:
        lg.log_metrics(clean, step=step)


def log_image(ctx: RunContext, key: str, path: Path) -> None:
    """Log a PNG saved in the run dir to W&B (when W&B is on)."""
    for lg in ctx.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=key, images=[str(path)])


def finish_loggers(ctx: RunContext) -> None:
    for lg in ctx.loggers:
        try:
            lg.finalize("success")
        except Exception:  # pragma: no cover
            pass
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # pragma: no cover
        pass


def write_summary(ctx: RunContext, metrics: dict[str, Any], artifacts: dict[str, Any] | None = None) -> dict:
    """Write ``summary.json``: flat metrics, artifact paths, config hash, wall-clock."""
    summary = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in metrics.items()}
    summary.update({
        "config_hash": ctx.cfg_hash,
        "job_type": ctx.job_type,
        "run_dir": str(ctx.run_dir),
        "time/wall_clock_s": round(time.time() - ctx.started, 3),
        "artifacts": {k: str(v) for k, v in (artifacts or {}).items()},
    })
    wb = ctx.wandb_dir
    if wb is not None:
        summary["wandb/run_dir"] = str(wb)
    write_json(ctx.run_dir / "summary.json", summary)
    return summary


def print_summary(summary: dict, keys: list[str] | None = None, title: str = "summary") -> None:
    """A short human-readable summary at the end of a job."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k in keys or sorted(k for k in summary if k != "artifacts"):
        if k in summary:
            v = summary[k]
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console(stderr=False).print(table)


class _DropTip(logging.Filter):
    """Lightning's advertisement for its own cloud logger, printed by every trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_console() -> None:
    """Each message once: under Hydra the root logger prints to the console and run.log, so Lightning's own console
    handler (which also propagates to the root) would print every line twice; drop it then. Filter Lightning's
    litlogger tip and the `srun` hint (submitit, not srun, starts our SLURM tasks)."""
    import warnings

    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for h in [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]:
            lightning_logger.removeHandler(h)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropTip) for f in lg.filters):
            lg.addFilter(_DropTip())
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@contextmanager
def job(cfg: DictConfig, job_type: str) -> Iterator[RunContext]:
    """Set up a job (run dir, seed, saved config, loggers) and always close W&B, even on errors."""
    quiet_console()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, cfg_hash=hash_of(cfg), job_type=job_type)
    seed_everything(OmegaConf.select(cfg, "seed", default=0))
    try:
        yield ctx
    finally:
        finish_loggers(ctx)


def dispatch(cfg: DictConfig) -> dict:
    """Run ``datamatters.tasks.<cfg.task.name>.run(cfg)``; turn a ``UserError`` into one message and exit 1."""
    name = OmegaConf.select(cfg, "task.name")
    _watch_scheduler_signals()
    try:
        try:
            module = importlib.import_module(f"datamatters.tasks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"datamatters.tasks.{name}":
                raise UserError(f"unknown task {name!r}") from exc
            raise
        return module.run(cfg)
    except Exception as exc:
        if _STOPPED_BY:  # requeue/preemption: whatever broke while stopping is not this job's result
            raise SystemExit(f"stopped by signal {_STOPPED_BY[0]} (requeue/preemption); last error: {exc!r}") from exc
        if not isinstance(exc, UserError):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if _in_multirun():
            raise  # the launcher records the failed job and reports it in the sweep output
        sys.exit(1)


_STOPPED_BY: list[int] = []  # signals with which the scheduler asked this job to stop


def _watch_scheduler_signals() -> None:
    """Under submitit (Hydra's submitit launcher), note SIGTERM and submitit's preemption signal, then hand them to
    the handlers already there (submitit requeues on USR2 and ignores SIGTERM; Lightning, which chains to them, stops
    training at the next step). A job stopped for requeue or preemption must end without a result: otherwise an error
    raised while stopping (W&B's service is killed with the job step) reaches the sweep as a failure while the
    requeued job is still to run."""
    import signal
    import threading

    if "SUBMITIT_FOLDER" not in os.environ or threading.current_thread() is not threading.main_thread():
        return
    preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    for sig in {signal.SIGTERM, preempt}:
        prev = signal.getsignal(sig)
        if callable(prev) and not getattr(prev, "_dm_watch", False):
            def note(signum, frame, prev=prev):
                _STOPPED_BY.append(signum)
                prev(signum, frame)

            note._dm_watch = True
            signal.signal(sig, note)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # pragma: no cover
        return False
