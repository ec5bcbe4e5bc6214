"""Samplers of subsets for semivalues, MSR and least core, each with its probability p(S | i)."""
from datamatters.valuation.samplers.base import MarginalBatch, PermutationBatch, Sampler, SetBatch
from datamatters.valuation.samplers.msr import AllSetsSampler, MSRSampler, UniformSetSampler
from datamatters.valuation.samplers.owen import AntitheticOwenSampler, OwenSampler
from datamatters.valuation.samplers.permutation import (
    AntitheticPermutationSampler,
    DeterministicPermutationSampler,
    FixedTruncation,
    NoTruncation,
    PermutationSampler,
    RelativeTruncation,
    TruncationPolicy,
)
from datamatters.valuation.samplers.powerset import AntitheticSampler, DeterministicUniformSampler, UniformSampler
from datamatters.valuation.samplers.stratified import (
    ConstantSampleSize,
    HarmonicSampleSize,
    PowerLawSampleSize,
    SampleSizeStrategy,
    StratifiedSampler,
)

__all__ = [
    "AllSetsSampler", "AntitheticOwenSampler", "AntitheticPermutationSampler", "AntitheticSampler",
    "ConstantSampleSize", "DeterministicPermutationSampler", "DeterministicUniformSampler", "FixedTruncation",
    "HarmonicSampleSize", "MSRSampler", "MarginalBatch", "NoTruncation", "OwenSampler", "PermutationBatch",
    "PermutationSampler", "PowerLawSampleSize", "RelativeTruncation", "SampleSizeStrategy", "Sampler", "SetBatch",
    "StratifiedSampler", "TruncationPolicy", "UniformSampler", "UniformSetSampler",
]
