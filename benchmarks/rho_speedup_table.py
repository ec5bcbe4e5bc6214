"""The goals and the README block of benchmarks/results/rho_speedup.json: stdlib only, so benchmarks/report.py can
import them without torch or Lightning (``from rho_speedup_table import markdown``; ``python benchmarks/rho_speedup.py
--table benchmarks/results/rho_speedup.json`` prints the block)."""
from __future__ import annotations


def paired(runs: list[dict], label: str, other: str) -> dict | None:
    """``label`` against ``other`` on the seeds both ran, per seed then averaged: final-accuracy drop in points and the
    fraction of training time saved (wall-clock and process CPU). A seed only one side ran would mix seed luck and
    the machine's load of another hour into the comparison. ``runs``: rho_speedup.py's run dicts (one cell)."""
    a = {r["seed"]: r for r in runs if r["method"] == label}
    b = {r["seed"]: r for r in runs if r["method"] == other}
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    mean = lambda f: sum(f(a[s], b[s]) for s in seeds) / len(seeds)  # noqa: E731
    return {"seeds": seeds, "acc_drop_points": 100 * mean(lambda x, y: y["final_acc"] - x["final_acc"]),
            "time_saved": 1 - mean(lambda x, y: x["train_s"] / y["train_s"]),
            "cpu_time_saved": 1 - mean(lambda x, y: x["train_cpu_s"] / y["train_cpu_s"])}


def _infobatch_goal(ib: dict, other: dict, name: str) -> dict:
    """From ``ib["paired"][name]`` (the seeds both ran) when present, else the two rows' means (older results)."""
    p = (ib.get("paired") or {}).get(name)
    if p:
        g = dict(p)
    else:
        g = {"acc_drop_points": 100 * (other["final_acc"] - ib["final_acc"]),
             "time_saved": 1 - ib["train_s_total"] / other["train_s_total"],
             "cpu_time_saved": 1 - ib["train_cpu_s_total"] / other["train_cpu_s_total"], "unpaired": True}
    g["met_in_wall_clock"] = g["acc_drop_points"] <= 0.5 and g["time_saved"] >= 0.30
    g["met_in_cpu_seconds"] = g["acc_drop_points"] <= 0.5 and g["cpu_time_saved"] >= 0.30
    g["met"] = g["met_in_wall_clock"] and g["met_in_cpu_seconds"]  # both clocks: wall-clock alone is load-dependent
    return g


def goals(summary: dict) -> dict:
    """The issue's goals, each as measured / met; a time goal is met only when both wall-clock and process CPU time
    meet it (on a shared machine wall-clock alone can pass or fail with the load)."""
    out = {}
    rho = {cell: next((r for r in rows if r["baseline"] == "uniform" and r["label"] == "reducible_loss"), None)
           for cell, rows in summary.items()}
    r = rho.get("mnist1d:uniform:0.1")
    if r:
        out["rho_steps_speedup_mnist1d_10pct >= 3"] = {"measured": r["sp_steps"], "ci": [r["sp_steps_lo"], r["sp_steps_hi"]],
                                                       "reached": f"{r['reached']}/{r['seeds']}", "met": r["sp_steps"] >= 3}
    for cell in ("mnist1d:uniform:0.2", "digits:uniform:0.2"):
        r = rho.get(cell)
        if r:
            out[f"rho_wallclock_with_il_{cell} >= 1.5"] = {
                "measured": r["sp_secs_il"], "ci": [r["sp_secs_il_lo"], r["sp_secs_il_hi"]], "met": r["sp_secs_il"] >= 1.5 and r["sp_cpu_il"] >= 1.5,
                "met_in_wall_clock": r["sp_secs_il"] >= 1.5,
                "cpu_seconds_speedup_with_il": r["sp_cpu_il"], "met_in_cpu_seconds": r["sp_cpu_il"] >= 1.5,
                "without_il": r["sp_secs"], "cpu_seconds_without_il": r["sp_cpu"]}
        r = next((r for r in summary.get(cell, []) if r["baseline"] == "uniform"
                  and r["label"] == "reducible_loss_small_il"), None)
        if r:  # the labelled variant: a small IL model trained a few epochs, its cost timed the same way
            out[f"variant reducible_loss_small_il: rho_wallclock_with_il_{cell} >= 1.5"] = {
                "measured": r["sp_secs_il"], "ci": [r["sp_secs_il_lo"], r["sp_secs_il_hi"]], "met": r["sp_secs_il"] >= 1.5 and r["sp_cpu_il"] >= 1.5,
                "met_in_wall_clock": r["sp_secs_il"] >= 1.5,
                "cpu_seconds_speedup_with_il": r["sp_cpu_il"], "met_in_cpu_seconds": r["sp_cpu_il"] >= 1.5,
                "without_il": r["sp_secs"], "steps_speedup": r["sp_steps"], "reached": f"{r['reached']}/{r['seeds']}"}
    for cell, rows in summary.items():
        by = {r["label"]: r for r in rows if r["baseline"] == "uniform"}
        if "infobatch" in by and "full_data" in by:
            ib, fd, u = by["infobatch"], by["full_data"], by.get("uniform")
            goal = _infobatch_goal(ib, fd, "full_data")
            if u:  # uniform trains on as many points (32 of each 320) in as many steps: the same data budget
                goal["vs_uniform_selecting_32_of_320"] = _infobatch_goal(ib, u, "uniform")
            out[f"infobatch_{cell}: acc within 0.5 pt of full data at >= 30% less time"] = goal
    return out


