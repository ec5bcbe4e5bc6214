"""The attribution job (one LDS scale for every method): tiny end-to-end runs, the control, store reuse/refusal."""
import json

import numpy as np
import pytest
from scipy import stats

from conftest import compose_cfg
from datamatters.errors import UserError
from datamatters.evaluation.attribution import lds_one_target, markdown_table, tables_from_results
from datamatters.evaluation.metrics import lds_from_scores

TINY = ["+experiment=attribution_digits", "logger.wandb.enabled=false", "attribution.models=[{label:logistic,name:logistic}]",
        "attribution.num_test=12", "attribution.train.epochs=8", "attribution.ground_truth.num_subsets=8",
        "attribution.ground_truth.seeds=2", "attribution.ground_truth.block=4", "attribution.n_boot=50"]
FEW = ["attribution.methods=[direct,graddot,tracin,knn_shapley,trak,data_oob]", "attribution.trak.checkpoints=[1,2]",
       "attribution.trak.outputs=[loss,margin]",
       "attribution.trak.projection_dims=[16]", "attribution.tracin_epochs=[4,8]",
       "attribution.valuation.data_oob.n_estimators=30"]


def run_job(tmp_path, overrides):
    """The job in-process, UserErrors raised (``dispatch`` would turn them into exit 1)."""
    from datamatters.tasks.attribution import run

    return run(compose_cfg([f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides]))


def _results(summary):
    return json.loads(open(summary["artifacts"]["results"]).read())


def test_lds_matches_scipy_spearman():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 25)) < 0.5
    scores = rng.normal(size=(6, 25))
    actual = masks @ scores.T + rng.normal(scale=2.0, size=(40, 6))
    got = lds_from_scores(scores, masks, actual, n_boot=10)["mean"]
    want = np.mean([stats.spearmanr(masks @ scores[t], actual[:, t])[0] for t in range(6)])
    assert got == pytest.approx(want, abs=1e-12)
    one = lds_one_target(masks @ scores[0], actual[:, 0], n_boot=200)
    assert one["mean"] == pytest.approx(stats.spearmanr(masks @ scores[0], actual[:, 0])[0], abs=1e-12)
    assert one["ci_low"] < one["mean"] < one["ci_high"]
    with pytest.raises(UserError, match="NaN"):
        lds_one_target([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])


def test_tiny_job_end_to_end_and_resume(tmp_path):
    s = run_job(tmp_path, TINY + FEW)
    res = _results(s)["models"]["logistic"]
    names = {r["method"] for r in res["rows"]}
    assert {"direct", "control: grad dot", "tracin (2 ckpts)", "knn-shapley (k=5)", "trak-1 (k=16)", "trak-2 (k=16)",
            "data_oob"} <= names
    for r in res["rows"]:
        assert -1 <= r["ci_low"] <= r["lds"] <= r["ci_high"] <= 1, r
        assert r["cost_s"] >= r["seconds"] >= 0 and s[f"lds/logistic/{r['method']}"] == r["lds"]
    assert {r["group"] for r in res["rows"] if r["method"] == "data_oob"} == {"global"}
    assert res["ground_truth_train_s"] > 0
    run = tmp_path / "run"
    assert (run / "lds_vs_cost.png").stat().st_size > 1000
    assert "| direct |" in (run / "attribution" / "logistic" / "table.md").read_text()
    assert (run / "attribution" / "logistic" / "table.md").read_text().strip() in tables_from_results(
        s["artifacts"]["results"])
    assert [r["trainings"] for r in res["rows"] if r["family"] == "trak k=16"] == [1, 2]
    assert [r["method"] for r in res["rows"] if r["family"] == "trak-margin k=16"] == ["trak-margin-1 (k=16)",
                                                                                    "trak-margin-2 (k=16)"]
    # re-run into the same dir: nothing is retrained, rows come back identical
    again = _results(run_job(tmp_path, TINY + FEW))["models"]["logistic"]
    assert again["ground_truth_train_s"] == 0
    assert again["rows"] == res["rows"]


