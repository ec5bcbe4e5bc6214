"""The HMM job: ``python run.py +experiment=dynamics_hmm dynamics.runs=<dir or glob>``.

Gathers the weight-statistics tables of many runs, selects the number of HMM states by BIC, analyses the chosen
model (training map, detour states, transition feature importance) and writes ``summary.json`` with ``hmm/k_bic``,
``hmm/test_ll_per_sample`` and ``hmm/state<i>/r|p`` (detour states listed in ``hmm/detour_states``).
"""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamatters.errors import UserError
from datamatters.tasks.common import RunContext, job, log_image, log_metrics, make_loggers, print_summary, write_summary

SUMMARY_KEYS = ["hmm/k_bic", "hmm/k", "hmm/test_ll_per_sample", "hmm/n_runs", "hmm/detour_states",
                "hmm/select_seconds", "time/wall_clock_s", "run_dir"]


def debug_sized(cfg: DictConfig) -> DictConfig:
    """Under ``+debug=fast`` (``trainer.fast_dev_run``): the config with the job's ``task.debug`` fragment merged
    over it. Lightning's one batch would record one row per run, too few for an HMM, so each dynamics job says in
    its task config what a seconds-long run is (seeds, steps, recording interval, K range). Unchanged otherwise."""
    debug = OmegaConf.select(cfg, "task.debug")
    if not OmegaConf.select(cfg, "trainer.fast_dev_run") or debug is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.merge_with(debug)
    return cfg


def options(cfg: DictConfig) -> tuple[object, dict]:
    """``(runs, HMMOptions kwargs)`` from ``cfg.dynamics``."""
    dyn = OmegaConf.select(cfg, "dynamics")
    if dyn is None:
        raise UserError("no dynamics config: use +experiment=dynamics_hmm (or add dynamics=default)")
    d = OmegaConf.to_container(dyn, resolve=True)
    return d.pop("runs", None), d


def analyse(ctx: RunContext, runs, opts: dict, out_dir: Path | None = None) -> dict:
    """Run the analysis into ``out_dir`` (default: the run dir), log metrics and figures, return the summary."""
    from datamatters.dynamics.pipeline import HMMOptions, analyse_runs

    metrics, artifacts = analyse_runs(runs, out_dir or ctx.run_dir, HMMOptions.from_dict(opts))
    log_metrics(ctx, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    for name, path in artifacts.items():
        if name.startswith("fig_"):
            log_image(ctx, f"dynamics/{name[4:]}", path)
    return write_summary(ctx, metrics, artifacts)


def run(cfg: DictConfig) -> dict:
    cfg = debug_sized(cfg)
    runs, opts = options(cfg)
    if not runs:
        raise UserError("set dynamics.runs to the run directories to analyse (a sweep dir, a glob, or a list), e.g. "
                        "dynamics.runs=outputs/classifier/multiruns/2026-01-01_00-00-00")
    with job(cfg, cfg.task.get("job_type", "dynamics")) as ctx:
        make_loggers(ctx)
        summary = analyse(ctx, runs, opts)
        print_summary(summary, SUMMARY_KEYS, title="dynamics HMM")
        return summary
