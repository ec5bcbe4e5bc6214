"""Bad input reaches no algorithm: diverged torch models are failed fits, labels / feature shapes / NaN features
/ empty sets / worker counts are refused with one clear UserError where the data enters."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

from datamatters.errors import UserError
from datamatters.models import build_model
from datamatters.valuation import (
    Dataset,
    DataOOBValuation,
    KNNShapleyValuation,
    LOOValuation,
    ModelUtility,
    SupervisedScorer,
    TorchUtility,
)
from datamatters.valuation.data_oob import bootstrap_rows
from datamatters.valuation.knn import KNNClassifierUtility
from datamatters.valuation.parallel import resolve_n_jobs


def problem(n=20, n_test=15, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (Dataset(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n)),
            Dataset(rng.normal(size=(n_test, d)).astype(np.float32), rng.integers(0, classes, n_test)))


def torch_utility(test, **kw):
    kw = {"epochs": 1, "batch_size": 8, "lr": 0.1, **kw}
    return TorchUtility(build_model("logistic", (4,), 3), SupervisedScorer("accuracy", test), **kw)


def test_diverged_torch_models_are_failed_fits_not_class_zero_predictors():
    train, test = problem()
    u = torch_utility(test, lr=1e300).with_dataset(train)
    masks = np.arange(20)[None, :] < np.array([[20], [10]])
    with pytest.warns(RuntimeWarning, match="fits failed"):
        np.testing.assert_array_equal(u.evaluate(masks), [0.0, 0.0])
    assert (u.n_failed, u.n_nan) == (2, 0)  # counted as failed fits (argmax of NaN used to score as class 0)
    with pytest.raises(UserError, match="cannot be fitted and scored on the full training set"):
        LOOValuation(torch_utility(test, lr=1e300)).fit(train)
    strict = torch_utility(test, lr=1e300, catch_errors=False).with_dataset(train)
    with pytest.raises(UserError, match="training diverged for 2 of 2 subsets.*NaN or inf"):
        strict.evaluate(masks)
    ok = torch_utility(test, catch_errors=False).with_dataset(train)  # control: a sane lr trains and scores
    assert ok.evaluate(masks).shape == (2,) and ok.n_failed == 0


@pytest.mark.parametrize("bad_score", [-np.inf, np.inf, np.nan])
def test_a_non_finite_torch_score_is_treated_like_nan(bad_score):
    """As in ModelUtility: a finite model whose score is NaN or +-inf gets the default and counts in n_nan (not
    n_failed); with catch_errors=False it is one UserError naming the first such subset's size. An infinite score
    used to pass through into the values."""
    train, test = problem()

    class BadWhenFirstPointIsClass0(SupervisedScorer):
        def from_logits(self, logits):
            bad = logits[:, 0].argmax(-1).cpu().numpy() == 0
            self.bad.append(bad)
            return np.where(bad, bad_score, super().from_logits(logits))

    def utility(scorer, **kw):
        return TorchUtility(build_model("logistic", (4,), 3), scorer, epochs=1, batch_size=8, lr=0.1,
                            **kw).with_dataset(train)

    masks = np.random.default_rng(3).random((12, 20)) < 0.6
    plain = utility(SupervisedScorer("accuracy", test)).evaluate(masks)  # same subsets, same seeds, same models
    scorer = BadWhenFirstPointIsClass0("accuracy", test, default=-1.0)
    scorer.bad = []
    u = utility(scorer, show_warnings=False)
    got = u.evaluate(masks)
    bad = np.concatenate(scorer.bad)
    assert bad.any() and not bad.all()
    np.testing.assert_array_equal(got, np.where(bad, -1.0, plain))
    assert (u.n_nan, u.n_failed) == (bad.sum(), 0)
    strict = utility(scorer, catch_errors=False)
    with pytest.raises(UserError, match=f"accuracy returned NaN or inf for a subset of {masks[bad][0].sum()} points"):
        strict.evaluate(masks)


def test_torch_inputs_are_checked_when_bound():
    train, test = problem()
    x = train.x.copy()
    x[3, 1] = np.nan
    with pytest.raises(UserError, match="training set has non-finite features.*1 rows, the first at position 3"):
        torch_utility(test).with_dataset(Dataset(x, train.y))
    for bad in (7, -1):
        y = train.y.copy()
        y[5] = bad
        with pytest.raises(UserError, match=f"training set has labels from {min(bad, 0)} to {max(bad, 2)}, but the "
                                            "model has 3 outputs"):
            torch_utility(test).with_dataset(Dataset(train.x, y))
    yt = test.y.copy()
    yt[0] = 3
    with pytest.raises(UserError, match="test set has labels from 0 to 3"):
        torch_utility(Dataset(test.x, yt)).with_dataset(train)
    wide = Dataset(np.zeros((5, 6), np.float32), np.zeros(5, int))
    with pytest.raises(UserError, match=r"test set has features of shape \(6,\) but the training set \(4,\)"):
        torch_utility(wide).with_dataset(train)


@pytest.mark.filterwarnings("ignore:.*in every bag")
def test_torch_data_oob_refuses_bad_labels_and_diverged_models():
    train, _ = problem()
    y = train.y.copy()
    y[2] = 9
    model = build_model("logistic", (4,), 3)
    with pytest.raises(UserError, match="labels from 0 to 9, but the model has 3 outputs"):
        DataOOBValuation(model, n_estimators=4).fit(Dataset(train.x, y))
    kw = {"epochs": 1, "lr": 1e300}
    with pytest.raises(UserError, match="4 of 4 Data-OOB estimators failed.*non-finite outputs"):
        DataOOBValuation(model, n_estimators=4, torch_kw=kw).fit(train)
    r = DataOOBValuation(model, n_estimators=4, torch_kw={"epochs": 1}).fit(train).result  # control
    assert r.meta["failed_estimators"] == 0 and r.counts.sum() > 0


@pytest.mark.filterwarnings("ignore:.*in every bag")
def test_sklearn_data_oob_leaves_out_failed_bags_or_raises():
    """LogisticRegression cannot fit a bag with one class: those bags are counted, left out and warned about."""
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 0, 0, 1])
    data = Dataset(rng.normal(size=(6, 2)), y)
    one_class = [len(np.unique(y[bootstrap_rows(1, b, 6, 6)])) == 1 for b in range(30)]
    assert 0 < sum(one_class) < 30
    with pytest.warns(RuntimeWarning, match=f"{sum(one_class)} of 30 Data-OOB estimators failed"):
        r = DataOOBValuation(LogisticRegression(), n_estimators=30, seed=1).fit(data).result
    assert r.meta["failed_estimators"] == sum(one_class)
    expected_counts = np.zeros(6, int)
    for b in np.flatnonzero(~np.array(one_class)):
        expected_counts[np.setdiff1d(np.arange(6), bootstrap_rows(1, b, 6, 6))] += 1
    np.testing.assert_array_equal(r.counts, expected_counts)
    with pytest.raises(UserError, match="estimators failed, the first with: ValueError"):
        DataOOBValuation(LogisticRegression(), n_estimators=30, seed=1, catch_errors=False).fit(data)


@pytest.mark.filterwarnings("ignore:.*in every bag")
def test_nan_features_for_knn_and_sklearn_data_oob():
    train, test = problem()
    x = train.x.astype(float)
    x[[4, 9], 0] = np.nan
    nan_train = Dataset(x, train.y)
    with pytest.raises(UserError, match="training set has non-finite features.*2 rows, the first at position 4"):
        KNNShapleyValuation(3, test).fit(nan_train)
    xt = test.x.copy()
    xt[0, 0] = np.inf
    with pytest.raises(UserError, match="test set has non-finite features"):
        KNNShapleyValuation(3, Dataset(xt, test.y)).fit(train)
    with pytest.raises(UserError, match="test set has non-finite features"):
        KNNClassifierUtility(3, Dataset(xt, test.y)).with_dataset(train)
    with pytest.raises(UserError, match="training set has non-finite features"):
        DataOOBValuation(LogisticRegression(), n_estimators=3).fit(nan_train)
    # a tree accepts missing values (sklearn's allow_nan tag): no error there
    r = DataOOBValuation(DecisionTreeClassifier(random_state=0), n_estimators=6).fit(nan_train).result
    assert r.meta["failed_estimators"] == 0 and r.counts.sum() > 0


def test_knn_test_set_of_another_feature_shape_or_empty():
    train, _ = problem()
    wide = Dataset(np.zeros((5, 6)), np.zeros(5, int))
    with pytest.raises(UserError, match=r"test set has features of shape \(6,\) but the training set \(4,\)"):
        KNNShapleyValuation(KNeighborsClassifier(3), wide).fit(train)
    with pytest.raises(UserError, match="features of shape"):
        KNNClassifierUtility(3, wide).with_dataset(train)
    with pytest.raises(UserError, match="the test set is empty"):
        KNNShapleyValuation(3, Dataset(np.zeros((0, 4)), np.zeros(0, int))).fit(train)


def test_n_jobs_follows_joblib_and_refuses_zero_and_fractions(monkeypatch):
    import joblib

    monkeypatch.setattr(joblib, "cpu_count", lambda *a, **k: 8)
    assert [resolve_n_jobs(n) for n in (None, 1, 3, np.int64(2), -1, -2, -8, -20)] == [1, 1, 3, 2, 8, 7, 1, 1]
    _, test = problem()
    scorer = SupervisedScorer("accuracy", test)
    with pytest.raises(UserError, match="n_jobs=0 means no workers"):
        ModelUtility(LogisticRegression(), scorer, n_jobs=0)
    for bad in (1.5, 2.0, "2", True):
        with pytest.raises(UserError, match="n_jobs must be an integer"):
            ModelUtility(LogisticRegression(), scorer, n_jobs=bad)
    with pytest.raises(UserError, match="n_jobs must be an integer"):
        DataOOBValuation(LogisticRegression(), n_jobs=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelUtility(LogisticRegression(), scorer, n_jobs=-2).n_jobs == -2
