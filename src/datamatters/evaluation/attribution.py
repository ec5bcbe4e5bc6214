"""One attribution scale: LDS of every method against one retraining ground truth, with what each one cost.

* ``lds_one_target``: LDS for a single target (a global value's prediction of the mean test loss): the Spearman
  correlation over the ground-truth subset models, with a bootstrap CI over *models* (per-test LDS bootstraps over
  test points; with one target there is nothing else to resample).
* ``Measure``: wall-clock seconds and peak resident memory above the starting level of a block of work (RSS polled
  from ``/proc/self/statm``; CUDA's peak allocation when a GPU is used), so a method's memory is not hidden by an
  earlier, larger peak of the process.
* ``markdown_table`` and ``plot_lds_vs_cost``: the table per model and the LDS-versus-cost frontier (log x).

A row is a dict with ``method``, ``group`` (``per_test`` or ``global``), ``lds``, ``ci_low``, ``ci_high``,
``seconds``, ``cost_s`` (seconds including the model trainings the method needs), ``trainings``,
``grad_passes``, ``peak_mib`` and optionally ``damping`` and ``family`` (rows of one family form a curve).
"""
from __future__ import annotations

import math
import resource
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from datamatters.errors import UserError
from datamatters.evaluation.metrics import spearman_per_column


def lds_one_target(pred, actual, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman correlation of ``pred`` and ``actual`` (one number per ground-truth model) with a percentile
    bootstrap CI over models."""
    pred, actual = np.asarray(pred, float).ravel(), np.asarray(actual, float).ravel()
    if pred.shape != actual.shape or len(pred) < 3:
        raise UserError(f"one-target LDS needs >= 3 models and matching lengths, got {pred.shape} and {actual.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(actual).all()):
        raise UserError("one-target LDS: predictions or actual outputs hold NaN/inf")
    rho = float(spearman_per_column(pred, actual)[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pred), size=(int(n_boot), len(pred)))
    boot = spearman_per_column(pred[idx].T, actual[idx].T)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [0.025, 0.975]) if len(boot) else (math.nan, math.nan)
    return {"mean": rho, "ci_low": float(lo), "ci_high": float(hi)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the process peak (kB on Linux, bytes on macOS) is the best available
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Measure:
    """``with Measure() as m: ...`` -> ``m.seconds``, ``m.peak_mib`` (peak RSS above the start, or the CUDA peak
    allocation when ``cuda`` is true)."""

    def __init__(self, interval_s: float = 0.005, cuda: bool = False):
        self.interval_s, self.cuda = float(interval_s), bool(cuda)
        self.seconds, self.peak_mib = 0.0, 0.0

    def __enter__(self) -> "Measure":
        self._start_rss = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        self._t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        if self.cuda:
            import torch

            self.peak_mib = (torch.cuda.max_memory_allocated() - self._cuda0) / 2**20
        else:
            self.peak_mib = (self._peak - self._start_rss) / 2**20


COLUMNS = ("method", "group", "lds", "ci_low", "ci_high", "seconds", "cost_s", "trainings", "grad_passes", "peak_mib",
           "damping")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict], title: str | None = None) -> str:
    """The per-model table: per-test methods by LDS, then the global-value group."""
    head = "| method | LDS (95% CI) | seconds | cost s (incl. training) | trainings | grad passes | peak MiB | damping |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|" + "---|" * 8]
    for group, label in (("per_test", None), ("global", "*global values: one-target LDS on the mean test loss*")):
        part = sorted((r for r in rows if r.get("group", "per_test") == group), key=lambda r: -(r["lds"] or -9))
        if part and label:
            lines.append(f"| {label} | | | | | | | |")
        for r in part:
            ci = f"{r['lds']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            lines.append(f"| {r['method']} | {ci} | {_fmt(r.get('seconds'))} | {_fmt(r.get('cost_s'))} | "
                         f"{_fmt(r.get('trainings'))} | {_fmt(r.get('grad_passes'))} | {_fmt(r.get('peak_mib'))} | "
                         f"{_fmt(r.get('damping'))} |")
    return "\n".join(lines)


def plot_lds_vs_cost(tables: dict[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """One panel per model: LDS against cost (seconds, log x); rows sharing a ``family`` are joined as a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.8), squeeze=False)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        rows = [r for r in rows if r.get("group", "per_test") == "per_test" and r.get("cost_s")]
        fams: dict[str, list[dict]] = {}
        for r in rows:
            fams.setdefault(r.get("family") or r["method"], []).append(r)
        for fam, rs in fams.items():
            rs = sorted(rs, key=lambda r: r["cost_s"])
            x, y = [r["cost_s"] for r in rs], [r["lds"] for r in rs]
            err = [[r["lds"] - r["ci_low"] for r in rs], [r["ci_high"] - r["lds"] for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, lw=1, label=fam)
            for r in rs:
                ax.annotate(r["method"], (r["cost_s"], r["lds"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("cost: seconds incl. model trainings (log)")
        ax.set_ylabel("LDS (Spearman, mean over test points)")
        ax.set_title(f"{title} {model}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tables_from_results(path: str | Path, plot: str | Path | None = None) -> str:
    """The markdown tables (and, with ``plot``, the frontier PNG) of a job's ``attribution.json`` (or its copy in
    ``benchmarks/results/``), so the README is regenerated from the results, not retyped."""
    import json

    rec = json.loads(Path(path).read_text())
    models = rec.get("models")
    if not isinstance(models, dict) or not models or not all(
            isinstance(m, dict) and all("lds" in r for r in m.get("rows", [None])) for m in models.values()):
        raise UserError(f"{path} is not an attribution job's results file (no 'models' with LDS rows; "
                        "attribution_refs.json has its own table: benchmarks/attribution_refs.py --markdown)")
    md = [markdown_table(m["rows"], title=f"{rec.get('protocol', {}).get('dataset', '')} {label} "
                                          f"({m.get('n_parameters')} parameters, test acc {m.get('test_acc', 0):.3f})")
          for label, m in models.items()]
    if plot is not None:
        plot_lds_vs_cost({k: m["rows"] for k, m in models.items()}, plot,
                         title=rec.get("protocol", {}).get("dataset", ""))
    return "\n\n".join(md)
