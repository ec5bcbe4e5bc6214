"""The per-evaluation path stays lean without losing a guarantee: the compute environment (BLAS thread limit,
warning filter) is entered once per fit, not per subset, yet every fit runs inside it; duplicates are trained once,
in first-occurrence order; shallow copies are used only where they are clones; the permutation walk gives the
definition's prefix utilities; one subset per call scores, fails and counts exactly like a batch."""
import copy
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import datamatters.valuation.utility as U
from datamatters.valuation import Dataset, MaxUpdates, ModelUtility, SupervisedScorer, TMCShapleyValuation
from datamatters.errors import UserError
from datamatters.valuation.games import AdditiveGame
from datamatters.valuation.samplers import RelativeTruncation
from datamatters.valuation.semivalue import prefix_utilities


class Majority:
    """A trivial model that records, at each fit, the BLAS threads and whether it was asked to warn."""

    seen_threads: list = []

    def __init__(self, warn=False):
        self.warn = warn

    def get_params(self, deep=True):
        return {"warn": self.warn}

    def set_params(self, **params):
        self.__dict__.update(params)
        return self

    def fit(self, X, y):
        if len(Majority.seen_threads) < 3:  # threadpool_info costs milliseconds: sample the first fits
            Majority.seen_threads.append(max(i["num_threads"] for i in threadpool_info()))
        if self.warn:
            warnings.warn("tiny subset", UserWarning)
        self.c_ = np.bincount(y).argmax()
        return self

    def predict(self, X):
        return np.full(len(X), self.c_)


def problem(n=12):
    rng = np.random.default_rng(0)
    y, yt = rng.integers(0, 3, n), rng.integers(0, 3, 20)
    return Dataset(rng.normal(size=(n, 3)), y), Dataset(rng.normal(size=(20, 3)), yt)


@pytest.fixture
def env_entries(monkeypatch):
    calls = []
    real = U.compute_env

    def counting(utility):
        calls.append(1)
        return real(utility)

    monkeypatch.setattr(U, "compute_env", counting)
    return calls


def test_environment_entered_once_per_fit_and_every_fit_runs_inside_it(env_entries):
    train, test = problem()
    if not threadpool_info():
        pytest.skip("no BLAS/OpenMP library loaded to limit")
    with threadpool_limits(2):
        outside = max(i["num_threads"] for i in threadpool_info())
        if outside < 2:
            pytest.skip("the BLAS library here runs one thread whatever it is asked")
        Majority.seen_threads = []
        u = ModelUtility(Majority(), SupervisedScorer("accuracy", test))
        r = TMCShapleyValuation(u, is_done=MaxUpdates(3), seed=0, batch_size=3).fit(train).result
        after = max(i["num_threads"] for i in threadpool_info())
    assert r.meta["utility_evaluations"] > 10
    assert len(env_entries) == 1  # one session, not one entry per evaluation (was 2 per evaluation)
    assert outside == after == 2 and Majority.seen_threads == [1, 1, 1]  # limited inside, restored after
    env_entries.clear()
    direct = ModelUtility(Majority(), SupervisedScorer("accuracy", test)).with_dataset(train)
    direct.evaluate(np.tril(np.ones((6, 12), bool)))  # outside a session: once per call, not per subset
    assert len(env_entries) == 1 and direct.n_evaluations == 6


def test_limits_nest_without_touching_the_libraries_again(monkeypatch):
    if not threadpool_info():
        pytest.skip("no BLAS/OpenMP library loaded to limit")
    with threadpool_limits(2):
        if max(i["num_threads"] for i in threadpool_info()) < 2:
            pytest.skip("the BLAS library here runs one thread whatever it is asked")
        with U.limit_threads(1):
            sets = []
            for lib in U._CONTROLLER.lib_controllers:
                monkeypatch.setattr(lib, "set_num_threads", lambda n, sets=sets: sets.append(n))
            with U.limit_threads(1), U.limit_threads(2):  # within the held limit: nothing to set or restore
                pass
            assert sets == []
            monkeypatch.undo()
            assert max(i["num_threads"] for i in threadpool_info()) == 1
        assert max(i["num_threads"] for i in threadpool_info()) == 2


