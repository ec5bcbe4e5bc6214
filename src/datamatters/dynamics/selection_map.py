"""The training map of data selection: ONE HMM fitted over the runs of several selection methods (uniform, RHO-LOSS,
...), then read per method: where each method's runs spend their time (state occupancy), how they move (empirical
transition matrix of the Viterbi paths), when they settle (steps to the final state) and which states only one
method visits (states a method skips or adds). Plain functions on Viterbi paths, so they can be checked on
hand-made sequences; ``markdown`` renders the README block from the results JSON (no heavy imports here).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

NA = "n/a"


def final_entry_step(path: np.ndarray, steps: np.ndarray) -> float:
    """Step of the first checkpoint of the run's final uninterrupted stay in its last state ("steps to the final
    state"; a run that returns to its final state after leaving it counts from the return)."""
    path, steps = np.asarray(path), np.asarray(steps)
    changes = np.flatnonzero(path[1:] != path[:-1])
    return float(steps[changes[-1] + 1] if len(changes) else steps[0])


def summary_stats(x: Sequence[float]) -> dict:
    x = np.asarray(x, float)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max())}


def method_map(paths: Sequence[np.ndarray], steps: Sequence[np.ndarray], k: int) -> dict:
    """One method's map over its runs' Viterbi ``paths`` (state per checkpoint) at ``steps``:

    occupancy: fraction of all its checkpoints in each state; transmat: row-normalised counts of consecutive
    checkpoint pairs (self-transitions included; a state never left-from is a row of None); switches: counts of
    i -> j, i != j; visited_runs / final_state_runs: runs that visit / end in each state; convergence_step: steps
    to the final state (``final_entry_step``) per run and summarised."""
    paths = [np.asarray(p, dtype=np.int64) for p in paths]
    if not paths or any(len(p) == 0 for p in paths):
        raise ValueError("method_map needs at least one non-empty path")
    allp = np.concatenate(paths)
    if allp.min() < 0 or allp.max() >= k:
        raise ValueError(f"states must be in 0..{k - 1}, got {allp.min()}..{allp.max()}")
    pairs = np.zeros((k, k), dtype=np.int64)
    for p in paths:
        np.add.at(pairs, (p[:-1], p[1:]), 1)
    rows = pairs.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        trans = np.where(rows > 0, pairs / np.maximum(rows, 1), np.nan)
    conv = [final_entry_step(p, s) for p, s in zip(paths, steps)]
    return {
        "n_runs": len(paths), "n_checkpoints": int(len(allp)),
        "occupancy": (np.bincount(allp, minlength=k) / len(allp)).tolist(),
        "transmat": [[None if math.isnan(v) else float(v) for v in r] for r in trans],
        "pair_counts": pairs.tolist(),
        "switches": (pairs * (1 - np.eye(k, dtype=np.int64))).tolist(),
        "visited_runs": [int(sum(bool(np.any(p == s)) for p in paths)) for s in range(k)],
        "final_state_runs": np.bincount([int(p[-1]) for p in paths], minlength=k).tolist(),
        "convergence_step": {"per_run": conv, **summary_stats(conv)},
    }


def occupancy_tv(a: Sequence[np.ndarray], b: Sequence[np.ndarray], k: int) -> float:
    """Total-variation distance between the pooled state occupancies of two groups of runs."""
    occ = [np.bincount(np.concatenate(g), minlength=k) / sum(len(p) for p in g) for g in (a, b)]
    return float(0.5 * np.abs(occ[0] - occ[1]).sum())


def permutation_p(a: Sequence[np.ndarray], b: Sequence[np.ndarray], k: int, n_perm: int = 2000,
                  seed: int = 0) -> float:
    """P-value of ``occupancy_tv`` under exchangeable method labels (runs shuffled between the groups):
    (1 + #{permuted TV >= observed}) / (1 + n_perm)."""
    runs = list(a) + list(b)
    observed = occupancy_tv(a, b, k)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(int(n_perm)):
        perm = rng.permutation(len(runs))
        hits += occupancy_tv([runs[i] for i in perm[:len(a)]], [runs[i] for i in perm[len(a):]], k) >= observed - 1e-12
    return (1 + hits) / (1 + int(n_perm))