@pytest.mark.slow
def test_datamodels_curve_in_the_job(tmp_path):
    s = run_job(tmp_path, TINY + ["attribution.methods=[datamodels]", "attribution.datamodels.sizes=[220,260]",
                                  "attribution.datamodels.block=130"])
    rows = {r["method"]: r for r in _results(s)["models"]["logistic"]["rows"]}
    assert rows["datamodels-220"]["trainings"] == 220 and rows["datamodels-260"]["trainings"] == 260
    assert rows["datamodels-260"]["cost_s"] > rows["datamodels-260"]["seconds"]  # the trainings are charged


def test_control_scores_clearly_below_direct_on_logistic(tmp_path):
    s = run_job(tmp_path, ["+experiment=attribution_digits", "logger.wandb.enabled=false",
                           "attribution.models=[{label:logistic,name:logistic}]", "attribution.num_test=30",
                           "attribution.train.epochs=30", "attribution.ground_truth.num_subsets=40",
                           "attribution.ground_truth.seeds=2", "attribution.n_boot=100",
                           "attribution.methods=[direct,graddot]"])
    direct, control = s["lds/logistic/direct"], s["lds/logistic/control: grad dot"]
    assert direct > 0.6 and direct - control > 0.15, (direct, control)


def test_ground_truth_store_refused_for_other_masks_or_model(tmp_path):
    store = tmp_path / "gt"
    base = TINY + [f"attribution.ground_truth.store={store}", "attribution.methods=[graddot]",
                   "attribution.ground_truth.n_test=12"]
    run_job(tmp_path / "a", base)
    with pytest.raises(UserError, match="other masks, data or model.*alpha"):
        run_job(tmp_path / "b", base + ["attribution.ground_truth.alpha=0.3"])
    with pytest.raises(UserError, match="other masks, data or model.*'recipe'"):
        run_job(tmp_path / "c", base + ["attribution.train.epochs=5"])
    with pytest.raises(UserError, match="other masks, data or model.*meta 'model'"):
        run_job(tmp_path / "e", base + ["attribution.models=[{label:logistic,name:mlp,hidden:[4]}]"])
    with pytest.raises(UserError, match="ground truth holds 5 test points"):
        run_job(tmp_path / "d", base + ["attribution.ground_truth.n_test=5"])
    # the store holds the first 12 test points; a run storing the whole test split cannot use it
    with pytest.raises(UserError, match=r"store .* holds 12 test points, this run scores 359; lower attribution"):
        run_job(tmp_path / "f", base + ["attribution.ground_truth.n_test=null"])


def test_bad_input_is_one_clear_message(tmp_path):
    """Refused from the settings, before any model is trained (no run dir content, no ground truth)."""
    with pytest.raises(UserError, match=r"TracIn needs the checkpoints .*tracin_epochs must list epochs in 1..8.*\[\]"):
        run_job(tmp_path, TINY + ["attribution.methods=[tracin]", "attribution.tracin_epochs=[]"])
    with pytest.raises(UserError, match=r"tracin_epochs must list epochs in 1..8 .*got \[4, 9\]"):
        run_job(tmp_path, TINY + ["attribution.methods=[tracin]", "attribution.tracin_epochs=[4,9]"])
    with pytest.raises(UserError, match=r"TRAK needs independently trained checkpoints.*got \[\]"):
        run_job(tmp_path, TINY + ["attribution.methods=[trak]", "attribution.trak.checkpoints=[]"])
    with pytest.raises(UserError, match=r"trak.dtype must be null, float32 or float64, got 'float16'"):
        run_job(tmp_path, TINY + ["attribution.methods=[trak]", "attribution.trak.dtype=float16"])
    with pytest.raises(UserError, match=r"datamodels.sizes must list model counts >= 1, got \[0\]"):
        run_job(tmp_path, TINY + ["attribution.methods=[datamodels]", "attribution.datamodels.sizes=[0]"])
    with pytest.raises(UserError, match="unknown attribution methods"):
        run_job(tmp_path, TINY + ["attribution.methods=[nope]"])
    assert not (tmp_path / "run" / "ground_truth").exists()