@pytest.mark.parametrize("show", [False, True])
def test_model_warnings_follow_show_warnings(show):
    train, test = problem()
    u = ModelUtility(Majority(warn=True), SupervisedScorer("accuracy", test), show_warnings=show)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TMCShapleyValuation(u, is_done=MaxUpdates(1), seed=0, batch_size=1).fit(train)
    tiny = [w for w in caught if "tiny subset" in str(w.message)]
    assert (len(tiny) > 0) == show


class CountingGame(AdditiveGame):
    """Records the subsets each _compute call receives."""

    def _compute(self, masks):
        self.calls.append(np.array(masks))
        return super()._compute(masks)


@pytest.mark.parametrize("batch", [5, 40])  # the set path (<= 16 subsets) and the sorting path
def test_duplicates_trained_once_in_first_occurrence_order(batch):
    rng = np.random.default_rng(1)
    g = CountingGame(rng.normal(size=8))
    g = g.with_dataset(g.data)
    g.calls = []
    masks = rng.random((batch, 8)) < 0.5
    masks[:, 0] = True
    masks = masks[rng.integers(0, batch, 2 * batch)]  # repeats, in random order
    masks[3] = False  # an empty subset: the default, never computed
    masks = np.asfortranarray(masks)  # a non-contiguous layout (a column-permuted view is one)
    np.testing.assert_allclose(g.evaluate(masks), masks @ g.weights)
    expected = [m for j, m in enumerate(masks) if m.any() and not any(np.array_equal(m, p) for p in masks[:j])]
    assert len(expected) < len(masks) - 1  # the case has duplicates
    np.testing.assert_array_equal(np.concatenate(g.calls), expected)  # each distinct subset once, in order
    assert g.n_evaluations == len(expected)


class CopyCounting:
    copies = 0

    def get_params(self, deep=True):
        return {"a": 1}

    def fit(self, X, y):
        return self

    def __copy__(self):
        CopyCounting.copies += 1
        new = CopyCounting.__new__(CopyCounting)
        new.__dict__.update(self.__dict__)
        return new


def test_plain_copies_are_clones_and_custom_copy_protocols_are_kept():
    from sklearn.linear_model import LogisticRegression

    template = LogisticRegression(C=0.3, max_iter=7)
    make = U._plain_copier(template)
    a, b = make(), make()
    assert a is not b and a is not template and type(a) is LogisticRegression
    assert a.get_params() == template.get_params() and not hasattr(a, "_sklearn_version")
    a.fit(np.r_[np.zeros((3, 2)), np.ones((3, 2))], [0, 0, 0, 1, 1, 1])
    assert hasattr(a, "coef_") and not hasattr(b, "coef_") and not hasattr(template, "coef_")
    CopyCounting.copies = 0
    U._plain_copier(CopyCounting())()
    assert CopyCounting.copies == 1  # a class with its own __copy__ gets copy.copy, not a bare __dict__ copy
    u = copy.copy(ModelUtility(template, SupervisedScorer("accuracy", problem()[1])))
    assert u._fresh_model() is not template and u._fresh_model().get_params() == template.get_params()


def test_the_data_is_held_once_not_copied():
    """A worker payload is the utility with its train and test data: each array once (the scorer used to hold a
    copy of the test features, which then shipped twice: 196 kB instead of 117 kB on the benchmark's digits)."""
    train, test = problem()
    scorer = SupervisedScorer("accuracy", test)
    assert scorer._X is test.x and scorer._y is test.y
    assert train.data()[0] is train.x and np.array_equal(train.data([2, 0])[0], train.x[[0, 2]])
    u = ModelUtility(Majority(), scorer).with_dataset(train).worker_copy()
    assert u.data.x is train.x and u.scorer._X is test.x


class TrainedSubsets(ModelUtility):
    """Records the subsets each evaluate() call trains (after empty/duplicate removal)."""

    def _evaluate(self, masks, distinct=False):
        self.trained.append([])
        return super()._evaluate(masks, distinct)

    def _fit_score(self, r):
        self.trained[-1].append(r.copy())
        return super()._fit_score(r)


def walk(perms, utility, truncation, total):
    """The definition, one prefix at a time: u(sigma[:k]) until the policy fires, constant afterwards."""
    U = np.empty(perms.shape)
    for b, p in enumerate(perms):
        mask = np.zeros(perms.shape[1], bool)
        for j, player in enumerate(p):
            mask[player] = True
            U[b, j] = utility.evaluate(mask[None])[0]
            if truncation.fires(j + 1, U[b, j], len(p), total):
                U[b, j + 1:] = U[b, j]
                break
    return U


