"""Markdown tables generated from benchmarks/results/*.json, so README numbers are never retyped.

    python benchmarks/report.py            # print every table and the benchmark index
    python benchmarks/report.py --write    # rewrite README.md and benchmarks/README.md between the markers
    python benchmarks/report.py --check    # exit 1 when a marker block differs from the JSON (stale README)

A block is ``<!-- report:NAME -->`` ... ``<!-- /report:NAME -->``; NAME is a key of ``SECTIONS`` (or ``index``).
Renderers read the JSON layouts the benchmark scripts write; a value a file lacks prints as ``n/a`` rather than
failing, a goal missed prints as ``goal 20x: 8.5x — missed``, an extrapolated number carries ``(extrapolated ...)``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")
NA = "n/a"
UNRENDERABLE = "Could not render"


# ----------------------------------------------------------------------------------------------- formatting helpers
def get(d, path: str, default=None):
    """``get(d, "a.b.0.c")``: nested lookup that returns ``default`` on any missing step."""
    cur = d
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return default
    return cur


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sig(x, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, thousands separated, no exponent for ordinary sizes."""
    if not _num(x):
        return NA
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.1e}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{decimals}f}"


def secs(x) -> str:
    return f"{sig(x)} s" if _num(x) else NA


def ratio(x) -> str:
    return f"{sig(x)}x" if _num(x) else NA


def pct(x) -> str:
    return f"{sig(100 * x, 2)}%" if _num(x) else NA


def _g(goal) -> str:
    return f"{goal:,g}" if _num(goal) else NA


def goal_ge(value, goal, unit: str = "x", fmt: Callable = sig) -> str:
    """``goal 20x: 8.5x — missed`` (misses bold) for a goal of at least ``goal``."""
    if not _num(value) or not _num(goal):
        return f"goal {_g(goal)}{unit}: {NA}"
    met = value >= goal
    text = f"goal {_g(goal)}{unit}: {fmt(value)}{unit} — {'met' if met else 'missed'}"
    return text if met else f"**{text}**"


def goal_le(value, goal, unit: str = " s", fmt: Callable = sig) -> str:
    """``goal 60 s: 18.6 s — met`` for a goal of at most ``goal``."""
    if not _num(value) or not _num(goal):
        return f"goal {_g(goal)}{unit}: {NA}"
    met = value <= goal
    text = f"goal {_g(goal)}{unit}: {fmt(value)}{unit} — {'met' if met else 'missed'}"
    return text if met else f"**{text}**"


def extrap(text: str, rec: dict | None, unit: str = "") -> str:
    """Mark a number taken from an extrapolation (``extrapolated: true``), naming what it was extrapolated from."""
    if not isinstance(rec, dict) or not rec.get("extrapolated"):
        return text
    src = rec.get("extrapolated_from")
    return f"{text} (extrapolated{' from ' + str(src) if src is not None else ''}{unit})"


def table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def missing(name: str) -> str:
    return f"_No results yet: `benchmarks/results/{name}` does not exist._"


def med_min(rec) -> str:
    """``median (min)`` of a ``{"min": .., "median": ..}`` or ``{"min_s": .., "median_s": ..}`` record."""
    if not isinstance(rec, dict):
        return NA
    med = rec.get("median", rec.get("median_s"))
    mn = rec.get("min", rec.get("min_s"))
    if _num(med) and _num(mn):
        return f"{secs(med)} (min {secs(mn)})"
    return secs(med)


def machine_line(d: dict) -> str:
    m = d.get("machine")
    if isinstance(m, dict):
        cpus = m.get("cpus", m.get("cpu_count"))
        dev = m.get("device") or m.get("gpu")
        where = dev or (f"{cpus} CPU cores" if cpus else "")
    else:
        where = str(m or d.get("device", ""))
    threads = d.get("threads", get(d, "problem.threads", get(d, "setting.threads")))
    if isinstance(threads, dict):
        threads = " / ".join(f"{k} {v}" for k, v in threads.items())
    reps = d.get("repetitions", d.get("repeats", d.get("reps")))
    if isinstance(reps, dict):
        reps = "/".join(str(v) for v in reps.values())
    bits = [b for b in (where, f"{threads} thread(s)" if threads is not None else "",
                        f"repetitions {reps}" if reps is not None else "") if b]
    return "; ".join(bits)


def caption(src: str, d: dict) -> str:
    where = machine_line(d)
    return f"_From `benchmarks/results/{src}`{' (' + where + ')' if where else ''}._"


