"""The paper's speed-up protocol: test accuracy after every epoch, and the epochs / gradient steps / wall-clock a
method needs to reach a baseline's best test accuracy, with bootstrap CIs over seeds.

Reading test accuracy during training is the RHO-LOSS reference's protocol; it is off by default
(``eval.test_every_epoch``) because it reads the test set while training. Training wall-clock counts only the
training loop (data loading, scoring, optimiser steps, InfoBatch's epoch plan); validation and these test passes are
excluded, so the two sides of a speed-up are timed on the same thing. The process CPU seconds of the same spans are
kept too: on a shared, loaded machine they measure the work done, which wall-clock (waiting included) does not.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamatters.training.classifier import evaluate_losses

CURVE_FIELDS = ("epoch", "step", "examples_seen", "train_s", "train_cpu_s", "test_acc")


class EpochTestCurve(L.Callback):
    """After every training epoch: test accuracy, gradient steps, examples trained on, training seconds so far.

    Training time accumulates from the epoch start to the last batch end, batch by batch, so the validation pass
    (which Lightning runs after the last batch) is not counted. Rows go to ``out`` (CSV) and to the loggers as
    ``test_epoch/acc``; a resumed run appends."""

    def __init__(self, test_loader, out: Path | None = None):
        self.test_loader, self.out = test_loader, Path(out) if out else None
        self.train_s, self.train_cpu_s, self.rows, self._mark, self._cpu_mark = 0.0, 0.0, [], None, None

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_epoch_start(self, trainer, module):
        self._sync(module)
        self._mark, self._cpu_mark = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, *args):
        self._sync(module)
        now, cpu = time.perf_counter(), time.process_time()
        self.train_s += now - self._mark
        self.train_cpu_s += cpu - self._cpu_mark
        self._mark, self._cpu_mark = now, cpu

    def on_train_epoch_end(self, trainer, module):
        _, _, logits = evaluate_losses(module.model, self.test_loader)
        y = self.test_loader.dataset.label_array()
        acc = float((logits.argmax(-1) == y).mean())
        seen = int(getattr(module, "totals", {}).get("examples_seen", 0))
        row = dict(epoch=int(trainer.current_epoch), step=int(trainer.global_step), examples_seen=seen,
                   train_s=self.train_s, train_cpu_s=self.train_cpu_s, test_acc=acc)
        self.rows.append(row)
        module.log("test_epoch/acc", acc, on_step=False, on_epoch=True, rank_zero_only=True)
        if self.out is not None and trainer.is_global_zero:
            new = not self.out.is_file()
            with self.out.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)

    def state_dict(self) -> dict:
        return {"train_s": self.train_s, "train_cpu_s": self.train_cpu_s, "rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.train_s, self.rows = float(state["train_s"]), list(state["rows"])
        self.train_cpu_s = float(state.get("train_cpu_s", 0.0))


def read_curve(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def first_reach(curve: list[dict], target: float) -> dict | None:
    """The first row (epoch) whose test accuracy is >= target, or None."""
    for row in curve:
        if row["test_acc"] >= target:
            return row
    return None


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI of the mean over seeds (a single value gives a zero-width interval)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return (float("nan"),) * 3
    if not np.isfinite(v).all():
        raise ValueError("non-finite value in a speed-up")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def speedup_table(runs: list[dict], baseline: str) -> list[dict]:
    """``runs``: dicts with ``label``, ``seed``, ``curve`` (rows as ``EpochTestCurve``), and optionally ``il_s``,
    ``il_cpu_s``,
    ``final_acc``, ``corrupted_frac``, ``overhead``. Per seed the target is the baseline's best test accuracy; each
    label gets epochs / steps / seconds to reach it and speed-ups (baseline / method, per seed, bootstrap CI)."""
    base = {r["seed"]: r for r in runs if r["label"] == baseline}
    if not base:
        raise ValueError(f"no runs of the baseline {baseline!r} among {sorted({r['label'] for r in runs})}")
    out = []
    for label in sorted({r["label"] for r in runs}, key=lambda s: (s != baseline, s)):
        rows = [r for r in runs if r["label"] == label and r["seed"] in base]
        per = {k: [] for k in ("epochs", "steps", "secs", "secs_il", "sp_epochs", "sp_steps", "sp_secs", "sp_secs_il",
                               "sp_cpu", "sp_cpu_il")}
        reached = 0
        for r in rows:
            b = base[r["seed"]]
            target = max(row["test_acc"] for row in b["curve"])
            hit, bhit = first_reach(r["curve"], target), first_reach(b["curve"], target)
            if hit is None:
                continue
            reached += 1
            il = r.get("il_s") or 0.0
            epochs, secs = hit["epoch"] + 1, hit["train_s"]
            per["epochs"].append(epochs), per["steps"].append(hit["step"])
            per["secs"].append(secs), per["secs_il"].append(secs + il)
            per["sp_epochs"].append((bhit["epoch"] + 1) / epochs)
            per["sp_steps"].append(bhit["step"] / max(hit["step"], 1))
            per["sp_secs"].append(bhit["train_s"] / max(secs, 1e-12))
            per["sp_secs_il"].append(bhit["train_s"] / max(secs + il, 1e-12))
            if "train_cpu_s" in hit and "train_cpu_s" in bhit:
                il_cpu = r.get("il_cpu_s") or 0.0
                per["sp_cpu"].append(bhit["train_cpu_s"] / max(hit["train_cpu_s"], 1e-12))
                per["sp_cpu_il"].append(bhit["train_cpu_s"] / max(hit["train_cpu_s"] + il_cpu, 1e-12))
        row = {"label": label, "baseline": baseline, "seeds": len(rows), "reached": reached}
        for k, v in per.items():
            m, lo, hi = bootstrap_ci(v)
            row.update({k: m, f"{k}_lo": lo, f"{k}_hi": hi})
        for k in ("final_acc", "corrupted_frac", "overhead", "il_s"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            row[k] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out
