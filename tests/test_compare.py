"""The speed-up statistics (hand-made curves with known answers) and task=compare on a sweep directory."""
import csv
import json
import math

import numpy as np
import pytest

from conftest import run_job
from datamatters.errors import UserError
from datamatters.evaluation.speedup import bootstrap_ci, first_reach, speedup_table


def curve(accs, steps_per_epoch=10, secs_per_epoch=1.0):
    return [{"epoch": e, "step": (e + 1) * steps_per_epoch, "examples_seen": 0, "train_s": (e + 1) * secs_per_epoch,
             "test_acc": a} for e, a in enumerate(accs)]


RUNS = [
    # uniform: best 0.80 (seed 0) first reached at epoch index 2; 0.90 (seed 1) at index 3
    {"label": "uniform", "seed": 0, "curve": curve([0.5, 0.7, 0.8, 0.79])},
    {"label": "uniform", "seed": 1, "curve": curve([0.6, 0.7, 0.85, 0.9])},
    # rho: seed 0 reaches 0.80 at index 1 (step 20, 4 s); seed 1 reaches 0.90 at index 0 (step 10, 2 s); IL 2 s
    {"label": "rho", "seed": 0, "curve": curve([0.6, 0.85, 0.9, 0.9], 10, 2.0), "il_s": 2.0, "final_acc": 0.9},
    {"label": "rho", "seed": 1, "curve": curve([0.95, 0.95, 0.95, 0.95], 10, 2.0), "il_s": 2.0, "final_acc": 0.95},
    # never reaches uniform's best
    {"label": "slow", "seed": 0, "curve": curve([0.1, 0.2, 0.3, 0.4])},
    {"label": "slow", "seed": 1, "curve": curve([0.1, 0.2, 0.3, 0.4])},
]


def test_first_reach_is_the_first_epoch_at_or_above_target():
    c = curve([0.5, 0.8, 0.7, 0.9])
    assert first_reach(c, 0.8)["epoch"] == 1 and first_reach(c, 0.85)["epoch"] == 3 and first_reach(c, 0.95) is None


def test_speedup_table_against_hand_computed_values():
    rows = {r["label"]: r for r in speedup_table(RUNS, "uniform")}
    u, rho, slow = rows["uniform"], rows["rho"], rows["slow"]
    assert u["sp_steps"] == 1.0 and u["sp_steps_lo"] == u["sp_steps_hi"] == 1.0 and u["reached"] == 2
    # per seed: steps 30/20 and 40/10; epochs 3/2 and 4/1; seconds 3/4 and 4/2; with IL 3/6 and 4/4
    assert rho["sp_steps"] == pytest.approx((1.5 + 4.0) / 2)
    assert rho["sp_epochs"] == pytest.approx((1.5 + 4.0) / 2)
    assert rho["sp_secs"] == pytest.approx((0.75 + 2.0) / 2)
    assert rho["sp_secs_il"] == pytest.approx((0.5 + 1.0) / 2)
    assert rho["steps"] == pytest.approx(15.0) and rho["secs_il"] == pytest.approx((6 + 4) / 2)
    assert 1.5 <= rho["sp_steps_lo"] <= rho["sp_steps"] <= rho["sp_steps_hi"] <= 4.0
    assert rho["final_acc"] == pytest.approx(0.925) and rho["il_s"] == 2.0
    assert slow["reached"] == 0 and math.isnan(slow["sp_steps"])
    assert math.isnan(rho["sp_cpu"])  # curves without CPU seconds give no CPU-time speed-up


def test_cpu_seconds_speedup_includes_the_il_cpu_cost():
    runs = [{**r, "curve": [{**row, "train_cpu_s": row["train_s"] / 2} for row in r["curve"]]} for r in RUNS[:4]]
    runs[2]["il_cpu_s"] = runs[3]["il_cpu_s"] = 1.0
    rho = {r["label"]: r for r in speedup_table(runs, "uniform")}["rho"]
    assert rho["sp_cpu"] == pytest.approx((0.75 + 2.0) / 2)              # same ratios as wall-clock here
    assert rho["sp_cpu_il"] == pytest.approx((1.5 / 3 + 2.0 / 2) / 2)    # 1.5/(2+1) and 2/(1+1)


def test_speedup_table_needs_its_baseline():
    with pytest.raises(ValueError, match="no runs of the baseline 'uniform'"):
        speedup_table([r for r in RUNS if r["label"] != "uniform"], "uniform")


def test_bootstrap_ci_of_the_mean():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], n_boot=4000)
    assert m == 2.5 and 1.0 <= lo < 2.0 and 3.0 < hi <= 4.0
    # against the normal approximation of the mean's sampling distribution (large sample)
    v = np.random.default_rng(1).normal(size=200)
    m, lo, hi = bootstrap_ci(v, n_boot=4000)
    se = v.std() / np.sqrt(len(v))
    assert lo == pytest.approx(m - 1.96 * se, abs=0.3 * se) and hi == pytest.approx(m + 1.96 * se, abs=0.3 * se)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("inf")])


def write_run(d, method, seed, accs, schedule="constant", il_s=None, secs=1.0):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "selection/method": method, "seed": seed, "train/lr_schedule": schedule, "time/il_s": il_s,
        "test/acc": accs[-1], "selection/corrupted_frac": 0.1, "selection/overhead": 0.2, "trainer/steps": 10 * len(accs)}))
    with (d / "test_curve.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "examples_seen", "train_s", "test_acc"])
        w.writeheader()
        for row in curve(accs, 10, secs):
            w.writerow(row)


def test_compare_job_turns_a_sweep_into_speedup_tables(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    k = 0
    for seed in (0, 1):
        write_run(sweep / str(k), "uniform", seed, [0.5, 0.7, 0.8, 0.8]); k += 1
        write_run(sweep / str(k), "uniform", seed, [0.5, 0.75, 0.85, 0.86], "CosineAnnealingLR"); k += 1
        write_run(sweep / str(k), "reducible_loss", seed, [0.7, 0.86, 0.9, 0.9], il_s=1.0); k += 1
    s = run_job(tmp_path / "cmp", ["task=compare", f"compare.runs=[{sweep}]"])
    assert s["compare/runs"] == 6
    assert s["speedup/reducible_loss/steps"] == pytest.approx(1.5)      # 30 / 20 on both seeds
    assert s["speedup/reducible_loss/secs_il"] == pytest.approx(3 / 3)  # 3 s vs 2 s + 1 s of IL
    assert s["speedup_vs_lr_decay/reducible_loss/steps"] == pytest.approx(40 / 20)
    assert s["speedup/uniform (lr decay)/steps"] == pytest.approx(30 / 30)
    table = list(csv.DictReader(open(s["artifacts"]["speedup_table"])))
    assert {(r["baseline"], r["label"]) for r in table} == {
        (b, lab) for b in ("uniform", "uniform (lr decay)") for lab in ("uniform", "uniform (lr decay)", "reducible_loss")}
    assert (tmp_path / "cmp" / "run" / "speed_curves.png").is_file()


def test_compare_with_nothing_to_compare_says_where_it_looked(tmp_path):
    from datamatters.tasks.compare import find_runs

    with pytest.raises(UserError, match=f"no finished runs .* under .*{tmp_path.name}/nothing"):
        find_runs([f"{tmp_path}/nothing"])
