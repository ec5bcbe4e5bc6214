"""LogisticUtility fits scikit-learn's LogisticRegression objective for a batch of subsets: the same coefficients
(multinomial and binary) and utilities as scikit-learn, one-class subsets fail as in scikit-learn."""
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from datamatters.errors import UserError
from datamatters.valuation import Dataset, LogisticUtility, ModelUtility, SupervisedScorer
from datamatters.valuation.logistic import fit_logistic_batch


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """scikit-learn's fits on small data run fastest on one BLAS thread; with two, the suite's two workers
    oversubscribe the 2 cores (test_coefficients_equal_sklearn[1.0]: 12.6 s -> 1 s here)."""
    with threadpool_limits(1):
        yield


def digits(n=80, n_test=200):
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return X[:n], y[:n], X[n:n + n_test], y[n:n + n_test]


def subsets(y, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((8, len(y))) < rng.uniform(0.3, 1.0, (8, 1))
    masks[0] = np.isin(y, [1, 7])  # binary: scikit-learn fits one weight vector
    masks[1] = np.isin(y, [0, 3, 5])  # three of the ten classes
    return masks


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_coefficients_equal_sklearn(C):
    X, y, _, _ = digits()
    masks = subsets(y)
    classes = np.unique(y)
    W = fit_logistic_batch(X, y, masks, classes, C=C, tol=1e-10, max_iter=10_000)
    for b, m in enumerate(masks):
        sk = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X[m], y[m])
        Wb = W[b][:, np.isin(classes, sk.classes_)]
        assert np.all(W[b][:, ~np.isin(classes, sk.classes_)] == 0)  # absent classes never move
        if len(sk.classes_) == 2:  # the symmetric pair: w = W_1 - W_0, intercept likewise
            np.testing.assert_allclose(Wb[:-1, 1] - Wb[:-1, 0], sk.coef_[0], atol=1e-5)
            np.testing.assert_allclose(Wb[-1, 1] - Wb[-1, 0], sk.intercept_[0], atol=1e-5)
        else:  # unpenalised intercepts are defined up to a common shift
            np.testing.assert_allclose(Wb[:-1], sk.coef_.T, atol=1e-5)
            np.testing.assert_allclose(Wb[-1] - Wb[-1].mean(), sk.intercept_ - sk.intercept_.mean(), atol=1e-4)


def test_utilities_equal_sklearn_and_one_class_subsets_fail():
    X, y, Xt, yt = digits()
    scorer = SupervisedScorer("accuracy", Dataset(Xt, yt), default=-1.0)
    model = LogisticRegression(tol=1e-10, max_iter=10_000)
    masks = subsets(y)
    masks[2] = y == 4  # one class: scikit-learn refuses to fit
    ours = LogisticUtility(model, scorer, show_warnings=False).with_dataset(Dataset(X, y))
    ref = ModelUtility(model, scorer, show_warnings=False).with_dataset(Dataset(X, y))
    u = ours.evaluate(masks)
    np.testing.assert_array_equal(u, ref.evaluate(masks))
    assert u[2] == -1.0 and ours.n_failed == 1
    strict = LogisticUtility(model, scorer, catch_errors=False).with_dataset(Dataset(X, y))
    with pytest.raises(UserError, match="one class only"):
        strict.evaluate(masks[2:3])


@pytest.mark.parametrize("bad_score", [-np.inf, np.inf, np.nan])
def test_a_non_finite_score_is_treated_like_nan_as_in_model_utility(bad_score):
    """A NaN or +-inf score gets the default and counts in n_nan, the same values and counts as ModelUtility;
    with catch_errors=False it is ModelUtility's UserError. An infinite score used to pass through into the values."""
    X, y, Xt, yt = digits()

    def bad_if_first_point_right(model, X, y):  # a log-likelihood-like scorer that can be infinite
        pred = model.predict(X)
        return bad_score if pred[0] == y[0] else float(np.mean(pred == y))

    scorer = SupervisedScorer(bad_if_first_point_right, Dataset(Xt, yt), default=-1.0)
    model = LogisticRegression(tol=1e-10, max_iter=10_000)
    masks = subsets(y)
    ours = LogisticUtility(model, scorer, show_warnings=False).with_dataset(Dataset(X, y))
    ref = ModelUtility(model, scorer, show_warnings=False).with_dataset(Dataset(X, y))
    u = ours.evaluate(masks)
    np.testing.assert_array_equal(u, ref.evaluate(masks))
    assert (u == -1.0).any() and (u != -1.0).any()
    assert ours.n_nan == ref.n_nan == (u == -1.0).sum() and ours.n_failed == 0
    strict = LogisticUtility(model, scorer, catch_errors=False).with_dataset(Dataset(X, y))
    size = masks[u == -1.0][0].sum()
    with pytest.raises(UserError, match=f"bad_if_first_point_right returned NaN or inf for a subset of {size} points"):
        strict.evaluate(masks)


def test_other_logistic_models_are_refused():
    _, _, Xt, yt = digits()
    scorer = SupervisedScorer("accuracy", Dataset(Xt, yt))
    with pytest.raises(UserError, match="solver='liblinear'"):
        LogisticUtility(LogisticRegression(solver="liblinear"), scorer)
    with pytest.raises(UserError, match="l1_ratio=1"):
        LogisticUtility(LogisticRegression(l1_ratio=1, solver="saga"), scorer)
    with pytest.raises(UserError, match="needs an sklearn LogisticRegression"):
        LogisticUtility(object(), scorer)


def test_warm_start_from_the_previous_prefix_reaches_the_same_models():
    X, y, Xt, yt = digits(n=40)
    scorer = SupervisedScorer("accuracy", Dataset(Xt, yt))
    model = LogisticRegression(tol=1e-9, max_iter=10_000)
    perm = np.random.default_rng(1).permutation(40)
    prefixes = np.zeros((25, 40), bool)
    for j in range(25):
        prefixes[j, perm[:j + 15]] = True
    walked = LogisticUtility(model, scorer).with_dataset(Dataset(X, y))
    steps = np.concatenate([walked.evaluate(m[None]) for m in prefixes])  # each step warm from the last one
    cold = LogisticUtility(model, scorer).with_dataset(Dataset(X, y)).evaluate(prefixes)  # one call, all cold
    np.testing.assert_array_equal(steps, cold)
    init = walked._warm_init(prefixes[-1:] | prefixes[:1], (65, 10))  # started from the largest known subset
    assert np.abs(init).sum() > 0