@pytest.mark.parametrize("block", [None, 1, 3])
def test_prefix_walk_equals_the_definition_and_trains_no_subset_twice_per_call(block):
    # 6 players, 12 permutations: prefixes of different permutations often hold the same set
    train, test = problem(6)
    u = TrainedSubsets(Majority(), SupervisedScorer("accuracy", test)).with_dataset(train)
    u.trained = []
    perms = np.argsort(np.random.default_rng(3).random((12, 6)), axis=1)
    total = u.evaluate(np.ones((1, 6), bool))[0]
    trunc = RelativeTruncation(0.05, 0.3)
    expected = walk(perms, u, trunc, total)
    u.trained, before = [], u.n_evaluations
    got = prefix_utilities(perms, u, trunc, total, block)
    np.testing.assert_array_equal(got, expected)
    assert (expected[:, 1:-1] == expected[:, -1:]).all(1).any()  # some permutations truncated early
    assert sum(map(len, u.trained)) == u.n_evaluations - before  # every trained subset recorded
    assert all(len({m.tobytes() for m in call}) == len(call) for call in u.trained)  # each set once per call
    burn_in = (np.argsort(perms, 1)[:, None, :] <= np.arange(2)[None, :, None]).reshape(-1, 6)
    assert len({m.tobytes() for m in burn_in}) < len(burn_in)  # ...although the block repeats sets


class Picky:
    """Fails on a single point; the scorer below returns NaN when it predicts class 0."""

    def get_params(self, deep=True):
        return {}

    def fit(self, X, y):
        if len(y) < 2:
            raise ValueError("needs two points")
        self.c_ = np.bincount(y).argmax()
        return self

    def predict(self, X):
        return np.full(len(X), self.c_)


def nan_for_class_0(model, X, y):
    return float("nan") if model.c_ == 0 else float(np.mean(model.predict(X) == y))


def failing_subsets(grouped: bool, seed: int, n_masks: int):
    """12 points (6 groups when grouped), distinct non-empty masks starting with 3 single players (failed fits when
    ungrouped), and a scorer that gives NaN for models predicting class 0."""
    train, test = problem(12)
    if grouped:
        train = Dataset(train.x, train.y, groups=np.arange(12) // 2)
    n = len(train)
    masks = np.random.default_rng(seed).random((n_masks, n)) < 0.4
    masks[:3] = np.eye(n, dtype=bool)[:3]
    masks = np.unique(masks[masks.any(1)], axis=0)  # distinct and non-empty: a batch trains each once as well
    return train, masks, SupervisedScorer(nan_for_class_0, test, default=-1.0)


@pytest.mark.parametrize("grouped", [False, True])
def test_one_subset_per_call_equals_one_batch_with_failures_and_nans(grouped):
    train, masks, scorer = failing_subsets(grouped, seed=4, n_masks=40)
    batch = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    one = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    expected = batch.evaluate(masks)
    got = np.array([one.evaluate(m[None])[0] for m in masks])
    np.testing.assert_array_equal(got, expected)
    assert (one.n_evaluations, one.n_failed, one.n_nan) == (batch.n_evaluations, batch.n_failed, batch.n_nan)
    assert one.n_nan > 0 and (one.n_failed > 0) == (not grouped)
    strict = ModelUtility(Picky(), scorer, catch_errors=False).with_dataset(train)
    bad = next(r for r in map(train.rows, masks) if len(r) > 1 and np.bincount(train.y[r]).argmax() == 0)
    with pytest.raises(UserError, match=f"returned NaN or inf for a subset of {len(bad)} points"):
        strict.evaluate(np.isin(train.group_of_row, train.group_of_row[bad])[None] if not grouped else
                        np.isin(np.arange(len(train)), np.unique(train.group_of_row[bad]))[None])


def test_a_subclass_overriding_compute_sees_single_subsets_too():
    class Logged(ModelUtility):
        def _compute(self, masks):
            self.seen = getattr(self, "seen", 0) + len(masks)
            return super()._compute(masks)

    train, test = problem()
    u = Logged(Majority(), SupervisedScorer("accuracy", test)).with_dataset(train)
    with u.session():
        u.evaluate(np.eye(12, dtype=bool)[:1])
    assert u.seen == 1 and ModelUtility._inline_one and not Logged._inline_one


def test_a_truncation_policy_with_the_old_array_check_is_refused():
    from datamatters.valuation.samplers import TruncationPolicy

    with pytest.raises(UserError, match="implement fires"):
        class Old(TruncationPolicy):
            def check(self, count, u, n, total):
                return np.zeros(len(u), bool)


def test_an_infinite_score_is_treated_like_nan():
    """A scorer returning -inf (e.g. a log-likelihood) gets the default and counts in n_nan, one subset per call and
    in a batch alike; with catch_errors=False it is one UserError. It used to pass through and turn every TMC
    value into NaN."""
    train, test = problem(12)

    def inf_for_class_0(model, X, y):
        return float("-inf") if model.c_ == 0 else float(np.mean(model.predict(X) == y))

    scorer = SupervisedScorer(inf_for_class_0, test, default=-1.0)
    masks = np.random.default_rng(4).random((30, 12)) < 0.5
    masks = np.unique(masks[masks.sum(1) > 1], axis=0)
    batch = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    one = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    expected = batch.evaluate(masks)
    got = np.array([one.evaluate(m[None])[0] for m in masks])
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got).all() and (got == -1.0).any() and (got != -1.0).any()
    assert one.n_nan == batch.n_nan == int((got == -1.0).sum()) and one.n_failed == 0
    strict = ModelUtility(Picky(), scorer, catch_errors=False).with_dataset(train)
    bad = masks[np.flatnonzero(got == -1.0)[0]]
    with pytest.raises(UserError, match=f"returned NaN or inf for a subset of {bad.sum()} points"):
        strict.evaluate(bad[None])
    with pytest.raises(UserError, match="returned NaN or inf"):
        strict.evaluate(np.stack([bad, ~bad | bad]))


