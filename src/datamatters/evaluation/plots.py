"""Plots shared by the jobs (matplotlib, Agg backend, PNG in the run dir). matplotlib and pandas are imported when a
plot is drawn, not when a job module is imported (seconds per job)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(csv_path: Path):
    """Lightning CSV metrics of a run (a DataFrame, or None); a resumed run's later parts (csv/resume_k/metrics.csv)
    are appended."""
    import pandas as pd

    csv_path = Path(csv_path)
    parts = [csv_path] if csv_path.is_file() else []
    parts += sorted(csv_path.parent.glob("resume_*/metrics.csv"))
    if not parts:
        return None
    return pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)


def plot_learning_curves(runs: dict[str, Path], out: Path, metric: str = "val/acc") -> Path | None:
    """Accuracy vs gradient steps, one line per run (e.g. per selection method), from Lightning CSV metrics."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = 0
    for label, path in runs.items():
        df = read_metrics(path)
        if df is None or metric not in df or "step" not in df:
            continue
        d = df[["step", metric]].dropna()
        if len(d):
            ax.plot(d["step"], d[metric], label=label, marker=".")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("gradient steps")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
