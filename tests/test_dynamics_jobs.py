"""The dynamics jobs end to end: the demo (train seeds + HMM) in miniature, the HMM job on its runs, the experiments'
training runs in miniature, and bad input giving one clear message."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg, run_cli, run_job
from datamatters.dynamics.stats import FEATURES

TINY_DEMO = ["+experiment=dynamics_demo", "task.seeds=[0,1,2]", "trainer.max_epochs=1",
             "callbacks.dynamics.every_n_steps=1", "dynamics.k_max=3", "dynamics.restarts=2",
             "dynamics.test_fraction=0.3", "logger.wandb.enabled=false"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    return run_job(tmp, TINY_DEMO)


def test_demo_trains_seeds_then_selects_and_maps(demo):
    run = Path(demo["run_dir"])
    tables = sorted(run.glob("runs/seed*/weight_stats.parquet"))
    assert len(tables) == 3
    df = pd.read_parquet(tables[0])
    assert len(df) == 20 and set(FEATURES) <= set(df.columns) and (df["seed"] == 0).all()
    assert not pd.read_parquet(tables[1])[list(FEATURES)].equals(df[list(FEATURES)])  # seeds differ
    assert 1 <= demo["hmm/k_bic"] <= 3 and demo["hmm/n_runs"] == 3 and demo["hmm/n_test_runs"] == 1
    assert np.isfinite(demo["hmm/test_ll_per_sample"])
    for k in range(demo["hmm/k"]):
        assert f"hmm/state{k}/r" in demo and f"hmm/state{k}/p" in demo
    for fig in ("selection", "training_map", "curves_by_state"):
        assert Path(demo["artifacts"][f"fig_{fig}"]).stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["hmm/k_bic"] == demo["hmm/k_bic"]
    assert len(list((run / "hmm" / "models").glob("*.npz"))) == 3 * 2
    paths = pd.read_parquet(run / "state_paths.parquet")
    assert set(paths["split"]) == {"train", "test"} and paths["state"].between(0, demo["hmm/k"] - 1).all()


def test_hmm_job_on_recorded_runs_is_reproducible(demo, tmp_path):
    """The HMM job on the demo's runs (a glob this time) finds the same model as the demo's own analysis."""
    runs = Path(demo["run_dir"]) / "runs"
    again = run_job(tmp_path, ["+experiment=dynamics_hmm", f"dynamics.runs={runs}/seed*", "dynamics.k_max=3",
                               "dynamics.restarts=2", "dynamics.covariance_type=diag", "dynamics.n_jobs=1",
                               "dynamics.test_fraction=0.3", "logger.wandb.enabled=false"])
    assert again["hmm/n_runs"] == 3 and again["hmm/k_bic"] == demo["hmm/k_bic"]
    assert again["hmm/test_ll"] == pytest.approx(demo["hmm/test_ll"])


@pytest.mark.parametrize("experiment, extra", [
    pytest.param("modular_addition", [], marks=pytest.mark.slow),
    ("modular_addition_layernorm", ["data.p=23", "data.batch_size=32"]),
    ("sparse_parity", []),
    pytest.param("mnist1d_dynamics", ["data.num_samples=2000"], marks=pytest.mark.slow),
    pytest.param("digits_dynamics", [], marks=pytest.mark.slow),
])
def test_experiment_runs_record_statistics(tmp_path, experiment, extra):
    """Each experiment's real training path (task=classifier, callbacks.dynamics from the config), 2 short epochs."""
    s = run_job(tmp_path, [f"+experiment={experiment}", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
                           "+trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1",
                           "~callbacks.dynamics", "+callbacks.dynamics.every_n_epochs=1",
                           "logger.wandb.enabled=false", "trainer.enable_progress_bar=false", *extra])
    df = pd.read_parquet(Path(s["run_dir"]) / "weight_stats.parquet")
    assert df["step"].tolist() == [3, 6] and df["val_acc"].notna().all()
    assert np.isfinite(df[list(FEATURES)].to_numpy()).all()
    assert (df["experiment"] == experiment).all()


def test_experiment_settings_follow_the_reference():
    m = compose_cfg(["+experiment=modular_addition"])
    assert (m.data.p, m.data.train_fraction, m.data.batch_size) == (113, 0.3, 256)
    assert (m.model.d_model, m.model.num_heads, m.model.d_mlp, m.model.layernorm) == (128, 4, 512, False)
    assert (m.optimizer.lr, m.optimizer.weight_decay) == (1e-3, 1.0) and m.optimizer._target_ == "torch.optim.AdamW"
    assert compose_cfg(["+experiment=modular_addition_layernorm"]).model.layernorm is True
    p = compose_cfg(["+experiment=sparse_parity"])
    assert (p.data.n_bits, p.data.k, p.model.hidden[0], p.task.loss, p.optimizer.lr) == (40, 3, 1000, "hinge", 0.1)
    c = compose_cfg(["+experiment=cifar100_dynamics_plain"])
    assert (c.model.name, c.model.batchnorm, c.model.residual) == ("resnet18", False, False)
    assert compose_cfg(["+experiment=cifar100_dynamics"]).model.batchnorm is True


def _error_of(tmp_path, overrides, capsys):
    with pytest.raises(SystemExit) as exc:
        run_job(tmp_path, overrides)
    assert exc.value.code == 1
    return capsys.readouterr().err


def test_bad_input_gives_one_clear_message(tmp_path, capsys, demo):
    base = ["+experiment=dynamics_hmm", "logger.wandb.enabled=false", "dynamics.n_jobs=1"]
    assert "no run tables" in _error_of(tmp_path, [*base, f"dynamics.runs={tmp_path}/nothing"], capsys)
    assert "set dynamics.runs" in _error_of(tmp_path, base, capsys)
    bad = tmp_path / "bad" / "run0"
    bad.mkdir(parents=True)
    pd.DataFrame({"step": [1, 2], "l1": [1.0, 2.0]}).to_parquet(bad / "weight_stats.parquet")
    assert "lacks columns" in _error_of(tmp_path, [*base, f"dynamics.runs={bad.parent}"], capsys)
    runs = Path(demo["run_dir"]) / "runs"
    err = _error_of(tmp_path, [*base, f"dynamics.runs={runs}", "dynamics.k_max=40"], capsys)
    assert "free parameters" in err and "k_max=40" in err
    assert "normalize" in _error_of(tmp_path, [*base, f"dynamics.runs={runs}", "dynamics.normalize=zz"], capsys)
    assert "must be int" in _error_of(tmp_path, [*base, f"dynamics.runs={runs}", "dynamics.k_max=abc"], capsys)
    assert "unknown dynamics options" in _error_of(tmp_path, [*base, f"dynamics.runs={runs}", "+dynamics.kmax=3"],
                                                   capsys)
    nan_run = tmp_path / "nan" / "run0"
    nan_run.mkdir(parents=True)
    df = pd.read_parquet(runs / "seed0" / "weight_stats.parquet")
    df.loc[3, "l2"] = np.nan
    df.to_parquet(nan_run / "weight_stats.parquet")
    assert "NaN" in _error_of(tmp_path, [*base, f"dynamics.runs={nan_run.parent}"], capsys)


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    res = run_cli(["+experiment=dynamics_hmm", f"dynamics.runs={tmp_path}/none", "logger.wandb.enabled=false"],
                  tmp_path, timeout=240)
    assert res.returncode == 1 and "no run tables" in res.stderr and "Traceback" not in res.stderr
