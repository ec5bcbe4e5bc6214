"""Datamodel evaluation helpers: LDS on held-out models, the LDS curve, counterfactual removal, plots, trainers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamatters.datamodels import (BatchedSubsetTrainer, DatamodelFit, block_masks, counterfactual, evaluate_lds,
                                    lds_curve, plot_lds_curve, plot_top_examples)
from datamatters.errors import UserError
from datamatters.evaluation.metrics import spearman_per_column
from datamatters.training.subsets import subset_masks


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _linear(n=40, T=5, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, T)) * (rng.random((n, T)) < 0.3)
    return W.astype(np.float32), rng.normal(size=T).astype(np.float32)


def test_lds_is_spearman_of_mask_predictions():
    W, b = _linear()
    masks = subset_masks(40, 300, 0.5, seed=1)
    rng = np.random.default_rng(0)
    actual = masks @ W + b + 0.5 * rng.normal(size=(300, 5))
    res = evaluate_lds((W, b), masks, actual, n_boot=200)
    np.testing.assert_allclose(res["per_target"], spearman_per_column(masks @ W + b, actual))
    assert 0.5 < res["mean"] < 1 and res["ci_low"] <= res["mean"] <= res["ci_high"]
    shuffled = evaluate_lds((W, b), masks, actual[rng.permutation(300)], n_boot=200)
    assert abs(shuffled["mean"]) < 0.15  # no relation, no score
    with pytest.raises(UserError, match=r"held-out masks \(300, 30\) / outputs .* do not match datamodels W"):
        evaluate_lds((W, b), masks[:, :30], actual)


def test_lds_curve_improves_with_more_models():
    W, b = _linear(n=30, T=4, seed=2)
    masks = subset_masks(30, 1200, 0.5, seed=3)
    Y = masks @ W + b + np.random.default_rng(1).normal(size=(1200, 4))
    ev = subset_masks(30, 200, 0.5, seed=4)
    Yev = ev @ W + b + np.random.default_rng(2).normal(size=(200, 4))
    curve = lds_curve(masks, Y, range(1200), ev, Yev, [60, 1200], k=20)
    assert [c["n_models"] for c in curve] == [60, 1200]
    assert curve[1]["lds"] > curve[0]["lds"] > 0
    with pytest.raises(UserError, match="exceeds"):
        lds_curve(masks, Y, range(100), ev, Yev, [200])


def test_counterfactual_recovers_a_linear_ground_truth():
    W, b = _linear(n=50, T=6, seed=5)
    fit = DatamodelFit(W=W, b=b, lam=np.zeros(6), lam_index=np.zeros(6, int), val_mse=np.zeros(6),
                       nonzeros=(W != 0).sum(0))
    calls = []

    def train_fn(masks, ids):  # a "training" whose outputs are exactly linear in the mask
        calls.append(list(ids))
        return masks.astype(np.float64) @ W + b

    base = block_masks(50, 0.5, 0, range(100, 104))
    res = counterfactual(fit, train_fn, [0, 2, 5], base, list(range(100, 104)), k=3)
    for r in res["per_target"]:
        assert r["actual_drop"] == pytest.approx(r["predicted_drop"], abs=1e-5)
        assert r["predicted_drop"] > 0
    assert calls[0] == [100, 101, 102, 103] and calls[1] == [100, 101, 102, 103] * 3  # same seeds retrained
    assert res["pearson"] == pytest.approx(1.0, abs=1e-6)


def test_batched_trainer_rows_are_independent_of_blocks_and_offsets():
    from datamatters.data.digits import digits_arrays
    from datamatters.models import build_model

    X, y = digits_arrays()
    X, y = torch.from_numpy(X[:120]), torch.from_numpy(y[:120])
    kw = dict(epochs=2, batch_size=32, lr=0.05, alpha=0.5, seed=3, outputs=("masks", "margins", "logits", "loss"))
    tr = BatchedSubsetTrainer(build_model("logistic", (1, 8, 8), 10), X[:80], y[:80], X[80:], y[80:], **kw)
    whole = tr(list(range(6)))
    part = tr([4, 5])
    for k in whole:
        np.testing.assert_allclose(whole[k][4:], part[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(whole["masks"], subset_masks(80, 6, 0.5, seed=3))
    assert whole["logits"].shape == (6, 40, 10) and whole["loss"].shape == (6, 40)
    off = BatchedSubsetTrainer(build_model("logistic", (1, 8, 8), 10), X[:80], y[:80], X[80:], y[80:],
                               id_offset=4, **kw)([0, 1])
    np.testing.assert_allclose(off["margins"], whole["margins"][4:], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match=r"unknown outputs \['grads'\]"):
        BatchedSubsetTrainer(build_model("logistic", (1, 8, 8), 10), X, y, X, y, outputs=("masks", "grads"))


def test_plots_are_written(tmp_path):
    W, _ = _linear(n=20, T=3)
    imgs = np.random.default_rng(0).random((20, 1, 8, 8))
    p = plot_top_examples(W, imgs, imgs[:3], [0, 2], tmp_path / "top.png", k=3, train_y=np.arange(20) % 10,
                          target_y=np.arange(3))
    assert p.stat().st_size > 1000
    p1 = plot_top_examples(W, np.random.rand(20, 40), np.random.rand(3, 40), [1], tmp_path / "top1d.png", k=2)
    assert p1.is_file()
    c = plot_lds_curve([{"n_models": 100, "lds": 0.2, "ci_low": 0.1, "ci_high": 0.3},
                        {"n_models": 1000, "lds": 0.5, "ci_low": 0.45, "ci_high": 0.55}], tmp_path / "c.png")
    assert c.stat().st_size > 1000
