"""Subset masks and batched ensemble training: the batched path must equal plain sequential training."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamatters.data.digits import digits_arrays
from datamatters.errors import UserError
from datamatters.models import build_model
from datamatters.training.ensemble import (
    epoch_order,
    init_params,
    losses,
    margins,
    predict_ensemble,
    train_ensemble,
)
from datamatters.training.subsets import subset_masks


@pytest.fixture(autouse=True)
def one_thread():
    """Small vectorised ops: one thread avoids thread-pool wake-ups that dominate on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    X, y = digits_arrays()
    return torch.from_numpy(X[:240]), torch.from_numpy(y[:240])


# ---- masks -----------------------------------------------------------------------------------------------------
def test_masks_rows_depend_only_on_seed_and_index():
    full = subset_masks(100, 20, 0.5, seed=3)
    assert full.dtype == bool and full.shape == (20, 100)
    np.testing.assert_array_equal(subset_masks(100, 5, 0.5, seed=3, start=7), full[7:12])
    assert not np.array_equal(subset_masks(100, 20, 0.5, seed=4), full)
    assert len({r.tobytes() for r in full}) == 20


def test_mask_modes():
    fixed = subset_masks(101, 30, 0.3, seed=0, mode="fixed")
    assert (fixed.sum(1) == round(0.3 * 101)).all()
    bern = subset_masks(400, 200, 0.25, seed=0)
    assert abs(bern.mean() - 0.25) < 0.01 and bern.sum(1).std() > 1  # sizes vary in Bernoulli mode


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=1.5), dict(mode="poisson"), dict(n=0), dict(start=-1)])
def test_masks_reject_bad_input(kw):
    args = dict(n=10, num_models=2, alpha=0.5, seed=0) | kw
    with pytest.raises(UserError):
        subset_masks(**args)


# ---- batched training == sequential training -------------------------------------------------------------------
def _sequential(model, X, y, masks, seed, ids, epochs, bs, make_opt):
    """Plain torch training of each model alone, same init and minibatch order as the batched path."""
    init = init_params(model, seed, ids)
    out = []
    for m, mid in enumerate(ids):
        net = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(init[k][m])
        opt = make_opt(net.parameters())
        for ep in range(epochs):
            order, counts = epoch_order(masks[m:m + 1], seed, [mid], ep)
            seq = order[0, :counts[0]]
            assert set(seq.tolist()) == set(torch.nonzero(masks[m]).flatten().tolist())
            for b in range(0, len(seq), bs):
                ib = seq[b:b + bs]
                opt.zero_grad()
                F.cross_entropy(net(X[ib]), y[ib]).backward()
                opt.step()
        out.append({k: p.detach().clone() for k, p in net.named_parameters()})
    return out


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batched_equals_sequential(digits, optimizer):
    X, y = digits
    masks = torch.from_numpy(subset_masks(len(y), 5, 0.5, seed=1))
    masks[4] = False
    masks[4, :20] = True  # a much smaller subset: this model sits out most steps of each epoch
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16])
    kw = dict(epochs=3, batch_size=32, lr=0.05 if optimizer == "sgd" else 0.01, weight_decay=1e-3, seed=2)
    if optimizer == "sgd":
        make = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
        kw["momentum"] = 0.9
    else:
        make = lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)  # noqa: E731
    batched = train_ensemble(model, X, y, masks, optimizer=optimizer, **kw)
    seq = _sequential(model, X, y, masks, 2, list(range(5)), 3, 32, make)
    init = init_params(model, 2, range(5))
    for m in range(5):
        for k in batched:
            torch.testing.assert_close(batched[k][m], seq[m][k], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(batched[k][m], init[k][m])  # it did train


def test_small_cnn_batched_equals_sequential(digits):
    X, y = digits[0][:96], digits[1][:96]
    masks = torch.from_numpy(subset_masks(96, 2, 0.5, seed=0))
    model = build_model("cnn", (1, 8, 8), 10, channels=[4, 8])
    batched = train_ensemble(model, X, y, masks, epochs=1, batch_size=16, lr=0.01, seed=0)
    seq = _sequential(model, X, y, masks, 0, [0, 1], 1, 16, lambda ps: torch.optim.Adam(ps, lr=0.01))
    for m in range(2):
        for k in batched:
            torch.testing.assert_close(batched[k][m], seq[m][k], rtol=1e-4, atol=1e-5)


def test_chunking_and_model_ids_do_not_change_models(digits):
    X, y = digits
    masks = torch.from_numpy(subset_masks(len(y), 6, 0.5, seed=0))
    model = build_model("logistic", (1, 8, 8), 10)
    kw = dict(epochs=2, batch_size=50, lr=0.02, seed=5)
    whole = train_ensemble(model, X, y, masks, **kw)
    chunked = train_ensemble(model, X, y, masks, chunk=4, **kw)
    tail = train_ensemble(model, X, y, masks[3:], model_ids=[3, 4, 5], **kw)
    for k in whole:
        torch.testing.assert_close(whole[k], chunked[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(whole[k][3:], tail[k], rtol=0, atol=1e-6)
    assert not torch.allclose(whole["net.1.weight"][0], whole["net.1.weight"][1])  # independent inits


def test_predict_margins_losses(digits):
    X, y = digits
    model = build_model("mlp", (1, 8, 8), 10, hidden=[8])
    params = init_params(model, 0, range(3))
    logits = predict_ensemble(model, params, X[:50], chunk=2)
    assert logits.shape == (3, 50, 10)
    for m in range(3):
        net = copy.deepcopy(model)
        net.load_state_dict({k: v[m] for k, v in params.items()})
        torch.testing.assert_close(logits[m], net(X[:50]).detach(), rtol=1e-5, atol=1e-6)
    mg = margins(logits, y[:50])
    srt = logits.clone()
    for m in range(3):
        for i in range(50):
            others = torch.cat([srt[m, i, :y[i]], srt[m, i, y[i] + 1:]])
            assert abs(mg[m, i] - (srt[m, i, y[i]] - others.max())) < 1e-6
    torch.testing.assert_close(losses(logits, y[:50])[1], F.cross_entropy(logits[1], y[:50], reduction="none"))


def test_bad_inputs_are_user_errors(digits):
    X, y = digits
    model = build_model("logistic", (1, 8, 8), 10)
    masks = torch.ones(2, len(y), dtype=torch.bool)
    with pytest.raises(UserError, match="no training point"):
        train_ensemble(model, X, y, torch.zeros(2, len(y), dtype=torch.bool), epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(UserError, match="agree"):
        train_ensemble(model, X[:10], y, masks, epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(UserError, match="optimizer"):
        train_ensemble(model, X, y, masks, epochs=1, batch_size=8, lr=0.1, optimizer="lbfgs")
    bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8))
    with pytest.raises(UserError, match="batch norm"):
        train_ensemble(bn, X, y, masks, epochs=1, batch_size=8, lr=0.1)
