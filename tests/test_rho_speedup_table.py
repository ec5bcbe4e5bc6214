"""benchmarks/rho_speedup_table.py: the speed-up benchmark's goals (met / missed at the issue's thresholds) and its
README block, on hand-made summaries."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tab():
    spec = importlib.util.spec_from_file_location("rho_speedup_table", ROOT / "benchmarks" / "rho_speedup_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(label, baseline="uniform", sp_steps=1.0, sp_secs_il=1.0, sp_cpu_il=1.0, final_acc=0.6, secs=10.0, cpu=5.0,
        reached=3):
    r = {"label": label, "baseline": baseline, "seeds": 3, "reached": reached, "final_acc": final_acc,
         "corrupted_frac": 0.05, "overhead": 0.3, "train_s_total": secs, "train_cpu_s_total": cpu}
    for k, v in (("sp_steps", sp_steps), ("sp_secs", 1.0), ("sp_secs_il", sp_secs_il), ("sp_cpu", 1.0),
                 ("sp_cpu_il", sp_cpu_il)):
        r.update({k: v, f"{k}_lo": v - 0.1 if v == v else v, f"{k}_hi": v + 0.1 if v == v else v})
    return r


def cell(rho_steps=3.2, rho_il=1.6, ib_acc=0.596, ib_secs=6.9, ib_cpu=3.4):
    return [row("uniform"), row("reducible_loss", sp_steps=rho_steps, sp_secs_il=rho_il, sp_cpu_il=rho_il),
            row("full_data", final_acc=0.600), row("infobatch", final_acc=ib_acc, secs=ib_secs, cpu=ib_cpu),
            row("reducible_loss", baseline="uniform_lr_decay", sp_steps=2.0)]


def test_goals_met_at_the_thresholds(tab):
    g = tab.goals({"mnist1d:uniform:0.1": cell(), "mnist1d:uniform:0.2": cell()})
    assert g["rho_steps_speedup_mnist1d_10pct >= 3"]["met"]
    assert g["rho_steps_speedup_mnist1d_10pct >= 3"]["measured"] == 3.2  # against uniform, not the lr-decay baseline
    assert g["rho_wallclock_with_il_mnist1d:uniform:0.2 >= 1.5"]["met"]
    ib = g["infobatch_mnist1d:uniform:0.1: acc within 0.5 pt of full data at >= 30% less time"]
    assert ib["met"] and ib["acc_drop_points"] == pytest.approx(0.4) and ib["time_saved"] == pytest.approx(0.31)
    assert ib["met_in_cpu_seconds"] and ib["cpu_time_saved"] == pytest.approx(0.32)


@pytest.mark.parametrize("kw, key", [
    (dict(rho_steps=2.9), "rho_steps_speedup_mnist1d_10pct >= 3"),
    (dict(rho_steps=float("nan")), "rho_steps_speedup_mnist1d_10pct >= 3"),  # never reached the target
    (dict(rho_il=1.4), "rho_wallclock_with_il_mnist1d:uniform:0.2 >= 1.5"),
    (dict(ib_acc=0.594), "infobatch_mnist1d:uniform:0.2: acc within 0.5 pt of full data at >= 30% less time"),
    (dict(ib_secs=7.1), "infobatch_mnist1d:uniform:0.2: acc within 0.5 pt of full data at >= 30% less time"),
])
def test_goals_missed_just_past_the_thresholds(tab, kw, key):
    g = tab.goals({"mnist1d:uniform:0.1": cell(**kw), "mnist1d:uniform:0.2": cell(**kw)})
    assert not g[key]["met"]


def test_a_time_goal_needs_both_clocks(tab):
    """Wall-clock on a loaded machine once passed goals that process CPU time missed (and could do the reverse)."""
    c = cell()
    next(r for r in c if r["label"] == "reducible_loss")["sp_cpu_il"] = 1.42  # wall 1.6x, CPU 1.42x
    next(r for r in c if r["label"] == "infobatch")["train_cpu_s_total"] = 3.6  # wall 31% saved, CPU 28%
    g = tab.goals({"mnist1d:uniform:0.2": c})
    rho = g["rho_wallclock_with_il_mnist1d:uniform:0.2 >= 1.5"]
    assert rho["met_in_wall_clock"] and not rho["met_in_cpu_seconds"] and not rho["met"]
    ib = g["infobatch_mnist1d:uniform:0.2: acc within 0.5 pt of full data at >= 30% less time"]
    assert ib["met_in_wall_clock"] and not ib["met_in_cpu_seconds"] and not ib["met"]


def test_markdown_shows_ci_na_and_misses(tab):
    summary = {"mnist1d:uniform:0.1": cell(rho_steps=float("nan"))}
    md = tab.markdown({"summary": summary, "goals": tab.goals(summary), "setup": {"n_B": 320}, "reps": 3,
                       "reduced": "mnist1d only"})
    line = next(x for x in md.splitlines() if x.startswith("| mnist1d:uniform:0.1 | reducible_loss |"))
    assert "| n/a | 2.00 [1.90, 2.10] |" in line  # no speed-up vs uniform (never reached), 2x vs the lr-decay one
    assert "**missed**" in md and "Reduced run: mnist1d only" in md
    assert md.count("| mnist1d:uniform:0.1 |") == 4  # one row per method against uniform


def test_infobatch_goal_compares_only_the_seeds_both_sides_ran(tab):
    """InfoBatch's rows once averaged seeds 0-1 against full data / uniform over seeds 0-4 (other load, other seeds)."""
    def run(method, seed, acc, secs, cpu=None):
        return {"method": method, "seed": seed, "final_acc": acc, "train_s": secs, "train_cpu_s": cpu or secs / 2}

    runs = [run("infobatch", 0, 0.60, 6.0), run("infobatch", 1, 0.58, 8.0),
            run("full_data", 0, 0.61, 10.0), run("full_data", 1, 0.59, 10.0), run("full_data", 2, 0.40, 100.0),
            run("uniform", 1, 0.57, 4.0), run("uniform", 3, 0.70, 1.0)]
    p = tab.paired(runs, "infobatch", "full_data")
    assert p["seeds"] == [0, 1] and p["acc_drop_points"] == pytest.approx(1.0)
    assert p["time_saved"] == pytest.approx(1 - (0.6 + 0.8) / 2) and p["cpu_time_saved"] == pytest.approx(0.3)
    u = tab.paired(runs, "infobatch", "uniform")
    assert u["seeds"] == [1] and u["acc_drop_points"] == pytest.approx(-1.0) and u["time_saved"] == pytest.approx(-1.0)
    assert tab.paired(runs, "infobatch", "ce_loss") is None

    c = cell()  # row means say: met (0.4 points, 31% less time); the paired seeds say: missed (1.0 points)
    next(r for r in c if r["label"] == "infobatch")["paired"] = {"full_data": p, "uniform": u}
    g = tab.goals({"mnist1d:uniform:0.2": c})["infobatch_mnist1d:uniform:0.2: acc within 0.5 pt of full data at >= 30% less time"]
    assert g["seeds"] == [0, 1] and g["acc_drop_points"] == pytest.approx(1.0) and not g["met"]
    assert g["vs_uniform_selecting_32_of_320"]["seeds"] == [1] and "unpaired" not in g


