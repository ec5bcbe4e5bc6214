"""Stacked-seed modular addition (torch.func over stacked parameters, one AdamW over the stacks) equals training the
seeds one by one with a plain model and torch.optim.AdamW, on the same initialisations, splits and minibatches."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from datamatters.dynamics.stacked import StackedSeeds, batch_indices, seed_model, seed_split
from datamatters.dynamics.stats import FEATURES, weight_statistics

SIZE = dict(p=23, frac=0.3, d_model=16, num_heads=2, d_mlp=32)
OPT = dict(lr=3e-3, weight_decay=1.0, betas=(0.9, 0.98))


def one_by_one(seed, steps, batch_size=32, layernorm=False):
    model = seed_model(seed, SIZE["p"], SIZE["d_model"], SIZE["num_heads"], SIZE["d_mlp"], layernorm)
    Xtr, ytr, _, _ = seed_split(SIZE["p"], SIZE["frac"], seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    for _ in range(steps):
        idx = batch_indices(gen, len(Xtr), batch_size)
        opt.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
    return model


@pytest.mark.parametrize("layernorm", [False, True])
def test_stacked_seeds_equal_seed_by_seed_training(layernorm, tmp_path):
    steps = 6
    stacked = StackedSeeds([3, 7], batch_size=32, layernorm=layernorm, **SIZE, **OPT)
    rows = stacked.train(steps, record_every=3, out_root=tmp_path)
    for i, seed in enumerate([3, 7]):
        ref = one_by_one(seed, steps, layernorm=layernorm)
        init = seed_model(seed, SIZE["p"], SIZE["d_model"], SIZE["num_heads"], SIZE["d_mlp"], layernorm)
        for name, p in ref.named_parameters():
            got = stacked.params[name][i]
            torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)
            if "ln" not in name:  # trained: a step that did nothing would not pass
                assert not torch.allclose(got, dict(init.named_parameters())[name], atol=1e-4)
        want = weight_statistics(ref)
        assert [rows[seed][-1][f] for f in FEATURES] == pytest.approx([want[f] for f in FEATURES], rel=1e-5)
        table = pd.read_parquet(tmp_path / f"seed{seed}" / "weight_stats.parquet")
        assert table["step"].tolist() == [1, 3, 6] and (table["seed"] == seed).all()
        assert np.isfinite(table[list(FEATURES) + ["train_loss", "val_acc"]].to_numpy(float)).all()
    assert not torch.allclose(stacked.params["blocks.0.attn.W_Q"][0], stacked.params["blocks.0.attn.W_Q"][1])


def test_a_seed_does_not_depend_on_its_stack_mates():
    alone = StackedSeeds([7], batch_size=32, **SIZE, **OPT)
    pair = StackedSeeds([3, 7], batch_size=32, **SIZE, **OPT)
    for _ in range(3):
        alone.step()
        pair.step()
    for name, t in alone.params.items():
        torch.testing.assert_close(t[0], pair.params[name][1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_stacked_job_trains_all_seeds_then_analyses(tmp_path):
    from conftest import run_job

    out = run_job(tmp_path, ["+experiment=modular_addition_stacked", "task.seeds=[0,1,2]", "task.p=11",
                             "task.d_model=8", "task.d_mlp=16", "task.num_heads=2", "task.batch_size=16",
                             "task.steps=12", "task.record_every=3", "dynamics.k_max=2", "dynamics.restarts=1",
                             "dynamics.covariance_type=diag", "dynamics.n_jobs=1", "dynamics.test_fraction=0.34",
                             "logger.wandb.enabled=false"])
    tables = sorted((tmp_path / "run").rglob("runs/seed*/weight_stats.parquet"))
    assert len(tables) == 3 and pd.read_parquet(tables[0])["step"].tolist() == [1, 3, 6, 9, 12]
    assert out["hmm/n_runs"] == 3 and 1 <= out["hmm/k_bic"] <= 2 and out["train/seed_steps_per_s"] > 0