# ------------------------------------------------------------------------------------------------------- renderers
def render_datamodels() -> str:
    reg, tr = load("datamodels_regression.json"), load("datamodels_training.json")
    out = []
    if reg is None:
        out.append(missing("datamodels_regression.json"))
    else:
        p = reg.get("problem", {})
        size = (f"{p.get('models', NA):,} models x {p.get('n_train', NA):,} points x {p.get('targets', NA):,} targets"
                if all(_num(p.get(k)) for k in ("models", "n_train", "targets")) else NA)
        goal = reg.get("goal_speedup")
        rows = []
        for name, c in reg.get("cases", {}).items():
            lfl = c.get("like_for_like")
            work = str(c.get("work", name))
            label = (f"like for like, {name.replace('_', ' ')}: {work}" if lfl else
                     work if work.startswith("algorithmic gain") else f"algorithmic gain, not like for like: {work}")
            r = c.get("speedup", c.get("gain"))
            shown = goal_ge(r, goal) if lfl and _num(goal) else ratio(r)
            acc = []
            if _num(get(c, "val_mse_rel_ours_vs_sklearn.max_abs")):
                acc.append(f"val MSE within {sig(get(c, 'val_mse_rel_ours_vs_sklearn.max_abs'), 2)} rel. of sklearn")
            if _num(c.get("chosen_lambda_agreement")):
                acc.append(f"same lambda on {pct(c['chosen_lambda_agreement'])} of targets")
            ref = get(c, "val_mse_rel_vs_reference")
            if isinstance(ref, dict):
                acc.append("val MSE vs converged reference (max rel.): " + ", ".join(
                    f"{side} {sig(get(ref, side + '.max_abs'), 2)}" for side in ref))
            if _num(get(c, "mean_lambdas_visited.ours")):
                acc.append(f"{sig(get(c, 'mean_lambdas_visited.ours'))} lambdas per target on average")
            rows.append([label, med_min(c.get("ours_cpu_s")), med_min(c.get("sklearn_cpu_s")),
                         extrap(shown, reg), "; ".join(acc) or NA])
        basis = f" ({reg['ratio_basis']})" if reg.get("ratio_basis") else ""
        out.append(table([f"lasso path + validation + refit, {size} (CPU s, median (min))", "ours",
                          "scikit-learn `lasso_path`", f"ratio{basis}", "accuracy"], rows))
        out.append(caption("datamodels_regression.json", reg))
    if tr is None:
        out.append(missing("datamodels_training.json"))
    else:
        mps = tr.get("models_per_s", {})
        s = tr.get("setting", {})
        goal = tr.get("goal_speedup")
        rows = [[f"training throughput, {s.get('model', NA)} on {s.get('data', NA)}, {s.get('epochs', NA)} epochs",
                 f"{sig(mps.get('batched'))} models/s (batched)",
                 f"one process per model via Lightning: {sig(mps.get('one_process_per_model_lightning'))}/s; "
                 f"Lightning in one process: {sig(mps.get('lightning_in_one_process'))}/s",
                 f"{ratio(tr.get('speedup_batched_vs_process_per_model'))} / "
                 + goal_ge(tr.get("speedup_batched_vs_lightning_in_process"), goal)]]
        out.append(table(["benchmark", "ours", "baseline", "ratio (vs process per model / vs Lightning in process)"],
                         rows))
        out.append(caption("datamodels_training.json", tr))
    return "\n\n".join(out)


def _val_accuracy(c: dict, side: str) -> str:
    a = get(c, f"accuracy.{side}") or get(c, f"sides.{side}") or {}
    if _num(a.get("spearman_to_reference")):
        return f"Spearman {sig(a['spearman_to_reference'], 2)}"
    return NA


def _reference(c: dict) -> str:
    """The case's reference, flagged when it is our own estimator (the protocol asks for an independent one)."""
    ref = str(c.get("reference", NA))
    return f"{ref}: not independent" if ref.lower().startswith("ours") else ref


def render_valuation() -> str:
    d = load("valuation_vs_pydvl.json")
    if d is None:
        return missing("valuation_vs_pydvl.json")
    rows = []
    for name, c in d.get("cases", {}).items():
        if "sides" in c:  # one pyDVL side against several of ours
            base = c["sides"].get("pydvl", {})
            for side, rec in c["sides"].items():
                if side == "pydvl":
                    continue
                r = base.get("median_s", math.nan) / rec["median_s"] if _num(rec.get("median_s")) else None
                shown = goal_ge(r, c.get("goal_speedup")) if side == "ours_batched" and _num(c.get("goal_speedup")) \
                    else ratio(r)
                util = (f"utilities identical to pyDVL's: {pct(rec.get('utilities_identical_fraction'))} of "
                        f"{rec.get('utilities_compared_with_pydvl', NA)} "
                        f"(max diff {sig(rec.get('utilities_max_abs_diff'), 2)})")
                acc = (f"Spearman to reference: pyDVL {sig(base.get('spearman_to_reference'), 2)}, ours "
                       f"{sig(rec.get('spearman_to_reference'), 2)} ({_reference(c)})")
                rows.append([f"{name} ({c.get('model', '')}, n={c.get('n_train', NA)}, {c.get('permutations', NA)} "
                             f"permutations), `{side}`",
                             med_min(base), med_min(rec), extrap(shown, c), f"{util}; {acc}"])
            continue
        if "max_abs_diff" in c:
            acc = f"exact: max diff {sig(c['max_abs_diff'], 2)} between sides"
        else:
            acc = (f"Spearman to reference ({_reference(c)}): pyDVL {_val_accuracy(c, 'pydvl')}, ours "
                   f"{_val_accuracy(c, 'ours')}")
        ev_p, ev_o = get(c, "evaluations.pydvl.0"), get(c, "evaluations.ours.0")
        what = ", ".join(f"{k}={c[k]}" for k in ("n_train", "n_test", "k", "budget") if k in c)
        if ev_p is not None and ev_o is not None and ev_p != ev_o:
            what += f"; utility evaluations pyDVL {ev_p}, ours {ev_o}: not like for like"
        elif ev_o is not None:
            what += f", {ev_o} evaluations"
        rows.append([f"{name} ({what})",
                     secs(c.get("pydvl_seconds")), secs(c.get("ours_seconds")), extrap(ratio(c.get("speedup")), c),
                     acc])
    out = [table(["case (same utility and budget)", "pyDVL 0.10", "ours", "speed-up", "accuracy"], rows),
           caption("valuation_vs_pydvl.json", d)]
    return "\n\n".join(out)