def compare(ref: str, other: str, maps: dict[str, dict], paths: dict[str, Sequence[np.ndarray]], k: int,
            n_perm: int = 2000, seed: int = 0) -> dict:
    """``other`` against ``ref``: states it skips (visited by some ``ref`` run, by none of its own) and adds (the
    reverse), per-state Fisher exact p of the visit counts, occupancy TV distance with its permutation p, and the
    Mann-Whitney p of the steps to the final state."""
    from scipy.stats import fisher_exact, mannwhitneyu

    a, b = maps[ref], maps[other]
    fisher = []
    for s in range(k):
        table = [[a["visited_runs"][s], a["n_runs"] - a["visited_runs"][s]],
                 [b["visited_runs"][s], b["n_runs"] - b["visited_runs"][s]]]
        fisher.append(float(fisher_exact(table)[1]))
    ca, cb = a["convergence_step"]["per_run"], b["convergence_step"]["per_run"]
    mw = float(mannwhitneyu(ca, cb).pvalue) if len(set(ca) | set(cb)) > 1 else 1.0
    return {
        "reference": ref, "method": other,
        "skipped_states": [s for s in range(k) if a["visited_runs"][s] > 0 and b["visited_runs"][s] == 0],
        "added_states": [s for s in range(k) if b["visited_runs"][s] > 0 and a["visited_runs"][s] == 0],
        "visit_fisher_p": fisher,
        "occupancy_tv": occupancy_tv(paths[ref], paths[other], k),
        "occupancy_tv_p": permutation_p(paths[ref], paths[other], k, n_perm, seed),
        "n_perm": int(n_perm),
        "convergence_step_diff_mean": b["convergence_step"]["mean"] - a["convergence_step"]["mean"],
        "convergence_mannwhitney_p": mw,
    }


def first_visit_order(paths: Sequence[np.ndarray], steps: Sequence[np.ndarray], k: int) -> list[int]:
    """States by mean first-visit step over the runs that visit them (never-visited states last, by index)."""
    first = np.full((len(paths), k), np.nan)
    for r, (p, s) in enumerate(zip(paths, steps)):
        for state in range(k):
            hit = np.flatnonzero(np.asarray(p) == state)
            if len(hit):
                first[r, state] = np.asarray(s)[hit[0]]
    seen = ~np.isnan(first).all(0)
    mean = np.array([np.nanmean(first[:, i]) if seen[i] else np.inf for i in range(k)])
    return [int(i) for i in np.lexsort((np.arange(k), mean))]


