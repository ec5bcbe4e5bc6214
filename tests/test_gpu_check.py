"""benchmarks/gpu/check.sh --tiny: every part of the GPU check runs on the CPU, without the modules the GPU machine
lacks, and writes a JSON with sane numbers; one part's failure or timeout does not lose the others."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABSENT = ("hydra", "omegaconf", "antlr4", "wandb", "hmmlearn", "submitit", "zarr", "dask", "distributed", "mnist1d")
BLOCKER = ("import sys\nfor _m in {names!r}:\n"
           "    sys.modules[_m] = None  # import -> ModuleNotFoundError, importlib.util.find_spec -> None\n")


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """An environment whose Python cannot import what the GPU machine lacks (a sitecustomize on PYTHONPATH)."""
    d = tmp_path_factory.mktemp("blocked")
    (d / "sitecustomize.py").write_text(BLOCKER.format(names=ABSENT))
    env = {**os.environ, "PYTHONPATH": str(d), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    # control: the blocker is active in a child process
    r = subprocess.run([sys.executable, "-c", "import omegaconf"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "omegaconf" in r.stderr
    return env


def run_check(env, out: Path, *args, timeout=600):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "--tiny", *args],
                       env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_common(rec, name):
    assert rec["part"] == name and rec["status"] == "ok", rec.get("traceback") or rec.get("error")
    assert rec["tiny"] is True and rec["device"].startswith("cpu") and finite_pos(rec["wall_s"])
    assert {"machine", "threads", "repetitions", "headline"} <= set(rec)


def check_lasso(rec):
    check_common(rec, "lasso")
    agree = rec["agreement_vs_cpu_float64"]  # float32 sweeps on the "device" vs a float64 fit of the same problem
    assert agree["val_mse_max_rel_diff"] < 1e-3 and agree["prediction_max_rel_diff"] < 1e-2
    assert agree["same_lambda_fraction"] >= 0.8
    assert finite_pos(rec["seconds"]) and rec["goal_s"] == 60.0 and isinstance(rec["extrapolated"], bool)
    assert rec["met"] == (rec["seconds"] <= 60.0)
    assert rec["goal_text"].startswith("goal <= 60 s:")


def check_influence(rec):
    check_common(rec, "influence")
    m = rec["methods"]
    assert set(m) == {"direct", "cg", "ekfac"}
    assert all(finite_pos(v["fit_s"] + v["influences_s"]) for v in m.values())
    assert m["cg"]["pearson_vs_direct"] > 0.99999 and m["cg"]["rel_error_vs_direct"] < 1e-4  # CG solves exactly
    assert 0.3 < m["ekfac"]["pearson_vs_direct"] < 1.0  # an approximation: close, not equal


def check_knn(rec):
    check_common(rec, "knn_shapley")
    assert rec["max_abs_diff_vs_engine_small"] < 1e-12  # the torch recursion equals valuation/knn.py's
    assert 0.0 <= rec["values_sum_per_test_point"] <= 1.0  # u(N) - u(empty) of a KNN accuracy utility
    assert finite_pos(rec["seconds"]) and 0 < rec["test_points_done"] <= rec["n_test"]
    assert rec["extrapolated"] == (rec["test_points_done"] < rec["n_test"])


def test_tiny_check_without_the_absent_modules(blocked_env, tmp_path):
    """The fast twin: the parts that do not import lightning (importing it can take 25 s on a loaded machine)."""
    got = run_check(blocked_env, tmp_path, "--parts", "lasso", "influence", "knn_shapley")
    assert set(got) == {"lasso", "influence", "knn_shapley"}
    check_lasso(got["lasso"])
    check_influence(got["influence"])
    check_knn(got["knn_shapley"])
    assert "lasso" in (tmp_path / "check.log").read_text()


@pytest.mark.slow
def test_tiny_check_all_parts(blocked_env, tmp_path):
    got = run_check(blocked_env, tmp_path)
    assert set(got) == {"rho_throughput", "il_pass", "ensemble", "lasso", "influence", "knn_shapley"}
    check_lasso(got["lasso"])
    check_influence(got["influence"])
    check_knn(got["knn_shapley"])
    rho = got["rho_throughput"]
    check_common(rho, "rho_throughput")
    assert rho["benchmark"] == "rho_throughput" and [r["variant"] for r in rho["results"]] == ["uniform",
                                                                                             "rho_inference_fp32"]
    assert all(finite_pos(r["step_s"]) for r in rho["results"]) and finite_pos(rho["value"])
    il = got["il_pass"]
    check_common(il, "il_pass")
    assert all(finite_pos(v) for v in il["examples_per_s"].values()) and il["bf16_vs_fp32_max_rel_diff"] < 0.05
    ens = got["ensemble"]
    check_common(ens, "ensemble")
    assert finite_pos(ens["speedup"]) and ens["models"] == {"device": 8, "cpu": 4}
    assert ens["train_acc_max_abs_diff_same_models"] <= 0.02  # the same model ids train to the same models


@pytest.fixture
def check_mod():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_or_slow_part_does_not_lose_the_others(check_mod, tmp_path, monkeypatch):
    def boom(a, device, out):
        raise RuntimeError("planted failure")

    def slow(a, device, out):
        time.sleep(5)
        return {"headline": "never"}

    monkeypatch.setitem(check_mod.PARTS, "lasso", boom)
    monkeypatch.setitem(check_mod.PARTS, "influence", slow)
    monkeypatch.setitem(check_mod.PARTS, "knn_shapley", lambda a, d, o: {"headline": "fine", "value": 1.0})
    rc = check_mod.main(["--tiny", "--out", str(tmp_path), "--budget-scale", str(1 / 60),
                         "--parts", "lasso", "influence", "knn_shapley"])
    assert rc == 1
    got = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert got["lasso"]["status"] == "failed" and "planted failure" in got["lasso"]["error"]
    assert got["influence"]["status"] == "timeout" and got["influence"]["wall_s"] < 3
    assert got["knn_shapley"]["status"] == "ok" and got["knn_shapley"]["headline"] == "fine"


def test_knn_shapley_torch_stops_at_the_deadline(check_mod):
    """The budget-bound loop: past the deadline it stops after the first chunk, and what it did is exact."""
    import numpy as np
    import torch

    from datamatters.valuation.knn import knn_shapley_values, sorted_neighbours

    xs, ys = check_mod.blobs(400, 8, 3, 0, "cpu", torch.float64)
    xq, yq = check_mod.blobs(30, 8, 3, 1, "cpu", torch.float64)
    vals, done = check_mod.knn_shapley_torch(xq, yq, xs, ys, 5, chunk=10, deadline=0.0)
    assert done == 10
    ref = knn_shapley_values(sorted_neighbours(xq[:10].numpy(), xs.numpy()), ys.numpy(), yq[:10].numpy(), 5)
    np.testing.assert_allclose(vals.numpy(), ref, rtol=0, atol=1e-12)
    full, done = check_mod.knn_shapley_torch(xq, yq, xs, ys, 5, chunk=7, exact_distances=True)
    assert done == 30 and not np.allclose(full.numpy(), vals.numpy())


def test_lasso_part_extrapolates_when_the_budget_is_short(check_mod):
    import types

    import torch

    torch.manual_seed(0)
    a = types.SimpleNamespace(tiny=True, deadline=time.monotonic())  # no time left: the full size is extrapolated
    rec = check_mod.part_lasso(a, torch.device("cpu"), Path("."))
    assert rec["extrapolated"] is True and rec["extrapolated_from"] == "4 of 12 targets"
    assert rec["seconds"] == pytest.approx(rec["first_targets_s"] * 3)
    assert rec["agreement_vs_cpu_float64"]["val_mse_max_rel_diff"] < 1e-3