def test_settings_resolve_interpolations_against_the_whole_config():
    """direct_wd's damping is ${attribution.train.weight_decay}: it must follow the recipe, not fail to resolve."""
    from datamatters.tasks.attribution import settings

    s = settings(compose_cfg(["+experiment=attribution_digits", "attribution.train.weight_decay=0.003"]))
    assert s.influence.direct_wd.regularization == 0.003 and s.train.weight_decay == 0.003
    with pytest.raises(UserError, match="bad attribution config"):
        settings(compose_cfg(["+experiment=attribution_digits", "+attribution.influence.x.regularization=${nope}"]))


def test_trak_margin_is_log_odds_of_the_label():
    import torch

    from datamatters.tasks.attribution_methods import neg_margin

    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    p = torch.softmax(logits, 1)[torch.arange(5), y]
    for i in range(5):
        assert float(neg_margin(logits[i:i + 1], y[i:i + 1])) == pytest.approx(-float(torch.log(p[i] / (1 - p[i]))))


def test_wandb_table_accepts_mixed_damping_values():
    """A real run's rows mix numeric, per-layer and 'auto' damping; wandb.Table refuses mixed column types."""
    import wandb

    from datamatters.evaluation.attribution import COLUMNS
    from datamatters.tasks.attribution import table_data

    base = {"group": "per_test", "lds": 0.5, "ci_low": 0.4, "ci_high": 0.6, "seconds": 1.0, "cost_s": 2.0,
            "trainings": 1, "grad_passes": 1, "peak_mib": 0.0}
    rows = [{**base, "method": "direct", "damping": 0.001}, {**base, "method": "datainf", "damping": "auto"},
            {**base, "method": "graddot", "damping": None}, {**base, "method": "x", "damping": {"fc1": 0.1}}]
    t = wandb.Table(columns=list(COLUMNS), data=table_data(rows))
    assert [r[-1] for r in t.data] == ["0.001", "auto", None, "{'fc1': 0.1}"]


def test_tables_from_results_refuses_other_files(tmp_path):
    bad = tmp_path / "refs.json"
    bad.write_text(json.dumps({"models": {"logistic": {"rows": [{"method": "trak timing (k=64)"}]}}}))
    with pytest.raises(UserError, match="not an attribution job's results file"):
        tables_from_results(bad)


def test_markdown_table_groups_global_values_last():
    rows = [{"method": "v", "group": "global", "lds": 0.5, "ci_low": 0.4, "ci_high": 0.6},
            {"method": "a", "lds": 0.1, "ci_low": 0.0, "ci_high": 0.2},
            {"method": "b", "lds": 0.9, "ci_low": 0.8, "ci_high": 0.95}]
    lines = markdown_table(rows).splitlines()
    order = [line.split("|")[1].strip() for line in lines[2:]]
    assert order[:2] == ["b", "a"] and "global values" in order[2] and order[3] == "v"