def test_merge_replaces_a_rerun_and_adds_the_il_data_cost(tmp_path, monkeypatch):
    """--merge of the committed JSON with a re-run of some methods: the re-run's (cell, method, seed) runs replace the
    old ones, the other methods stay, and the IL's data building is added back in sp_cpu_il_with_data."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("rho_speedup", ROOT / "benchmarks" / "rho_speedup.py")
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)

    def run(method, rows, il=None, data=None, seed=0):
        curve = [dict(epoch=e, step=10 * (e + 1), train_s=t, train_cpu_s=t, test_acc=a)
                 for e, (t, a) in enumerate(rows)]
        return {"cell": "c", "method": method, "seed": seed, "curve": curve, "il_s": il, "il_cpu_s": il,
                "il_data_cpu_s": data, "final_acc": rows[-1][1], "corrupted_frac": 0.1, "overhead": 0.3,
                "train_s": rows[-1][0], "train_cpu_s": rows[-1][0]}

    old = {"runs": [run("uniform", [(1.0, 0.5), (2.0, 0.6)]), run("ce_loss", [(3.0, 0.6)]),
                    run("reducible_loss_small_il", [(0.5, 0.6)], il=1.0)],
           "il": {}, "il_small": {"c:0": {"il_cpu_s": 1.0}}, "cells_requested": ["c"], "setup": {}}
    new = {"runs": [run("uniform", [(1.0, 0.5), (2.0, 0.6)]),
                    run("reducible_loss_small_il", [(0.4, 0.6)], il=0.3, data=0.3)],
           "il": {}, "il_small": {"c:0": {"il_cpu_s": 0.3}}, "cells_requested": ["c"], "setup": {}}
    paths = []
    for name, d in (("old", old), ("new", new)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(d))
    rs.merge([str(p) for p in paths], tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert sorted(r["method"] for r in out["runs"]) == ["ce_loss", "reducible_loss_small_il", "uniform"]
    assert out["il_small"]["c:0"]["il_cpu_s"] == 0.3
    row = next(r for r in out["summary"]["c"] if r["baseline"] == "uniform" and r["label"] == "reducible_loss_small_il")
    assert row["sp_cpu_il"] == pytest.approx(2.0 / 0.7) and row["sp_cpu_il_with_data"] == pytest.approx(2.0 / 1.0)
    assert row["il_data_cpu_s"] == pytest.approx(0.3)
    ce = next(r for r in out["summary"]["c"] if r["baseline"] == "uniform" and r["label"] == "ce_loss")
    assert ce["sp_cpu"] == pytest.approx(2.0 / 3.0) and "sp_cpu_il_with_data" not in ce


def test_small_il_lean_fit_gives_the_lightning_fits_il_table(monkeypatch):
    """The benchmark's small IL model trained by the lean loop and by Lightning (digits at 20% noise, seed 0): the same
    best and last epoch and the same IL values (so the variant's runs differ only in the IL cost)."""
    import argparse

    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("rho_speedup", ROOT / "benchmarks" / "rho_speedup.py")
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)
    args = argparse.Namespace(data_dir="data", small_il_epochs=30, small_il_batch=1024, small_il_lr=5e-2,
                              small_il_patience=2, il_fit="lightning")
    got = {how: rs.irreducible_losses(("digits", "uniform", 0.2), 0, argparse.Namespace(**vars(args), small_il_fit=how),
                                      small=True) for how in ("lightning", "lean")}
    (tab_l, _, info_l), (tab, _, info) = got["lightning"], got["lean"]
    assert (info["il_fit"], info_l["il_fit"]) == ("lean", "lightning")
    assert (info["il_best_epoch"], info["il_epochs_trained"]) == (info_l["il_best_epoch"], info_l["il_epochs_trained"])
    assert info["il_best_epoch"] < info["il_epochs_trained"] - 1 < 29  # early stopping ended both before epoch 30
    assert info["il_val_loss"] == pytest.approx(info_l["il_val_loss"], rel=1e-6)
    known = ~np.isnan(tab_l.table.numpy())
    np.testing.assert_allclose(tab.table.numpy()[known], tab_l.table.numpy()[known], rtol=1e-6)
    assert np.isnan(tab.table.numpy()[~known]).all()