OVERHEAD_VARIANTS = (("ours_one_per_call", "bare", "one subset per evaluate() call in a fit's session"),
                     ("ours_one_call", "bare", "one evaluate() call with 80 subsets"),
                     ("tmc_ours", "tmc_bare", "a whole TMC-Shapley fit ({n} evaluations)"))


def _overhead_rows(ov: dict) -> list:
    """Framework overhead per utility evaluation (thread CPU time: wall clock is unreliable on the shared machine)
    and 2 workers vs serial, from valuation_overhead.json."""
    rows = []
    for name in ("overhead_logistic", "overhead_trivial"):
        c = get(ov, f"cases.{name}")
        if not c:
            continue
        model = name.split("_")[1]
        for key, base, what in OVERHEAD_VARIANTS:
            ours, bare = c.get(key, {}), c.get(base, {})
            if not ours:
                continue
            direct = ours.get("cpu_overhead_vs_bare")
            # logistic: the framework's fixed cost (measured on the trivial model) over the fit, the direct
            # difference being within the fit's noise; trivial: the direct ratio
            rel = get(ov, f"overhead_us_per_evaluation_vs_logistic_fit.{key}") if model == "logistic" else direct
            rows.append([f"framework overhead per utility evaluation, {model} model: "
                         + what.format(n=ours.get("utility_evaluations", NA)),
                         f"{sig(ours.get('cpu_min_us'))} us CPU per evaluation vs bare fit + score "
                         f"{sig(bare.get('cpu_min_us'))} us (direct ratio {sig(100 * direct, 2) if _num(direct) else NA}"
                         f"%; wall median {sig(ours.get('median_us'))} vs {sig(bare.get('median_us'))} us)",
                         goal_le(100 * rel if _num(rel) else None, 10, unit="%", fmt=lambda v: sig(v, 2))])
    w = get(ov, "cases.workers")
    if w:
        s1, s2 = w.get("serial", {}), w.get("two_workers_reused_pool", {})
        first = w.get("two_workers_first_fit", {})
        rows.append([f"2 local workers vs serial: {w.get('case', '')}",
                     f"serial {med_min(s1)} (CPU {secs(s1.get('cpu_s_median'))}); 2 workers {med_min(s2)} (CPU, "
                     f"workers included, {secs(s2.get('cpu_s_median'))}); first fit (worker start) "
                     f"{secs(first.get('wall_s'))}; {_workers_load(w)}",
                     goal_ge(w.get("speedup_reused_pool"), 1.0) + ("; identical values"
                                                                  if w.get("values_identical") else "")])
    return rows


def _workers_load(w: dict) -> str:
    """The load average recorded with the workers runs: 2 workers beat serial only where a core is free."""
    loads = [r.get("load_average_1min") for r in w.get("serial", {}).get("runs", [])
             + w.get("two_workers_reused_pool", {}).get("runs", [])]
    loads = [x for x in loads if _num(x)]
    return (f"load average {sig(min(loads), 2)}-{sig(max(loads), 2)} on 2 cores" if loads
            else "load average not recorded")


def render_valuation_scale() -> str:
    sc, ov = load("valuation_scale.json"), load("valuation_overhead.json")
    out, rows = [], []
    if sc is None:
        out.append(missing("valuation_scale.json"))
    else:
        k = get(sc, "cases.knn_shapley", {})
        if k:
            rows.append([f"exact KNN-Shapley, {sig(k.get('n_train'))} train x {sig(k.get('n_test'))} test, "
                         f"k={k.get('k', NA)}, chunked (max_memory_mb={sig(k.get('max_memory_mb'))})",
                         med_min(k) + f"; peak memory growth {sig(k.get('peak_rss_growth_mb'))} MB",
                         extrap(goal_le(k.get("median_s"), k.get("goal_s")), k)])
        o = get(sc, "cases.data_oob", {})
        if o:
            rows.append([f"Data-OOB, {sig(o.get('n'))} x {o.get('features', NA)} features, "
                         f"{o.get('target_models', NA)} bags of {o.get('model', NA)}, {o.get('n_jobs', NA)} workers",
                         med_min(o), extrap(goal_le(o.get("seconds_for_target", o.get("median_s")), o.get("goal_s")),
                                            o, unit="")])
    if ov is None:
        out.append(missing("valuation_overhead.json"))
    else:
        rows += _overhead_rows(ov)
    if rows:
        out.insert(0, table(["benchmark (ours only)", "measured", "goal"], rows))
        out.append(" ".join(caption(n, x) for n, x in (("valuation_scale.json", sc), ("valuation_overhead.json", ov))
                            if x is not None))
    return "\n\n".join(out)


