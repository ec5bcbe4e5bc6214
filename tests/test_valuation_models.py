"""Model utilities (sklearn and batched torch), Data-OOB, class-wise Shapley, caching and workers."""
import itertools
import math

import numpy as np
import pytest
from sklearn.ensemble import BaggingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

from datamatters.errors import UserError
from datamatters.valuation import (
    Dataset,
    LOOValuation,
    MaxChecks,
    MSRSampler,
    ModelUtility,
    MSRBanzhafValuation,
    SupervisedScorer,
    TMCShapleyValuation,
    UtilityCache,
)
from datamatters.valuation.classwise import ClasswiseShapleyValuation
from datamatters.valuation.data_oob import DataOOBValuation
from datamatters.valuation.scorers import ClasswiseScorer


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """scikit-learn's fits on small data run fastest on one BLAS thread; with two, the suite's two workers
    oversubscribe the 2 cores (test_coefficients_equal_sklearn[1.0]: 12.6 s -> 1 s here)."""
    with threadpool_limits(1):
        yield


def toy(n=30, n_test=40, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3, size=(classes, 4))
    y, yt = rng.integers(0, classes, n), rng.integers(0, classes, n_test)
    X, Xt = centers[y] + rng.normal(size=(n, 4)), centers[yt] + rng.normal(size=(n_test, 4))
    return Dataset(X, y, names=np.arange(1000, 1000 + n)), Dataset(Xt, yt)


def test_model_utility_scores_and_caches():
    train, test = toy()
    u = ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test), cache=True).with_dataset(train)
    masks = np.zeros((4, len(train)), bool)
    masks[0, :10] = masks[1, 5:20] = masks[3, :10] = True  # row 2 empty, row 3 repeats row 0
    scores = u.evaluate(masks)
    ref = GaussianNB().fit(train.x[:10], train.y[:10]).score(test.x, test.y)
    assert scores[0] == pytest.approx(ref) and scores[3] == scores[0] and scores[2] == 0.0
    assert u.n_evaluations == 2  # duplicates and the empty set are never trained
    u.evaluate(masks[[1, 0]])
    assert u.n_evaluations == 2 and u.cache.hits == 2
    assert u(np.arange(10)) == pytest.approx(ref)  # positions or masks, same set, same value


def test_failed_fits_and_nan_scores_get_the_default():
    train, test = toy(n=12)
    y = train.y.copy()
    y[:4] = 0
    data = Dataset(train.x, y)
    from sklearn.linear_model import LogisticRegression

    u = ModelUtility(LogisticRegression(), SupervisedScorer("accuracy", test, default=-1.0)).with_dataset(data)
    one_class = np.zeros((1, 12), bool)
    one_class[0, :4] = True  # a single class: LogisticRegression refuses to fit
    with pytest.warns(RuntimeWarning, match="fits failed"):
        assert u.evaluate(one_class)[0] == -1.0
    assert (u.n_failed, u.n_nan) == (1, 0)
    nan_scorer = SupervisedScorer(lambda m, X, y: float("nan"), test, default=0.25)
    v = ModelUtility(GaussianNB(), nan_scorer).with_dataset(data)
    with pytest.warns(RuntimeWarning, match="scored NaN"):
        assert v.evaluate(np.ones((1, 12), bool))[0] == 0.25
    assert (v.n_failed, v.n_nan) == (0, 1)


