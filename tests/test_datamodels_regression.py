"""The datamodel lasso path against scikit-learn, planted sparse recovery, SAGA vs Gram, slicing, raw units."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lasso_path
from sklearn.preprocessing import StandardScaler

from datamatters.datamodels import DatamodelFit, fit_datamodels, initialize_store, lasso_gram, standard_spec
from datamatters.datamodels.regression import lambda_path, moments, split_models, standardise
from datamatters.errors import UserError

F64 = torch.float64


def _problem(N=400, p=30, T=4, nnz=5, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((N, p)) < 0.5
    X[:, 7] = True  # a constant column (a point in every subset): sd 1, weight 0, as StandardScaler
    W = np.zeros((p, T))
    for t in range(T):
        W[rng.choice(p, nnz, replace=False), t] = rng.normal(size=nnz)
    W[7] = 0
    Y = X @ W + noise * rng.normal(size=(N, T)) + rng.normal(size=T)
    return X, Y.astype(np.float32), W


def _standardised(X, Y, rows=None):
    rows = np.arange(len(X)) if rows is None else rows
    return standardise(moments(X, Y, rows, slice(0, Y.shape[1])), F64)


@pytest.mark.parametrize("alpha", [1e-4, 0.05])
def test_fixed_lambda_equals_sklearn_lasso(alpha):
    X, Y, _ = _problem()
    S = _standardised(X, Y)
    W, conv = lasso_gram(S.Q, S.q, S.yy, alpha, tol=1e-12, max_iter=200000)
    assert conv.all()
    Xs = StandardScaler().fit_transform(X.astype(float))
    for t in range(Y.shape[1]):
        sk = Lasso(alpha=alpha, tol=1e-12, max_iter=1_000_000).fit(Xs, Y[:, t].astype(float))
        np.testing.assert_allclose(W[:, t].numpy(), sk.coef_, atol=1e-6)
    if alpha == 0.05:
        assert (W == 0).any()  # the penalty bites


def test_lambda_max_is_the_smallest_all_zero_lambda():
    X, Y, _ = _problem()
    S = _standardised(X, Y)
    lam = lambda_path(S.q, 5, 1e-2)
    W0, _ = lasso_gram(S.Q, S.q, S.yy, lam[0], tol=1e-10)
    assert (W0 == 0).all()
    W1, _ = lasso_gram(S.Q, S.q, S.yy, lam[0] * 0.98, tol=1e-10)
    assert ((W1 != 0).sum(0) >= 1).all()
    torch.testing.assert_close(lam[-1], lam[0] * 1e-2)


def _patience_choice(mse: np.ndarray, patience: int) -> int:
    best, since, k_best = np.inf, 0, 0
    for k, m in enumerate(mse):
        if m < best:
            best, since, k_best = m, 0, k
        else:
            since += 1
            if since > patience:
                break
    return k_best


@pytest.mark.parametrize("patience", [2, 100])
def test_path_val_mse_and_chosen_lambda_match_sklearn(patience):
    X, Y, _ = _problem(N=300, p=25, T=4, noise=1.0, seed=1)
    fit = fit_datamodels(X, Y, k=25, eps=1e-3, patience=patience, tol=1e-11, max_iter=100000, dtype=F64,
                         val_fraction=0.2, seed=3)
    tr, va = split_models(np.arange(len(X)), 0.2, 3)
    sc = StandardScaler().fit(X[tr].astype(float))
    for t in range(Y.shape[1]):
        ybar = Y[tr, t].astype(float).mean()
        alphas, coefs, _ = lasso_path(sc.transform(X[tr].astype(float)), Y[tr, t] - ybar,
                                      alphas=fit.path["lambdas"][:, t], tol=1e-12, max_iter=100000)
        mse = ((sc.transform(X[va].astype(float)) @ coefs + ybar - Y[va, t][:, None]) ** 2).mean(0)
        k_sk = _patience_choice(mse, patience)
        assert fit.lam_index[t] == k_sk
        reached = ~np.isnan(fit.path["val_mse"][:, t])
        assert reached[:k_sk + 1].all()
        np.testing.assert_allclose(fit.path["val_mse"][reached, t], mse[reached], rtol=2e-5)
        assert fit.lam[t] == pytest.approx(alphas[k_sk])
        assert fit.val_mse[t] == pytest.approx(mse[k_sk], rel=2e-5)
    if patience == 2:
        assert np.isnan(fit.path["val_mse"][-1]).any()  # early stopping skipped the end of some paths


def test_many_targets_path_matches_sklearn():
    """40 targets (the sweeps' no-skip branch; targets leave at different lambdas and rows are compacted): every
    target's validation MSE path and early-stopped lambda equal sklearn's."""
    X, Y, _ = _problem(N=300, p=25, T=40, noise=1.0, seed=4)
    fit = fit_datamodels(X, Y, k=20, eps=1e-3, patience=3, tol=1e-11, max_iter=100000, dtype=F64, val_fraction=0.2)
    tr, va = split_models(np.arange(len(X)), 0.2, 0)
    sc = StandardScaler().fit(X[tr].astype(float))
    Xt, Xv = sc.transform(X[tr].astype(float)), sc.transform(X[va].astype(float))
    stops = set()
    for t in range(Y.shape[1]):
        ybar = Y[tr, t].astype(float).mean()
        _, coefs, _ = lasso_path(Xt, Y[tr, t] - ybar, alphas=fit.path["lambdas"][:, t], tol=1e-12, max_iter=100000)
        mse = ((Xv @ coefs + ybar - Y[va, t][:, None]) ** 2).mean(0)
        assert fit.lam_index[t] == _patience_choice(mse, 3)
        reached = ~np.isnan(fit.path["val_mse"][:, t])
        np.testing.assert_allclose(fit.path["val_mse"][reached, t], mse[reached], rtol=2e-5)
        stops.add(int(reached.sum()))
    assert len(stops) > 3  # targets left the path at many different lambdas


def test_few_models_x_form_matches_sklearn():
    """N < p / 3: the solver never forms the Gram matrix; same path, same chosen lambda as sklearn."""
    X, Y, _ = _problem(N=40, p=150, T=3, noise=0.3, seed=7)
    fit = fit_datamodels(X, Y, k=8, eps=0.05, patience=100, tol=1e-11, max_iter=200000, dtype=F64, val_fraction=0.2)
    assert fit.meta["solver"] == "gram-xform"
    tr, va = split_models(np.arange(len(X)), 0.2, 0)
    sc = StandardScaler().fit(X[tr].astype(float))
    for t in range(Y.shape[1]):
        ybar = Y[tr, t].astype(float).mean()
        _, coefs, _ = lasso_path(sc.transform(X[tr].astype(float)), Y[tr, t] - ybar, alphas=fit.path["lambdas"][:, t],
                                 tol=1e-12, max_iter=200000)
        mse = ((sc.transform(X[va].astype(float)) @ coefs + ybar - Y[va, t][:, None]) ** 2).mean(0)
        np.testing.assert_allclose(fit.path["val_mse"][:, t], mse, rtol=1e-4)
        assert fit.lam_index[t] == np.argmin(mse)


def test_refit_weights_are_in_raw_mask_units():
    """W, b predict from raw masks and equal sklearn's lasso on train+val at the chosen lambda."""
    X, Y, _ = _problem(N=300, p=20, T=3, seed=2)
    fit = fit_datamodels(X, Y, k=15, tol=1e-11, max_iter=100000, dtype=F64)
    sc = StandardScaler().fit(X.astype(float))
    for t in range(Y.shape[1]):
        sk = Lasso(alpha=fit.lam[t], tol=1e-12, max_iter=1_000_000).fit(sc.transform(X.astype(float)), Y[:, t])
        pred_sk = sk.predict(sc.transform(X.astype(float)))
        np.testing.assert_allclose(fit.predict(X)[:, t], pred_sk, atol=1e-4)
        np.testing.assert_allclose(fit.W[:, t], sk.coef_ / sc.scale_, atol=1e-4)
        assert fit.nonzeros[t] == (np.abs(sk.coef_) > 0).sum()
    assert fit.W[7].tolist() == [0.0] * 3


def test_planted_sparse_model_is_recovered():
    X, Y, W = _problem(N=3000, p=60, T=6, nnz=4, noise=0.2, seed=4)
    fit = fit_datamodels(X, Y, k=40)
    for t in range(Y.shape[1]):
        true = set(np.flatnonzero(W[:, t]))
        top = set(np.argsort(-np.abs(fit.W[:, t]))[:len(true)])
        assert top == true
    np.testing.assert_allclose(fit.W, W, atol=0.05)
    assert fit.meta["unconverged_lambdas"] == 0


def test_target_slicing_and_store_input(tmp_path):
    X, Y, _ = _problem(N=300, p=20, T=6, seed=5)
    store = initialize_store(tmp_path / "s", standard_spec(320, 20, 6))
    store.write_rows(range(300), {"masks": X, "margins": Y})  # rows 300..319 are never completed
    full = fit_datamodels(store, "margins", k=15, dtype=F64, tol=1e-10)
    part = fit_datamodels(store["masks"], store["margins"], range(300), k=15, dtype=F64, tol=1e-10, start=2, end=5)
    np.testing.assert_allclose(part.W, full.W[:, 2:5], atol=1e-8)
    np.testing.assert_allclose(part.b, full.b[2:5], atol=1e-8)
    assert part.meta["start"] == 2 and part.meta["end"] == 5
    assert full.meta["n_train_models"] + full.meta["n_val_models"] == 300


def test_saga_streaming_solver_matches_gram():
    X, Y, _ = _problem(N=400, p=15, T=3, noise=0.5, seed=6)
    kw = dict(k=12, eps=1e-2, dtype=F64, patience=100)
    gram = fit_datamodels(X, Y, tol=1e-11, max_iter=100000, **kw)
    saga = fit_datamodels(X, Y, solver="saga", saga_tol=1e-13, saga_batch=40, saga_max_epochs=3000, **kw)
    assert saga.meta["solver"] == "saga"
    np.testing.assert_array_equal(saga.lam_index, gram.lam_index)
    np.testing.assert_allclose(saga.W, gram.W, atol=2e-4)
    np.testing.assert_allclose(saga.path["val_mse"], gram.path["val_mse"], rtol=1e-4)


def test_save_load_roundtrip(tmp_path):
    X, Y, _ = _problem(N=200, p=10, T=2)
    fit = fit_datamodels(X, Y, k=5)
    fit.meta["store"] = "x"
    fit.save(tmp_path / "dm.npz")
    back = DatamodelFit.load(tmp_path / "dm.npz", expect={"store": "x"})
    np.testing.assert_array_equal(back.W, fit.W)
    np.testing.assert_array_equal(back.path["val_mse"], fit.path["val_mse"])
    with pytest.raises(UserError, match="store"):
        DatamodelFit.load(tmp_path / "dm.npz", expect={"store": "y"})
    with pytest.raises(UserError, match="not found"):
        DatamodelFit.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("kw, match", [
    (dict(start=3, end=2), r"target slice \[3, 2\) is outside 0..3"),
    (dict(end=9), r"target slice \[0, 9\) is outside 0..3"),
    (dict(val_fraction=0.0), "need a validation split of at least 2 models"),
    (dict(val_fraction=0.001), "need a validation split of at least 2 models"),
    (dict(k=0), "need k >= 1, 0 < eps < 1"), (dict(eps=2.0), "need k >= 1, 0 < eps < 1"),
    (dict(solver="cd"), "solver must be auto, gram or saga, got 'cd'"),
    (dict(dtype=torch.bfloat16), r"dtype must be torch.float32 or torch.float64 \(or None\), got torch.bfloat16"),
    (dict(dtype="float32"), r"dtype must be torch.float32 or torch.float64 \(or None\), got 'float32'")])
def test_bad_settings_are_user_errors(kw, match):
    X, Y, _ = _problem(N=100, p=10, T=3)
    with pytest.raises(UserError, match=match):
        fit_datamodels(X, Y, **kw)


def test_tight_tol_is_honoured_without_stalling():
    """tol=1e-7: float32 sweeps stalled here (2 lambdas ran to max_iter, the path's val MSE off by 1e-4); the solver
    now switches to float64 below F32_MIN_TOL and every lambda converges, matching sklearn's exact path."""
    X, Y, _ = _problem(N=1000, p=120, T=6, nnz=10, noise=1.0, seed=5)
    fit = fit_datamodels(X, Y, k=50, eps=1e-3, patience=100, tol=1e-7, max_iter=5000, refit=False)
    assert fit.meta["unconverged_lambdas"] == 0 and fit.meta["dtype"] == "float64"
    assert fit.path["iters"].max() < 100
    tr, va = split_models(np.arange(len(X)), 0.1, 0)
    sc = StandardScaler().fit(X[tr].astype(float))
    for t in range(Y.shape[1]):
        ybar = Y[tr, t].astype(float).mean()
        _, coefs, _ = lasso_path(sc.transform(X[tr].astype(float)), Y[tr, t] - ybar, alphas=fit.path["lambdas"][:, t],
                                 tol=1e-13, max_iter=100000)
        mse = ((sc.transform(X[va].astype(float)) @ coefs + ybar - Y[va, t][:, None]) ** 2).mean(0)
        np.testing.assert_allclose(fit.path["val_mse"][:, t], mse, rtol=3e-4)
    loose = fit_datamodels(X, Y, k=5, tol=1e-4, refit=False)
    assert loose.meta["dtype"] == "float32"  # float32 where its gap is accurate enough
    with pytest.raises(UserError, match="below what float32 sweeps can reach"):  # forced float32 stalled here
        fit_datamodels(X, Y, k=5, tol=1e-7, dtype=torch.float32)


def _path_coefs(S, lambdas, tol, block=64):
    """Every lambda's coefficients (k, p, T) from the path solver, recorded through its val hook."""
    from datamatters.datamodels.regression import _BlockCD, _path_gram, _PathTracker

    k, T = lambdas.shape
    out = torch.full((k, S.Q.shape[0], T), float("nan"), dtype=F64)

    def hook(idx, W_rows):
        out[tracker.k[idx], :, idx] = W_rows
        return torch.zeros(len(idx), dtype=F64)

    tracker = _PathTracker(lambdas, k, hook)
    _path_gram(S, tracker, tol, 100000, _BlockCD(S.Q, block), False)
    return out.numpy()


def test_path_coefficients_equal_sklearn_lasso_path():
    """Extrapolated / plain warm starts, block steps, target rows: the coefficients at every lambda equal sklearn's."""
    X, Y, _ = _problem(N=300, p=40, T=5, nnz=6, noise=1.0, seed=8)
    S = _standardised(X, Y)
    lambdas = lambda_path(S.q, 30, 1e-3)
    coefs = _path_coefs(S, lambdas, 1e-14, block=8)
    Xs = StandardScaler().fit_transform(X.astype(float))
    for t in range(Y.shape[1]):
        yc = Y[:, t].astype(float) - Y[:, t].astype(float).mean()
        _, sk, _ = lasso_path(Xs, yc, alphas=lambdas[:, t].numpy(), tol=1e-13, max_iter=200000)
        np.testing.assert_allclose(coefs[:, :, t], sk.T, atol=1e-7)


def test_float32_cross_moments_are_centred_on_a_shift():
    """float32 X^T y (the float32 solver's moments) on y far from 0: within 1e-6 of float64 after centring; the
    naive float32 product (no shift) is not (control: its cancellation error is >100x larger)."""
    X, Y, _ = _problem(N=3000, p=60, T=3, seed=2)
    Y = Y + 1000.0
    rows = np.arange(len(X))

    def centred(m):
        return m.sxy / m.n - (m.sx / m.n)[:, None] * (m.sy / m.n)[None, :]

    exact = centred(moments(X, Y, rows, slice(0, 3)))
    fast = centred(moments(X, Y, rows, slice(0, 3), xy_dtype=torch.float32, chunk=1000))
    scale = exact.abs().max()
    err = float((fast - exact).abs().max() / scale)
    assert err < 1e-6
    X32, Y32 = torch.from_numpy(X.astype(np.float32)), torch.from_numpy(Y)
    naive = (X32.T @ Y32).double() / len(X) - (X32.double().mean(0))[:, None] * Y32.double().mean(0)[None, :]
    assert float((naive - exact).abs().max() / scale) > 100 * err


def test_duality_gap_equals_the_explicit_primal_dual_gap():
    """The Gram-form gap (cached lambda-free parts, finished at any lambda) equals sklearn's gap computed from the
    residual y - Xw on the standardised rows, at two lambdas and for a non-optimal w."""
    from datamatters.datamodels.regression import duality_gap, gap_from, gap_parts

    X, Y, _ = _problem(N=200, p=12, T=3, seed=6)
    S = _standardised(X, Y)
    Xs = StandardScaler().fit_transform(X.astype(float))
    W = torch.randn(3, 12, dtype=F64) * 0.3
    parts = gap_parts(S.q.T, W, W @ S.Q)
    for lam in (0.01, 0.2):
        lam_t = torch.full((3,), lam, dtype=F64)
        got = gap_from(parts, S.yy, lam_t)
        torch.testing.assert_close(got, duality_gap(S.q.T, S.yy, lam_t, W, W @ S.Q))
        for t in range(3):
            y = Y[:, t].astype(float) - Y[:, t].astype(float).mean()
            w = W[t].numpy()
            n = len(y)
            r = y - Xs @ w
            dual_norm = np.abs(Xs.T @ r).max() / n
            c = lam / dual_norm if dual_norm > lam else 1.0
            gap = 0.5 * (r @ r / n) * (1 + c * c) + lam * np.abs(w).sum() - c * (r @ y) / n
            assert float(got[t]) == pytest.approx(gap, rel=1e-9)


@pytest.mark.parametrize("solver", ["gram", "saga"])
def test_non_finite_outputs_are_one_user_error(solver):
    """A NaN or inf output in the rows fitted is one UserError naming the target (it gave NaN weights silently);
    the same outputs without it fit (control)."""
    X, Y, _ = _problem(N=100, p=10, T=3)
    fit_datamodels(X, Y, k=3, solver=solver, saga_max_epochs=3)
    for bad in (np.nan, np.inf):
        Yb = Y.astype(float)
        Yb[7, 2] = bad
        with pytest.raises(UserError, match=r"outputs hold NaN or inf for targets \[2\]"):
            fit_datamodels(X, Yb, k=3, solver=solver, saga_max_epochs=3)
