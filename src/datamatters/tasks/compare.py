"""Compare finished runs: one learning curve per run label (e.g. per selection method), plus a summary table.

    python run.py task=compare 'compare.runs=[outputs/rho/multiruns/2026-11-22_10-00-00/*]'
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from datamatters.errors import UserError
from datamatters.evaluation.plots import plot_learning_curves
from datamatters.tasks.common import job, write_summary


def find_runs(patterns: list[str]) -> list[Path]:
    runs = sorted({Path(p).parent for pat in patterns for p in glob.glob(str(Path(pat) / "summary.json"))})
    if not runs:
        raise UserError(f"no finished runs (summary.json) found under {patterns}; point compare.runs at run directories")
    return runs


def run(cfg: DictConfig) -> dict:
    with job(cfg, "compare") as ctx:
        runs = find_runs(list(cfg.compare.runs))
        label_key = cfg.compare.get("label", "selection/method")
        rows, curves = [], {}
        for r in runs:
            s = json.loads((r / "summary.json").read_text())
            label = f"{s.get(label_key, r.name)} ({r.name})"
            curves[label] = r / "csv" / "metrics.csv"
            rows.append({"run": str(r), "label": label, **{k: v for k, v in s.items() if not isinstance(v, dict)}})
        table = pd.DataFrame(rows)
        table.to_csv(ctx.run_dir / "comparison.csv", index=False)
        plot = plot_learning_curves(curves, ctx.run_dir / "learning_curves.png", metric=cfg.compare.get("metric", "val/acc"))
        print(table[[c for c in ("label", "test/acc", "selection/corrupted_frac", "trainer/steps") if c in table]])
        return write_summary(ctx, {"compare/runs": len(runs)}, {"table": ctx.run_dir / "comparison.csv", "plot": plot})
