"""Weight statistics of saved checkpoints: ``python run.py task=dynamics_stats task.checkpoints=<dir>``.

Writes ``<run dir>/weight_stats.parquet`` in the callback's schema (one row per checkpoint), so the HMM job reads it
like any recorded run (point ``dynamics.runs`` at several such run dirs, e.g. one per Pythia seed). ``task.evaluate``
maps column names to Hydra targets of callables ``fn(state_dict, info) -> number | {column: number}`` (``_partial_:
true`` for functions with settings); their columns can serve as ``dynamics.convergence.metric``.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamatters.errors import UserError
from datamatters.tasks.common import job, print_summary, write_summary

SUMMARY_KEYS = ["dynamics_stats/n_checkpoints", "dynamics_stats/first_step", "dynamics_stats/last_step", "run_dir"]


def evaluations(spec) -> dict:
    """``{column: callable}`` from ``task.evaluate`` (a Hydra target per name, or a dotted path to a function)."""
    if not spec:
        return {}
    if not isinstance(spec, dict):
        raise UserError(f"task.evaluate must map column names to targets, got {spec!r}")
    import hydra.utils

    out = {}
    for name, target in spec.items():
        fn = hydra.utils.get_method(target) if isinstance(target, str) else hydra.utils.instantiate(target)
        if not callable(fn):
            raise UserError(f"task.evaluate.{name} is not callable: {fn!r}")
        out[name] = fn
    return out


def run(cfg: DictConfig) -> dict:
    from datamatters.dynamics.callback import TABLE_NAME, write_table
    from datamatters.dynamics.checkpoints import checkpoints_table

    t = OmegaConf.to_container(cfg.task, resolve=True)
    if not t.get("checkpoints"):
        raise UserError("set task.checkpoints to a directory of checkpoints (Lightning .ckpt, torch state dicts or "
                        "Hugging Face save_pretrained folders such as step1000/)")
    with job(cfg, t.get("job_type", "dynamics")) as ctx:
        tags = {"source": str(t["checkpoints"]), **(t.get("tags") or {})}
        df = checkpoints_table(Path(t["checkpoints"]), t.get("steps"), t.get("num_heads"), t.get("include"),
                               t.get("exclude"), bool(t.get("per_layer")), evaluations(t.get("evaluate")), tags,
                               trusted=bool(t.get("trusted")))
        path = write_table(df, ctx.run_dir / TABLE_NAME, {"tags": tags, "every": None, "unit": "checkpoints"})
        summary = write_summary(ctx, {"dynamics_stats/n_checkpoints": len(df),
                                      "dynamics_stats/first_step": int(df["step"].iloc[0]),
                                      "dynamics_stats/last_step": int(df["step"].iloc[-1])}, {"weight_stats": path})
        print_summary(summary, SUMMARY_KEYS, title="dynamics stats")
        return summary
