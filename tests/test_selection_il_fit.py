"""The IL model's fit: metrics logged once per epoch (same values and weights as the per-step module), early stopping
on val loss with the best checkpoint chosen by the same rule up to the stop (on a hand-made val-loss curve)."""
import copy

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import compose_cfg
from datamatters.errors import UserError
from datamatters.selection.il_fit import EpochLoggedClassifier, check_patience
from datamatters.training.classifier import ClassifierModule, evaluate_losses

# val loss per epoch: best at 2, a plateau, a lower one at 6, a plateau, the lowest at 11
CURVE = [1.0, 0.8, 0.6, 0.7, 0.65, 0.9, 0.5, 0.55, 0.6, 0.7, 0.8, 0.2]


def _fit(cls, seed=0):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 5, generator=g), torch.randint(0, 3, (70,), generator=g)
    idx = torch.arange(70)
    train = DataLoader(TensorDataset(idx[:50], x[:50], y[:50]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(idx[50:], x[50:], y[50:]), batch_size=8)  # 8, 8, 4: unequal batches
    L.seed_everything(seed, verbose=False)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    module = cls(model, lambda p: torch.optim.SGD(p, lr=0.3), num_classes=3)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}, (x[50:], y[50:])


def test_epoch_logged_module_gives_the_per_step_modules_epoch_values_and_weights():
    ref_model, ref, _ = _fit(ClassifierModule)
    model, got, (xv, yv) = _fit(EpochLoggedClassifier)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)  # logging never touches the optimisation
    assert "train/loss_step" in ref and "train/loss_step" not in got
    assert got["train/loss"] == pytest.approx(ref["train/loss_epoch"], rel=1e-6)
    assert got["train/acc"] == pytest.approx(ref["train/acc"], rel=1e-6)
    with torch.no_grad():  # example-weighted over unequal batches (a mean of batch means would differ)
        logits = model(xv)
    assert got["val/loss"] == pytest.approx(float(F.cross_entropy(logits, yv)), rel=1e-6)
    assert got["val/acc"] == pytest.approx(float((logits.argmax(-1) == yv).float().mean()), rel=1e-6)
    assert got["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_patience_is_one_clear_message(bad):
    with pytest.raises(UserError, match="early_stopping_patience must be null .* or an integer >= 1"):
        check_patience(bad)


def _il_job(monkeypatch, tmp_path, overrides):
    """The IL job on digits with the val loss of epoch e forced to CURVE[e]; returns (meta, IL values, the weights
    after each epoch's validation)."""
    from datamatters.selection.il_store import load_irreducible_losses
    from datamatters.tasks import irreducible
    from datamatters.tasks.common import RunContext

    weights = {}

    class Scripted(ClassifierModule):
        def validation_step(self, batch, batch_idx):  # after the fit, trainer.validate reports the last value again
            self.log("val/loss", torch.tensor(CURVE[min(self.current_epoch, len(CURVE) - 1)]), on_epoch=True)
            self.log("val/acc", torch.tensor(0.5), on_epoch=True)

        def on_validation_epoch_end(self):
            if self.trainer.state.fn == "fit":
                weights[self.current_epoch] = copy.deepcopy(self.model.state_dict())

    monkeypatch.setattr(irreducible, "ClassifierModule", Scripted)
    cfg = compose_cfg([f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", "data=digits",
                       f"irreducible.max_epochs={len(CURVE)}", "irreducible.batch_size=256", "seed=3",
                       "trainer.enable_progress_bar=false", "logger.wandb.enabled=false", *overrides], "irreducible")
    out = tmp_path / "il.npz"
    meta = irreducible.train_irreducible(cfg, RunContext(cfg, tmp_path, "h", "irreducible"), out)
    dm = irreducible.build_datamodule(cfg)
    values, _ = load_irreducible_losses(out, dm.metadata("train"), dm.split_indices("train"))
    return meta, values, weights, dm


@pytest.mark.parametrize("patience, trained, best", [(None, 12, 11), (2, 5, 2), (4, 11, 6)])
def test_early_stopping_stops_after_patience_checks_and_keeps_the_best_val_loss_epoch(monkeypatch, tmp_path, patience,
                                                                                       trained, best):
    """patience 2: stops after epoch 4 (two checks above 0.6), IL from epoch 2; patience 4 passes the first plateau,
    finds 0.5 at epoch 6, stops after epoch 10 and never sees epoch 11's 0.2; null trains all 12 epochs."""
    over = [] if patience is None else [f"irreducible.early_stopping_patience={patience}"]
    meta, values, weights, dm = _il_job(monkeypatch, tmp_path, over)
    assert (meta["il_epochs_trained"], meta["il_best_epoch"]) == (trained, best)
    assert sorted(weights) == list(range(trained))  # no epoch ran after the stop
    from datamatters.tasks.building import build_network

    model = build_network(compose_cfg(["data=digits"], "irreducible").irreducible.model, dm)
    model.load_state_dict(weights[best])
    _, expected, _ = evaluate_losses(model, dm.loader("train"))
    np.testing.assert_allclose(values, expected, rtol=1e-6)  # the IL values come from the best epoch's weights
    if best != trained - 1:
        model.load_state_dict(weights[trained - 1])
        assert not np.allclose(values, evaluate_losses(model, dm.loader("train"))[1], rtol=1e-3)


def test_il_job_logged_per_epoch_writes_the_same_il_values(tmp_path):
    """log_every_step=false changes only the logging: the same checkpoint, the same IL file (a tiny digits fit)."""
    from datamatters.selection.il_store import load_irreducible_losses
    from datamatters.tasks import irreducible
    from datamatters.tasks.common import RunContext

    got = []
    for flag in ("true", "false"):
        d = tmp_path / flag
        cfg = compose_cfg([f"paths.log_dir={d}", f"paths.output_dir={d}/run", "data=digits", "irreducible.max_epochs=4",
                           "irreducible.batch_size=128", f"irreducible.log_every_step={flag}",
                           "trainer.enable_progress_bar=false", "logger.wandb.enabled=false"], "irreducible")
        L.seed_everything(0, verbose=False)  # as the job does before training
        meta = irreducible.train_irreducible(cfg, RunContext(cfg, d, "h", "irreducible"), d / "il.npz")
        dm = irreducible.build_datamodule(cfg)
        got.append((meta, load_irreducible_losses(d / "il.npz", dm.metadata("train"), dm.split_indices("train"))[0]))
        assert irreducible.il_config_key(cfg) == got[0][0]["config_hash"]  # logging is not part of the IL's key
    (m1, v1), (m2, v2) = got
    assert m1["il_best_epoch"] == m2["il_best_epoch"] and m1["il_epochs_trained"] == m2["il_epochs_trained"] == 4
    assert m2["holdout_val_loss"] == pytest.approx(m1["holdout_val_loss"], rel=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)


def test_il_key_is_unchanged_without_patience_and_changes_with_it():
    from datamatters.tasks.irreducible import il_config_key

    base = il_config_key(compose_cfg(["data=digits"], "irreducible"))
    assert il_config_key(compose_cfg(["data=digits", "irreducible.log_every_step=false"], "irreducible")) == base
    assert il_config_key(compose_cfg(["data=digits", "irreducible.early_stopping_patience=3"], "irreducible")) != base


def _il_job_fit(tmp_path, fit, snapshots=None, extra=()):
    """The IL job on digits (lr 0.02, patience 2: stops after epoch 7, best epoch 5) with irreducible.fit=``fit``;
    ``snapshots``: a dict filled with the lean fit's weights after each epoch."""
    from datamatters.selection import il_fit
    from datamatters.selection.il_store import load_irreducible_losses
    from datamatters.tasks import irreducible
    from datamatters.tasks.common import RunContext

    d = tmp_path / fit
    cfg = compose_cfg([f"paths.log_dir={d}", f"paths.output_dir={d}/run", "data=digits", "irreducible.max_epochs=15",
                       "irreducible.batch_size=256", "irreducible.early_stopping_patience=2", "optimizer.lr=0.02",
                       f"irreducible.fit={fit}", "irreducible.log_every_step=false", "trainer.enable_progress_bar=false",
                       "logger.wandb.enabled=false", *extra], "irreducible")
    ctx = RunContext(cfg, d, "h", "irreducible")
    if snapshots is not None:
        from datamatters.tasks.common import make_loggers

        make_loggers(ctx)  # the lean fit logs each epoch's metrics to the job's loggers

        def lean(*a, on_epoch=None, **k):
            def snap(epoch, metrics, model):
                snapshots[epoch] = copy.deepcopy(model.state_dict())
                on_epoch(epoch, metrics, model)
            return il_fit.lean_fit(*a, on_epoch=snap, **k)

        irreducible_lean, irreducible.lean_fit = irreducible.lean_fit, lean
    try:
        L.seed_everything(0, verbose=False)
        meta = irreducible.train_irreducible(cfg, ctx, d / "il.npz")
    finally:
        if snapshots is not None:
            irreducible.lean_fit = irreducible_lean
    dm = irreducible.build_datamodule(cfg)
    return meta, load_irreducible_losses(d / "il.npz", dm.metadata("train"), dm.split_indices("train"))[0], dm, ctx


def test_lean_il_fit_writes_the_lightning_fits_il_values(tmp_path):
    """Same seed, same loaders: the plain torch loop gives the Lightning fit's best epoch, stop and IL values (bitwise
    on CPU). Control: the lean fit's last-epoch weights give IL values far from them, so the epoch choice is pinned."""
    from datamatters.tasks.building import build_network

    meta_l, il_l, _, _ = _il_job_fit(tmp_path, "lightning")
    snaps = {}
    meta, il, dm, ctx = _il_job_fit(tmp_path, "lean", snaps)
    assert (meta["il_best_epoch"], meta["il_epochs_trained"]) == (meta_l["il_best_epoch"], meta_l["il_epochs_trained"])
    assert meta["il_epochs_trained"] < 15 and meta["il_best_epoch"] == meta["il_epochs_trained"] - 3  # stopped early
    assert meta["holdout_val_loss"] == pytest.approx(meta_l["holdout_val_loss"], rel=1e-6)
    assert meta["holdout_val_acc"] == pytest.approx(meta_l["holdout_val_acc"], rel=1e-6)
    np.testing.assert_allclose(il, il_l, rtol=1e-6, atol=1e-7)
    assert meta["config_hash"] == meta_l["config_hash"]  # the same IL values: the fit option is not part of the key
    assert sorted(snaps) == list(range(meta["il_epochs_trained"]))
    model = build_network(compose_cfg(["data=digits"], "irreducible").irreducible.model, dm)
    for epoch, close in ((meta["il_best_epoch"], True), (meta["il_epochs_trained"] - 1, False)):
        model.load_state_dict(snaps[epoch])
        assert np.allclose(evaluate_losses(model, dm.loader("train"))[1], il_l, rtol=1e-3) is close
    csv = (ctx.run_dir / "csv").glob("**/metrics.csv")
    assert "val/loss" in next(csv).read_text().splitlines()[0]


@pytest.mark.parametrize("patience, trained, best", [(None, 12, 11), (2, 5, 2), (4, 11, 6)])
def test_lean_fit_stops_and_chooses_as_early_stopping_and_the_checkpoint(monkeypatch, patience, trained, best):
    """The hand-made val-loss curve the Lightning job is tested on: the same stop and best epoch."""
    from datamatters.selection import il_fit

    seen = []
    monkeypatch.setattr(il_fit, "_validate", lambda model, *a: {"val/loss": CURVE[len(seen)], "val/acc": 0.5})
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.arange(40), torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,))),
                      batch_size=16)
    fit = il_fit.lean_fit(torch.nn.Linear(5, 3), lambda p: torch.optim.SGD(p, lr=0.1), data, data, len(CURVE),
                          patience=patience, on_epoch=lambda e, m, model: seen.append(copy.deepcopy(model.state_dict())))
    assert (fit.epochs_trained, fit.best_epoch, len(seen)) == (trained, best, trained)
    assert fit.metrics["val/loss"] == CURVE[best]
    assert all(torch.equal(fit.state[k], seen[best][k]) for k in fit.state)
    assert not torch.equal(fit.state["weight"], seen[-1]["weight"]) or best == trained - 1


