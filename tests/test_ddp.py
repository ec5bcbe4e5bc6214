"""Lightning DDP on CPU (2 processes, gloo): RHO-LOSS and plain training run, shard the data, and agree with
single-device training. Each rank selects within its own big batch of n_B points, so DDP with n_B = 160 on 2 ranks
takes the same steps on the same number of selected points as one device with n_B = 320."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli, run_job

EPOCHS = 12
COMMON = ["data.label_noise.pc_corrupted=0.2", f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false",
          "logger.wandb.enabled=false", "callbacks.checkpoint.every_n_train_steps=10"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_rho_loss_and_its_il_model_under_ddp_match_single_device(tmp_path):
    """One DDP job trains the IL model (plain training, ClassifierModule) and then runs RHO-LOSS, both on 2 ranks."""
    il = [f"irreducible.max_epochs={EPOCHS}"]
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "offline", "LOG_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "trainer=ddp", "trainer.accelerator=cpu",
                             "data.batch_size=160", *il, *COMMON, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # the single-device reference runs here while the DDP job imports (~12 s per rank, one after the other)
        single = run_job(tmp_path / "single", [*COMMON, *il])
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    ddp = _summary(run_dir)
    print({k: (single[k], ddp[k]) for k in ("test/acc", "selection/corrupted_frac", "trainer/steps",
                                            "trainer/examples_seen")})
    # 2 ranks x 160 = one device x 320: same optimiser steps, same number of selected points
    assert ddp["trainer/steps"] == single["trainer/steps"] == 2 * EPOCHS  # ceil(629 / 320) = 2 steps per epoch
    assert ddp["trainer/examples_seen"] == single["trainer/examples_seen"]
    sel = np.load(ddp["artifacts"]["selected_indices"])
    assert sel.shape == (2 * EPOCHS, 32)  # each step: 16 points selected on each rank (ragged last batch padded with -1)
    (il_file,) = (tmp_path / "cache" / "irreducible").glob("*.npz")  # written once, over the whole train split
    il_npz = np.load(il_file)
    assert set(sel[sel >= 0].tolist()) <= set(il_npz["indices"].tolist())
    assert (sel >= 0).sum() == ddp["trainer/examples_seen"]
    assert json.loads(str(il_npz["meta"]))["holdout_val_acc"] > 0.8  # the IL model learned under DDP
    # RHO-LOSS still avoids the noisy labels and learns as well as on one device
    assert ddp["data/corrupted_frac"] == pytest.approx(single["data/corrupted_frac"])
    assert ddp["selection/corrupted_frac"] < 0.06 and single["selection/corrupted_frac"] < 0.06
    assert abs(ddp["test/acc"] - single["test/acc"]) < 0.08 and ddp["test/acc"] > 0.8
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["selection_state"]["per_rank"]) == 2  # both ranks' selection state is kept for resuming


@pytest.mark.slow
def test_plain_training_under_ddp(tmp_path):
    run_dir = tmp_path / "ddp"
    res = run_cli(["task=classifier", "trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=32",
                   "trainer.max_epochs=5", "trainer.enable_progress_bar=false", "logger.wandb.enabled=false",
                   f"hydra.run.dir={run_dir}"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = _summary(run_dir)
    # 629 train points: each rank gets ceil(629 / 2) = 315, i.e. ceil(315 / 32) = 10 batches per epoch
    assert s["trainer/steps"] == 50
    assert s["test/acc"] > 0.85


def test_distributed_batch_sampler_shards_disjointly_with_equal_batches():
    from datamatters.data.base import DistributedBatchSampler

    ds = list(range(103))
    parts = [DistributedBatchSampler(ds, 10, shuffle=True, drop_last=False, seed=3, num_replicas=2, rank=r)
             for r in range(2)]
    for p in parts:
        p.set_epoch(1)
    batches = [list(p) for p in parts]
    assert [len(b) for b in batches] == [6, 6] and [len(p) for p in parts] == [6, 6]
    assert [len(x) for x in batches[0]] == [len(x) for x in batches[1]]
    flat = [i for b in batches for x in b for i in x]
    assert set(flat) == set(ds) and len(flat) == 104  # one point repeated to even the ranks, as DistributedSampler
    parts[0].set_epoch(2)
    assert list(parts[0]) != batches[0]  # a new order each epoch
    dropped = DistributedBatchSampler(ds, 10, shuffle=False, drop_last=True, seed=0, num_replicas=2, rank=1)
    assert len(dropped) == 5 and all(len(b) == 10 for b in dropped)
