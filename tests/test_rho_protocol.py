"""eval.test_every_epoch (the paper's speed-up protocol) in the train job: the per-epoch test curve, training seconds
that exclude evaluation, the IL model's cost with and without the cache, and a real sweep through task=compare."""
import csv
import json
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import run_job
from datamatters.evaluation.speedup import EpochTestCurve
from datamatters.training.classifier import ClassifierModule

QUIET = ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]


def rows(summary):
    with open(summary["artifacts"]["test_curve"]) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_protocol_is_off_by_default(tmp_path):
    s = run_job(tmp_path, ["selection=uniform", "trainer.max_epochs=1", *QUIET])
    assert s["eval/test_every_epoch"] is False and "test_curve" not in s["artifacts"] and "time/train_s" not in s
    assert not (Path(s["run_dir"]) / "test_curve.csv").exists()
    assert s["train/lr_schedule"] == "constant" and s["time/il_s"] is None


def test_test_every_epoch_curve_and_il_cost(tmp_path):
    common = ["trainer.max_epochs=3", "irreducible.max_epochs=2", "eval.test_every_epoch=true", *QUIET]
    s = run_job(tmp_path / "a", common)
    c = rows(s)
    assert [r["epoch"] for r in c] == [0, 1, 2] and [r["step"] for r in c] == [2, 4, 6]  # 2 big batches an epoch
    assert c[-1]["test_acc"] == pytest.approx(s["test/acc"], abs=1e-6)  # the last epoch's model is the tested one
    assert s["test/best_epoch_acc"] == max(r["test_acc"] for r in c)
    assert s["time/train_s"] == pytest.approx(c[-1]["train_s"]) and 0 < c[0]["train_s"] < c[1]["train_s"]
    assert 0 < c[0]["train_cpu_s"] < c[-1]["train_cpu_s"]
    il = s["time/il_s"]
    assert il > 0 and s["time/train_with_il_s"] == pytest.approx(s["time/train_s"] + il)
    side = list((tmp_path / "a").rglob("*.seconds.json"))
    assert len(side) == 1 and json.loads(side[0].read_text())["il_s"] == il
    # a second run with the same IL config reuses the cached file and reports the cost it took to make it, even right
    # after the file was written (a fresh mtime must not make the reuse look like a training run)
    cached = side[0].with_suffix("").with_suffix(".npz")
    os.utime(cached)
    s2 = run_job(tmp_path / "a", [*common, f"paths.output_dir={tmp_path}/b"])
    assert s2["time/il_s"] == il and json.loads(side[0].read_text())["il_s"] == il


def test_cosine_uniform_is_marked_as_lr_decay(tmp_path):
    s = run_job(tmp_path, ["selection=uniform", "scheduler=cosine", "trainer.max_epochs=1", *QUIET])
    assert s["train/lr_schedule"] == "CosineAnnealingLR"


class SlowValidation(ClassifierModule):
    def validation_step(self, batch, batch_idx):
        time.sleep(0.25)
        super().validation_step(batch, batch_idx)


def test_training_seconds_exclude_validation_and_the_test_pass():
    from torch.utils.data import DataLoader, TensorDataset

    class Indexed(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return i, x, y

        def label_array(self):
            return self.tensors[1].numpy()

    ds = Indexed(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    loader = DataLoader(ds, batch_size=32)
    cb = EpochTestCurve(loader)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], accelerator="cpu")
    t0 = time.perf_counter()
    trainer.fit(SlowValidation(torch.nn.Linear(4, 3), num_classes=3), loader, loader)
    total = time.perf_counter() - t0
    assert total > 1.5 and len(cb.rows) == 3     # 3 epochs x 2 validation batches x 0.25 s
    assert 0 < cb.train_s < 0.5                   # none of the 1.5 s of validation is counted


@pytest.mark.slow
def test_sweep_to_speedup_table(tmp_path):
    """uniform, uniform with cosine lr decay and RHO-LOSS, 2 seeds each, on noisy digits, then task=compare."""
    common = ["trainer.max_epochs=8", "irreducible.max_epochs=10", "eval.test_every_epoch=true",
              "data.label_noise.pc_corrupted=0.2", *QUIET]
    k = 0
    for seed in (0, 1):
        for extra in (["selection=uniform"], ["selection=uniform", "scheduler=cosine"], []):
            run_job(tmp_path / "sweep" / str(k), [*common, *extra, f"seed={seed}"])
            k += 1
    s = run_job(tmp_path / "cmp", ["task=compare", f"compare.runs=[{tmp_path}/sweep/*/run]"])
    table = {(r["baseline"], r["label"]): r for r in csv.DictReader(open(s["artifacts"]["speedup_table"]))}
    assert len(table) == 6 and float(table[("uniform", "uniform")]["sp_steps"]) == 1.0
    assert s["speedup/reducible_loss/secs_il"] is not None and Path(s["artifacts"]["speed_curves"]).is_file()


def test_synthetic_images_are_deterministic_cifar_shaped_and_learnable():
    from conftest import compose_cfg
    from datamatters.data.synthetic import SyntheticImagesDataModule, synthetic_image_arrays
    from datamatters.errors import UserError

    cfg = compose_cfg(["data=synthetic_images", "data.n_train=60", "data.n_holdout=20", "data.n_val=10",
                       "data.n_test=200"])
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    assert [len(dm.split_indices(s)) for s in ("train", "holdout", "val", "test")] == [60, 20, 10, 200]
    _, X, y = dm.dataset("test").tensors()
    assert X.shape == (200, 3, 32, 32) and X.dtype == torch.float32 and abs(float(X.std()) - 1) < 0.1
    X2, y2 = synthetic_image_arrays(290, seed=0)
    X3, _ = synthetic_image_arrays(290, seed=1)
    assert np.array_equal(X2, synthetic_image_arrays(290, seed=0)[0]) and not np.array_equal(X2, X3)
    # the class templates are recoverable: nearest class mean (from train) classifies test points well
    _, Xt, yt = dm.dataset("train").tensors()
    means = torch.stack([Xt[yt == c].mean(0) for c in range(10)]).reshape(10, -1)
    pred = torch.cdist(X.reshape(200, -1), means).argmin(1)
    assert float((pred == y).float().mean()) > 0.9
    with pytest.raises(UserError, match="n_train, n_val and n_test must be >= 1"):
        SyntheticImagesDataModule(n_train=0)
