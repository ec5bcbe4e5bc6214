"""Valuation methods against closed forms on cooperative games (exact to 1e-12; Monte Carlo within 5 standard
errors of the estimate as reported by the result itself, plus efficiency)."""
import math

import numpy as np
import pytest

from datamatters.valuation import (
    AntitheticOwenSampler,
    AntitheticPermutationSampler,
    AntitheticSampler,
    BanzhafValuation,
    BetaShapleyValuation,
    ConstantSampleSize,
    DeterministicPermutationSampler,
    DeterministicUniformSampler,
    ExactShapleyValuation,
    HarmonicSampleSize,
    LOOValuation,
    MaxChecks,
    MaxUpdates,
    MSRBanzhafValuation,
    MSRSampler,
    NoStopping,
    OwenSampler,
    PermutationSampler,
    PowerLawSampleSize,
    RelativeTruncation,
    ShapleyValuation,
    StratifiedSampler,
    TMCShapleyValuation,
    UniformSampler,
)
from datamatters.valuation.games import AdditiveGame, MinerGame, ShoesGame, SymmetricVotingGame
from datamatters.valuation.least_core import ExactLeastCoreValuation, MonteCarloLeastCoreValuation


def fit(valuation, game):
    return valuation.fit(game.data).result


@pytest.mark.parametrize("n", [4, 6, 8])
def test_symmetric_voting_exact(n):
    g = SymmetricVotingGame(n)
    np.testing.assert_allclose(fit(ExactShapleyValuation(g), g).values, 1 / n, atol=1e-12)
    b = fit(BanzhafValuation(g, DeterministicUniformSampler(), NoStopping()), g).values
    np.testing.assert_allclose(b, math.comb(n - 1, n // 2) / 2 ** (n - 1), atol=1e-12)
    np.testing.assert_allclose(g.shapley_values(), 1 / n)


def test_shoes_closed_forms():
    g = ShoesGame(2, 1)
    np.testing.assert_allclose(fit(ExactShapleyValuation(g), g).values, [1 / 6, 1 / 6, 2 / 3], atol=1e-12)
    g = ShoesGame(2, 3)
    banzhaf = fit(BanzhafValuation(g, DeterministicUniformSampler(), NoStopping()), g).values
    np.testing.assert_allclose(banzhaf, [0.6875] * 2 + [0.3125] * 3, atol=1e-12)
    np.testing.assert_allclose(g.banzhaf_values(), banzhaf, atol=1e-12)
    shap = fit(ExactShapleyValuation(g), g).values
    np.testing.assert_allclose(shap, g.shapley_values(), atol=1e-12)
    # every permutation once is also exact
    perm = fit(ShapleyValuation(g, DeterministicPermutationSampler(batch_size=30), NoStopping()), g).values
    np.testing.assert_allclose(perm, shap, atol=1e-12)


def test_additive_game_all_semivalues_equal_weights():
    g = AdditiveGame([0.5, -1.0, 2.0, 0.0, 3.5])
    w = g.weights
    np.testing.assert_allclose(fit(ExactShapleyValuation(g), g).values, w, atol=1e-12)
    np.testing.assert_allclose(fit(BanzhafValuation(g, DeterministicUniformSampler(), NoStopping()), g).values, w,
                               atol=1e-12)
    np.testing.assert_allclose(fit(LOOValuation(g), g).values, w, atol=1e-12)
    beta = BetaShapleyValuation(g, DeterministicUniformSampler(), NoStopping(), alpha=16, beta=1)
    np.testing.assert_allclose(fit(beta, g).values, w, atol=1e-12)
    # each permutation marginal of an additive game is the weight itself: TMC is exact after any number
    np.testing.assert_allclose(fit(TMCShapleyValuation(g, is_done=MaxUpdates(3), seed=1), g).values, w, atol=1e-12)
    msr = fit(MSRBanzhafValuation(g, MaxUpdates(4000), batch_size=512, seed=0), g)
    assert np.all(np.abs(msr.values - w) <= 5 * msr.stderr + 1e-12)


def test_miner_and_shoes_least_core():
    for n in (5, 6, 7):
        g = MinerGame(n)
        v = ExactLeastCoreValuation(g).fit(g.data)
        x, e = g.least_core_values()
        np.testing.assert_allclose(v.result.values, x, atol=1e-7)
        assert v.subsidy == pytest.approx(e, abs=1e-7)
        assert v.result.values.sum() == pytest.approx(n // 2)
    for left, right in ((1, 1), (2, 1), (1, 2), (2, 2)):
        g = ShoesGame(left, right)
        v = ExactLeastCoreValuation(g).fit(g.data)
        x, e = g.least_core_values()
        np.testing.assert_allclose(v.result.values, x, atol=1e-7)
        assert v.subsidy == pytest.approx(e, abs=1e-7)
    g = MinerGame(6)  # 64 subsets: 600 uniform draws see nearly all of them
    v = MonteCarloLeastCoreValuation(g, n_samples=600, seed=0).fit(g.data)
    np.testing.assert_allclose(v.result.values, 0.5, atol=1e-6)
    assert v.subsidy == pytest.approx(0.0, abs=1e-7)


def test_tmc_converges_and_is_efficient():
    g = SymmetricVotingGame(6)
    r = fit(TMCShapleyValuation(g, RelativeTruncation(0.01, 0.4), is_done=MaxUpdates(3000), seed=3,
                                batch_size=500, prefix_block=1), g)
    assert np.all(np.abs(r.values - 1 / 6) <= 5 * r.stderr + 1e-12)
    assert np.max(r.stderr) < 0.01
    assert r.values.sum() == pytest.approx(1.0, abs=1e-9)  # permutations telescope: sum = u(N) - u(empty)
    # truncation at |prefix| = 4 (u = u(N)) means no prefix of size 5 or 6 is ever trained; batches deduplicate
    # subsets, so each of the 6 batches trains at most the 6 + 15 + 20 + 15 distinct prefixes, plus u(N) once
    assert r.meta["utility_evaluations"] <= 6 * 56 + 1


SAMPLERS = {
    "uniform": lambda s: UniformSampler(batch_size=512, seed=s),
    "uniform_random_index": lambda s: UniformSampler(batch_size=512, seed=s, index_iteration="random"),
    "antithetic": lambda s: AntitheticSampler(batch_size=512, seed=s),
    "owen_grid": lambda s: OwenSampler(n_samples_outer=20, n_samples_inner=4, finite=False, batch_size=512, seed=s),
    "owen_uniform": lambda s: OwenSampler(outer="uniform", finite=False, batch_size=512, seed=s),
    "owen_antithetic": lambda s: AntitheticOwenSampler(n_samples_outer=10, finite=False, batch_size=512, seed=s),
    "stratified_constant": lambda s: StratifiedSampler(ConstantSampleSize(), batch_size=512, seed=s),
    "stratified_harmonic": lambda s: StratifiedSampler(HarmonicSampleSize(), batch_size=512, seed=s),
    "stratified_powerlaw": lambda s: StratifiedSampler(PowerLawSampleSize(-0.5), batch_size=512, seed=s),
    "permutation": lambda s: PermutationSampler(batch_size=200, seed=s),
    "antithetic_permutation": lambda s: AntitheticPermutationSampler(batch_size=200, seed=s),
    "msr": lambda s: MSRSampler(batch_size=512, seed=s),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_any_sampler_estimates_shapley_with_importance_weights(name):
    g = ShoesGame(2, 3)
    exact = g.shapley_values()
    r = fit(ShapleyValuation(g, SAMPLERS[name](7), MaxChecks(12)), g)
    err = np.abs(r.values - exact)
    assert np.all(err <= 5 * r.stderr + 1e-9), (name, err, r.stderr)
    assert np.max(err) < 0.06
    if name not in ("msr",):
        assert abs(r.values.sum() - 2.0) < 0.15  # efficiency, approximately, for Monte Carlo


def test_finite_owen_and_stratified_samplers():
    g = ShoesGame(2, 3)
    exact = g.shapley_values()
    owen = fit(ShapleyValuation(g, OwenSampler(n_samples_outer=50, n_samples_inner=40, batch_size=4000, seed=1),
                                NoStopping()), g)
    assert np.all(np.abs(owen.values - exact) <= 5 * owen.stderr + 1e-9)
    strat = StratifiedSampler(HarmonicSampleSize(), size_iteration="deterministic", n_samples_per_index=2000,
                              batch_size=5000, seed=1)
    r = fit(ShapleyValuation(g, strat, NoStopping()), g)
    assert np.all(r.counts == 2000)
    assert np.all(np.abs(r.values - exact) <= 5 * r.stderr + 1e-9)


def test_banzhaf_and_beta_with_sampling():
    g = ShoesGame(2, 3)
    r = fit(BanzhafValuation(g, UniformSampler(batch_size=512, seed=2), MaxChecks(10)), g)
    assert np.all(np.abs(r.values - g.banzhaf_values()) <= 5 * r.stderr + 1e-9)
    msr = fit(MSRBanzhafValuation(g, MaxChecks(40), batch_size=512, seed=2), g)
    assert np.all(np.abs(msr.values - g.banzhaf_values()) <= 5 * msr.stderr + 1e-9)
    exact_beta = fit(BetaShapleyValuation(g, DeterministicUniformSampler(), NoStopping(), 4, 2), g).values
    mc = fit(BetaShapleyValuation(g, PermutationSampler(batch_size=300, seed=2), MaxChecks(10), 4, 2), g)
    assert np.all(np.abs(mc.values - exact_beta) <= 5 * mc.stderr + 1e-9)
    # Beta(1, 1) is Shapley
    np.testing.assert_allclose(
        fit(BetaShapleyValuation(g, DeterministicUniformSampler(), NoStopping(), 1, 1), g).values,
        g.shapley_values(), atol=1e-12)
