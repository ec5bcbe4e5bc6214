"""Weight statistics: the issue's unit values, agreement with a numpy brute force, which tensors are tracked, and the
models/data of the dynamics experiments."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from datamatters.dynamics.stats import (FEATURES, StatsComputer, distribution_stats, kernel_stats, matrix_stats,
                                        tracked_tensors, weight_statistics)
from datamatters.errors import UserError


def _np_matrix_stats(W):
    s = np.linalg.svd(W, compute_uv=False)
    spectral = s[0]
    s = np.where(s < 1e-5, 0, s)
    l1, l2, tr = np.abs(W).sum(), np.sqrt((W ** 2).sum()), np.trace(W)
    return {"l1": l1, "l2": l2, "trace": tr, "spectral": spectral, "code_sparsity": l1 / l2,
            "computational_sparsity": tr / spectral, "mean_singular_value": s.mean(),
            "var_singular_value": s.var(ddof=1) if len(s) > 1 else np.nan}


def test_issue_unit_values():
    st = {k: float(v) for k, v in matrix_stats(torch.diag(torch.tensor([3.0, 4.0]))).items()}
    assert st == pytest.approx({"l1": 7, "l2": 5, "trace": 7, "spectral": 4, "code_sparsity": 1.4,
                                "computational_sparsity": 1.75, "mean_singular_value": 3.5,
                                "var_singular_value": 0.5})
    for n in (1, 4, 9):
        st = {k: float(v) for k, v in matrix_stats(torch.eye(n)).items()}
        assert st["l1"] == n and st["l2"] == pytest.approx(math.sqrt(n)) and st["spectral"] == pytest.approx(1)
        assert st["var_singular_value"] == 0 or (n == 1 and math.isnan(st["var_singular_value"]))


@pytest.mark.parametrize("shape", [(5, 5), (7, 3), (3, 9), (1, 6), (4, 2, 6)])
def test_matrix_stats_match_numpy(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    got = matrix_stats(W)
    mats = W.reshape(-1, *shape[-2:]).numpy()
    for i, M in enumerate(mats):
        want = _np_matrix_stats(M)
        for k, v in want.items():
            val = got[k].reshape(-1)[i].item()
            assert (math.isnan(v) and math.isnan(val)) or val == pytest.approx(v, rel=1e-4, abs=1e-5), (shape, k)


def test_small_singular_values_are_zeroed_as_the_reference():
    W = torch.diag(torch.tensor([2.0, 1e-7, 0.0]))
    st = matrix_stats(W)
    assert float(st["mean_singular_value"]) == pytest.approx(2 / 3)
    assert float(st["var_singular_value"]) == pytest.approx(np.var([2, 0, 0], ddof=1))


def test_kernel_and_distribution_stats():
    W = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    k = W.reshape(18, 9).numpy()
    l1, l2 = np.abs(k).sum(1), np.sqrt((k ** 2).sum(1))
    got = kernel_stats(W)
    assert float(got["l1"]) == pytest.approx(l1.mean(), rel=1e-5)
    assert float(got["l2"]) == pytest.approx(l2.mean(), rel=1e-5)
    assert float(got["code_sparsity"]) == pytest.approx((l1 / l2).mean(), rel=1e-5)
    mean, var, med = distribution_stats(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert (float(mean), float(var), float(med)) == pytest.approx((4.0, np.var([1, 2, 3, 10], ddof=1), 2.0))


def test_transformer_tracks_qkv_per_head_and_skips_embeddings_and_layernorm():
    from datamatters.models import build_model

    m = build_model("transformer", (3,), 113, layernorm=True)
    names = {t.name: t.kind for t in tracked_tensors(m)}
    assert names == {"blocks.0.attn.W_K": "heads", "blocks.0.attn.W_Q": "heads", "blocks.0.attn.W_V": "heads",
                     "blocks.0.attn.W_O": "matrix", "blocks.0.mlp.W_in": "matrix", "blocks.0.mlp.W_out": "matrix",
                     "blocks.0.mlp.b_in": "bias", "blocks.0.mlp.b_out": "bias"}
    with_ln = {t.name for t in tracked_tensors(m, exclude_types=[])}
    assert "blocks.0.ln1.bias" in with_ln
    only = {t.name for t in tracked_tensors(m, include=["*mlp*"])}
    assert only == {"blocks.0.mlp.W_in", "blocks.0.mlp.W_out", "blocks.0.mlp.b_in", "blocks.0.mlp.b_out"}
    # the checkpoint features: means over the 12 head matrices + W_O + W_in + W_out, pooled weights and biases
    st = weight_statistics(m)
    assert list(st) == list(FEATURES)
    a = m.blocks[0].attn
    mats = [*a.W_K.detach(), *a.W_Q.detach(), *a.W_V.detach(), a.W_O.detach(), m.blocks[0].mlp.W_in.detach(),
            m.blocks[0].mlp.W_out.detach()]
    per = [_np_matrix_stats(M.double().numpy()) for M in mats]
    for k in ("l1", "l2", "trace", "spectral", "var_singular_value"):
        assert st[k] == pytest.approx(np.mean([p[k] for p in per]), rel=1e-4)
    w = torch.cat([M.reshape(-1) for M in mats])
    assert st["mean_w"] == pytest.approx(float(w.mean()), abs=1e-7)
    assert st["median_w"] == pytest.approx(float(w.median()))
    assert st["var_b"] == pytest.approx(0.0)


def test_mha_splits_qkv_heads_and_single_row_variance_is_nan_aware():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    kinds = {t.name: (t.kind, tuple(t.get().shape)) for t in tracked_tensors(layer)}
    assert kinds["self_attn.in_proj_weight.q"] == ("heads", (4, 4, 16))
    assert kinds["self_attn.out_proj.weight"] == ("matrix", (16, 16))
    assert not any("norm" in n for n in kinds)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))  # the last weight has one singular value
    st = weight_statistics(mlp)
    assert math.isfinite(st["var_singular_value"])
    assert st["var_singular_value"] == pytest.approx(float(matrix_stats(mlp[0].weight)["var_singular_value"]))


def test_stats_of_explicit_params_and_no_weights_error():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sc = StatsComputer(m)
    other = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    assert sc(other)["mean_w"] == 1.0 and sc()["mean_w"] != 1.0
    with pytest.raises(UserError, match="no weight matrix"):
        StatsComputer(m, include=["nothing*"])


def test_conv_model_uses_kernel_stats():
    from datamatters.models import build_model

    m = build_model("resnet18", (3, 32, 32), 100, width=8)
    kinds = [t.kind for t in tracked_tensors(m, exclude=["*shortcut*"])]
    assert kinds.count("kernel") == 17 and kinds.count("matrix") == 1  # conv1 + 16 block convs, fc (as the reference)
    st = weight_statistics(m, exclude=["*shortcut*"])
    assert st["trace"] == pytest.approx(float(torch.trace(m.linear.weight.detach())), rel=1e-5)  # only fc has a trace


# ---- models and data of the experiments ----------------------------------------------------------------------------
def test_transformer_last_position_shortcut_is_exact():
    from datamatters.models import build_model

    for ln in (False, True):
        torch.manual_seed(0)
        m = build_model("transformer", (3,), 13, d_model=16, num_heads=2, layernorm=ln, num_layers=2)
        x = torch.randint(0, 13, (5, 3))
        h = m.embed[x] + m.pos_embed[:3]
        for b in m.blocks:
            h = b(h)
        assert torch.allclose(m(x), h[:, -1] @ m.unembed, atol=1e-5)


def test_ref_mlp_init_and_single_logit():
    from datamatters.models import build_model

    m = build_model("ref_mlp", (40,), 2, hidden=[1000], single_logit=True)
    assert m(torch.zeros(3, 40)).shape == (3, 1)
    lin = m.layers[1]
    assert torch.all(lin.bias == 0) and lin.weight.abs().max() <= math.sqrt(6 / (40 + 1000)) + 1e-6
    with pytest.raises(UserError, match="binary"):
        build_model("ref_mlp", (40,), 10, single_logit=True)


def test_modular_addition_and_sparse_parity_data():
    from datamatters.data.synthetic import ModularAdditionDataModule, SparseParityDataModule

    dm = ModularAdditionDataModule(p=11, seed=3)
    dm.setup()
    n = {s: len(dm.split_indices(s)) for s in ("train", "holdout", "val", "test")}
    assert n["train"] == round(0.3 * 121) and n["holdout"] == 0 and n["train"] + n["val"] + n["test"] == 121
    _, X, y = dm.dataset("train").tensors()
    assert torch.equal(y, (X[:, 0] + X[:, 1]) % 11) and torch.all(X[:, 2] == 11)
    dm2 = ModularAdditionDataModule(p=11, seed=3)
    dm2.setup()
    assert np.array_equal(dm.split_indices("train"), dm2.split_indices("train"))
    other = ModularAdditionDataModule(p=11, seed=4)
    other.setup()
    assert not np.array_equal(dm.split_indices("train"), other.split_indices("train"))
    sp = SparseParityDataModule(n_train=50, n_val=10, n_test=20, seed=1)
    sp.setup()
    _, X, y = sp.dataset("train").tensors()
    assert X.shape == (50, 40) and set(X.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y, (X[:, :3].prod(1) > 0).long())
    with pytest.raises(UserError):
        SparseParityDataModule(k=50)
    with pytest.raises(UserError):
        ModularAdditionDataModule(train_fraction=1.5)
