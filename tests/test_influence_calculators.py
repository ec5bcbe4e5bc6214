"""Sequential and dask calculators: same numbers as one in-memory call, factors computed once per test chunk,
zarr output with indices and metadata, and a clear refusal of multi-threaded dask workers."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamatters.errors import UserError
from datamatters.influence import DirectInfluence
from datamatters.influence.trak import TrakInfluence
from datamatters.influence import store
from datamatters.influence.calculators import DaskInfluenceCalculator, SequentialInfluenceCalculator, write_dask


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # module fixtures fit models too


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    train = [(torch.arange(i, i + 20), X[i:i + 20], Y[i:i + 20]) for i in range(0, 60, 20)]
    test = [(torch.arange(100 + i, 105 + i), X[i:i + 5], Y[i:i + 5]) for i in range(0, 15, 5)]
    inf = DirectInfluence(model, F.cross_entropy, regularization=0.1).fit(train)  # calculators are method-agnostic
    return dict(X=X, Y=Y, train=train, test=test, inf=inf, full=inf.influences(X[:15], Y[:15], X, Y),
                pert=inf.influences(X[:15], Y[:15], X, Y, mode="perturbation"))


def _dask(s):
    X, Y = s["X"].numpy(), s["Y"].numpy()
    return (da.from_array(X[:15], chunks=5), da.from_array(Y[:15], chunks=5), da.from_array(X, chunks=20),
            da.from_array(Y, chunks=20))


def test_dask_scores_of_a_float32_trak_on_a_float64_model_are_float64(setup):
    """TrakInfluence(dtype=float32) computes in float32 and returns the caller's dtype; the dask graph must declare
    and deliver that dtype in both modes, as the in-memory call does."""
    X, Y = setup["X"].double(), setup["Y"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inf = TrakInfluence(model, F.cross_entropy, projection_dim=16, regularization=0.1, dtype="float32")
    inf.fit([(torch.arange(60), X, Y)])
    xt, yt, x, y = (da.from_array(a, chunks=c) for a, c in
                    ((X[:15].numpy(), 5), (Y[:15].numpy(), 5), (X.numpy(), 20), (Y.numpy(), 20)))
    calc = DaskInfluenceCalculator(inf, "synchronous")
    for mode in ("up", "perturbation"):
        want = inf.influences(X[:15], Y[:15], X, Y, mode=mode)
        arr = calc.influences(xt, yt, x, y, mode=mode)
        got = arr.compute(scheduler="synchronous")
        assert want.dtype == torch.float64 and arr.dtype == np.float64 and got.dtype == np.float64
        assert np.allclose(got, want.numpy(), rtol=1e-5, atol=1e-6 * want.abs().max().item())  # float32 compute


@pytest.mark.parametrize("budget", [1, 1 << 20], ids=["group_per_chunk", "one_group"])
def test_sequential_matches_in_memory_and_reuses_factors(setup, budget):
    inf = setup["inf"]
    calc = SequentialInfluenceCalculator(inf, factor_budget=budget)
    inf.stats.clear()
    got = calc.influences(setup["test"], setup["train"]).to_tensor()
    assert torch.allclose(got, setup["full"], rtol=1e-4, atol=1e-4)
    assert inf.stats["solve_calls"] == 3  # one inverse-curvature solve per test chunk, not per (test, train) pair
    # train gradients: once per train chunk and factor group (one group holds all three test chunks)
    assert inf.stats["from_factors_calls"] == (9 if budget == 1 else 3)
    pert = calc.influences(setup["test"], setup["train"], mode="perturbation").to_tensor()
    assert pert.shape == (15, 60, 6) and torch.allclose(pert, setup["pert"], rtol=1e-4, atol=1e-4)
    factors = torch.cat(list(calc.influence_factors(setup["test"])))
    assert torch.allclose(factors, inf.influence_factors(setup["X"][:15], setup["Y"][:15]), rtol=1e-4, atol=1e-5)
    diag = calc.self_influences(setup["train"])
    assert torch.allclose(diag, torch.diagonal(inf.influences(setup["X"], setup["Y"])), rtol=1e-4, atol=1e-4)


def test_sequential_to_zarr_keeps_indices_and_meta(setup, tmp_path):
    lazy = SequentialInfluenceCalculator(setup["inf"]).influences(setup["test"], setup["train"])
    path = lazy.to_zarr(tmp_path / "m.zarr", meta={"dataset": "synthetic"})
    arr, test_idx, train_idx, meta = store.open_matrix(path, expect={"dataset": "synthetic"})
    assert arr.shape == (15, 60) and arr.chunks == (5, 20)
    assert np.allclose(arr[:], setup["full"].numpy(), rtol=1e-4, atol=1e-4)
    assert list(test_idx) == list(range(100, 115)) and list(train_idx) == list(range(60))
    assert meta["method"] == "direct" and meta["mode"] == "up"  # the registry name, as the job's dask path writes
    with pytest.raises(UserError, match="made for dataset"):
        store.open_matrix(path, expect={"dataset": "digits"})


def test_dask_synchronous_matches_and_shares_factor_tasks(setup):
    inf = setup["inf"]
    xt, yt, x, y = _dask(setup)
    calc = DaskInfluenceCalculator(inf, "synchronous")
    inf.stats.clear()
    arr = calc.influences(xt, yt, x, y)
    assert arr.shape == (15, 60) and arr.chunks == ((5, 5, 5), (20, 20, 20))
    assert np.allclose(arr.compute(scheduler="synchronous"), setup["full"].numpy(), rtol=1e-4, atol=1e-4)
    assert inf.stats["solve_calls"] == 3 and inf.stats["from_factors_calls"] == 0  # features are shared nodes
    fac = calc.influence_factors(xt, yt).compute(scheduler="synchronous")
    assert np.allclose(fac, inf.influence_factors(setup["X"][:15], setup["Y"][:15]).numpy(), rtol=1e-4, atol=1e-5)
    pert = calc.influences(xt, yt, x, y, mode="perturbation").compute(scheduler="synchronous")
    assert pert.shape == (15, 60, 6) and np.allclose(pert, setup["pert"].numpy(), rtol=1e-4, atol=1e-4)


def test_dask_cluster_matches_sequential_and_writes_zarr(setup, tmp_path):
    from distributed import Client, LocalCluster

    xt, yt, x, y = _dask(setup)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        calc = DaskInfluenceCalculator(setup["inf"], client)
        arr = calc.influences(xt, yt, x, y)
        path = write_dask(arr, tmp_path / "d.zarr", np.arange(100, 115), np.arange(60), {"dataset": "synthetic"})
    got, test_idx, train_idx, meta = store.open_matrix(path, expect={"dataset": "synthetic"})
    assert np.allclose(got[:], setup["full"].numpy(), rtol=1e-4, atol=1e-4) and list(test_idx) == list(range(100, 115))


def test_dask_refuses_threaded_workers_and_bad_input(setup):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(UserError, match="not thread-safe.*threads_per_worker=1"):
            DaskInfluenceCalculator(setup["inf"], client)
    calc = DaskInfluenceCalculator(setup["inf"], "synchronous")
    xt, yt, x, y = _dask(setup)
    with pytest.raises(UserError, match="both x and y"):
        calc.influences(xt, yt, x, None)
    with pytest.raises(UserError, match="dask arrays"):
        calc.influences(setup["X"], setup["Y"])
    with pytest.raises(UserError, match="rows"):
        calc.influence_factors(xt, yt[:-1])
    with pytest.raises(UserError, match="distributed.Client"):
        DaskInfluenceCalculator(setup["inf"], object())
    with pytest.raises(UserError, match="not fitted"):
        SequentialInfluenceCalculator(DirectInfluence(nn.Linear(2, 2), F.mse_loss))


class _SlowMLP(nn.Module):
    """Sleeps mid-forward (releasing the GIL), so tasks on two worker threads interleave inside functional_call."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        import time

        h = torch.tanh(self.a(x))
        time.sleep(0.002)
        return self.b(h)


def test_in_process_dask_workers_do_not_race_on_the_shared_model(setup):
    """In-process workers (processes=False) all hold the caller's model object, and functional_call swaps its
    parameters while it runs: without the calculator's per-model lock, concurrent tasks read each other's
    parameters (wrong numbers or errors, more often under load)."""
    from distributed import Client, LocalCluster

    torch.manual_seed(1)  # float64: chunking then changes only the last bits, so the tolerance can be tight
    inf = DirectInfluence(_SlowMLP().double(), F.cross_entropy, regularization=0.1).fit(setup["train"])
    X, Y = setup["X"].double().numpy(), setup["Y"].numpy()
    want = inf.influences(torch.from_numpy(X[:15]), setup["Y"][:15], torch.from_numpy(X), setup["Y"]).numpy()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = DaskInfluenceCalculator(inf, client).influences(
            da.from_array(X[:15], chunks=3), da.from_array(Y[:15], chunks=3), da.from_array(X, chunks=6),
            da.from_array(Y, chunks=6)).compute()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
