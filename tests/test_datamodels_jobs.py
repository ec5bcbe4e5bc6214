"""Datamodels jobs: the whole pipeline on digits (2,000 models, LDS clearly above 0), the stage jobs (chunked sweep
jobs, pool, fit on target slices, eval), a Hydra multirun, the Lightning trainer, and bad settings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_job
from datamatters.datamodels import open_store
from datamatters.training.subsets import subset_masks

QUIET = ["logger.wandb.enabled=false", "datamodels.threads=1"]
# 90 training points (a large test carve-out), the 180 validation digits as targets, 300 models: seconds per stage
SMALL = ["+experiment=digits_datamodels", *QUIET, "data.test_fraction=0.8", "datamodels.target_split=val",
         "datamodels.num_models=300", "datamodels.num_eval_models=40",
         "datamodels.epochs=2", "datamodels.block_size=50", "datamodels.lds_curve=[]",
         "datamodels.counterfactual.targets=0", "datamodels.plots.targets=0", "datamodels.regression.k=10",
         "datamodels.regression.eps=0.05"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.slow  # ~55 s; test_stage_jobs_chunks_pool_slices_and_eval is its fast twin (300 models, pinned LDS)
def test_digits_pipeline_2000_models_gives_the_pinned_lds(tmp_path):
    s = run_job(tmp_path, ["+experiment=digits_datamodels", *QUIET, "datamodels.lds_curve=[2000]",
                           "datamodels.counterfactual.targets=3", "datamodels.counterfactual.seeds=3",
                           "datamodels.plots.targets=2", "datamodels.n_boot=300"])
    print(f"\nLDS on 200 held-out models: {s['lds/mean']:.3f} [{s['lds/ci_low']:.3f}, {s['lds/ci_high']:.3f}]")
    assert s["models/trained"] == 2000 and s["models/eval"] == 200
    # the pipeline is deterministic (masks, inits and batch orders keyed by (seed, model id)): 0.709 measured
    assert s["lds/mean"] == pytest.approx(0.709, abs=0.02) and s["lds/ci_low"] < s["lds/mean"] < s["lds/ci_high"]
    assert s["counterfactual/pearson"] > 0.8  # 0.973 measured: predicted and actual margin drops agree
    for k in ("lds/mean", "lds/ci_low", "lds/ci_high", "time/train_s", "time/fit_s", "time/eval_s",
              "fit/mean_nonzeros", "counterfactual/pearson", "config_hash"):
        assert k in s
    art = s["artifacts"]
    assert Path(art["top_examples"]).is_file() and Path(art["lds_curve"]).is_file()
    details = json.loads(Path(art["details"]).read_text())
    assert details["lds_curve"] == [{"n_models": 2000, "lds": s["lds/mean"], "ci_low": s["lds/ci_low"],
                                     "ci_high": s["lds/ci_high"], "fit_seconds": s["fit/seconds"]}]  # reused fit
    assert len(details["counterfactual"]) == 3
    store = open_store(art["store_train"], mode="r")
    assert store.completed.all()
    np.testing.assert_array_equal(store["masks"][:5], subset_masks(store["masks"].shape[1], 5, 0.5, seed=0))


def _fails(tmp_path, overrides, match, capsys):
    """The job exits 1 with one error message matching ``match``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_job(tmp_path, overrides)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_stage_jobs_chunks_pool_slices_and_eval(tmp_path, capsys):
    for j in (0, 2):  # two jobs of a chunked sweep (100 models each)
        s = run_job(tmp_path, [*SMALL, "task=datamodels_train", f"datamodels.jobs={j}", "datamodels.models_per_job=100"])
        assert s["train/models_trained"] == 100
    store = open_store(tmp_path / "datamodels" / "digits" / "store", mode="r")
    assert store.completed.tolist() == [True] * 100 + [False] * 100 + [True] * 100
    first = np.array(store["margins"][:100])
    s = run_job(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.pool=true"])  # a pool worker takes the rest
    assert s["train/models_trained"] == 100 and s["train/rows_completed"] == 300
    np.testing.assert_array_equal(store["margins"][:100], first)  # finished rows untouched
    s = run_job(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.which=eval"])
    assert s["eval/rows_completed"] == 40
    for start, end in ((0, 100), (100, -1)):  # two regression jobs split the targets
        s = run_job(tmp_path, [*SMALL, "task=datamodels_fit", f"datamodels.regression.start={start}",
                               f"datamodels.regression.end={end}"])
        assert Path(s["artifacts"]["weights"]).name == f"weights_{start}_{end if end > 0 else None}.npz"
    ev = run_job(tmp_path, [*SMALL, "task=datamodels_eval", "datamodels.lds_curve=[150,300]",
                            "datamodels.counterfactual.targets=2", "datamodels.plots.targets=2"])
    assert ev["lds/mean"] == pytest.approx(0.7065, abs=0.02) and ev["lds/eval_models"] == 40  # deterministic
    # removing each target's top-10 positively weighted points lowers its margin, as its datamodel predicts
    # (two targets: too few for a correlation, which is NaN by design)
    assert ev["counterfactual/mean_predicted_drop"] > 0 and ev["counterfactual/mean_actual_drop"] > 0
    assert np.isnan(ev["counterfactual/pearson"])
    curve = json.loads(Path(ev["artifacts"]["details"]).read_text())["lds_curve"]
    assert [c["n_models"] for c in curve] == [150, 300] and Path(ev["artifacts"]["lds_curve"]).is_file()
    assert Path(ev["artifacts"]["top_examples"]).is_file()
    # the same job again: every row is complete, nothing is retrained
    s = run_job(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.which=both"])
    assert s["models/trained"] == 0
    # a worker configured differently must not write into this store
    _fails(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.lr=0.5"],
           r"was made for another spec \(disk vs requested: meta 'training'", capsys)
    _fails(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.jobs=3", "datamodels.models_per_job=100"],
           r"datamodels.jobs=3 with models_per_job=100 starts beyond the store's 300 models; use jobs in range\(0, 3\)",
           capsys)
    # force=true re-creates a store, but never deletes files it did not create
    (store.path / "notes.txt").write_text("mine")
    _fails(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.force=true"],
           r"files the store did not create \(notes.txt\); nothing was deleted", capsys)
    assert open_store(store.path).completed.all() and (store.path / "notes.txt").read_text() == "mine"


def test_worker_timeout_exits_non_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_job(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.timeout_s=0.000001"])
    assert exc.value.code == 1
    assert "ran out of time" in capsys.readouterr().err


def test_lightning_trainer_fills_rows(tmp_path):
    s = run_job(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.trainer=lightning", "datamodels.num_models=2",
                           "trainer.max_epochs=1", "datamodels.block_size=2", "model=mlp", "model.hidden=[16]"])
    assert s["train/models_trained"] == 2
    store = open_store(tmp_path / "datamodels" / "digits" / "store", mode="r")
    assert store.completed.all() and np.isfinite(store["margins"][:]).all() and store["margins"][:].std() > 0


def user_main(index, logdir):
    """A reference-style worker main: its own training, any keys the spec declares."""
    rng = np.random.default_rng(index)
    assert Path(logdir).is_dir()
    return {"masks": rng.random(5) < 0.5, "score": np.float32([index, index / 2])}


def user_extra(ids, masks, logits):
    return {"max_prob": logits.softmax(-1).amax(-1).numpy()}


def test_user_main_and_extra_keys(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"num_models": 4, "schema": {"masks": {"shape": [5], "dtype": "bool"},
                                                            "score": {"shape": [2], "dtype": "float32"}}}))
    run_job(tmp_path, [*SMALL, "task=datamodels_train", "datamodels.main=test_datamodels_jobs:user_main",
                       f"datamodels.spec_file={spec}", "datamodels.block_size=3"])
    store = open_store(tmp_path / "datamodels" / "digits" / "store", mode="r")
    assert store.completed.all() and store["score"][3].tolist() == [3.0, 1.5]
    assert (tmp_path / "datamodels" / "digits" / "store" / "workers" / "2").is_dir()
    s = run_job(tmp_path / "x", [*SMALL, "task=datamodels_train", "datamodels.num_models=10",
                                 "datamodels.extra_keys={max_prob: {shape: [180], dtype: float32}}",
                                 "datamodels.extra_fn=test_datamodels_jobs:user_extra"])
    store = open_store(tmp_path / "x" / "datamodels" / "digits" / "store", mode="r")
    assert s["train/rows_completed"] == 10 and ((store["max_prob"][:] > 0.1) & (store["max_prob"][:] <= 1)).all()
    _fails(tmp_path / "y", [*SMALL, "task=datamodels_train", "datamodels.main=nope.module:fn",
                            f"datamodels.spec_file={spec}"],
           r"cannot import 'nope.module:fn' \(expected 'package.module:function'\): No module named 'nope'", capsys)


def test_missing_config_is_a_user_error(tmp_path, capsys):
    msg = r"no datamodels config: add '\+datamodels=default' \(or use \+experiment=digits_datamodels\)"
    _fails(tmp_path, ["task=datamodels_fit", *QUIET[:1]], msg, capsys)
    _fails(tmp_path, ["task=datamodels_fit", "+debug=fast"], msg, capsys)  # debug's few datamodels keys are no config


def test_hydra_multirun_over_job_chunks(tmp_path, monkeypatch):
    """The sweep a SLURM array would run (``-m datamodels.jobs=0,1``), here through run.py's Hydra main on the local
    launcher, in-process: every job finds the same store; sweep job dirs are deterministic."""
    import runpy
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from conftest import ROOT

    GlobalHydra.instance().clear()
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["run.py", *SMALL, "task=datamodels_train", "datamodels.num_models=40",
                                      "datamodels.models_per_job=20", "datamodels.jobs=0,1",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}", "-m"])
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    GlobalHydra.instance().clear()
    store = open_store(tmp_path / "datamodels" / "digits" / "store", mode="r")
    assert store.completed.all() and store.num_models == 40
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    for j in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / j / "summary.json").read_text())["train/models_trained"] == 20


def test_debug_fast_shrinks_the_whole_datamodels_job(tmp_path):
    """``+experiment=digits_datamodels +debug=fast`` trains 40 + 10 models for one epoch (it trained 2,200)."""
    s = run_job(tmp_path, ["+experiment=digits_datamodels", "+debug=fast", "datamodels.threads=1"])
    assert (s["models/trained"], s["models/eval"]) == (40, 10)
    assert s["fit/models"] == 40 and s["time/fit_s"] < 30 and np.isfinite(s["lds/mean"])
    store = open_store(s["artifacts"]["store_train"], mode="r")
    assert store.spec.num_models == 40 and store.completed.all()
