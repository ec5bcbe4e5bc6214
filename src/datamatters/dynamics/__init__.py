"""Training dynamics (Hu et al., "Latent State Models of Training Dynamics", TMLR 2023): weight statistics recorded
on any run, Gaussian-HMM model selection over many seeds, and the training map with detour states.

No Hydra here: ``WeightStatsRecorder`` is a plain Lightning callback, ``analyse_runs`` a plain function.
"""
from datamatters.dynamics.callback import TABLE_NAME, WeightStatsRecorder, read_table
from datamatters.dynamics.hmm import HMMParams, n_parameters, select
from datamatters.dynamics.pipeline import HMMOptions, analyse_runs
from datamatters.dynamics.stats import FEATURES, matrix_stats, weight_statistics

__all__ = ["FEATURES", "HMMOptions", "HMMParams", "TABLE_NAME", "WeightStatsRecorder", "analyse_runs",
           "matrix_stats", "n_parameters", "read_table", "select", "weight_statistics"]
