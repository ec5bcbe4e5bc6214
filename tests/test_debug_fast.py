"""`+debug=fast` shrinks every job to a config check in seconds. (A job's console showing each message once is
checked on a job already spawned: test_rho_jobs.py::test_fast_dev_run_irreducible_then_train_from_the_command_line.)"""
from pathlib import Path

import pytest

from conftest import compose_cfg, run_job


# Experiments whose data is here (generated, embedded or under data/): Lightning jobs, one batch through each loop.
RUNS_HERE = ["digits_dynamics", "mnist1d_dynamics", "modular_addition", "modular_addition_layernorm", "sparse_parity"]
# Their data is not on this machine (CIFAR, CINIC, Clothing1M, GLUE): the debug config must still shrink them.
DATA_ABSENT = ["c1m_resnet18_irred", "c1m_resnet50_main", "cifar100_dynamics", "cifar100_dynamics_plain",
               "cifar100_resnet18_irred", "cifar100_resnet18_main", "cifar10_resnet18_irred", "cifar10_resnet18_main",
               "cinic10_resnet18_irred", "cinic10_resnet18_main", "cola_irred", "cola_main", "sst2_irred", "sst2_main"]


@pytest.mark.parametrize("experiment", RUNS_HERE)
def test_experiment_runs_in_seconds_with_debug_fast(tmp_path, experiment):
    s = run_job(tmp_path, [f"+experiment={experiment}", "+debug=fast"])
    assert s["trainer/steps"] == 1, s  # fast_dev_run: one training batch
    assert "wandb/run_dir" not in s


def test_mnist1d_il_model_then_rho_loss_with_debug_fast(tmp_path):
    """The documented pair: mnist1d_irred writes the IL file mnist1d_main reads."""
    il = run_job(tmp_path / "il", ["+experiment=mnist1d_irred", "+debug=fast", f"paths.log_dir={tmp_path}"])
    assert Path(il["artifacts"]["irreducible_losses"]).is_file()
    s = run_job(tmp_path / "main", ["+experiment=mnist1d_main", "+debug=fast", f"paths.log_dir={tmp_path}"])
    assert s["trainer/steps"] == 1


# Influence jobs (no Lightning): 12 test points, 1 training epoch, 4 LDS models; the dask one on an in-process worker.
INFLUENCE_RUNS = ["digits_influence", "digits_influence_dask"]


@pytest.mark.parametrize("experiment", INFLUENCE_RUNS)
def test_influence_experiments_run_in_seconds_with_debug_fast(tmp_path, experiment):
    full = compose_cfg([f"+experiment={experiment}"]).influence
    assert (full.num_test, full.train.epochs, full.lds.num_models) == (100, 60, 64)
    s = run_job(tmp_path, [f"+experiment={experiment}", "+debug=fast"])
    assert (s["influence/n_test"], s["lds/num_models"]) == (12, 4) and "wandb/run_dir" not in s
    assert s["time/wall_clock_s"] < 60, s  # ~6 s here (the Direct fit on the 2,410-parameter MLP is ~3.5 s)


# Attribution jobs: shrunk by configs/debug/fast.yaml (digits: 27 s job wall clock here, 36 s with imports: too slow
# for the fast suite; the job's own tiny end-to-end run is in tests/test_attribution*.py).
ATTRIBUTION_SHRUNK = ["attribution_digits", "attribution_mnist1d"]


@pytest.mark.parametrize("experiment", ATTRIBUTION_SHRUNK)
def test_debug_fast_shrinks_attribution_experiments(experiment):
    full = compose_cfg([f"+experiment={experiment}"]).attribution
    fast = compose_cfg([f"+experiment={experiment}", "+debug=fast"]).attribution
    assert (full.num_test, full.ground_truth.num_subsets, full.ground_truth.seeds) == (100, 100, 5)
    assert (fast.num_test, fast.train.epochs, fast.ground_truth.num_subsets, fast.ground_truth.seeds) == (12, 2, 6, 1)
    assert max(fast.tracin_epochs) <= fast.train.epochs and list(fast.datamodels.sizes) == [20]
    assert fast.influence.lissa.method == "lissa" and fast.influence.lissa.params.maxiter == 20  # merged, not replaced
    assert set(fast.methods) < set(full.methods) and fast.models == full.models


@pytest.mark.parametrize("experiment", DATA_ABSENT)
def test_debug_fast_shrinks_experiments_whose_data_is_absent(experiment):
    full, fast = compose_cfg([f"+experiment={experiment}"]), compose_cfg([f"+experiment={experiment}", "+debug=fast"])
    assert not full.trainer.get("fast_dev_run") and fast.trainer.fast_dev_run is True
    assert fast.irreducible.max_epochs == 1 < full.irreducible.max_epochs or full.irreducible.max_epochs == 1
    assert fast.logger.wandb.enabled is False


