"""The weight-statistics callback on real Lightning runs: epoch and step schedules, the table's columns, resume,
RHO-LOSS (manual optimisation), cost, and bad settings."""
import time
from functools import partial

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from datamatters.data.digits import DigitsDataModule
from datamatters.dynamics.callback import WeightStatsRecorder, read_table
from datamatters.dynamics.stats import FEATURES, weight_statistics
from datamatters.errors import UserError
from datamatters.models import build_model
from datamatters.training import ClassifierModule


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(label_noise={}, batch_size=128, holdout=False)
    dm.setup()
    return dm


def _fit(dm, callbacks, epochs=3, seed=0, ckpt=None, **kw):
    L.seed_everything(seed, verbose=False)
    # no checkpoint files in the working directory unless a test asks for them (with its own dirpath)
    kw.setdefault("enable_checkpointing", any(type(c).__name__ == "ModelCheckpoint" for c in callbacks))
    module = ClassifierModule(build_model("mlp", dm.input_shape, 10, hidden=[32]), partial(torch.optim.AdamW, lr=3e-3),
                              num_classes=10)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **kw)
    trainer.fit(module, dm, ckpt_path=ckpt)
    return trainer, module


def test_epoch_schedule_records_stats_and_metrics(digits, tmp_path):
    cb = WeightStatsRecorder(every_n_epochs=2, out_dir=tmp_path, tags={"seed": 0, "config_hash": "abc"},
                             extras=["grad_norm", "update_norm"])
    trainer, module = _fit(digits, [cb], epochs=4)
    df = read_table(tmp_path / "weight_stats.parquet")
    per_epoch = trainer.num_training_batches
    assert df["epoch"].tolist() == [1, 3] and df["step"].tolist() == [2 * per_epoch, 4 * per_epoch]
    assert set(FEATURES) <= set(df.columns)
    for col in ("train_loss", "train_acc", "val_loss", "val_acc", "grad_norm", "update_norm"):
        assert df[col].notna().all() and (df[col] > 0).all(), col
    assert (df["seed"] == 0).all() and (df["config_hash"] == "abc").all()
    # the last row holds the final weights' statistics and the last validation
    last = weight_statistics(module)
    assert df.iloc[-1]["l2"] == pytest.approx(last["l2"]) and df.iloc[-1]["var_w"] == pytest.approx(last["var_w"])
    assert df.iloc[-1]["val_acc"] == pytest.approx(float(trainer.callback_metrics["val/acc"]))


def test_step_schedule_and_per_layer(digits, tmp_path):
    cb = WeightStatsRecorder(every_n_steps=3, out_dir=tmp_path, extras={"per_layer": True})
    trainer, _ = _fit(digits, [cb], epochs=2)
    df = read_table(cb.path)
    assert df["step"].tolist() == list(range(3, trainer.global_step + 1, 3))
    assert "model.net.1.weight/l2" in df.columns and "model.net.3.weight/spectral" in df.columns
    assert df["train_loss"].notna().all()  # the latest step's loss when recording by steps


def test_resume_keeps_one_table_without_duplicates(digits, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = tmp_path / "ck"
    _fit(digits, [WeightStatsRecorder(every_n_epochs=1, out_dir=tmp_path),
                  ModelCheckpoint(dirpath=ck, save_last=True, every_n_epochs=1)], epochs=2)
    _fit(digits, [WeightStatsRecorder(every_n_epochs=1, out_dir=tmp_path),
                  ModelCheckpoint(dirpath=ck, save_last=True, every_n_epochs=1)], epochs=4, ckpt=str(ck / "last.ckpt"))
    df = read_table(tmp_path / "weight_stats.parquet")
    assert df["epoch"].tolist() == [0, 1, 2, 3] and df["step"].is_monotonic_increasing


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        WeightStatsRecorder(out_dir=tmp_path)
    with pytest.raises(UserError, match="exactly one"):
        WeightStatsRecorder(every_n_steps=1, every_n_epochs=1, out_dir=tmp_path)
    for bad in (0, 1.5, "abc", True):
        with pytest.raises(UserError, match=">= 1"):
            WeightStatsRecorder(every_n_steps=bad, out_dir=tmp_path)
    with pytest.raises(UserError, match="unknown settings"):
        WeightStatsRecorder(every_n_steps=1, every_n_step=2, out_dir=tmp_path)
    with pytest.raises(UserError, match="unknown extras"):
        WeightStatsRecorder(every_n_steps=1, extras=["hessian"], out_dir=tmp_path)


def test_overhead_is_small_at_the_default_interval(digits, tmp_path):
    """Loose check only (timings are noisy on shared cores; benchmarks/dynamics_overhead.py measures it properly):
    the time spent computing statistics is a small part of the run."""
    cb = WeightStatsRecorder(every_n_epochs=1, out_dir=tmp_path)
    t0 = time.perf_counter()
    _fit(digits, [cb], epochs=4)
    total = time.perf_counter() - t0
    assert len(cb.rows) == 4 and cb.stat_seconds < 0.25 * total, (cb.stat_seconds, total)


def test_records_rho_loss_runs(tmp_path):
    """The callback on a RHO-LOSS run (manual optimisation) through the lead's harness (callbacks.dynamics set)."""
    from conftest import run_job

    s = run_job(tmp_path, ["trainer.max_epochs=1", "irreducible.max_epochs=1", "trainer.enable_progress_bar=false",
                           "logger.wandb.enabled=false", "+callbacks.dynamics.every_n_steps=1",
                           "callbacks.checkpoint.every_n_train_steps=1000"])
    df = pd.read_parquet(f"{s['run_dir']}/weight_stats.parquet")
    assert len(df) == s["trainer/steps"] and np.isfinite(df[list(FEATURES)].to_numpy()).all()
    assert (df["seed"] == 0).all() and (df["config_hash"] == s["config_hash"]).all()
    assert df["train_loss"].notna().all()