def test_lean_fit_errors_are_one_clear_message(tmp_path):
    from datamatters.selection.il_fit import lean_fit

    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    data = DataLoader(TensorDataset(torch.arange(20), x, y), batch_size=8)
    empty = DataLoader(TensorDataset(torch.arange(0), x[:0], y[:0]), batch_size=8)
    with pytest.raises(UserError, match="the IL model's training split is empty"):
        lean_fit(torch.nn.Linear(5, 3), lambda p: torch.optim.SGD(p, lr=0.1), empty, data, 3)
    with pytest.raises(UserError, match="the IL model diverged: train/loss is (nan|inf) at epoch 0; lower"):
        lean_fit(torch.nn.Linear(5, 3), lambda p: torch.optim.SGD(p, lr=float("inf")), data, data, 3)
    with pytest.raises(UserError, match="chooses its epoch on val/loss or val/acc"):
        lean_fit(torch.nn.Linear(5, 3), lambda p: torch.optim.SGD(p, lr=0.1), data, data, 3, monitor="train/loss")
    from datamatters.tasks.irreducible import check_il_plan

    with pytest.raises(UserError, match="irreducible.fit must be 'lightning' .* or 'lean'"):
        check_il_plan(compose_cfg(["data=digits", "irreducible.fit=fast"], "irreducible"))
    with pytest.raises(UserError, match="cannot honour trainer.precision='bf16-mixed'.*use irreducible.fit=lightning"):
        check_il_plan(compose_cfg(["data=digits", "irreducible.fit=lean", "trainer.precision=bf16-mixed"],
                                  "irreducible"))