def test_the_hoisted_batch_loop_equals_fit_score_with_failures_and_nans():
    """A batch of plain copies is fitted by a loop with _fit_score's lookups hoisted; a subclass overriding
    _fit_score keeps the per-subset call. Both give the same scores, counts and strict-mode errors."""
    class Overridden(ModelUtility):
        def _fit_score(self, r):
            return super()._fit_score(r)

    train, test = problem(12)
    masks = np.random.default_rng(5).random((40, 12)) < 0.4
    masks[:3] = np.eye(12, dtype=bool)[:3]  # single players: failed fits
    scorer = SupervisedScorer(nan_for_class_0, test, default=-1.0)
    fast = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    slow = Overridden(Picky(), scorer, show_warnings=False).with_dataset(train)
    assert fast._plain_fits and not slow._plain_fits
    np.testing.assert_array_equal(fast.evaluate(masks), slow.evaluate(masks))
    assert (fast.n_evaluations, fast.n_failed, fast.n_nan) == (slow.n_evaluations, slow.n_failed, slow.n_nan)
    assert fast.n_failed >= 3 and fast.n_nan > 0
    for cls in (ModelUtility, Overridden):
        strict = cls(Picky(), scorer, catch_errors=False).with_dataset(train)
        with pytest.raises(UserError, match="on a subset of 1 points failed: ValueError"):
            strict.evaluate(masks[:4])


@pytest.mark.parametrize("grouped", [False, True])
def test_a_walk_step_scores_fails_and_counts_like_a_batch(grouped):
    """The permutation walk's one-subset call (_evaluate_one, a float, mask reused afterwards) equals a batch."""
    train, masks, scorer = failing_subsets(grouped, seed=6, n_masks=30)
    batch = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    walk = ModelUtility(Picky(), scorer, show_warnings=False).with_dataset(train)
    expected = batch.evaluate(masks)
    with walk.session():
        got = [walk._evaluate_one(m) for m in masks]
    assert all(type(g) is float for g in got)
    np.testing.assert_array_equal(got, expected)
    assert (walk.n_evaluations, walk.n_failed, walk.n_nan) == (batch.n_evaluations, batch.n_failed, batch.n_nan)
    assert walk.n_nan > 0 and (walk.n_failed > 0) == (not grouped)
