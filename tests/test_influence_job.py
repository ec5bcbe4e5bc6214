"""The influence job: every method config composes and builds its influence model; a small digits run writes the
zarr matrix, self-influence and summary.json (LDS, noisy-label AUC, timings); the dask variant gives the same
matrix; bad configs fail with one clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CONFIG_DIR, compose_cfg, run_job

from datamatters.artifacts import load_indexed
from datamatters.errors import UserError
from datamatters.influence import METHODS, store

METHOD_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "influence").glob("*.yaml"))
SMALL = ["+experiment=digits_influence", "model.hidden=[6]", "influence.num_test=12", "influence.lds.num_models=6",
         "influence.train.epochs=3", "influence.lds.n_boot=50", "logger.wandb.enabled=false"]


def test_every_method_has_a_config_that_builds_its_model():
    from omegaconf import OmegaConf

    from datamatters.tasks.influence import _method, settings

    assert set(METHOD_CONFIGS) == set(METHODS)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4), torch.nn.Tanh(), torch.nn.Linear(4, 10))
    cfg = compose_cfg(["+experiment=digits_influence", "influence=trak", "paths.output_dir=/tmp/x"])
    assert cfg.influence.method == "trak" and cfg.influence.num_test == 100  # the group option and the experiment
    for name in METHOD_CONFIGS:  # each option file on top of the experiment's shared settings
        option = OmegaConf.load(CONFIG_DIR / "influence" / f"{name}.yaml")
        cfg.influence = OmegaConf.merge(OmegaConf.masked_copy(cfg.influence, ["num_test", "lds", "train"]), option)
        inf = _method(settings(cfg), model.double(), torch.nn.functional.cross_entropy)
        assert isinstance(inf, METHODS[name]), name


def test_digits_job_writes_matrix_self_influence_and_summary(tmp_path):
    summary = run_job(tmp_path, [*SMALL, "influence=cg", "influence.curvature=gauss_newton",
                                 "influence.params.materialize=true"])
    # the job is deterministic (seeded data, noise, training and LDS models): pinned values of this run
    assert summary["lds/mean"] == pytest.approx(0.4857, abs=0.02)
    assert summary["lds/ci_low"] == pytest.approx(0.3044, abs=0.03)
    assert summary["noisy/auc"] == pytest.approx(0.8631, abs=0.01)
    assert summary["test/acc"] == pytest.approx(6 / 12, abs=0.09)  # at most one of the 12 test points flips
    for key in ("time/fit_s", "time/matrix_s", "time/self_influence_s", "time/lds_models_s"):
        assert summary[key] > 0, key
    assert summary["influence/n_test"] == 12 and summary["influence/solve_calls"] >= 1
    arr, test_idx, train_idx, meta = store.open_matrix(summary["artifacts"]["influences"],
                                                       expect={"dataset": "digits", "method": "cg"})
    assert arr.shape == (12, summary["influence/n_train"]) == (12, 629)
    assert float(np.abs(arr[:]).sum()) == pytest.approx(22003.744, rel=1e-5)
    assert len(set(test_idx)) == 12 and len(set(train_idx)) == arr.shape[1]
    values, idx, si_meta = load_indexed(summary["artifacts"]["self_influence"], expect={"method": "cg"})
    assert np.array_equal(idx, train_idx) and (values > 0).all()  # <g, (H + lambda)^-1 g> with a PD curvature


def test_dask_variant_gives_the_sequential_matrix(tmp_path):
    over = [*SMALL, "influence=ekfac", "influence.self_influence=false", "influence.test_chunk=5",
            "influence.train_chunk=200"]
    seq = run_job(tmp_path / "seq", over)
    dsk = run_job(tmp_path / "dask", [*over, "influence.calculator=dask", "influence.dask_processes=false"])
    a = store.open_matrix(seq["artifacts"]["influences"])
    b = store.open_matrix(dsk["artifacts"]["influences"])
    np.testing.assert_allclose(b[0][:], a[0][:], rtol=1e-8, atol=1e-10)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert a[3]["method"] == b[3]["method"] == "ekfac"  # one name on both paths (was "EkfacInfluence" on dask)
    assert dsk["lds/mean"] == pytest.approx(seq["lds/mean"])


@pytest.mark.parametrize("overrides,match", [
    (["influence.method=nope"], "unknown influence method"),
    (["+influence.regularisation=1"], "bad influence config"),
    (["influence.calculator=spark"], "sequential' or 'dask"),
    (["influence.params.rank=-1", "influence=arnoldi"], "rank must be >= 1"),
    (["influence=ekfac", "+influence.curvature=hessian"], "influence.curvature=hessian is not an option of "
                                                         "influence=ekfac"),
    (["influence=ekfac", "+influence.block_structure=full"], "influence.block_structure=full is not an option"),
])
def test_bad_configs_fail_clearly(tmp_path, overrides, match):
    from datamatters.tasks.influence import run

    cfg = compose_cfg([f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *SMALL, *overrides])
    with pytest.raises(UserError, match=match):
        run(cfg)


def test_trained_weights_must_match_the_network():
    from datamatters.tasks.influence import _trained_model

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = {k: torch.full_like(v, 0.5) for k, v in net.named_parameters()}
    model = _trained_model(net, state)  # buffers (running stats) stay the template's, as the trainer kept them
    assert float(model[0].weight.sum()) == 3.0 and torch.equal(model[1].running_var, net[1].running_var)
    with pytest.raises(UserError, match=r"missing \['0.bias'\], unexpected \[\]"):
        _trained_model(net, {k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(UserError, match=r"missing \[\], unexpected \['head.weight'\]"):
        _trained_model(net, {**state, "head.weight": torch.zeros(2)})


def test_no_method_selected_is_a_clear_error(tmp_path):
    from datamatters.tasks.influence import settings

    with pytest.raises(UserError, match="no influence method selected"):
        settings(compose_cfg(["task=influence", "paths.output_dir=/tmp/x"]))
    with pytest.raises(UserError, match="no influence method selected"):  # debug's sizes are not a method
        settings(compose_cfg(["task=influence", "+debug=fast", "paths.output_dir=/tmp/x"]))


# pinned from the deterministic runs (LDS over 12 test points and 6 held-out models, noisy AUC, sum |influences|)
PINNED = {"arnoldi": (0.3095, 0.5703, 12099.728), "cg": (0.4857, 0.8631, 22003.799),
          "datainf": (0.0095, 0.8181, 7653696.4), "direct": (0.4857, 0.8631, 22003.772),
          "ekfac": (0.4524, 0.8365, 34962.667), "lissa": (0.3095, 0.8501, 12736.809),
          "nystroem": (0.5476, 0.8651, 32265.448), "trak": (0.3048, 0.9606, 39497.577)}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_as_a_job(tmp_path, method):
    summary = run_job(tmp_path, [*SMALL, f"influence={method}", "influence.params.maxiter=50"
                                 if method == "lissa" else "influence.dtype=float64"])
    lds, auc, total = PINNED[method]
    assert summary["lds/mean"] == pytest.approx(lds, abs=0.02) and summary["noisy/auc"] == pytest.approx(auc, abs=0.01)
    M = store.open_matrix(summary["artifacts"]["influences"])[0][:]
    assert float(np.abs(M).sum()) == pytest.approx(total, rel=1e-4)


def _datamodels_eval_store(tmp_path, noise: float, n_models: int = 5):
    """A datamodels eval store made by the datamodels code itself (its spec and metadata), filled with random rows."""
    from datamatters.datamodels import initialize_store
    from datamatters.tasks.building import build_datamodule
    from datamatters.tasks.datamodels_common import store_spec

    cfg = compose_cfg(["+experiment=digits_datamodels", f"datamodels.num_eval_models={n_models}",
                       f"data.label_noise.pc_corrupted={noise}", f"paths.log_dir={tmp_path}",
                       f"paths.output_dir={tmp_path}/dm"])
    dm = build_datamodule(cfg)
    spec = store_spec(cfg, dm, "eval")
    st = initialize_store(tmp_path / f"eval_store_{noise}", spec)
    rng = np.random.default_rng(0)
    n, T = spec.shape("masks")[0], spec.shape("margins")[0]
    st.write_rows(list(range(n_models)), {"masks": rng.random((n_models, n)) < 0.5,
                                          "margins": rng.normal(size=(n_models, T)).astype(np.float32)})
    return st


def test_lds_on_the_held_out_models_of_a_datamodels_store(tmp_path):
    from datamatters.evaluation.metrics import lds_from_scores

    st = _datamodels_eval_store(tmp_path, noise=0.1)
    summary = run_job(tmp_path / "run", [*SMALL, "influence=trak", "influence.self_influence=false",
                                         f"influence.lds.store={st.path}"])
    M = store.open_matrix(summary["artifacts"]["influences"])[0][:]
    want = lds_from_scores(M, np.asarray(st["masks"]), np.asarray(st["margins"])[:, :12], n_boot=50, seed=0)
    assert summary["lds/num_models"] == 5 and summary["lds/mean"] == pytest.approx(want["mean"])
    other = _datamodels_eval_store(tmp_path, noise=0.0)  # other labels on the train split: not the same models
    from datamatters.tasks.influence import run

    cfg = compose_cfg([f"paths.log_dir={tmp_path}/bad", f"paths.output_dir={tmp_path}/bad/run", *SMALL,
                       "influence=trak", f"influence.lds.store={other.path}"])
    with pytest.raises(UserError, match="train_labels"):
        run(cfg)