INFLUENCE_LABELS = {
    "direct": "Direct",
    "cg_plain": "CG, row-wise on both sides (like for like)",
    "cg": "block CG (ours) vs row-wise CG (pyDVL) — algorithmic gain, not like for like",
    "cg_all": "CG, all test rows",
    "arnoldi": "Arnoldi",
    "ekfac": "EK-FAC",
    "ekfac_ggn": "EK-FAC on exact expected Gauss-Newton factors (ours only: another approximation than pyDVL's)",
}
INFLUENCE_GOALS = {"direct": 3.0, "arnoldi": 3.0}


def render_influence() -> str:
    d = load("influence_vs_pydvl.json")
    if d is None:
        return missing("influence_vs_pydvl.json")
    p = d.get("problem", {})
    rows = []
    res = d.get("results", {})
    order = [m for m in INFLUENCE_LABELS if m in res] + [m for m in res if m not in INFLUENCE_LABELS]
    for name in order:
        r = res[name]
        label = INFLUENCE_LABELS.get(name, name)
        n_test = get(r, "ours.0.n_test")
        label += f" ({n_test} test rows)" if n_test is not None else ""
        times, ratios = [], []
        for kind in ("calculator", "one_shot"):
            t = r.get(f"pydvl_{kind}_total_s")
            s = r.get(f"speedup_vs_pydvl_{kind}")
            if _num(t):
                times.append(f"{kind.replace('_', '-')} {secs(t)}")
            if _num(s):
                goal = INFLUENCE_GOALS.get(name) if name in INFLUENCE_GOALS and r.get("like_for_like", True) else None
                ratios.append(f"{kind.replace('_', '-')} " + (goal_ge(s, goal) if goal else ratio(s)))
        if not times and _num(r.get("speedup_vs_pydvl_one_shot")) and _num(get(res, "cg.pydvl_one_shot_total_s")):
            times.append(f"one-shot {secs(get(res, 'cg.pydvl_one_shot_total_s'))} (the `cg` entry's run)")
        if _num(r.get("pydvl_one_shot_extrapolated_s")):
            times.append(f"~{secs(r['pydvl_one_shot_extrapolated_s'])} (extrapolated from "
                         f"{p.get('n_test_cg', NA)} rows, not run)")
            if _num(r.get("ours_total_s")):
                ratios.append(f"~{ratio(r['pydvl_one_shot_extrapolated_s'] / r['ours_total_s'])} (extrapolated)")
        agree = []
        preferred = ["agreement_vs_pydvl_calculator", "agreement_vs_pydvl_one_shot"]
        for key in preferred + sorted(k for k in r if k.startswith("agreement_vs_") and k not in preferred):
            a = r.get(key)
            if isinstance(a, dict):
                agree.append(f"vs {key.split('_vs_')[1].replace('_', ' ')}: rel. error {sig(a.get('rel_error'), 2)}, "
                             f"Pearson {sig(a.get('pearson'), 4)}")
                break
        for key in ("ours_vs_direct", "pydvl_calculator_vs_direct", "pydvl_one_shot_vs_direct"):
            a = r.get(key)
            if isinstance(a, dict) and name != "direct":
                agree.append(f"{key.replace('_vs_direct', '').replace('_', ' ')} vs Direct: Pearson "
                             f"{sig(a.get('pearson'), 3)}")
        if name == "ekfac":
            pear = get(r, "agreement_vs_pydvl_calculator.pearson")
            same = goal_ge(pear, 0.999, unit="", fmt=lambda v: sig(v, 4))
            agree.append(same.replace("goal", "same approximation: goal Pearson"))
            if _num(pear) and pear < 0.999:
                ratios = [x + " (different approximations: not like for like)" for x in ratios]
        ours = secs(r.get("ours_total_s"))
        if _num(r.get("ours_one_shot_total_s")):  # both sides timed one-shot: each ratio compares the same call
            ours = f"calculator {ours}; one-shot {secs(r['ours_one_shot_total_s'])}"
        rows.append([label, "; ".join(times) or NA, ours, "; ".join(ratios) or NA, "; ".join(agree) or NA])
    head = (f"method ({p.get('model', '')}, {p.get('n_parameters', NA)} params, {p.get('n_test', NA)} test x "
            f"{p.get('n_train', NA)} train, reg {p.get('regularization', NA)})")
    return "\n\n".join([table([head, "pyDVL 0.10", "ours", "speed-up", "agreement"], rows),
                        caption("influence_vs_pydvl.json", d)])