def test_converged_recipe_of_the_logistic_model_reaches_the_optimum():
    """The config's own recipe for the logistic model (full-batch heavy-ball SGD) lands on the L-BFGS optimum of mean
    CE + wd/2 |theta|^2 on its subset; the shared Adam-60 recipe (the control) does not."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from datamatters.tasks.attribution import _gt_masks, _tensors, recipe, settings
    from datamatters.tasks.building import build_datamodule, build_network
    from datamatters.training.ensemble import train_ensemble

    cfg = compose_cfg(["+experiment=attribution_digits"])
    s, dm = settings(cfg), build_datamodule(cfg)
    model = next(m for m in s.models if m.label == "logistic")
    conv, adam = recipe(s, model), recipe(s, OmegaConf.create({"label": "x", "name": "logistic"}))
    assert conv["optimizer"] == "sgd" and adam["optimizer"] == "adam" and conv["weight_decay"] == adam["weight_decay"]
    X, y = _tensors(dm, "train")
    masks = _gt_masks(len(y), s.ground_truth, [0, 1])
    Xa = torch.cat([X.double().flatten(1), torch.ones(len(y), 1, dtype=torch.double)], 1)
    errs = {}
    for name, rec in (("converged", conv), ("adam", adam)):
        p = train_ensemble(build_network(OmegaConf.create({"name": "logistic"}), dm), X, y, masks, seed=1, **rec)
        W, b = p["net.1.weight"].double(), p["net.1.bias"].double()
        errs[name] = []
        for i in range(2):
            m = torch.as_tensor(masks[i], dtype=torch.double)
            V = torch.zeros(Xa.shape[1], 10, dtype=torch.double, requires_grad=True)
            opt = torch.optim.LBFGS([V], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                    history_size=50, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = (F.cross_entropy(Xa @ V, y, reduction="none") * m).sum() / m.sum() + \
                    rec["weight_decay"] / 2 * (V ** 2).sum()
                loss.backward()
                return loss
            opt.step(closure)
            got = torch.cat([W[i].T, b[i][None]])
            errs[name].append(float((got - V.detach()).norm() / V.detach().norm()))
    assert max(errs["converged"]) < 1e-4 and min(errs["adam"]) > 1e-2, errs


def test_damping_chosen_on_held_out_points(tmp_path):
    """regularization: select fits every grid value, keeps the one with the best LDS on the held-out test points (not
    the scored ones) and reports it; too few test points for scored + held-out is one clear message."""
    s = run_job(tmp_path, TINY + ["attribution.methods=[direct]", "attribution.damping_select.points=20",
                                  "attribution.damping_select.grid=[0.01,1.0,100.0]"])
    res = _results(s)["models"]["logistic"]
    row = res["rows"][0]
    held = row["held_out_lds"]
    lams = [f * res["spectrum"]["mean"] for f in (0.01, 1.0, 100.0)]
    assert sorted(float(k) for k in held) == pytest.approx(sorted(lams), rel=1e-3)
    best = max(held, key=held.get)
    assert row["damping"] == pytest.approx(float(best), rel=1e-3) and row["grad_passes"] == 3
    assert len(set(held.values())) == 3  # the grid values give different rankings: the choice is not vacuous
    with pytest.raises(UserError, match=r"needs num_test \+ damping_select.points = 12 \+ 400 test points"):
        run_job(tmp_path / "b", TINY + ["attribution.methods=[direct]", "attribution.damping_select.points=400"])


def test_a_models_own_recipe_keys_its_store_and_max_epochs_caps_it(tmp_path):
    from datamatters.tasks.attribution import recipe, settings, tracin_epochs

    own = "attribution.models=[{label:logistic,name:logistic,tracin_epochs:[5,8],train:{optimizer:sgd,momentum:0.9}}]"
    s = settings(compose_cfg(["+experiment=attribution_digits", own, "attribution.max_epochs=6"]))
    assert recipe(s, s.models[0]) == {"epochs": 6, "batch_size": 64, "lr": 0.01, "weight_decay": 0.001,
                                      "optimizer": "sgd", "momentum": 0.9}
    assert tracin_epochs(s, s.models[0]) == [5, 6]
    with pytest.raises(UserError, match=r"models\[logistic\].train: unknown keys \['lr_decay'\]"):
        settings(compose_cfg(["+experiment=attribution_digits",
                              "attribution.models=[{label:logistic,name:logistic,train:{lr_decay:0.1}}]"]))
    store = tmp_path / "gt"
    base = TINY + [f"attribution.ground_truth.store={store}", "attribution.methods=[graddot]"]
    run_job(tmp_path / "a", base)
    with pytest.raises(UserError, match="other masks, data or model.*'recipe'"):
        run_job(tmp_path / "c", base + [own.replace("[5,8]", "[4,8]")])


def test_trak_damping_factor_of_its_own(tmp_path):
    """attribution.trak.damping_factor=0 is traker's lambda_reg = 0 (like for like); null follows the job's rule."""
    base = TINY + ["attribution.methods=[trak]", "attribution.trak.checkpoints=[1]", "attribution.trak.projection_dims=[16]"]
    zero = _results(run_job(tmp_path / "a", base + ["attribution.trak.damping_factor=0"]))["models"]["logistic"]["rows"]
    rule = _results(run_job(tmp_path / "b", base))["models"]["logistic"]["rows"]
    assert zero[0]["damping"] == 0.0 and rule[0]["damping"] > 0 and zero[0]["lds"] != rule[0]["lds"]


@pytest.mark.slow
def test_trak_float32_rows_in_the_job(tmp_path):
    """attribution.trak.dtype=float32 (traker's precision): rows of their own label with the float64 rows' LDS (the
    fast twins: trak_ensemble's float32 tests in test_influence.py, the bad dtype in test_bad_input_...)."""
    base = TINY + ["attribution.methods=[trak]", "attribution.trak.checkpoints=[1]", "attribution.trak.projection_dims=[16]"]
    rule = _results(run_job(tmp_path, base))["models"]["logistic"]["rows"]
    f32 = _results(run_job(tmp_path, base + ["attribution.trak.dtype=float32"]))["models"]["logistic"]["rows"]
    assert [r["method"] for r in f32] == [r["method"].replace(")", ", float32)") for r in rule]
    assert rule[0]["method"] == "trak-1 (k=16)" and len(rule) == 2  # loss and margin outputs
    for a, b in zip(f32, rule):
        assert a["lds"] == pytest.approx(b["lds"], abs=1e-3) and a["damping"] == b["damping"]


def _refs_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attribution_refs.py"
    spec = importlib.util.spec_from_file_location("attribution_refs_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refs_seed_noise_prediction_and_run_pruning(monkeypatch):
    """benchmarks/attribution_refs.py: with kronfluence's runs = ours + independent noise, ours vs the mean of m runs
    follows sqrt(m r / (1 + (m - 1) r)); a systematic difference (the control) falls clearly below it. A run goes from
    the runs list only when later runs repeat each of its parts (a float32 TRAK run does not repeat a float64 one)."""
    R = _refs_module()
    truth = np.random.default_rng(0).normal(size=(40, 300))
    bias = np.random.default_rng(99).normal(size=truth.shape)
    for shift, agrees in ((0.0, True), (0.6, False)):
        def run(p, lam, empirical, seed=0):
            return truth + shift * bias + 0.6 * np.random.default_rng(seed + 1).normal(size=truth.shape)

        monkeypatch.setattr(R, "kronfluence_ekfac", run)
        monkeypatch.setattr(R, "lds", lambda p, s: {"lds": 0.0})
        row = R.kronfluence_seeds(None, 1e-3, truth, run(None, 0, False, 0), 5)
        gap = np.abs(np.subtract(row["pearson_ours_vs_mean_of_m_seeds"], row["expected_if_noise"]))
        assert (gap.max() < 0.01) == agrees, (shift, row)
        assert row["pearson_ours_vs_mean_of_m_seeds"][-1] > row["pearson_ours_vs_mean_of_m_seeds"][0]

    def rec(models, parts, dtype=None, dims=(64, 512)):
        return {"models": models, "protocol": {"parts": parts, "trak_dtype": dtype, "trak_damping_factor": None,
                                               "trak_outputs": ["loss", "margin"], "trak_dims": list(dims),
                                               "trak_counts": [1, 10, 50]}}

    both, f32, ek, f64 = (rec(["mlp"], ["trak", "ekfac"]), rec(["mlp"], ["trak"], "float32"), rec(["mlp"], ["ekfac"]),
                          rec(["mlp"], ["trak"]))
    assert R.prune_runs([both, f32, ek]) == [both, f32, ek]  # its TRAK rows are not repeated in float32
    assert R.prune_runs([both, f32, ek, f64]) == [f32, ek, f64]
    assert R.prune_runs([both, rec(["mlp"], ["trak"], dims=(64,)), ek]) == [both, rec(["mlp"], ["trak"], dims=(64,)),
                                                                            ek]  # k = 512 rows not repeated
