"""Sampler probabilities p(S | i) against empirical subset-size histograms (n = 6), semivalue coefficients,
seeded reproducibility of the streams, and the index iteration."""
import math

import numpy as np
import pytest

from datamatters.valuation import (
    AntitheticOwenSampler,
    AntitheticPermutationSampler,
    AntitheticSampler,
    BanzhafCoefficient,
    BetaCoefficient,
    DeterministicUniformSampler,
    HarmonicSampleSize,
    MSRSampler,
    OwenSampler,
    PermutationSampler,
    PowerLawSampleSize,
    ShapleyCoefficient,
    StratifiedSampler,
    UniformSampler,
)
from datamatters.valuation.coefficients import logcomb, total_weight

N = 6


def size_histogram(sampler, n_batches=40, batch=1000):
    """Empirical P(|S| = k) of the subsets S of N \\ {i} a sampler pairs with i, over all i."""
    counts = np.zeros(N)
    for b in range(n_batches):
        batch_ = sampler.batch(N, b, batch)
        if batch_ is None:
            break
        if sampler.kind == "permutation":  # the prefix before i = 0 is its position (all i: the test below)
            np.add.at(counts, np.argmax(batch_.perms == 0, axis=1), 1)
            continue
        if sampler.kind == "msr":  # S \ {i} for every i, in or out
            k = batch_.masks.sum(1)
            np.add.at(counts, k - 1, k)  # members: |S \ {i}| = k - 1, k of them
            np.add.at(counts, k[k < N], N - k[k < N])  # non-members: |S| = k
            continue
        assert not batch_.masks[np.arange(len(batch_.idx)), batch_.idx].any()  # S never contains i
        np.add.at(counts, batch_.masks.sum(1), 1)
    return counts / counts.sum()


def expected_sizes(sampler):
    k = np.arange(N)
    return np.exp(logcomb(N - 1, k) + sampler.log_weight(N, k))


CASES = {
    "uniform": UniformSampler(seed=0),
    "antithetic": AntitheticSampler(seed=0),
    "owen_grid": OwenSampler(n_samples_outer=5, n_samples_inner=2, finite=False, seed=0),
    "owen_grid_finite": OwenSampler(n_samples_outer=4, n_samples_inner=500, seed=0),
    "owen_uniform": OwenSampler(outer="uniform", finite=False, seed=0),
    "owen_antithetic_grid": AntitheticOwenSampler(n_samples_outer=3, finite=False, seed=0),
    "owen_antithetic_uniform": AntitheticOwenSampler(outer="uniform", finite=False, seed=0),
    "stratified_harmonic": StratifiedSampler(HarmonicSampleSize(), seed=0),
    "stratified_powerlaw_bounded": StratifiedSampler(PowerLawSampleSize(-2, lower_bound=1, upper_bound=4), seed=0),
    "stratified_deterministic": StratifiedSampler(HarmonicSampleSize(), size_iteration="deterministic",
                                                  n_samples_per_index=6000, seed=0),
    "permutation": PermutationSampler(seed=0),
    "antithetic_permutation": AntitheticPermutationSampler(seed=0),
    "msr": MSRSampler(seed=0),
    "deterministic": DeterministicUniformSampler(),
}


def histogram_matches(sampler) -> bool:
    sampler.reset()
    expected = expected_sizes(sampler)
    assert expected.sum() == pytest.approx(1.0, abs=1e-12)  # p(S | i) is a distribution over subsets
    empirical = size_histogram(sampler)
    n_draws = 40_000
    tol = 5 * np.sqrt(expected * (1 - expected) / n_draws) + 1e-3
    return bool(np.all(np.abs(empirical - expected) <= tol))


@pytest.mark.parametrize("name", sorted(CASES))
def test_size_histogram_matches_p_of_s(name):
    assert histogram_matches(CASES[name]), name


class SmallFirstPermutationSampler(PermutationSampler):
    """A plausible bug: the two first positions of every permutation are sorted (index 0 comes first too often)."""

    def batch(self, n, batch_id, batch_size, active=None):
        out = super().batch(n, batch_id, batch_size, active)
        out.perms[:, :2] = np.sort(out.perms[:, :2], axis=1)
        return out


