"""The valuation job: every method runs end to end on noisy digits with small settings (compose API)."""
import json

import numpy as np
import pytest

from conftest import compose_cfg, run_job

from datamatters.artifacts import load_indexed
from datamatters.errors import UserError

SMALL = ["+experiment=digits_valuation", "valuation.n_train=24", "valuation.utility.epochs=2",
         "valuation.utility.batch_size=16", "valuation.removal.step=0.25", "valuation.removal.n_random=1",
         "logger.wandb.enabled=false"]
# loo and owen_shapley with 2-epoch models ranked the noisy points below chance (AUC 0.44 / 0.46: the subset
# models were their initialisation); with 20-epoch models they find them (same AUC at 1 and 2 threads, within
# 0.02 for lr 0.049-0.051), in ~2 s each
PER_METHOD = {
    "loo": ["valuation.utility.epochs=20"],
    "tmc_shapley": ["valuation.stopping.max_updates=2"],
    "banzhaf_msr": ["valuation.stopping.max_updates=8", "valuation.batch_size=16"],
    "beta_shapley": ["valuation.stopping.max_updates=2", "valuation.batch_size=1"],
    "knn_shapley": [],
    # 6 bags of 2-epoch models valued 20 of 24 points 0: the AUC hung on ties, NaNs and near-tied logits and moved
    # with the machine (0.5556 vs 0.6667); 30 bags of 20 epochs give real values (batched: ~1 s more)
    "data_oob": ["valuation.n_estimators=30", "valuation.utility.epochs=20"],
    "owen_shapley": ["valuation.n_samples_outer=2", "valuation.n_samples_inner=1", "valuation.utility.epochs=20"],
    "classwise_shapley": ["valuation.stopping.max_checks=1", "valuation.n_train=30"],
    "least_core": ["valuation.n_samples=60"],
}

# noisy-label detection AUC of each method on this seeded problem (6 flipped labels among 24 points; class-wise
# 7 among 30): measured once, pinned so that a method computing something else fails
AUC = {"banzhaf_msr": 0.6944, "beta_shapley": 0.8056, "classwise_shapley": 0.7143, "data_oob": 0.8889,
       "knn_shapley": 0.9259, "least_core": 0.7315, "loo": 0.8843, "owen_shapley": 0.9074, "tmc_shapley": 0.6944}


@pytest.mark.parametrize("method", sorted(PER_METHOD))
def test_every_method_runs_and_writes_its_artifacts(tmp_path, method):
    s = run_job(tmp_path, SMALL + [f"valuation={method}"] + PER_METHOD[method])
    run = tmp_path / "run"
    for key in ("noisy/auc", "noisy/f1", "utility/evaluations", "time/valuation_s", "removal/high_mean_acc"):
        assert key in s, key
    assert s["noisy/auc"] == pytest.approx(AUC[method], abs=0.02)  # seeded: a pair or two of 108 may flip
    assert s["noisy/fraction"] == pytest.approx(7 / 30 if method == "classwise_shapley" else 6 / 24)
    if method != "knn_shapley":  # KNN-Shapley is closed-form: no utility is trained
        assert s["utility/evaluations"] > 0
    values, idx, meta = load_indexed(run / "values.npz", expect={"method": method, "split": "train"})
    assert len(values) == len(idx) == s["valuation/n"] and len(np.unique(idx)) == len(idx)
    assert meta["dataset"] == "digits" and meta["n_split"] > len(idx)
    from datamatters.valuation import ValuationResult

    algorithm = ValuationResult.load(run / "valuation_result.npz").algorithm  # one name per method
    assert algorithm == ("montecarlo_least_core" if method == "least_core" else method)
    assert (run / "point_removal.png").is_file() and (run / "noisy_detection.png").is_file()
    assert json.loads((run / "summary.json").read_text())["artifacts"]["values"].endswith("values.npz")


def test_sklearn_backend_and_resume(tmp_path):
    over = SMALL + ["valuation=tmc_shapley", "valuation.utility.backend=sklearn",
                    "valuation.utility.sklearn_model=gaussian_nb", "valuation.batch_size=1",
                    "valuation.stopping.max_updates=2"]
    first = run_job(tmp_path, over)
    assert first["valuation/resumed"] == 0
    again = run_job(tmp_path, over)  # a re-run in the same run dir finds the finished result
    assert again["valuation/resumed"] == 1 and again["utility/evaluations"] == first["utility/evaluations"]
    more = run_job(tmp_path, over[:-1] + ["valuation.stopping.max_updates=4"])  # a bigger budget continues it
    assert more["valuation/mean_count"] >= 4 > first["valuation/mean_count"]


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_job(tmp_path, SMALL + ["valuation.utility.backend=jax"])
    assert exit_.value.code == 1
    assert "error: valuation.utility.backend must be torch or sklearn, got 'jax'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_job(tmp_path, SMALL + ["valuation.stopping.max_updates=null", "valuation.stopping.max_time_s=null",
                                   "valuation.stopping.history_deviation=null"])
    assert "error: valuation.stopping sets no rule" in capsys.readouterr().err
    for n_jobs, message in (("0", "n_jobs=0 means no workers"), ("1.5", "n_jobs must be an integer")):
        with pytest.raises(SystemExit):
            run_job(tmp_path, SMALL + ["valuation=loo", f"valuation.n_jobs={n_jobs}"])
        assert message in capsys.readouterr().err
    from datamatters.tasks.valuation import run

    cfg = compose_cfg(["task=valuation", f"paths.output_dir={tmp_path}/x", "logger.wandb.enabled=false"])
    with pytest.raises(UserError, match="valuation=<method>"):
        run(cfg)


def test_every_valuation_option_composes():
    from conftest import CONFIG_DIR

    options = sorted(p.stem for p in (CONFIG_DIR / "valuation").glob("*.yaml"))
    assert len(options) == 9
    for option in options:
        cfg = compose_cfg(["+experiment=digits_valuation", f"valuation={option}"])
        assert cfg.valuation.method == option and cfg.valuation.n_train == 200