def test_torch_utility_matches_direct_training_and_is_batch_independent():
    import torch

    from datamatters.models import build_model
    from datamatters.training.ensemble import predict_ensemble, train_ensemble
    from datamatters.valuation.torch_utility import TorchUtility
    from datamatters.valuation.utility import subset_ids

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = toy(n=24, n_test=30)
        train = Dataset(train.x.astype(np.float32), train.y, names=train.names)
        test = Dataset(test.x.astype(np.float32), test.y)
        model = build_model("logistic", (4,), 3)
        u = TorchUtility(model, SupervisedScorer("accuracy", test), epochs=3, batch_size=8, lr=0.1, seed=5)
        u = u.with_dataset(train)
        masks = np.random.default_rng(0).random((5, 24)) < 0.6
        scores = u.evaluate(masks)
        params = train_ensemble(model, torch.tensor(train.x), torch.tensor(train.y), torch.tensor(masks),
                                epochs=3, batch_size=8, lr=0.1, seed=5, model_ids=subset_ids(masks))
        logits = predict_ensemble(model, params, torch.tensor(test.x))
        ref = (logits.argmax(-1) == torch.tensor(test.y)).double().mean(-1).numpy()
        np.testing.assert_allclose(scores, ref, atol=1e-12)
        np.testing.assert_allclose(u.evaluate(masks[[3, 1]]), scores[[3, 1]], atol=1e-12)  # same set, same model
        loo = LOOValuation(u).fit(train).result
        full, without = u.evaluate(np.ones((1, 24), bool))[0], u.evaluate(~np.eye(24, dtype=bool))
        np.testing.assert_allclose(loo.values, full - without, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_data_oob_matches_definition_for_fitted_bagging():
    train, test = toy(n=60)
    bag = BaggingClassifier(DecisionTreeClassifier(), n_estimators=15, max_features=0.5, random_state=0)
    bag.fit(train.x, train.y)
    r = DataOOBValuation(bag).fit(train).result
    scores = [[] for _ in range(60)]
    for est, rows, feats in zip(bag.estimators_, bag.estimators_samples_, bag.estimators_features_):
        for i in np.setdiff1d(np.arange(60), rows):
            scores[i].append(float(est.predict(train.x[i:i + 1, feats])[0] == train.y[i]))
    expected = np.array([np.mean(s) if s else np.nan for s in scores])
    np.testing.assert_allclose(r.values, expected, atol=1e-12)
    np.testing.assert_array_equal(r.counts, [len(s) for s in scores])


def test_data_oob_random_forest_in_bag_matches_sklearn():
    from sklearn.ensemble._forest import _generate_unsampled_indices

    from datamatters.valuation.data_oob import _forest_in_bag

    train, _ = toy(n=50)
    rf = RandomForestClassifier(8, random_state=0).fit(train.x, train.y)
    for est in rf.estimators_:
        ours = np.setdiff1d(np.arange(50), _forest_in_bag(rf, est, 50))
        np.testing.assert_array_equal(ours, _generate_unsampled_indices(est.random_state, 50, 50, None))
    r = DataOOBValuation(rf).fit(train).result
    scores = [[] for _ in range(50)]  # the definition, with sklearn's own out-of-bag indices
    for est in rf.estimators_:
        for i in _generate_unsampled_indices(est.random_state, 50, 50, None):
            scores[i].append(float(rf.classes_[int(est.predict(train.x[i:i + 1])[0])] == train.y[i]))
    np.testing.assert_allclose(r.values, [np.mean(s) if s else np.nan for s in scores], atol=1e-12)
    np.testing.assert_array_equal(r.counts, [len(s) for s in scores])


def test_data_oob_own_bagging_flags_noise():
    train, _ = toy(n=80, seed=3)
    y = train.y.copy()
    noisy = np.zeros(80, bool)
    noisy[:12] = True
    y[noisy] = (y[noisy] + 1) % 3
    data = Dataset(train.x, y)
    r = DataOOBValuation(DecisionTreeClassifier(random_state=0), n_estimators=40, seed=1).fit(data).result
    again = DataOOBValuation(DecisionTreeClassifier(random_state=0), n_estimators=40, seed=1).fit(data).result
    np.testing.assert_array_equal(r.values, again.values)
    from datamatters.evaluation.metrics import noisy_label_detection

    assert noisy_label_detection(r.values, noisy)["auc"] > 0.8


def exact_classwise(u, labels_of, labels, min_per_label=1):
    """Class-wise values by enumeration: for each class, the mean over admissible contexts T of the exact
    Shapley value of the in-class game S -> u_c(S + T)."""
    n = len(labels_of)
    values = np.zeros(n)
    for ci, c in enumerate(labels):
        inside = np.flatnonzero(labels_of == c)
        outside = np.flatnonzero(labels_of != c)
        contexts = []
        for bits in itertools.product([0, 1], repeat=len(outside)):
            T = outside[np.array(bits, bool)]
            if all((labels_of[T] == d).sum() >= min_per_label for d in labels if d != c):
                contexts.append(T)
        m = len(inside)
        for T in contexts:
            def game(S):
                mask = np.zeros(n, bool)
                mask[list(S) + list(T)] = True
                return u.evaluate(mask[None])[0, ci]
            for i in inside:
                others = [j for j in inside if j != i]
                for size in range(m):
                    for S in itertools.combinations(others, size):
                        w = 1 / (m * math.comb(m - 1, size))
                        values[i] += w * (game(list(S) + [i]) - game(S)) / len(contexts)
    return values


def test_classwise_shapley_converges_to_enumerated_definition():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 2))
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    Xt, yt = rng.normal(size=(12, 2)), rng.integers(0, 2, 12)
    train, test = Dataset(X, y), Dataset(Xt, yt)
    u = ModelUtility(KNeighborsClassifier(1), ClasswiseScorer(test), cache=UtilityCache())
    cw = ClasswiseShapleyValuation(u, MaxChecks(150), batch_size=8, seed=1, normalize_values=False)
    r = cw.fit(train).result
    bound = cw.utility
    exact = exact_classwise(bound, y, np.array([0, 1]))
    assert np.all(np.abs(r.values - exact) <= 5 * r.stderr + 1e-9), (r.values, exact, r.stderr)
    # normalisation: values of each class sum to its in-class score of the model trained on everything
    rn = ClasswiseShapleyValuation(u, MaxChecks(5), batch_size=4, seed=1).fit(train).result
    full = KNeighborsClassifier(1).fit(X, y).predict(Xt)
    for c in (0, 1):
        sel = yt == c
        in_score = (full[sel] == c).mean() * sel.mean()
        assert rn.values[y == c].sum() == pytest.approx(in_score)