def render_influence_methods() -> str:
    d = load("influence_digits_methods.json")
    if d is None:
        return missing("influence_digits_methods.json")
    rows = []
    for name, r in d.get("results", {}).items():
        ci = r.get("lds_ci") or [None, None]
        rows.append([name, ", ".join(f"{k}={v}" for k, v in (r.get("settings") or {}).items()),
                     secs(r.get("fit_s")), secs(r.get("matrix_s")),
                     f"{sig(r.get('lds_mean'), 3)} [{sig(ci[0], 3)}, {sig(ci[1], 3)}]",
                     sig(r.get("noisy_auc"), 3), sig(get(r, "vs_direct.pearson"), 3)])
    p = d.get("problem", {})
    return "\n\n".join([table([f"method ({p.get('model', '')}, {p.get('n_train', NA)} train x {p.get('n_test', NA)} "
                               "test)", "settings", "fit", "matrix", "LDS [95% CI]", "noisy AUC",
                               "Pearson vs Direct"], rows),
                        caption("influence_digits_methods.json", d)])


def render_dynamics() -> str:
    mod, hmm, ov = (load(f"dynamics_{n}.json") for n in ("modular", "hmm_timing", "overhead"))
    rows = []
    if mod is not None:
        s = mod.get("setting", {})
        for name, v in mod.get("variants", {}).items():
            ref = get(mod, f"reference.{name}", {})
            states = [x for x in v.get("states", []) if _num(x.get("dwell_r"))]
            strongest = max(states, key=lambda x: abs(x["dwell_r"]), default=None)
            conv = v.get("convergence_step", {})
            meas = (f"K={v.get('k_bic', NA)} (BIC); detour states: {len(v.get('detour_states') or []) or 'none'}; "
                    f"convergence step mean {sig(conv.get('mean'))} "
                    f"(range {sig(conv.get('min'))}–{sig(conv.get('max'))})")
            if strongest:
                meas += (f"; strongest dwell-time vs convergence: state {strongest['state']} "
                         f"r={strongest['dwell_r']:+.2f}, p={sig(strongest.get('dwell_p'), 2)}")
            detour = f", detour r=+{ref['detour_r']}, p={ref['detour_p']}" if "detour_r" in ref else ""
            refs = (f"K={ref['k']}" + detour
                    + f" (full size, {ref.get('seeds', NA)} seeds)") if ref else "—"
            rows.append([f"modular addition, {name} (reduced: p={s.get('p', NA)}, d_model {s.get('d_model', NA)}, "
                         f"{sig(s.get('steps'))} steps, {s.get('seeds', NA)} seeds)", meas, refs])
    if hmm is not None:
        rows.append([f"HMM selection, {hmm.get('fits', NA)} fits ({hmm.get('covariance_type', '')} covariance), "
                     f"{hmm.get('cpu_count', NA)} cores",
                     f"serial {secs(hmm.get('median_serial_s'))}, parallel {secs(hmm.get('median_parallel_s'))} "
                     f"(medians); identical models: {hmm.get('identical_models')}",
                     goal_ge(hmm.get("speedup"), 1.0) + " (faster than serial where cores are free)"])
    if ov is not None:
        for name, c in ov.get("settings", {}).items():
            rows.append([f"callback cost, {name.replace('_', ' ')}",
                         f"{sig(c.get('overhead_inside_pct_median'), 2)}% of CPU time inside the callback (median)",
                         goal_le(c.get("overhead_inside_pct_median"), 5, unit="%", fmt=lambda v: sig(v, 2))])
    if not rows:
        return missing("dynamics_*.json")
    return table(["what", "measured", "reference / goal"], rows) + "\n\n_From `benchmarks/results/dynamics_*.json`._"


def render_dynamics_selection() -> str:
    """The training map of data selection: ``datamatters.dynamics.selection_map.markdown`` of the job's results JSON."""
    d = load("dynamics_selection.json")
    if d is None:
        return missing("dynamics_selection.json")
    from datamatters.dynamics.selection_map import markdown

    return markdown(d)