def state_fractions(paths: Sequence[np.ndarray], steps: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps (T,), fractions (T, K))``: the share of runs in each state at each recorded step."""
    grid = np.unique(np.concatenate([np.asarray(s) for s in steps]))
    counts = np.zeros((len(grid), k))
    for p, s in zip(paths, steps):
        np.add.at(counts, (np.searchsorted(grid, s), np.asarray(p)), 1)
    return grid, counts / np.maximum(counts.sum(1, keepdims=True), 1)


def _methods(d: dict) -> list[str]:
    """Methods in the job's order (the reference first; the JSON's method keys come back sorted)."""
    return list(d.get("setting", {}).get("methods") or d["methods"])


# ---- figure ------------------------------------------------------------------------------------------------------
def plot_selection_map(results: dict, paths: dict[str, Sequence[np.ndarray]], steps: dict[str, Sequence[np.ndarray]],
                       path: str | Path) -> Path:
    """Top: each method's training map (states left to right by the first visit over all runs, size = the method's
    occupancy, arrows = its switches labelled with its transition probability; a state it never visits is hollow).
    Bottom: the share of its runs in each state over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    from datamatters.dynamics.plots import _save as save_figure, state_colors

    k, methods = results["hmm"]["k"], _methods(results)
    colors = state_colors(k)
    x = np.empty(k)
    x[np.asarray(results["state_order"])] = np.arange(k)
    y = np.where(x % 2 == 0, 0.0, 0.6)
    fig, axes = plt.subplots(2, len(methods), figsize=(max(5.0, 1.3 * k) * len(methods), 6.6), squeeze=False)
    for col, m in enumerate(methods):
        mm, ax = results["methods"][m], axes[0, col]
        for i in range(k):
            for j in range(k):
                if i != j and mm["switches"][i][j] > 0:
                    ax.add_patch(FancyArrowPatch((x[i], y[i]), (x[j], y[j]), arrowstyle="-|>", mutation_scale=13,
                                                 connectionstyle="arc3,rad=0.25", color="0.35", shrinkA=16,
                                                 shrinkB=16, lw=0.6 + 2.4 * mm["switches"][i][j] / mm["n_runs"]))
                    ax.text((x[i] + x[j]) / 2, (y[i] + y[j]) / 2 + 0.17 * np.sign(x[j] - x[i] + 1e-9),
                            f"{mm['transmat'][i][j]:.2f}", fontsize=7, ha="center", va="center", color="0.2")
        for i in range(k):
            occ, seen = mm["occupancy"][i], mm["visited_runs"][i] > 0
            ax.scatter(x[i], y[i], s=250 + 2500 * occ, zorder=3, edgecolor=colors[i] if not seen else "k",
                       facecolor=colors[i] if seen else "white", linewidth=2 if not seen else 1)
            ax.text(x[i], y[i], str(i), ha="center", va="center", fontsize=10, zorder=4, weight="bold")
            ax.text(x[i], y[i] - 0.3, f"{100 * occ:.0f}% | {mm['visited_runs'][i]}/{mm['n_runs']}", ha="center",
                    fontsize=7)
        ax.set_xlim(-0.8, k - 0.2)
        ax.set_ylim(-0.55, 1.0)
        ax.axis("off")
        conv = mm["convergence_step"]
        ax.set_title(f"{m}: occupancy | runs visiting; final state at step {conv['mean']:.0f} (mean)", fontsize=9)
        grid, frac = state_fractions(paths[m], steps[m], k)
        ax2 = axes[1, col]
        ax2.stackplot(grid, frac.T, colors=colors, labels=[f"state {s}" for s in range(k)])
        ax2.set_xlabel("step")
        ax2.set_ylabel("share of runs")
        ax2.set_ylim(0, 1)
        ax2.set_xlim(grid[0], grid[-1])
    axes[1, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"one HMM (K={k}) over {sum(results['methods'][m]['n_runs'] for m in methods)} runs", fontsize=10)
    return save_figure(fig, path)


# ---- README block ------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return NA if v is None else f"{100 * v:.1f}%"


def _num(v, fmt="{:.0f}") -> str:
    return NA if v is None else fmt.format(v)


def _p(v) -> str:
    return NA if v is None else (f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}")


def _comparison_line(c: dict) -> str:
    skip = ", ".join(map(str, c["skipped_states"])) or "none"
    add = ", ".join(map(str, c["added_states"])) or "none"
    low = [s for s, p in enumerate(c["visit_fisher_p"]) if p < 0.05]
    return (f"- **{c['method']} vs {c['reference']}**: states skipped (visited by {c['reference']} runs only): {skip}; "
            f"added (visited by {c['method']} runs only): {add}; states whose share of visiting runs differs "
            f"(Fisher p < 0.05): {', '.join(map(str, low)) or 'none'}; occupancy total-variation distance "
            f"{c['occupancy_tv']:.3f} (permutation p = {_p(c['occupancy_tv_p'])}, {c['n_perm']} label shuffles); "
            f"steps to the final state {c['convergence_step_diff_mean']:+.0f} on average (Mann-Whitney p = "
            f"{_p(c['convergence_mannwhitney_p'])}).")


