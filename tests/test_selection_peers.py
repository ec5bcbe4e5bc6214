"""InfoBatch and Selective Backprop: their defining behaviour on hand-made tensors, and one tiny job each on digits."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import run_job
from datamatters.errors import UserError
from datamatters.selection.infobatch import INITIAL_SCORE, InfoBatchSampler, InfoBatchState
from datamatters.selection.selective_backprop import LossHistory, SelectiveBackpropModule, SelectiveBackpropRule


def state_with(scores, num_epochs=10, **kw) -> InfoBatchState:
    st = InfoBatchState(np.arange(len(scores)) * 3 + 5, num_epochs, **kw)  # global indices != positions
    st.update(st.indices, torch.tensor(scores, dtype=torch.float32))
    return st


# ---- InfoBatch ----------------------------------------------------------------------------------------------------
def test_infobatch_prunes_only_below_mean_points_and_rescales_the_kept_ones():
    scores = [0.1, 0.2, 5.0, 6.0, 0.3, 4.0, 0.05, 0.15]   # mean 1.975: positions 0, 1, 4, 6, 7 are below
    low, high = {0, 1, 4, 6, 7}, {2, 3, 5}
    seen_low = set()
    for epoch in range(40):
        st = state_with(scores, prune_ratio=0.4)
        order = st.plan(0, torch.Generator().manual_seed(epoch)).tolist()
        assert len(order) == len(set(order))
        assert high <= set(order)                        # above-mean points are never pruned
        kept_low = set(order) & low
        assert len(kept_low) == int(0.6 * 5) == 3        # int((1 - r) * n_low), as the reference
        seen_low |= kept_low
        w = st.weights
        assert torch.allclose(w[sorted(kept_low)], torch.full((3,), 1 / 0.6))
        assert torch.equal(w[sorted(high)], torch.ones(3))
        assert torch.equal(st.weight_of(st.indices[sorted(kept_low)]), w[sorted(kept_low)])
    assert seen_low == low                               # the pruned ones are drawn at random


def test_infobatch_mean_is_over_all_scores_including_unseen_points():
    st = InfoBatchState(np.arange(4), 10)
    st.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))  # points 2, 3 keep the initial score 3.0
    assert INITIAL_SCORE == 3.0 and st.scores.mean() == pytest.approx(2.25)
    st.prune_ratio = 0.5
    order = st.plan(0, torch.Generator().manual_seed(0))
    # both seen points are below the mean over all four (2.25); over the seen ones only (1.5) just point 0 would be
    assert len(order) == 3 and {2, 3} <= set(order.tolist())
    assert sorted(st.weights.tolist()) == [1.0, 1.0, 1.0, 2.0]


def test_infobatch_first_epoch_is_full_because_all_scores_start_equal():
    st = InfoBatchState(np.arange(10), 10)
    assert len(st.plan(0, torch.Generator().manual_seed(0))) == 10 and torch.equal(st.weights, torch.ones(10))


@pytest.mark.parametrize("num_epochs, delta", [(10, 0.875), (8, 0.875), (16, 0.5), (3, 1.0), (5, 0.0)])
def test_infobatch_annealing_epoch_boundary_matches_the_reference(num_epochs, delta):
    st = state_with([0.1, 0.2, 5.0, 6.0], num_epochs=num_epochs, delta=delta)
    for epoch in range(num_epochs):
        reference_prunes = (epoch + 1) <= delta * num_epochs  # the reference's 1-based iteration counter
        order = st.plan(epoch, torch.Generator().manual_seed(epoch))
        assert st.prunes(epoch) == reference_prunes
        assert len(order) == (3 if reference_prunes else 4)
        if not reference_prunes:
            assert torch.equal(st.weights, torch.ones(4))  # full data, weight 1 after the boundary


def test_infobatch_keeps_the_expected_gradient():
    """E[sum over the epoch's plan of w_i * grad_i] = sum over all points of grad_i, for per-example gradients of a
    hand-made linear least-squares model; without the 1 / (1 - r) rescale the estimate is clearly biased. (Exactly
    unbiased when (1 - r) * n_below is an integer, as here; the reference rounds the kept count down otherwise.)"""
    g = torch.Generator().manual_seed(1)
    X, y, theta = torch.randn(12, 3, generator=g), torch.randn(12, generator=g), torch.randn(3, generator=g)
    grads = (X @ theta - y)[:, None] * X                    # per-example gradient of 0.5 * (x.theta - y)^2
    scores = 0.5 * (X @ theta - y) ** 2
    st = state_with(scores.tolist(), prune_ratio=0.5)
    n_low = int((scores < scores.mean()).sum())
    assert n_low % 2 == 0 and n_low >= 4                     # keep exactly half: inclusion probability exactly 1/2
    draws, unweighted = [], []
    for s in range(4000):
        pos = st.plan(0, torch.Generator().manual_seed(s))
        draws.append((st.weights[pos, None] * grads[pos]).sum(0))
        unweighted.append(grads[pos].sum(0))
    est, full = torch.stack(draws).mean(0), grads.sum(0)
    se = torch.stack(draws).std(0) / math.sqrt(len(draws))
    assert torch.all((est - full).abs() < 4 * se + 1e-6)
    bias = (torch.stack(unweighted).mean(0) - full).abs().max()
    assert bias > 10 * se.max()                              # the control: dropping the rescale is detectably biased


def test_infobatch_sampler_shards_one_plan_across_ranks_in_equal_batches():
    scores = [0.1, 0.2, 5.0, 6.0, 0.3, 4.0, 0.05, 0.15, 7.0]
    shards = []
    for rank in range(2):
        st = state_with(scores, prune_ratio=0.5)
        ds = list(range(len(scores)))
        s = InfoBatchSampler(ds, st, batch_size=2, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s) == 2 and [len(b) for b in batches] == [2, 1]
        shards.append([p for b in batches for p in b])
    plan = state_with(scores, prune_ratio=0.5).plan(1, torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist()
    assert len(plan) == 6 and sorted(shards[0] + shards[1]) == sorted(plan)  # 6 kept, none padded
    assert len(shards[0]) == len(shards[1])


@pytest.mark.parametrize("per_item", [False, True])
def test_infobatch_loader_yields_the_plan_on_both_data_paths(per_item):
    """In-memory data: whole batches by fancy indexing; other datasets (e.g. augmented images): per-item loading."""
    from datamatters.data.indexed import IndexedDataset, TensorBase, TensorIndexedDataset
    from datamatters.selection.infobatch import infobatch_loader

    base = TensorBase(torch.arange(40, dtype=torch.float32)[:, None], torch.arange(40) % 3)
    indices = np.arange(0, 40, 2)                                   # global indices 0, 2, ..., 38
    ds = (IndexedDataset if per_item else TensorIndexedDataset)(base, indices)
    st = InfoBatchState(indices, 10, prune_ratio=0.5)
    st.update(torch.as_tensor(indices), torch.as_tensor(indices, dtype=torch.float32))  # below mean: 0..18
    loader = infobatch_loader(ds, st, batch_size=4, seed=0)
    loader.sampler.set_epoch(1)
    batches = list(loader)
    g = torch.cat([b[0] for b in batches])
    assert [len(b[0]) for b in batches] == [4, 4, 4, 3] and len(set(g.tolist())) == 15   # 10 above + 5 of 10 below
    assert set(range(20, 40, 2)) <= set(g.tolist())
    assert torch.equal(torch.cat([b[1][:, 0] for b in batches]), g.float())              # x follows the index
    assert torch.equal(st.weight_of(g) == 2.0, g < 20)


def test_infobatch_bad_options_are_user_errors():
    with pytest.raises(UserError, match="prune_ratio must be in"):
        InfoBatchState(np.arange(3), 10, prune_ratio=1.0)
    with pytest.raises(UserError, match="delta must be in"):
        InfoBatchState(np.arange(3), 10, delta=1.5)
    st = InfoBatchState(np.arange(3), 10)
    with pytest.raises(UserError, match="non-finite training loss.*optimizer.lr"):
        st.update(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="outside the train split"):
        st.weight_of(torch.tensor([2, 7]))
    st = state_with([1.0, 2.0])                              # global indices 5 and 8
    with pytest.raises(ValueError, match="outside the train split"):
        st.weight_of(torch.tensor([5, 6]))


# ---- Selective Backprop -------------------------------------------------------------------------------------------
def test_loss_history_cdf_is_the_strict_percentile_of_the_last_losses():
    h = LossHistory(4)
    h.append(torch.tensor([9.0, 9.0, 1.0, 2.0]))
    h.append(torch.tensor([3.0, 4.0]))                      # the two 9.0s fall out of the window
    assert sorted(h.values().tolist()) == [1.0, 2.0, 3.0, 4.0]
    q = torch.tensor([0.5, 1.0, 3.0, 3.5, 10.0])
    expect = [stats.percentileofscore([1, 2, 3, 4], v, kind="strict") / 100 for v in q.tolist()]
    assert h.cdf(q).tolist() == pytest.approx(expect)


def test_selective_backprop_probability_is_percentile_to_the_beta_with_the_batch_in_the_history():
    rule = SelectiveBackpropRule(beta=3.0, history=1024)
    p = rule.probabilities(torch.tensor([4.0, 1.0, 3.0, 2.0]))  # empty history: the batch itself is the history
    assert p.tolist() == pytest.approx([0.75 ** 3, 0.0, 0.5 ** 3, 0.25 ** 3])
    p = rule.probabilities(torch.tensor([2.5]))                 # history {1, 2, 2.5, 3, 4}: 2 of 5 below
    assert p.tolist() == pytest.approx([0.4 ** 3])


def test_selective_backprop_keeps_each_example_with_its_probability():
    rule = SelectiveBackpropRule(beta=1.0, history=4)          # the window is always this batch: p fixed
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.Generator().manual_seed(0)
    kept = torch.zeros(4)
    n = 4000
    for _ in range(n):
        kept[rule(4, loss=loss, generator=g).idx] += 1
    assert kept[0] == 0                                         # the lowest loss is never backpropagated
    assert (kept / n).tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75], abs=0.03)


def test_selective_backprop_empty_selection_takes_no_step_and_bad_options_fail():
    m = SelectiveBackpropModule(torch.nn.Linear(2, 3), num_classes=3)
    from datamatters.selection.rules import Selection
    out = m._optimise(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), Selection(torch.zeros(0, dtype=torch.long)))
    assert float(out) == 0.0 and m.method == "selective_backprop"
    with pytest.raises(UserError, match="beta must be >= 0"):
        SelectiveBackpropRule(beta=-1)
    with pytest.raises(UserError, match="history must be >= 1"):
        SelectiveBackpropRule(history=0)


# ---- end to end on digits -----------------------------------------------------------------------------------------
def _curve(summary) -> list[dict]:
    with open(summary["artifacts"]["test_curve"]) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _tiny(sel):
    return [f"selection={sel}", "trainer.max_epochs=4", "trainer.enable_progress_bar=false",
            "logger.wandb.enabled=false", "eval.test_every_epoch=true"]


def test_infobatch_job_on_digits_prunes_then_trains_on_everything(tmp_path):
    s = run_job(tmp_path, _tiny("infobatch"))
    c = _curve(s)
    n_train = c[0]["examples_seen"]                              # epoch 0: all scores equal, nothing pruned
    per_epoch = np.diff([0] + [r["examples_seen"] for r in c])
    assert per_epoch[0] == n_train and per_epoch[3] == n_train  # floor(0.875 * 4) = 3: the last epoch is full
    assert 0.5 * n_train < per_epoch[1] < n_train and 0.5 * n_train < per_epoch[2] < n_train
    assert s["selection/method"] == "infobatch" and s["trainer/examples_seen"] == per_epoch.sum()
    assert s["test/acc"] > 0.3 and s["time/il_s"] is None
    assert all(r["train_s"] > 0 for r in c) and Path(s["run_dir"], "selected_indices.npy").is_file()


def test_infobatch_overhead_is_its_bookkeeping_not_logging(tmp_path, monkeypatch):
    """InfoBatch has no scoring pass: its overhead is the score update and the epoch plan (microseconds per step).
    Logging made slow (2 ms a call) must land in the step time, as in SelectiveModule; timed as overhead it gave
    InfoBatch a selection overhead of ~1.0 in the speed-up benchmark."""
    import time

    from datamatters.selection.infobatch import InfoBatchModule

    log = InfoBatchModule.log
    monkeypatch.setattr(InfoBatchModule, "log", lambda self, *a, **k: (time.sleep(0.002), log(self, *a, **k))[1])
    s = run_job(tmp_path, [*_tiny("infobatch"), "trainer.max_epochs=2", "data.batch_size=64", "eval.test_every_epoch=false"])
    steps = s["trainer/steps"]
    assert steps >= 20
    assert s["time/score_s"] < 0.5e-3 * steps, s["time/score_s"]  # 3 slow log calls a step would add 6 ms
    assert s["selection/overhead"] < 0.2


def test_selective_backprop_job_on_digits_primes_then_backprops_a_fraction(tmp_path):
    s = run_job(tmp_path, _tiny("selective_backprop"))
    c = _curve(s)
    per_epoch = np.diff([0] + [r["examples_seen"] for r in c])
    n_train = per_epoch[0]                                        # the primed first epoch trains on every example
    assert all(0.1 * n_train < k < 0.5 * n_train for k in per_epoch[1:])  # E[p] = 1 / (beta + 1) = 1/4
    assert s["selection/method"] == "selective_backprop" and s["test/acc"] > 0.3


@pytest.mark.slow
def test_infobatch_under_ddp_keeps_one_plan_across_ranks(tmp_path):
    """2 gloo ranks: the scores are all-gathered every step, so both ranks draw the same plan each epoch (a rank
    with a different plan would take a different number of steps and the job would hang or fail)."""
    from conftest import run_cli
    import json

    run_dir = tmp_path / "ddp"
    res = run_cli(["selection=infobatch", "trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=160",
                   "trainer.max_epochs=4", "eval.test_every_epoch=true", "trainer.enable_progress_bar=false",
                   "logger.wandb.enabled=false", f"hydra.run.dir={run_dir}"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    single = run_job(tmp_path / "single", _tiny("infobatch"))
    n_train = _curve(single)[0]["examples_seen"]
    # epochs 0 and 3 are full: 2 ranks x ceil(n / 2) points each; epochs 1 and 2 are pruned
    full = 2 * -(-n_train // 2)
    assert 2 * full + n_train < s["trainer/examples_seen"] < 4 * full
    assert s["test/acc"] > 0.3