def _rho_table_module():
    """benchmarks/rho_speedup_table.py (stdlib only): the selection benchmark's own block and goals."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rho_speedup_table", ROOT / "benchmarks" / "rho_speedup_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def render_rho_speedup() -> str:
    d = load("rho_speedup.json")
    if d is None:
        return missing("rho_speedup.json")
    if "summary" in d:  # the layout of rho_speedup.py's merged runs: its own renderer knows it
        return _rho_table_module().markdown(d)
    rows = [[str(r.get("noise", NA)), str(r.get("method", NA)), f"{r.get('reached', NA)}/{r.get('seeds', NA)}",
             sig(r.get("steps_to_target_mean")), ratio(r.get("step_speedup_mean")), ratio(r.get("time_speedup_mean")),
             sig(r.get("final_acc_mean"), 3)] for r in d.get("table", [])]
    return "\n\n".join([
        table(["label noise", "method", "seeds reaching target", "steps to target (mean)", "step speed-up",
               "time speed-up", "final acc"], rows),
        f"_From `benchmarks/results/rho_speedup.json`: {d.get('dataset', '')}; {d.get('model', '')}; "
        f"{d.get('epochs', NA)} epochs; {d.get('device', '')}._"])


def _rho_throughput(d: dict, src: str) -> str:
    rows = []
    goal = 1.5
    for r in d.get("results", []):
        x = r.get("step_vs_uniform")
        shown = ratio(x) if r.get("variant") == "uniform" else (
            ratio(x) + " (CPU smoke: no goal)" if d.get("tiny") or "cpu" in str(d.get("device", "")) else
            goal_le(x, goal, unit="x"))
        rows.append([str(r.get("variant")), f"{sig(1e3 * r['step_s'])} ms" if _num(r.get("step_s")) else NA,
                     shown, sig(r.get("big_batch_examples_per_s"))])
    return "\n\n".join([table(["variant", "step (median rep)", "x uniform step", "big-batch examples/s"], rows),
                        f"_From `benchmarks/results/{src}`: {d.get('model', '')}, n_B={d.get('n_B', NA)}, "
                        f"{d.get('device', '')}, {d.get('threads', NA)} thread(s), {d.get('reps', NA)} reps x "
                        f"{d.get('timed_steps', NA)} steps. {d.get('note', '')}_".replace(" _", "_")])


def render_rho_throughput() -> str:
    out = [_rho_throughput(load(n), n) for n in ("gpu/rho_throughput.json", "rho_throughput_tiny_cpu.json")
           if load(n) is not None]
    return "\n\n".join(out) or missing("rho_throughput_tiny_cpu.json")


def render_gpu() -> str:
    """The GPU check's parts (benchmarks/gpu/check.py writes one JSON per part)."""
    files = sorted((RESULTS / "gpu").glob("*.json"))
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        goal = d.get("goal_text") or "—"
        rows.append([f"{d.get('part', f.stem)}: {d.get('what', '')}",
                     str(d.get("status", NA)) + (f" ({d['error']})" if d.get("error") else ""),
                     str(d.get("device", NA)), extrap(str(d.get("headline", NA)), d),
                     f"**{goal}**" if "missed" in goal else goal])
    if not rows:
        return "_No GPU run yet: `benchmarks/gpu/check.sh` writes `benchmarks/results/gpu/*.json` on a GPU machine._"
    return table(["part", "status", "device", "measured", "goal"], rows) + \
        "\n\n_From `benchmarks/results/gpu/*.json` (written by `benchmarks/gpu/check.sh`)._"


def _is_attribution_table(path: Path) -> bool:
    """An attribution job's results (``models: {label: {rows: [...]}}``), not e.g. attribution_refs.json."""
    models = json.loads(path.read_text()).get("models")
    return isinstance(models, dict) and bool(models) and all(
        isinstance(m, dict) and isinstance(m.get("rows"), list) and all("lds" in r for r in m["rows"])
        for m in models.values())


def render_attribution() -> str:
    files = [f for f in sorted(RESULTS.glob("attribution*.json")) if _is_attribution_table(f)]
    if not files:
        return missing("attribution*.json")
    from datamatters.evaluation.attribution import tables_from_results

    return "\n\n".join(tables_from_results(f) + f"\n\n_From `benchmarks/results/{f.name}`._" for f in files)