def markdown(out: dict) -> str:
    """The README block of a results JSON (importable: benchmarks/report.py may call it): per cell and method the
    speed-ups against uniform (and uniform with lr decay) with 95% CIs over seeds, then each goal as met / missed."""
    f = lambda r, k: "n/a" if r[k] != r[k] else f"{r[k]:.2f} [{r[k + '_lo']:.2f}, {r[k + '_hi']:.2f}]"  # noqa: E731
    lines = ["| cell | method | seeds reaching target | steps x (vs uniform) | steps x (vs lr decay) | time x | "
             "time x with IL | CPU-time x with IL | final acc | corrupted trained on | overhead |", "|" + "---|" * 11]
    for cell, rows in out["summary"].items():
        decay = {r["label"]: r for r in rows if r["baseline"] == "uniform_lr_decay"}
        for r in (r for r in rows if r["baseline"] == "uniform"):
            d = decay.get(r["label"])
            lines.append(f"| {cell} | {r['label']} | {r['reached']}/{r['seeds']} | {f(r, 'sp_steps')} | "
                         f"{f(d, 'sp_steps') if d else 'n/a'} | {f(r, 'sp_secs')} | {f(r, 'sp_secs_il')} | "
                         f"{f(r, 'sp_cpu_il')} | {r['final_acc']:.3f} | {r['corrupted_frac']:.3f} | {r['overhead']:.2f} |")
    goal_lines = []
    for name, g in out.get("goals", {}).items():
        flat = {f"{k}.{k2}" if isinstance(v, dict) else k: v2 for k, v in g.items()
                for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)])}
        rnd = lambda v: round(v, 3) if isinstance(v, float) else [rnd(x) for x in v] if isinstance(v, list) else v  # noqa: E731
        shown = {k: rnd(v) for k, v in flat.items()}
        goal_lines.append(f"- {name}: **{'met' if g.get('met') else 'missed'}** "
                          f"({', '.join(f'{k} {v}' for k, v in shown.items() if k != 'met')})")
    st = out.get("setup", {})
    notes = [f"_From `benchmarks/results/rho_speedup.json`: {st.get('model', '')}, n_B={st.get('n_B')}, "
             f"n_b={st.get('n_b')}, {st.get('epochs')} epochs, lr {st.get('lr')}; seeds per cell "
             f"{ {c: len(v) for c, v in out.get('seeds_per_cell', {}).items()} or out.get('reps') }. "
             f"x = uniform / method (mean [95% bootstrap CI] over the seeds that reached uniform's best test accuracy); "
             f"time = wall-clock on a loaded shared 2-core CPU (indicative), CPU-time = process CPU seconds._"]
    if out.get("reduced"):
        notes.append(f"_Reduced run: {out['reduced']}_")
    return "\n".join(lines) + ("\n\nGoals:\n\n" + "\n".join(goal_lines) if goal_lines else "") + "\n\n" + "\n\n".join(notes)
