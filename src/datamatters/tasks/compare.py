"""Compare finished runs: a table of their summaries, and for a sweep run with ``eval.test_every_epoch=true`` the
paper's speed-up table (epochs, gradient steps and wall-clock, with and without the IL cost, to reach uniform's best
test accuracy; bootstrap CIs over seeds) against uniform and against uniform with a decaying learning rate, plus
learning curves against steps and against training seconds.

    python run.py -m selection=uniform,reducible_loss,infobatch seed=0,1,2,3,4 eval.test_every_epoch=true
    python run.py -m selection=uniform scheduler=cosine seed=0,1,2,3,4 eval.test_every_epoch=true
    python run.py task=compare 'compare.runs=[outputs/rho/multiruns/2026-11-22_10-00-00,outputs/rho/multiruns/...]'
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from datamatters.errors import UserError
from datamatters.evaluation.plots import plot_learning_curves
from datamatters.evaluation.speedup import read_curve, speedup_table
from datamatters.tasks.common import job, write_summary

BASELINES = ("uniform", "uniform (lr decay)")


def find_runs(patterns: list[str]) -> list[Path]:
    """Run dirs (holding summary.json) matched by the globs, or inside a matched sweep dir (its numbered subdirs)."""
    runs = set()
    for pat in patterns:
        for p in map(Path, glob.glob(str(pat))):
            if (p / "summary.json").is_file():
                runs.add(p)
            elif p.is_dir():
                runs.update(s.parent for s in p.glob("*/summary.json"))
    if not runs:
        raise UserError(f"no finished runs (summary.json) found under {patterns}; point compare.runs at run "
                        f"directories or at a sweep (multirun) directory")
    return sorted(runs)


def run_label(summary: dict, label_key: str, fallback: str) -> str:
    """The label key's value; a run whose learning rate follows a schedule is marked '(lr decay)'."""
    label = str(summary.get(label_key, fallback))
    return label + (" (lr decay)" if summary.get("train/lr_schedule", "constant") != "constant" else "")


def load_runs(runs: list[Path], label_key: str) -> tuple[pd.DataFrame, list[dict]]:
    rows, curves = [], []
    for r in runs:
        s = json.loads((r / "summary.json").read_text())
        label = run_label(s, label_key, r.name)
        rows.append({"run": str(r), "label": label, **{k: v for k, v in s.items() if not isinstance(v, dict)}})
        curve_path = r / "test_curve.csv"
        if curve_path.is_file():
            curves.append({"label": label, "seed": s.get("seed", r.name), "curve": read_curve(curve_path),
                           "il_s": s.get("time/il_s"), "final_acc": s.get("test/acc"),
                           "corrupted_frac": s.get("selection/corrupted_frac"),
                           "overhead": s.get("selection/overhead")})
    return pd.DataFrame(rows), curves


def plot_curves(curves: list[dict], out: Path) -> Path:
    """Mean test accuracy over seeds per label, against gradient steps and against training seconds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in sorted({c["label"] for c in curves}):
        cs = [c["curve"] for c in curves if c["label"] == label]
        n = min(len(c) for c in cs)
        mean = lambda key: np.mean([[row[key] for row in c[:n]] for c in cs], axis=0)  # noqa: E731
        for ax, x in zip(axes, ("step", "train_s")):
            ax.plot(mean(x), mean("test_acc"), label=f"{label} ({len(cs)})", marker=".")
    for ax, name in zip(axes, ("gradient steps", "training seconds (no IL cost)")):
        ax.set_xlabel(name)
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(cfg: DictConfig) -> dict:
    with job(cfg, "compare") as ctx:
        runs = find_runs(list(cfg.compare.runs))
        table, curves = load_runs(runs, cfg.compare.get("label", "selection/method"))
        table.to_csv(ctx.run_dir / "comparison.csv", index=False)
        plot = plot_learning_curves({f"{lab} ({Path(r).name})": Path(r) / "csv" / "metrics.csv"
                                     for lab, r in zip(table["label"], table["run"])},
                                    ctx.run_dir / "learning_curves.png", metric=cfg.compare.get("metric", "val/acc"))
        print(table[[c for c in ("label", "test/acc", "selection/corrupted_frac", "trainer/steps") if c in table]])
        metrics, artifacts = {"compare/runs": len(runs)}, {"table": ctx.run_dir / "comparison.csv", "plot": plot}
        baselines = [b for b in BASELINES if any(c["label"] == b for c in curves)]
        if curves and not baselines:
            print("no uniform runs with a test curve among these runs: no speed-up table")
        speed = []
        for b in baselines:
            for row in speedup_table(curves, b):
                speed.append(row)
                tag = "speedup" if b == "uniform" else "speedup_vs_lr_decay"
                for k in ("sp_steps", "sp_epochs", "sp_secs", "sp_secs_il"):
                    metrics[f"{tag}/{row['label']}/{k[3:]}"] = row[k]
        if speed:
            sp = pd.DataFrame(speed)
            sp.to_csv(ctx.run_dir / "speedup.csv", index=False)
            artifacts["speedup_table"] = ctx.run_dir / "speedup.csv"
            artifacts["speed_curves"] = plot_curves(curves, ctx.run_dir / "speed_curves.png")
            cols = ["baseline", "label", "reached", "seeds", "sp_steps", "sp_steps_lo", "sp_steps_hi", "sp_secs",
                    "sp_secs_il", "final_acc"]
            with pd.option_context("display.width", 200, "display.precision", 3):
                print(sp[cols])
        return write_summary(ctx, metrics, artifacts)
