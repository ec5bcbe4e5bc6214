"""Bad input: clear UserErrors (or documented defaults), never a hang."""
import numpy as np
import pytest
from sklearn.naive_bayes import GaussianNB

from datamatters.errors import UserError
from datamatters.valuation import (
    Dataset,
    DeterministicUniformSampler,
    ExactShapleyValuation,
    LOOValuation,
    MaxUpdates,
    ModelUtility,
    NoStopping,
    PermutationSampler,
    RankCorrelation,
    ShapleyValuation,
    SupervisedScorer,
    TMCShapleyValuation,
    UniformSampler,
)
from datamatters.valuation.classwise import ClasswiseShapleyValuation
from datamatters.valuation.games import AdditiveGame, ShoesGame
from datamatters.valuation.least_core import ExactLeastCoreValuation, MonteCarloLeastCoreValuation
from datamatters.valuation.scorers import ClasswiseScorer


def data(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.normal(size=(n, 3)), rng.integers(0, 2, n)), Dataset(rng.normal(size=(8, 3)),
                                                                               rng.integers(0, 2, 8))


class Unfittable:
    def fit(self, X, y):
        raise ValueError("this model never fits")

    def predict(self, X):  # pragma: no cover - never reached
        return np.zeros(len(X))


def test_empty_training_or_test_set():
    train, test = data()
    empty = Dataset(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(UserError, match="the training set to value is empty"):
        LOOValuation(ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test))).fit(empty)
    with pytest.raises(UserError, match="the test set is empty"):
        SupervisedScorer("accuracy", empty)
    with pytest.raises(UserError, match="the test set is empty"):
        ClasswiseScorer(empty)
    with pytest.raises(UserError, match="rows"):
        Dataset(np.zeros((3, 2)), np.zeros(2))
    _, test = data()
    with pytest.raises(UserError, match="test_data"):
        SupervisedScorer("accuracy", None)


def test_model_that_cannot_be_fitted():
    train, test = data()
    u = ModelUtility(Unfittable(), SupervisedScorer("accuracy", test), clone_before_fit=False)
    with pytest.raises(UserError, match="cannot be fitted and scored on the full training set"):
        TMCShapleyValuation(u, is_done=MaxUpdates(2)).fit(train)
    with pytest.raises(UserError, match="cannot be fitted"):
        LOOValuation(u).fit(train)
    strict = ModelUtility(Unfittable(), SupervisedScorer("accuracy", test), clone_before_fit=False,
                          catch_errors=False)
    with pytest.raises(UserError, match="subset of 10 points failed.*never fits"):
        LOOValuation(strict).fit(train)
    with pytest.raises(UserError, match="has no fit"):
        ModelUtility(object(), SupervisedScorer("accuracy", test))


def test_nan_scores_give_the_documented_default_or_an_error():
    train, test = data()
    nan = SupervisedScorer(lambda m, X, y: float("nan"), test, default=0.0)
    with pytest.raises(UserError, match="cannot be fitted and scored"):
        LOOValuation(ModelUtility(GaussianNB(), nan, show_warnings=False)).fit(train)
    strict = ModelUtility(GaussianNB(), nan, catch_errors=False)
    with pytest.raises(UserError, match="NaN"):
        strict.with_dataset(train).evaluate(np.ones((1, 10), bool))
    with pytest.raises(UserError, match="unknown scoring"):
        SupervisedScorer("no_such_metric", test)


def test_stopping_rules_that_can_never_fire_are_refused_up_front():
    g = ShoesGame(2, 2)
    with pytest.raises(UserError, match="not certain to fire"):
        ShapleyValuation(g, UniformSampler(), RankCorrelation(0.01, 5)).fit(g.data)
    with pytest.raises(UserError, match="not certain to fire"):
        ShapleyValuation(g, PermutationSampler(), ~MaxUpdates(3)).fit(g.data)
    with pytest.raises(UserError, match="not certain to fire"):
        ClasswiseShapleyValuation(ModelUtility(GaussianNB(), ClasswiseScorer(data()[1])), ~MaxUpdates(3)).fit(
            data()[0])
    # a finite sampler ends by itself, so NoStopping is fine there
    ShapleyValuation(g, DeterministicUniformSampler(), NoStopping()).fit(g.data)


def test_other_impossible_settings():
    g = AdditiveGame(np.ones(30))
    with pytest.raises(UserError, match="n <= 24"):
        ExactShapleyValuation(g).fit(g.data)
    with pytest.raises(UserError, match="too many"):
        ExactLeastCoreValuation(g).fit(g.data)
    with pytest.raises(UserError, match="n_samples"):
        MonteCarloLeastCoreValuation(g, n_samples=0)
    with pytest.raises(UserError, match="cannot skip"):
        ShapleyValuation(g, PermutationSampler(), MaxUpdates(3), skip_converged=True)
    with pytest.raises(UserError, match="shape"):
        g.evaluate(np.ones((2, 5), bool))
    with pytest.raises(UserError, match="with_dataset"):
        ModelUtility(GaussianNB(), SupervisedScorer("accuracy", data()[1])).evaluate(np.ones((1, 3), bool))
    train, test = data()
    one_class = Dataset(train.x, np.zeros(10, int))
    with pytest.raises(UserError, match="two classes"):
        ClasswiseShapleyValuation(ModelUtility(GaussianNB(), ClasswiseScorer(test)), MaxUpdates(2)).fit(one_class)
    with pytest.raises(UserError, match="ClasswiseScorer"):
        ClasswiseShapleyValuation(ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test)), MaxUpdates(2))
    with pytest.raises(UserError, match="batch_size"):
        UniformSampler(batch_size=0)
    with pytest.raises(UserError, match="fit"):
        LOOValuation(g).result


def test_skip_converged_stops_sampling_converged_indices():
    g = AdditiveGame(np.arange(6.0))
    from datamatters.valuation import MinUpdates

    v = ShapleyValuation(g, UniformSampler(batch_size=4, seed=0), MinUpdates(3) | MaxUpdates(50),
                         skip_converged=True).fit(g.data)
    # with skipping, the indices are updated in turn only until each has 3 updates
    assert v.result.counts.max() <= 4