def test_semivalues_on_a_real_model_flag_noisy_labels():
    train, test = toy(n=30, seed=4)
    y = train.y.copy()
    noisy = np.zeros(30, bool)
    noisy[:5] = True
    y[noisy] = (y[noisy] + 1) % 3
    data = Dataset(train.x, y)
    u = ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test), cache=True)
    from datamatters.evaluation.metrics import noisy_label_detection

    tmc = TMCShapleyValuation(u, is_done=MaxChecks(8), seed=0, batch_size=4).fit(data).result
    assert noisy_label_detection(tmc.values, noisy)["auc"] > 0.75
    assert tmc.values.sum() == pytest.approx(u.with_dataset(data)(np.arange(30)), abs=1e-9)  # efficiency
    msr = MSRBanzhafValuation(u, MaxChecks(8), batch_size=32, seed=0).fit(data).result
    sets = np.concatenate([MSRSampler(seed=0).batch(30, b, 32).masks for b in range(8)])  # the 8 batches drawn
    us = u.with_dataset(data).evaluate(sets)
    definition = [us[sets[:, i]].mean() - us[~sets[:, i]].mean() for i in range(30)]  # MSR: in-mean - out-mean
    np.testing.assert_allclose(msr.values, definition, atol=1e-12)
    assert noisy_label_detection(msr.values, noisy)["auc"] > 0.6


def test_grouped_dataset_values_groups_of_rows():
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 2))
    y = X @ [1.0, -2.0] + rng.normal(scale=0.1, size=9)
    Xt = rng.normal(size=(20, 2))
    test = Dataset(Xt, Xt @ [1.0, -2.0])
    groups = np.array(["a", "a", "b", "b", "b", "c", "c", "d", "d"])
    data = Dataset(X, y, groups=groups)
    assert len(data) == 4 and list(data.names) == ["a", "b", "c", "d"]
    u = ModelUtility(LinearRegression(), SupervisedScorer("r2", test, default=-1.0), catch_errors=True)
    from datamatters.valuation import ExactShapleyValuation

    r = ExactShapleyValuation(u).fit(data).result
    np.testing.assert_array_equal(r.names, ["a", "b", "c", "d"])

    def brute(S):  # the same utility by hand: fit on the rows of the groups in S
        if not S:
            return -1.0
        rows = np.isin(groups, S)
        return LinearRegression().fit(X[rows], y[rows]).score(Xt, Xt @ [1.0, -2.0])

    labels = ["a", "b", "c", "d"]
    exact = np.zeros(4)
    for i, g in enumerate(labels):
        others = [h for h in labels if h != g]
        for size in range(4):
            for S in itertools.combinations(others, size):
                exact[i] += (brute(list(S) + [g]) - brute(list(S))) / (4 * math.comb(3, size))
    np.testing.assert_allclose(r.values, exact, atol=1e-10)
    assert r.values.sum() == pytest.approx(brute(labels) - (-1.0))


ITERATIONS = []


class CountingLogisticRegression(LogisticRegression):
    def fit(self, X, y):
        super().fit(X, y)
        ITERATIONS.append(int(self.n_iter_[0]))
        return self


def test_warm_start_along_a_permutation_gives_the_cold_fit_with_fewer_iterations():
    train, test = toy(n=60, n_test=80)
    perm = np.random.default_rng(0).permutation(60)
    prefixes = np.arange(60)[None, :] < np.arange(20, 61)[:, None]  # prefixes of 20..60 points, in order
    prefixes = prefixes[:, np.argsort(perm)]
    scorer = SupervisedScorer("neg_log_loss", test)  # continuous: shows how close the models are
    iters = {}
    scores = {}
    for warm in (False, True):
        ITERATIONS.clear()
        u = ModelUtility(CountingLogisticRegression(tol=1e-8, max_iter=5000), scorer, warm_start=warm)
        scores[warm] = u.with_dataset(train).evaluate(prefixes)
        iters[warm] = sum(ITERATIONS)
    np.testing.assert_allclose(scores[True], scores[False], atol=1e-5)  # the same optimum
    assert iters[True] < 0.85 * iters[False], iters  # measured: 0.72 (lbfgs keeps no curvature memory)
    with pytest.raises(UserError, match="is an ensemble"):
        ModelUtility(RandomForestClassifier(), scorer, warm_start=True)
    with pytest.raises(UserError, match="has no warm_start parameter"):
        ModelUtility(GaussianNB(), scorer, warm_start=True)


def test_shallow_copies_only_where_they_are_clones():
    from datamatters.valuation.utility import _copy_is_clone

    train, test = toy()
    template = LogisticRegression()
    assert _copy_is_clone(template)
    u = ModelUtility(template, SupervisedScorer("accuracy", test)).with_dataset(train)
    u.evaluate(np.ones((2, len(train)), bool) & (np.arange(len(train)) < [[10], [20]]))
    assert not hasattr(template, "coef_")  # the template is never fitted
    assert not _copy_is_clone(LogisticRegression().fit(train.x, train.y))  # fitted: clone it
    assert not _copy_is_clone(BaggingClassifier(DecisionTreeClassifier()))  # nested estimator: clone it