def render_attribution_refs() -> str:
    """benchmarks/attribution_refs.py's own table (its ``markdown``) from attribution_refs.json."""
    d = load("attribution_refs.json")
    if d is None:
        return missing("attribution_refs.json")
    import importlib.util

    spec = importlib.util.spec_from_file_location("attribution_refs", ROOT / "benchmarks" / "attribution_refs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.markdown(d)


SECTIONS: dict[str, Callable[[], str]] = {
    "datamodels": render_datamodels,
    "valuation": render_valuation,
    "valuation_scale": render_valuation_scale,
    "influence": render_influence,
    "influence_methods": render_influence_methods,
    "dynamics": render_dynamics,
    "dynamics_selection": render_dynamics_selection,
    "rho_speedup": render_rho_speedup,
    "rho_throughput": render_rho_throughput,
    "attribution": render_attribution,
    "attribution_refs": render_attribution_refs,
    "gpu": render_gpu,
}


# ---------------------------------------------------------------------------------------------- the benchmark index
def _status_datamodels():
    d = load("datamodels_regression.json")
    return d and goal_ge(d.get("speedup"), d.get("goal_speedup")) + " (like for like)"


def _status_training():
    d = load("datamodels_training.json")
    return d and goal_ge(d.get("speedup_batched_vs_lightning_in_process"), d.get("goal_speedup"))


def _status_valuation():
    d = load("valuation_vs_pydvl.json")
    c = get(d, "cases.tmc_logistic") if d else None
    return c and goal_ge(c.get("speedup"), c.get("goal_speedup")) + " (TMC, sklearn LogisticRegression)"


def _status_overhead():
    d = load("valuation_overhead.json")
    if not d:
        return None
    lo = get(d, "overhead_us_per_evaluation_vs_logistic_fit.tmc_ours")
    tr = get(d, "cases.overhead_trivial.tmc_ours.cpu_overhead_vs_bare")
    w = get(d, "cases.workers") or {}
    f = lambda v: sig(v, 2)  # noqa: E731
    return (f"TMC fit: logistic {goal_le(100 * lo if _num(lo) else None, 10, '%', f)}; trivial model "
            f"{goal_le(100 * tr if _num(tr) else None, 10, '%', f)}; 2 workers "
            f"{goal_ge(w.get('speedup_reused_pool'), 1.0)} ({_workers_load(w)})")


def _status_scale():
    d = load("valuation_scale.json")
    if not d:
        return None
    k, o = get(d, "cases.knn_shapley", {}), get(d, "cases.data_oob", {})
    return (f"KNN-Shapley {extrap(goal_le(k.get('median_s'), k.get('goal_s')), k)}; "
            f"Data-OOB {extrap(goal_le(o.get('seconds_for_target'), o.get('goal_s')), o)}")


def _status_influence():
    d = load("influence_vs_pydvl.json")
    if not d:
        return None
    r = d.get("results", {})
    parts = [f"{m} {goal_ge(get(r, m + '.speedup_vs_pydvl_calculator'), 3.0)}" for m in ("direct", "arnoldi")]
    pear = get(r, "ekfac.agreement_vs_pydvl_calculator.pearson")
    parts.append("EK-FAC same approximation " + goal_ge(pear, 0.999, unit="", fmt=lambda v: sig(v, 4)))
    return "; ".join(parts)


def _status_rho_speedup():
    d = load("rho_speedup.json")
    if not d:
        return None
    goals = d.get("goals")
    if not isinstance(goals, dict) or not goals:
        return "measured (see table)"
    return "; ".join(f"{name}: {'met' if g.get('met') else '**missed**'}" for name, g in goals.items())


def _status_rho_throughput():
    d = load("gpu/rho_throughput.json")
    if not d:
        return "no GPU run yet (CPU smoke only)"
    worst = max((r["step_vs_uniform"] for r in d.get("results", []) if r.get("variant") != "uniform"
                 and _num(r.get("step_vs_uniform"))), default=None)
    best = min((r["step_vs_uniform"] for r in d.get("results", []) if r.get("variant") != "uniform"
                and _num(r.get("step_vs_uniform"))), default=None)
    return f"best RHO variant {goal_le(best, 1.5, unit='x')} (worst {ratio(worst)})"


def _status_gpu():
    files = sorted((RESULTS / "gpu").glob("*.json"))
    parts = [json.loads(f.read_text()) for f in files]
    parts = [p for p in parts if "part" in p]
    if not parts:
        return "no GPU run yet"
    return "; ".join(f"{p['part']}: {p.get('goal_text') or p.get('status')}" for p in parts)


INDEX = [
    ("datamodels_regression", "datamodels_regression.json", "lasso path + validation + refit for every target vs "
     "scikit-learn `lasso_path`, full path and early stopping on both sides",
     "python benchmarks/datamodels_regression.py", ">= 20x sklearn like for like, val MSE within 1%",
     _status_datamodels),
    ("datamodels_training", "datamodels_training.json", "subset-model training throughput (batched vs Lightning)",
     "python benchmarks/datamodels_training.py", ">= 20x", _status_training),
    ("valuation_vs_pydvl", "valuation_vs_pydvl.json", "TMC / MSR / KNN-Shapley vs pyDVL 0.10, same utility and "
     "evaluations", ".venv-ref/bin/python benchmarks/valuation_vs_pydvl.py",
     "TMC with sklearn LogisticRegression >= 3x pyDVL", _status_valuation),
    ("valuation_overhead", "valuation_overhead.json", "framework overhead per utility evaluation; 2 workers vs serial",
     ".venv/bin/python benchmarks/valuation_overhead.py", "overhead <= 10% of fit + score; parallel faster than serial",
     _status_overhead),
    ("valuation_scale", "valuation_scale.json", "exact KNN-Shapley 10^5 x 10^3; Data-OOB 10^5 x 100, 200 bags",
     ".venv/bin/python benchmarks/valuation_scale.py", "<= 60 s; <= 300 s on 2 cores", _status_scale),
    ("influence_vs_pydvl", "influence_vs_pydvl.json", "Direct, CG, Arnoldi, EK-FAC vs pyDVL 0.10 on an MNIST-1D MLP",
     "python benchmarks/influence_vs_pydvl.py", "Direct and Arnoldi >= 3x; EK-FAC Pearson >= 0.999 between sides",
     _status_influence),
    ("influence_digits_methods", "influence_digits_methods.json", "all influence methods on digits: LDS, noisy AUC, "
     "agreement with Direct", "python benchmarks/influence_vs_pydvl.py --evaluate", "— (quality table)",
     lambda: load("influence_digits_methods.json") and "measured"),
    ("dynamics", "dynamics_*.json", "modular-addition phases (HMM), HMM selection timing, callback cost",
     "python benchmarks/dynamics_modular.py; dynamics_hmm_timing.py; dynamics_overhead.py",
     "callback < 5%; parallel selection faster than serial",
     lambda: (load("dynamics_overhead.json") or None) and "; ".join(
         f"{k} {goal_le(v.get('overhead_inside_pct_median'), 5, '%', lambda x: sig(x, 2))}"
         for k, v in load("dynamics_overhead.json").get("settings", {}).items())),
    ("rho_speedup", "rho_speedup.json", "RHO-LOSS steps / time to uniform's accuracy on MNIST-1D and digits; InfoBatch",
     "python benchmarks/rho_speedup.py --cells all --seeds 5",
     "RHO-LOSS >= 3x fewer steps (10% noise), >= 1.5x wall-clock with IL (20%); InfoBatch lossless at >= 30% less time",
     _status_rho_speedup),
    ("rho_throughput", "rho_throughput_tiny_cpu.json, gpu/rho_throughput.json", "RHO-LOSS step vs uniform step "
     "(ResNet-18, n_B 320)", "python benchmarks/rho_throughput.py --device cuda", "RHO step <= 1.5x uniform on one GPU",
     _status_rho_throughput),
    ("gpu_check", "gpu/*.json", "the GPU check: RHO throughput, IL pass, ensembles, lasso GPU vs CPU, influence, "
     "KNN-Shapley 10^6 x 10^4", "bash benchmarks/gpu/check.sh (on the GPU machine; --tiny on CPU)",
     "lasso <= 60 s; KNN-Shapley <= 600 s; ensembles >= 20x CPU", _status_gpu),
]


def _keys(x, out: set) -> set:
    if isinstance(x, dict):
        for k, v in x.items():
            out.add(str(k).lower())
            _keys(v, out)
    elif isinstance(x, list):
        for v in x[:3]:
            _keys(v, out)
    return out


# protocol field -> any key that satisfies it (anywhere in the JSON)
PROTOCOL_FIELDS = {
    "machine": lambda k: k in ("machine", "cpu_count", "cpus", "device"),
    "threads": lambda k: k == "threads" or k.endswith("_threads"),
    "repetitions": lambda k: k in ("repetitions", "repeats", "reps"),
    "min": lambda k: k == "min" or k.startswith("min_") or k.endswith("_min"),
    "median": lambda k: "median" in k,
    "speedup": lambda k: k.startswith("speedup"),
}


COMPARATIVE = {"datamodels_regression", "datamodels_training", "valuation_vs_pydvl", "influence_vs_pydvl"}


def protocol_gaps(src: str, comparative: bool) -> str:
    """The protocol fields (benchmarks/README.md) a results file lacks, e.g. ``repetitions, min``; ``speedup`` only
    for a benchmark against a baseline."""
    files = sorted(RESULTS.glob(src)) if any(c in src for c in "*?") else [RESULTS / src]
    files = [f for f in files if f.exists()]
    if not files:
        return NA
    gaps = set()
    for f in files:
        keys = _keys(json.loads(f.read_text()), set())
        gaps |= {field for field, ok in PROTOCOL_FIELDS.items() if not any(ok(k) for k in keys)
                 and (comparative or field != "speedup")}
    return ", ".join(f for f in PROTOCOL_FIELDS if f in gaps) or "none"


def render_index() -> str:
    rows = []
    for name, src, what, cmd, goal, status in INDEX:
        try:
            st = status()
        except (KeyError, TypeError, ZeroDivisionError) as e:  # a layout this index does not know yet
            st = f"unreadable ({type(e).__name__})"
        first = src.split(",")[0].strip()
        rows.append([name, what, f"`{cmd}`", f"`{src}`", goal, st or "no results yet", protocol_gaps(first, name in COMPARATIVE)])
    return table(["benchmark", "measures", "command", "results", "goal", "current JSON", "protocol fields missing"],
                 rows)


def render(name: str) -> str:
    if name == "index":
        return render_index()
    if name not in SECTIONS:
        raise KeyError(f"unknown report marker {name!r}; known: index, {', '.join(SECTIONS)}")
    try:
        return SECTIONS[name]()
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError) as e:
        # a results layout this renderer does not know: the other blocks still render, the test flags this one
        return f"_{UNRENDERABLE} {name}: {type(e).__name__}: {e}; update benchmarks/report.py._"


# -------------------------------------------------------------------------------------------------------- markers
MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)


def blocks(text: str) -> dict[str, str]:
    """Marker name -> the text between the markers (without the surrounding newlines)."""
    return {m["name"]: m["body"].strip("\n") for m in MARKER.finditer(text)}


def rewrite(text: str) -> str:
    return MARKER.sub(lambda m: f"{m.group(1)}{render(m['name'])}\n{m.group(4)}", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true",
                    help="rewrite the marker blocks of README.md and benchmarks/README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when a marker block differs from the results")
    args = ap.parse_args(argv)
    if not (args.write or args.check):
        print("## index\n\n" + render_index())
        for name in SECTIONS:
            print(f"\n## {name}\n\n{render(name)}")
        return 0
    stale = []
    for doc in DOCS:
        if not doc.exists():
            continue
        old = doc.read_text()
        new = rewrite(old)
        if new != old:
            stale.append(doc.relative_to(ROOT))
            if args.write:
                doc.write_text(new)
    if stale:
        print(("rewrote " if args.write else "stale (run python benchmarks/report.py --write): ")
              + ", ".join(map(str, stale)))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