def test_digits_valuation_runs_in_seconds_with_debug_fast(tmp_path):
    full = compose_cfg(["+experiment=digits_valuation"]).valuation
    assert (full.n_train, full.utility.epochs, full.stopping.max_time_s) == (200, 20, 1800)
    s = run_job(tmp_path, ["+experiment=digits_valuation", "+debug=fast"])  # tmc_shapley, the experiment's default
    assert s["valuation/n"] == 24 and s["valuation/mean_count"] <= 2 and "wandb/run_dir" not in s
    assert s["time/valuation_s"] < 10, s


def test_debug_fast_wins_over_the_experiment_when_given_after_it():
    """Hydra appends `+` configs in command-line order, so `+experiment=X +debug=fast` (the documented order) ends
    with debug's values; `debug` cannot sit in train.yaml's defaults without breaking the `+debug=fast` syntax."""
    cfg = compose_cfg(["+experiment=digits_datamodels", "+debug=fast"])
    assert cfg.datamodels.num_models == 40 and cfg.datamodels.epochs == 1


def test_every_experiment_is_listed():
    from conftest import CONFIG_DIR

    listed = set(ATTRIBUTION_SHRUNK) | set(RUNS_HERE) | {"mnist1d_irred", "mnist1d_main"} | set(DATA_ABSENT) | SHRUNK_TESTED_ELSEWHERE | set(INFLUENCE_RUNS) | {"digits_valuation"} | set(DYNAMICS_RUNS)
    assert listed == {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}


# Jobs not run here: digits_datamodels is shrunk by configs/debug/fast.yaml and run by its own test
# (tests/test_datamodels_jobs.py::test_debug_fast_shrinks_the_whole_datamodels_job).
SHRUNK_TESTED_ELSEWHERE = {"digits_datamodels"}


# Dynamics jobs: under fast_dev_run each merges its task config's `debug` fragment (one batch would record one row per
# run, too few for an HMM): 3 seeds x 6 steps, statistics every step, K in 1..2 with one restart. dynamics_selection
# runs with +debug=fast in tests/test_dynamics_selection.py::test_selection_map_job_in_miniature.
DYNAMICS_RUNS = ["dynamics_demo", "dynamics_hmm", "modular_addition_stacked", "dynamics_selection"]


def _tables(summary):
    import pandas as pd

    return {p.parent.name: pd.read_parquet(p) for p in sorted(Path(summary["run_dir"]).glob("runs/seed*/*.parquet"))}


def test_dynamics_demo_then_hmm_job_run_in_seconds_with_debug_fast(tmp_path):
    full = compose_cfg(["+experiment=dynamics_demo"])
    assert (len(full.task.seeds), full.trainer.max_epochs, full.dynamics.k_max) == (6, 8, 5)
    s = run_job(tmp_path / "demo", ["+experiment=dynamics_demo", "+debug=fast"])
    tables = _tables(s)
    assert sorted(tables) == ["seed0", "seed1", "seed2"]
    assert all(t["step"].tolist() == [1, 2, 3, 4, 5, 6] for t in tables.values())
    assert s["hmm/n_runs"] == 3 and s["hmm/k"] <= 2 and "wandb/run_dir" not in s
    assert s["time/wall_clock_s"] < 15, s  # ~7 s here
    h = run_job(tmp_path / "hmm", ["+experiment=dynamics_hmm", "+debug=fast", f"dynamics.runs={s['run_dir']}/runs"])
    assert h["hmm/n_runs"] == 3 and "wandb/run_dir" not in h
    assert sorted(p.name for p in (Path(h["run_dir"]) / "hmm" / "models").glob("*.npz")) == ["k1_r0.npz", "k2_r0.npz"]
    assert h["time/wall_clock_s"] < 10, h


def test_modular_addition_stacked_runs_in_seconds_with_debug_fast(tmp_path):
    full = compose_cfg(["+experiment=modular_addition_stacked"]).task
    assert (len(full.seeds), full.p, full.steps) == (40, 113, 150000)
    s = run_job(tmp_path, ["+experiment=modular_addition_stacked", "+debug=fast"])
    tables = _tables(s)
    assert sorted(tables) == ["seed0", "seed1", "seed2"]
    assert all(t["step"].tolist() == [1, 2, 3, 4, 5, 6] for t in tables.values())
    assert s["hmm/n_runs"] == 3 and s["hmm/k"] <= 2 and "wandb/run_dir" not in s
    assert s["time/wall_clock_s"] < 15, s  # ~7 s here