def positions_uniform(sampler, n_perms=30_000) -> bool:
    """Every index is equally likely at every position (chi-square per index, 5 degrees of freedom)."""
    perms = sampler.batch(N, 0, n_perms).perms
    counts = np.stack([np.bincount(np.argmax(perms == i, axis=1), minlength=N) for i in range(N)])
    expected = len(perms) / N
    chi2 = ((counts - expected) ** 2 / expected).sum(1)
    return bool(np.all(chi2 < 25))  # p ~ 1e-4 each beyond 25


def test_permutation_samplers_place_every_index_uniformly():
    assert positions_uniform(PermutationSampler(seed=0))
    assert positions_uniform(AntitheticPermutationSampler(seed=0))
    biased = SmallFirstPermutationSampler(seed=0)  # controls: both checks catch it
    assert not positions_uniform(biased)
    assert not histogram_matches(biased)


def test_pydvl_continuum_formula_would_fail_for_a_coarse_owen_grid():
    """The reason for the exact grid mixture: with 3 grid points, 1/((m+1) C(m, k)) is far from the truth."""
    s = OwenSampler(n_samples_outer=3, finite=False, seed=0)
    k = np.arange(N)
    continuum = np.full(N, 1 / N)
    assert np.max(np.abs(size_histogram(s) - continuum)) > 0.1
    assert np.max(np.abs(size_histogram(s) - expected_sizes(s))) < 0.01


def test_uniform_within_each_size():
    """Given its size, every subset of N \\ {i} is equally likely (chi-square, i = 0)."""
    s = StratifiedSampler(HarmonicSampleSize(), seed=1, index_iteration="random")
    codes = []
    for b in range(60):
        batch = s.batch(N, b, 1000)
        keep = (batch.idx == 0) & (batch.masks.sum(1) == 2)
        codes += [int("".join(map(str, m.astype(int))), 2) for m in batch.masks[keep]]
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == math.comb(N - 1, 2)
    expected = counts.sum() / len(counts)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 9 degrees of freedom: p < 1e-3 beyond 27.9


@pytest.mark.parametrize("n", [10, 100])
@pytest.mark.parametrize("coef", [ShapleyCoefficient(), BanzhafCoefficient(), BetaCoefficient(16, 1),
                                  BetaCoefficient(4, 4), BetaCoefficient(1, 1)])
def test_semivalue_coefficients_sum_to_one(n, coef):
    assert total_weight(coef, n) == pytest.approx(1.0, abs=1e-10)


def test_beta_one_one_is_shapley_and_coefficients_match_definitions():
    k = np.arange(10)
    np.testing.assert_allclose(BetaCoefficient(1, 1)(10, k), ShapleyCoefficient()(10, k), rtol=1e-12)
    np.testing.assert_allclose(ShapleyCoefficient()(10, k), [1 / (10 * math.comb(9, j)) for j in k], rtol=1e-12)
    np.testing.assert_allclose(BanzhafCoefficient()(10, k), 2.0**-9, rtol=1e-12)


def test_streams_depend_on_seed_and_batch_only():
    a, b = UniformSampler(seed=3), UniformSampler(seed=3)
    x = [a.batch(20, i, 16).masks for i in range(3)]
    b.set_state({"cursor": 16})  # where a's sequential index iteration stood after batch 0
    np.testing.assert_array_equal(b.batch(20, 1, 16).masks, x[1])
    assert not np.array_equal(UniformSampler(seed=4).batch(20, 0, 16).masks, x[0])
    p1, p2 = PermutationSampler(seed=5).batch(9, 7, 4).perms, PermutationSampler(seed=5).batch(9, 7, 4).perms
    np.testing.assert_array_equal(p1, p2)
    assert all(sorted(p) == list(range(9)) for p in p1)


def test_sequential_index_iteration_skips_converged():
    s = UniformSampler(seed=0)
    active = np.array([True, False, True, False, True])
    idx = s.batch(5, 0, 7, active).idx
    assert set(idx) <= {0, 2, 4}
    np.testing.assert_array_equal(idx, [0, 2, 4, 0, 2, 4, 0])
    np.testing.assert_array_equal(s.batch(5, 1, 2, active).idx, [2, 4])  # cursor continues


def test_deterministic_sampler_enumerates_every_pair_once():
    s = DeterministicUniformSampler()
    seen = set()
    b = 0
    while (batch := s.batch(4, b, 5)) is not None:
        for i, m in zip(batch.idx, batch.masks):
            seen.add((int(i), m.tobytes()))
        b += 1
    assert len(seen) == 4 * 2**3
