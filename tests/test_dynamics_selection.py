"""The training map of data selection: the per-method reading of one HMM's Viterbi paths on hand-made sequences
(exact answers), the stacked selective trainer against a plain one-seed loop, and the job end to end in miniature."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import run_job
from datamatters.dynamics import selection_map as sm
from datamatters.dynamics.stacked_selection import _SELECT_SALT, StackedSelection
from datamatters.dynamics.stats import FEATURES
from datamatters.errors import UserError
from datamatters.models import build_model

STEPS = np.array([0, 10, 20, 30, 40])
U = [np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 2])]       # through state 1
R = [np.array([0, 0, 0, 2, 2]), np.array([0, 2, 0, 2, 2])]       # never state 1; the second run re-enters state 2


def test_method_map_on_hand_made_paths():
    u = sm.method_map(U, [STEPS, STEPS], 3)
    assert u["occupancy"] == pytest.approx([0.3, 0.4, 0.3])
    assert u["pair_counts"] == [[1, 2, 0], [0, 2, 2], [0, 0, 1]]
    assert u["transmat"] == [pytest.approx([1 / 3, 2 / 3, 0]), [0, 0.5, 0.5], [0, 0, 1]]
    assert u["switches"] == [[0, 2, 0], [0, 0, 2], [0, 0, 0]]
    assert u["visited_runs"] == [2, 2, 2] and u["final_state_runs"] == [0, 0, 2]
    c = u["convergence_step"]
    assert c["per_run"] == [40, 30] and (c["mean"], c["median"], c["min"], c["max"]) == (35, 35, 30, 40)
    assert c["std"] == pytest.approx(np.sqrt(50))
    r = sm.method_map(R, [STEPS, STEPS], 3)
    assert r["occupancy"] == pytest.approx([0.5, 0.0, 0.5])
    assert r["transmat"] == [[0.4, 0, 0.6], [None, None, None], pytest.approx([1 / 3, 0, 2 / 3])]
    assert r["visited_runs"] == [2, 0, 2]
    assert r["convergence_step"]["per_run"] == [30, 30]  # the re-entry at step 30 counts, not the first visit at 10


def test_compare_finds_the_skipped_state_and_exact_statistics():
    maps = {"u": sm.method_map(U, [STEPS] * 2, 3), "r": sm.method_map(R, [STEPS] * 2, 3)}
    c = sm.compare("u", "r", maps, {"u": U, "r": R}, 3, n_perm=100)
    assert c["skipped_states"] == [1] and c["added_states"] == []
    assert c["occupancy_tv"] == pytest.approx(0.4)  # (|0.3-0.5| + |0.4-0| + |0.3-0.5|) / 2
    assert c["visit_fisher_p"] == pytest.approx([1.0, 1 / 3, 1.0])  # [[2, 0], [0, 2]]: 1/6 + 1/6
    assert c["convergence_step_diff_mean"] == -5
    back = sm.compare("r", "u", maps, {"u": U, "r": R}, 3, n_perm=100)
    assert back["skipped_states"] == [] and back["added_states"] == [1]


def test_markdown_shows_the_maps_numbers():
    maps = {"u": sm.method_map(U, [STEPS] * 2, 3), "r": sm.method_map(R, [STEPS] * 2, 3)}
    d = {"methods": maps, "setting": {"methods": ["u", "r"], "description": "toy"}, "state_order": [0, 1, 2],
         "hmm": {"k": 3, "k_bic": 2, "k_max": 4, "covariance_type": "full", "restarts": 1, "normalize": "global",
                 "n_runs": 4, "n_test_runs": 1, "test_ll_per_sample": 1.0},
         "comparisons": [sm.compare("u", "r", maps, {"u": U, "r": R}, 3, n_perm=10)]}
    md = sm.markdown(d)
    assert "| 1 | 40.0%, 2/2 | 0.0%, 0/2 |" in md
    assert "| u | 2 | 35 (35, 30–40) | 2: 2 | n/a | n/a | n/a | n/a |" in md
    assert "| 0 | 0.33 / 0.40 | 0.67 / 0.00 | 0.00 / 0.60 |" in md
    assert "| 1 |  | 0.50 / n/a | 0.50 / n/a |" in md and "| 2 | 0.00 / 0.33 |  | 1.00 / 0.67 |" in md
    assert "states skipped (visited by u runs only): 1; added (visited by r runs only): none" in md
    assert "K=3 set; BIC chose 2" in md and "total-variation distance 0.400" in md


def test_permutation_p_separates_only_different_groups():
    same = [np.array([0, 1, 1])] * 6
    assert sm.occupancy_tv(same, same, 2) == 0 and sm.permutation_p(same, same, 2, n_perm=50) == 1.0
    a, b = [np.zeros(4, int)] * 10, [np.ones(4, int)] * 10
    # TV 1 is reached only by the 2 of C(20, 10) = 184,756 shuffles that keep the groups (1 of these 200 draws)
    assert sm.permutation_p(a, b, 2, n_perm=200, seed=0) == pytest.approx(2 / 201)
    mixed = [np.zeros(4, int)] * 5 + [np.ones(4, int)] * 5  # half of each group in each state: TV 0, p = 1
    assert sm.permutation_p(mixed, mixed[::-1], 2, n_perm=50) == 1.0


def test_first_visit_order_and_state_fractions():
    assert sm.first_visit_order([np.array([2, 2, 0, 1])], [np.arange(4)], 4) == [2, 0, 1, 3]  # 3 never visited
    grid, frac = sm.state_fractions(U, [STEPS, STEPS], 3)
    assert grid.tolist() == STEPS.tolist()
    assert frac.tolist() == [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]]
    with pytest.raises(ValueError, match="states must be in 0..1"):
        sm.method_map([np.array([0, 2])], [np.arange(2)], 2)


# ---- the stacked selective trainer -----------------------------------------------------------------------------
def _data(n=50, d=6, c=3):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    corrupted = torch.arange(n) % 5 == 0
    il = torch.where(corrupted, 1e3, torch.rand(n, generator=g))  # corrupted points: never worth training on
    return X, y, il, corrupted


def _make(seed):
    return build_model("mlp", (6,), 3, hidden=[8])


def _opt(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _reference(seed, method, X, y, il, epochs, big=16, frac=0.25):
    """One seed, plain PyTorch: the model under manual_seed(seed), its own shuffles, top-k / uniform draws."""
    torch.manual_seed(seed)
    model = _make(seed)
    opt = _opt(model.parameters())
    order, draws = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + _SELECT_SALT)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=order)
        for b in range(0, len(X), big):
            pos = perm[b:b + big]
            k = max(1, int(frac * len(pos)))
            if method == "uniform":
                keep = pos[torch.randperm(len(pos), generator=draws)[:k]]
            else:
                with torch.no_grad():
                    score = F.cross_entropy(model(X[pos]), y[pos], reduction="none") - il[pos]
                keep = pos[np.argsort(-score.numpy(), kind="stable")[:k]]
            opt.zero_grad()
            F.cross_entropy(model(X[keep]), y[keep]).backward()
            opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["uniform", "reducible_loss"])
def test_stacked_selection_equals_one_seed_at_a_time(method):
    X, y, il, corrupted = _data()
    st = StackedSelection(_make, [3, 1, 7], X, y, method=method, optimizer=_opt, percent_train=0.25, big_batch=16,
                          il=il, corrupted=corrupted)
    rows = st.train(epochs=2, record_every=4)
    assert st.step_count == 8  # 4 big batches per epoch (16, 16, 16, 2)
    for i, s in enumerate([3, 1, 7]):
        ref = _reference(s, method, X, y, il, epochs=2)
        for name, p in st.member(i).items():
            torch.testing.assert_close(p, ref[name], atol=2e-6, rtol=1e-5)
        assert [r["step"] for r in rows[s]] == [1, 4, 8]
        assert np.isfinite([[r[f] for f in FEATURES] for r in rows[s]]).all()
    # the rule's choice is visible: RHO-LOSS never trains on the corrupted points whose IL is huge, uniform does
    frac = float((st.total_corrupted / st.total_seen).mean())
    assert frac == 0 if method == "reducible_loss" else frac > 0.1


def test_stacked_selection_refuses_what_it_cannot_stack():
    X, y, il, _ = _data()
    with pytest.raises(UserError, match="needs irreducible losses"):
        StackedSelection(_make, [0, 1], X, y, method="reducible_loss", optimizer=_opt)
    with pytest.raises(UserError, match="MC dropout"):
        StackedSelection(_make, [0, 1], X, y, method="bald", optimizer=_opt)
    with pytest.raises(UserError, match="batch norm"):
        StackedSelection(lambda s: torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4),
                                                       torch.nn.Linear(4, 3)), [0, 1], X, y, method="uniform",
                         optimizer=_opt)
    with pytest.raises(UserError, match="distinct"):
        StackedSelection(_make, [0, 0], X, y, method="uniform", optimizer=_opt)


# ---- the job -------------------------------------------------------------------------------------------------------
def test_selection_map_job_in_miniature(tmp_path, monkeypatch):
    """`+debug=fast`: 3 seeds x 2 methods, the IL model on one batch; every output exists and agrees with the
    per-checkpoint states it was computed from. A rerun in the same directory with another K reuses the runs."""
    s = run_job(tmp_path, ["+experiment=dynamics_selection", "+debug=fast"])
    run = Path(s["run_dir"])
    tables = sorted(run.glob("runs/*/seed*/weight_stats.parquet"))
    assert [str(p.relative_to(run / "runs").parent) for p in tables] == [
        "reducible_loss/seed0", "reducible_loss/seed1", "reducible_loss/seed2", "uniform/seed0", "uniform/seed1",
        "uniform/seed2"]
    d = json.loads((run / "selection_map.json").read_text())
    k = d["hmm"]["k"]
    assert d["hmm"]["n_runs"] == 6 and 1 <= k <= 2 and sorted(d["state_order"]) == list(range(k))
    paths = pd.read_parquet(run / "state_paths.parquet")
    for m in ("uniform", "reducible_loss"):
        mm = d["methods"][m]
        assert mm["n_runs"] == 3 and len(mm["convergence_step"]["per_run"]) == 3
        assert sum(mm["occupancy"]) == pytest.approx(1) and sum(mm["final_state_runs"]) == 3
        assert all(sum(r) == pytest.approx(1) for r in mm["transmat"] if r[0] is not None)
        mine = paths[paths["run"].str.contains(f"/runs/{m}/")]
        assert mm["n_checkpoints"] == len(mine) == 3 * len(pd.read_parquet(tables[0]))
        assert mm["occupancy"] == pytest.approx(np.bincount(mine["state"], minlength=k) / len(mine))
        assert s[f"map/{m}/test_acc_mean"] == mm["test_acc"]["mean"] and mm["steps_per_run"] == 2
        last = [g.sort_values("step")["train_loss"].iloc[-1] for _, g in mine.groupby("run")]
        assert mm["final_train_loss"]["mean"] == pytest.approx(np.mean(last))
    # uniform's draws depend only on the seeds: 25 corrupted of the 171 points it trained on; RHO-LOSS avoids them
    frac = {m: d["methods"][m]["selected_corrupted_frac"] for m in ("uniform", "reducible_loss")}
    assert frac["uniform"] == pytest.approx(25 / 171, abs=1e-6) and frac["reducible_loss"] < 0.5 * frac["uniform"]
    c = d["comparisons"][0]
    assert (c["reference"], c["method"]) == ("uniform", "reducible_loss") and 0 < c["occupancy_tv_p"] <= 1
    assert s["map/occupancy_tv"] == pytest.approx(c["occupancy_tv"])
    assert len(pd.read_csv(run / "selection_map.csv")) == 2 * k
    assert (run / "selection_map.png").stat().st_size > 5000
    assert (run / "selection_map.md").read_text().strip() == sm.markdown(d)
    assert s["time/wall_clock_s"] < 20, s  # ~9 s here

    import datamatters.tasks.dynamics_selection as job

    def no_training(*args):
        raise AssertionError("the finished runs should have been reused")

    monkeypatch.setattr(job, "train_method", no_training)
    again = run_job(tmp_path, ["+experiment=dynamics_selection", "+debug=fast", "dynamics.k=1"])
    d1 = json.loads((run / "selection_map.json").read_text())
    assert again["hmm/k"] == 1 and d1["hmm"]["k"] == 1 and d1["methods"]["uniform"]["occupancy"] == [1.0]
    assert d1["methods"]["uniform"]["test_acc"] == d["methods"]["uniform"]["test_acc"]  # carried from the first run


def test_selection_map_job_refuses_bad_task(tmp_path):
    base = ["+experiment=dynamics_selection", "+debug=fast", "logger.wandb.enabled=false"]
    from datamatters.tasks.dynamics_selection import run
    from conftest import compose_cfg

    with pytest.raises(UserError, match="2 distinct selection methods"):
        run(compose_cfg([*base, "task.methods=[uniform]"]))
    with pytest.raises(UserError, match="at least 2 seeds"):
        run(compose_cfg([*base, "task.debug.task.seeds=[0]"]))
    with pytest.raises(UserError, match="unknown selection method"):
        run(compose_cfg([*base, "task.methods=[uniform,nope]"]))
