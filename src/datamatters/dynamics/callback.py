"""``WeightStatsRecorder``: a Lightning callback that records weight statistics on any run of the framework.

Every ``every_n_steps`` optimizer steps (or at the end of every ``every_n_epochs``-th epoch, the epochs after which
Lightning validates with ``check_val_every_n_epoch = n``; the reference recorded after epochs 0, n, 2n, ...) it
appends one row to ONE table per run: ``step``, ``epoch``, the 14 statistics of ``dynamics.stats``, ``train_loss``/``train_acc``/``val_loss``/``val_acc`` read from
``trainer.callback_metrics`` (so it works for the plain classifier, RHO-LOSS's manual optimisation and datamodels
runs alike), every other scalar logged metric under its own name, and the ``tags`` (seed, config hash, ...). The table
is written as parquet through a temporary file (so a killed job leaves a readable table), and a resumed job keeps
the rows recorded before its checkpoint. This replaces the reference's JSON-per-checkpoint files and the separate
JSON -> CSV step.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import lightning as L
import pandas as pd
import torch

from datamatters.artifacts import atomic_write_bytes
from datamatters.dynamics.stats import DEFAULT_EXCLUDE, DEFAULT_EXCLUDE_TYPES, StatsComputer, total_norm
from datamatters.errors import UserError

TABLE_NAME = "weight_stats.parquet"
EXTRAS = ("grad_norm", "update_norm", "per_layer")
# canonical metric columns, first logged name that exists wins (epoch aggregates first when recording per epoch)
METRIC_SOURCES = {
    "train_loss": ("train/loss_epoch", "train/loss", "train/loss_step"),
    "train_acc": ("train/acc_epoch", "train/acc", "train/acc_step"),
    "val_loss": ("val/loss", "val/loss_epoch"),
    "val_acc": ("val/acc", "val/acc_epoch"),
}


def _extras(extras: Iterable[str] | Mapping[str, bool] | None) -> set[str]:
    if extras is None:
        return set()
    if isinstance(extras, Mapping):
        chosen = {k for k, v in extras.items() if v}
    elif isinstance(extras, str):
        chosen = {extras}
    else:
        chosen = set(extras)
    unknown = chosen - set(EXTRAS)
    if unknown:
        raise UserError(f"dynamics recorder: unknown extras {sorted(unknown)}; choose from {list(EXTRAS)}")
    return chosen


class WeightStatsRecorder(L.Callback):
    """Record weight statistics + losses every N steps or epochs into ``out_dir/weight_stats.parquet``."""

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = DEFAULT_EXCLUDE,
                 exclude_types: Iterable[str] | None = DEFAULT_EXCLUDE_TYPES,
                 extras: Iterable[str] | Mapping[str, bool] | None = None, out_dir: str | Path | None = None,
                 tags: Mapping[str, Any] | None = None, filename: str = TABLE_NAME, flush_every: int = 25,
                 **unknown: Any):
        if unknown:
            raise UserError(f"dynamics recorder: unknown settings {sorted(unknown)}; known: every_n_steps, "
                            "every_n_epochs, include, exclude, exclude_types, extras, filename, flush_every")
        if (every_n_steps is None) == (every_n_epochs is None):
            raise UserError("dynamics recorder: set exactly one of every_n_steps or every_n_epochs "
                            f"(got every_n_steps={every_n_steps}, every_n_epochs={every_n_epochs})")
        n = every_n_steps if every_n_steps is not None else every_n_epochs
        if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or int(n) < 1:
            raise UserError(f"dynamics recorder: the recording interval must be a whole number >= 1, got {n!r}")
        self.by_steps = every_n_steps is not None
        self.every = int(n)
        self.include, self.exclude = include, exclude
        self.exclude_types = exclude_types
        self.extras = _extras(extras)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tags = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                     for k, v in dict(tags or {}).items()}
        self.filename, self.flush_every = filename, max(int(flush_every), 1)
        self.rows: list[dict] = []
        self.stat_seconds = 0.0
        self._computer: StatsComputer | None = None
        self._due = False
        self._grad_norm = math.nan
        self._before: list[torch.Tensor] | None = None
        self._update_norm = math.nan
        self._last_step = -1

    # ---- where ------------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        if self.out_dir is None:
            raise UserError("dynamics recorder: out_dir is not set and the trainer gave none")
        return self.out_dir / self.filename

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.out_dir is None:
            self.out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self._computer is None:
            self._computer = StatsComputer(pl_module, self.include, self.exclude, self.exclude_types,
                                           per_layer="per_layer" in self.extras)

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed job keeps the rows recorded up to its checkpoint (one table per run, no duplicates)."""
        if self.path.is_file() and not self.rows:
            old = pd.read_parquet(self.path)
            self.rows = old[old["step"] <= trainer.global_step].to_dict("records")
            self._last_step = int(self.rows[-1]["step"]) if self.rows else -1

    # ---- when -------------------------------------------------------------------------------------------------
    def _next_is_due(self, trainer, batch_idx: int) -> bool:
        if self.by_steps:
            return (trainer.global_step + 1) % self.every == 0
        n_batches = trainer.num_training_batches
        last = not math.isfinite(n_batches) or batch_idx == int(n_batches) - 1
        return last and (trainer.current_epoch + 1) % self.every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._due = bool({"grad_norm", "update_norm"} & self.extras) and self._next_is_due(trainer, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._due:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if "grad_norm" in self.extras:
            self._grad_norm = total_norm(p.grad for p in params)
        if "update_norm" in self.extras:
            self._before = [p.detach().clone() for p in params]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._before is not None:
            params = [p for p in pl_module.parameters() if p.requires_grad]
            self._update_norm = total_norm(p.detach() - b for p, b in zip(params, self._before))
            self._before = None
        step = trainer.global_step
        if self.by_steps and step > 0 and step % self.every == 0 and step != self._last_step:
            self.record(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.by_steps and (trainer.current_epoch + 1) % self.every == 0:
            self.record(trainer, pl_module)

    # ---- what -------------------------------------------------------------------------------------------------
    def record(self, trainer, pl_module) -> dict:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        row.update(self._computer())
        row.update(self._metrics(trainer))
        if "grad_norm" in self.extras:
            row["grad_norm"] = self._grad_norm
        if "update_norm" in self.extras:
            row["update_norm"] = self._update_norm
        row.update(self.tags)
        self.rows.append(row)
        self._last_step = row["step"]
        self.stat_seconds += time.perf_counter() - t0
        if len(self.rows) % self.flush_every == 0:
            self.write()
        return row

    def _metrics(self, trainer) -> dict[str, float]:
        logged = {}
        for k, v in trainer.callback_metrics.items():
            if torch.is_tensor(v) and v.numel() == 1:
                logged[k] = float(v)
            elif isinstance(v, (int, float)):
                logged[k] = float(v)
        out = {}
        for col, sources in METRIC_SOURCES.items():
            if self.by_steps and col.startswith("train"):
                sources = tuple(sorted(sources, key=lambda s: not s.endswith("_step")))
            out[col] = next((logged[s] for s in sources if s in logged), math.nan)
        out.update(logged)
        return out

    # ---- the table --------------------------------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def write(self) -> Path | None:
        if not self.rows:
            return None
        return write_table(self.table(), self.path, {"tags": self.tags, "every": self.every,
                                                    "unit": "steps" if self.by_steps else "epochs"})

    def on_train_end(self, trainer, pl_module) -> None:
        self.write()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.write()

    def state_dict(self) -> dict:
        return {"stat_seconds": self.stat_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stat_seconds = float(state_dict.get("stat_seconds", 0.0))


def write_table(df: pd.DataFrame, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """A run's table as parquet (atomically), ``meta`` in the schema metadata under ``datamatters``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tbl = pa.Table.from_pandas(df, preserve_index=False)
    tbl = tbl.replace_schema_metadata({**(tbl.schema.metadata or {}), b"datamatters": json.dumps(meta).encode()})
    atomic_write_bytes(Path(path), lambda fh: pq.write_table(tbl, fh))
    return Path(path)


def read_table(path: str | Path) -> pd.DataFrame:
    """A run's table (parquet or CSV)."""
    path = Path(path)
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


__all__ = ["WeightStatsRecorder", "TABLE_NAME", "read_table", "write_table"]