def markdown(d: dict) -> str:
    """The README block of a results JSON written by ``tasks/dynamics_selection.py``."""
    methods, k = _methods(d), d["hmm"]["k"]
    mm = d["methods"]
    head = "| state (by first visit) | " + " | ".join(f"{m}: occupancy, runs visiting" for m in methods) + " |"
    lines = [head, "|---" * (len(methods) + 1) + "|"]
    for s in d["state_order"]:
        lines.append(f"| {s} | " + " | ".join(f"{_pct(mm[m]['occupancy'][s])}, {mm[m]['visited_runs'][s]}/"
                                              f"{mm[m]['n_runs']}" for m in methods) + " |")
    per = ["| method | runs | steps to the final state: mean (median, range) | final states (runs) | "
           "loss on the noisy target-train at the end | val acc at the end | test acc | corrupted share of "
           "trained-on points |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        c = mm[m]["convergence_step"]
        finals = ", ".join(f"{s}: {n}" for s, n in enumerate(mm[m]["final_state_runs"]) if n)
        per.append(f"| {m} | {mm[m]['n_runs']} | {c['mean']:.0f} ({c['median']:.0f}, {c['min']:.0f}–{c['max']:.0f}) "
                   f"| {finals} | {_num(mm[m].get('final_train_loss', {}).get('mean'), '{:.3f}')} | "
                   f"{_num(mm[m].get('final_val_acc', {}).get('mean'), '{:.3f}')} | "
                   f"{_num(mm[m].get('test_acc', {}).get('mean'), '{:.3f}')} | "
                   f"{_pct(mm[m].get('selected_corrupted_frac'))} |")
    trans = ["| from \\ to | " + " | ".join(str(s) for s in d["state_order"]) + " |", "|---" * (k + 1) + "|"]
    for i in d["state_order"]:
        cells = []
        for j in d["state_order"]:
            vals = [mm[m]["transmat"][i][j] for m in methods]
            cells.append(" / ".join(NA if v is None else f"{v:.2f}" for v in vals) if any(vals) else "")
        trans.append(f"| {i} | " + " | ".join(cells) + " |")
    notes = [_comparison_line(c) for c in d["comparisons"]]
    for k2, other in sorted(d.get("also_k", {}).items(), key=lambda kv: int(kv[0])):
        occ = "; ".join(f"{m}: " + ", ".join(f"{s}: {_pct(other['methods'][m]['occupancy'][s])} "
                                            f"({other['methods'][m]['visited_runs'][s]} runs)"
                                            for s in other["state_order"]) for m in methods)
        notes.append(f"- *The same runs at K={k2}* (held-out log-likelihood per checkpoint "
                     f"{other['hmm']['test_ll_per_sample']:.2f} vs {d['hmm']['test_ll_per_sample']:.2f} at K={k}): "
                     f"occupancy (runs visiting) {occ}.")
        notes += ["  " + _comparison_line(c) for c in other["comparisons"]]
    h, s = d["hmm"], d["setting"]
    chosen = "by BIC" if k == h["k_bic"] else f"set; BIC chose {h['k_bic']}"
    caption = (f"_From `benchmarks/results/dynamics_selection.json`: {s['description']}. One Gaussian HMM over all "
               f"{h['n_runs']} runs (K={k} {chosen} of K = 1..{h['k_max']}, {h['covariance_type']} covariance, "
               f"{h['restarts']} restarts, {h['normalize']} z-scoring; held-out runs {h['n_test_runs']}). "
               f"Transition cells: {' / '.join(methods)} (blank: never observed). {d.get('note', '')}_")
    return "\n".join(["\n".join(lines), "", "\n".join(per), "", "\n".join(trans), "", "\n".join(notes), "",
                      caption.replace(" _", "_")])
