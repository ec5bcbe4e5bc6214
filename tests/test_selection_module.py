"""The selective module's contracts (issue 10): MC-dropout rules refuse a model without dropout, the on-the-fly IL
model lives outside the module tree, uniform takes no scoring pass, the overhead clock synchronises CUDA, per-rank
generators and step horizon, IL/SVP passes on the trainer's accelerator, and the diagnostics reach the CSV."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import compose_cfg, run_job
from datamatters.errors import UserError
from datamatters.selection import scoring
from datamatters.selection.module import SelectiveModule

QUIET = ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]


def _mlp(p: float | None = None) -> nn.Module:
    layers = [nn.Linear(4, 8), nn.ReLU()] + ([nn.Dropout(p)] if p is not None else []) + [nn.Linear(8, 3)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("method", ["bald", "conditional_entropy", "entropy"])
def test_mc_dropout_rules_refuse_a_model_without_active_dropout(method):
    for model in (_mlp(), _mlp(0.0)):
        with pytest.raises(UserError, match=f"selection.method={method} scores with MC dropout.*model.dropout=0.2"):
            SelectiveModule(model, num_classes=3, method=method)
    SelectiveModule(_mlp(0.2), num_classes=3, method=method)  # dropout active: accepted


def test_il_model_lives_outside_the_module_tree():
    il = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    m = SelectiveModule(_mlp(), num_classes=3, method="reducible_loss", il_model=il)
    il_params = {id(p) for p in il.parameters()}
    assert not il_params & {id(p) for p in m.parameters()}            # no optimiser / dynamics statistics
    assert not any(mod is il for mod in m.modules())                  # not seen by callbacks walking the module
    assert all(k.startswith(("model.", "metrics.")) for k in m.state_dict())  # not in checkpoints
    m.train()
    assert m.model.training and not il.training and not any(x.training for x in il.modules())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    bn_before = il[1].running_mean.clone()
    out = m.irreducible(torch.arange(6), x, y)
    assert torch.allclose(out, nn.functional.cross_entropy(il.eval()(x), y, reduction="none"))
    assert torch.equal(il[1].running_mean, bn_before)                # frozen: its BatchNorm never updates
    assert m.il_model is il


def test_synced_clock_synchronises_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    scoring.synced_clock(torch.device("cpu"))
    scoring.synced_clock(None)
    assert calls == []
    scoring.synced_clock(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_per_rank_generators_and_step_horizon():
    """setup() (before any checkpoint restore): rank r draws from its own stream; the step-wise temperature's horizon
    is this process's number of optimiser steps (Lightning's estimate, which counts per-rank batches under DDP)."""
    def draws(rank, steps=7):
        m = SelectiveModule(_mlp(), num_classes=3, method="uniform", seed=3)
        m._trainer = SimpleNamespace(global_rank=rank, estimated_stepping_batches=steps, world_size=2)
        m.setup("fit")
        return m.total_steps, torch.randperm(100, generator=m.generator)[:10].tolist()

    (h0, a0), (h1, a1) = draws(0), draws(1, steps=4)
    assert h0 == 7 and h1 == 4
    assert a0 != a1 and draws(1, 4)[1] == a1  # ranks differ, each is reproducible


def _csv(summary) -> pd.DataFrame:
    return pd.read_csv(Path(summary["run_dir"]) / "csv" / "metrics.csv")


def test_uniform_trains_without_a_scoring_pass(tmp_path, monkeypatch, tiny):
    from datamatters.selection import module as mod

    calls = []
    real = mod.score_batch
    monkeypatch.setattr(mod, "score_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = run_job(tmp_path / "u", [*tiny, "selection=uniform", "trainer.max_epochs=1"])
    assert calls == [] and s["trainer/steps"] == 2 and s["trainer/examples_seen"] == 62  # 32 + int(0.1 * 309)
    run_job(tmp_path / "ce", [*tiny, "selection=ce_loss", "trainer.max_epochs=1"])
    assert len(calls) == 2  # the control: a scoring rule scores every big batch


def test_diagnostics_reach_the_csv(tmp_path, tiny):
    """Per-class selected fraction (checked against the saved selections and the split's labels), score percentiles
    of selected vs not, Boltzmann entropy, importance-sampling max p and unique count."""
    import hydra

    s = run_job(tmp_path / "ce", [*tiny, "selection=ce_loss", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"])
    df = _csv(s)
    steps = df.dropna(subset=["selection/score_selected_p10"])
    assert len(steps) == 2 and (steps["selection/score_selected_p10"] >= steps["selection/score_not_selected_p90"]).all()
    dm = hydra.utils.instantiate(compose_cfg([]).data)
    dm.setup()
    labels = dict(zip(dm.split_indices("train").tolist(), dm.split_targets("train").tolist()))
    sel = np.load(s["artifacts"]["selected_indices"])
    chosen = np.bincount([labels[i] for i in sel[sel >= 0]], minlength=10)
    scored = np.bincount(list(labels.values()), minlength=10)
    row = df.dropna(subset=["selection/class_frac_0"]).iloc[-1]
    got = np.array([row[f"selection/class_frac_{c}"] for c in range(10)])
    assert np.allclose(got, chosen / scored, atol=1e-6) and got.std() > 0  # ce_loss does not pick classes evenly

    b = run_job(tmp_path / "b", [*tiny, "selection=boltzmann", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"])
    bdf = _csv(b).dropna(subset=["selection/boltzmann_entropy"])
    assert len(bdf) == 2 and (bdf["selection/temperature"] == 0.25).all()
    assert ((bdf["selection/boltzmann_entropy"] > 0) & (bdf["selection/boltzmann_entropy"] < np.log(320))).all()
    assert (bdf["selection/unique"] <= 32).all()

    g = run_job(tmp_path / "g", [*tiny, "selection=gradnorm_is", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"])
    gdf = _csv(g).dropna(subset=["selection/is_max_p"])
    assert len(gdf) == 2 and ((gdf["selection/is_max_p"] > 1 / 330) & (gdf["selection/is_max_p"] < 1)).all()
    assert ((gdf["selection/unique"] >= 1) & (gdf["selection/unique"] <= 32)).all()


def test_il_pass_runs_on_the_trainers_accelerator(tmp_path, monkeypatch, tiny):
    """After fit Lightning moves the module to CPU; the loss pass moves it to the trainer's device (faked: meta)."""
    from datamatters.tasks import irreducible

    seen = []

    def fake_losses(model, loader, *a, **k):
        seen.append(next(model.parameters()).device)
        idx = np.concatenate([np.asarray(b[0]) for b in loader])
        return idx, np.zeros(len(idx), np.float32), np.zeros((len(idx), 10), np.float32)

    monkeypatch.setattr(irreducible, "pass_device", lambda trainer: torch.device("meta"))
    monkeypatch.setattr(irreducible, "evaluate_losses", fake_losses)
    run_job(tmp_path, [*tiny, f"irreducible.output={tmp_path}/il.npz", "irreducible.max_epochs=1"],
            config_name="irreducible")
    assert seen == [torch.device("meta")]


def test_svp_scores_with_the_il_checkpoint_on_the_accelerator(tmp_path, monkeypatch, tiny):
    """SVP as the paper's baseline: the IL checkpoint is the proxy, 10% kept, target minibatch 32."""
    from datamatters.tasks import irreducible

    run_job(tmp_path / "il", [*tiny, "irreducible.max_epochs=2"], config_name="irreducible")
    ckpt = tmp_path / "il" / "run" / "checkpoints_il" / "best.ckpt"
    seen = []
    real = irreducible.evaluate_losses
    monkeypatch.setattr(irreducible, "evaluate_losses",
                        lambda model, loader, *a, **k: seen.append(next(model.parameters()).device) or real(model, loader))
    s = run_job(tmp_path / "svp", [*tiny, "selection=svp", f"irreducible.checkpoint={ckpt}", "trainer.max_epochs=1"])
    n_train = len(np.load(Path(s["artifacts"]["selected_indices"])))
    assert s["svp/proxy"] == "il_checkpoint" and s["svp/batch_size"] == 32 and seen == [torch.device("cpu")]
    assert s["svp/kept"] == n_train == 63  # round(0.1 * 629) points of target-train
    assert s["trainer/steps"] == 2  # 64 points in minibatches of 32, one epoch


def _fit_counting(tmp_path, monkeypatch, logger, every: int, steps: int = 7, n_B: int = 20):
    """A RHO-LOSS fit of ``steps`` big batches on synthetic data; counts the per-step diagnostic computations."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from datamatters.selection import module as mod
    from datamatters.selection.il_store import ILTable

    calls = []
    real = mod.percentiles
    monkeypatch.setattr(mod, "percentiles", lambda x, *a: calls.append(len(x)) or real(x, *a))
    g = torch.Generator().manual_seed(0)
    n = steps * n_B
    X, Y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    batches = [(torch.arange(i, i + n_B), X[i:i + n_B], Y[i:i + n_B]) for i in range(0, n, n_B)]
    corrupted = torch.arange(n) % 3 == 0
    il = ILTable(np.arange(n), torch.rand(n, generator=g).numpy())
    m = SelectiveModule(_mlp(), num_classes=3, method="reducible_loss", percent_train=0.25, il_table=il,
                        corrupted=corrupted)
    tr = L.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path) if logger else False,
                   log_every_n_steps=every, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    tr.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return m, tr, calls


def test_step_diagnostics_are_computed_only_on_logged_steps(tmp_path, monkeypatch):
    """Lightning writes on-step metrics every log_every_n_steps steps only, so the per-step diagnostics (~20 self.log
    calls and 6 quantiles) are built only then (they made a RHO-LOSS step ~2.5x a uniform one on a tiny MLP); the run
    totals and per-class counts still cover every step."""
    m, tr, calls = _fit_counting(tmp_path, monkeypatch, logger=True, every=3)
    assert len(calls) == 2 * 6  # steps 3 and 6 of 7: {loss, il, score} x {selected, not selected}
    df = pd.read_csv(Path(tr.logger.log_dir) / "metrics.csv")
    rows = df.dropna(subset=["selection/score_selected_p10"])
    assert rows["step"].tolist() == [2, 5] and rows["trainer/examples_seen"].tolist() == [15.0, 30.0]
    sel = m.selected_indices()
    assert sel.shape == (7, 5) and m.totals["examples_seen"] == 35 and m.totals["examples_scored"] == 140
    assert m.totals["corrupted_selected"] == int((sel % 3 == 0).sum()) > 0  # every step counted, logged or not
    assert df["selection/class_frac_0"].notna().sum() == 1

    _, _, quiet = _fit_counting(tmp_path / "none", monkeypatch, logger=False, every=1)
    assert quiet == []  # no logger: nothing is computed for it
    _, _, each = _fit_counting(tmp_path / "each", monkeypatch, logger=True, every=1)
    assert len(each) == 7 * 6  # the control: logging every step computes them every step
