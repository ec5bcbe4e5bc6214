"""Data valuation: semivalues (Shapley, Banzhaf, Beta), TMC and MSR, KNN-Shapley, Data-OOB, LOO, class-wise
Shapley and least core, with composable stopping rules, batched utilities and worker pools (no Hydra here)."""
from datamatters.valuation.base import Valuation
from datamatters.valuation.classwise import ClasswiseShapleyValuation
from datamatters.valuation.coefficients import BanzhafCoefficient, BetaCoefficient, ShapleyCoefficient
from datamatters.valuation.data_oob import DataOOBValuation
from datamatters.valuation.dataset import Dataset
from datamatters.valuation.knn import KNNClassifierUtility, KNNShapleyValuation
from datamatters.valuation.logistic import LogisticUtility
from datamatters.valuation.least_core import (
    ExactLeastCoreValuation,
    LeastCoreValuation,
    MonteCarloLeastCoreValuation,
)
from datamatters.valuation.methods import (
    BanzhafValuation,
    BetaShapleyValuation,
    ExactShapleyValuation,
    LOOValuation,
    MSRBanzhafValuation,
    ShapleyValuation,
    TMCShapleyValuation,
)
from datamatters.valuation.result import ValuationResult
from datamatters.valuation.samplers import *  # noqa: F401,F403
from datamatters.valuation.samplers import __all__ as _samplers
from datamatters.valuation.scorers import ClasswiseScorer, Scorer, SupervisedScorer
from datamatters.valuation.semivalue import SemivalueValuation
from datamatters.valuation.stopping import (
    AbsoluteStandardError,
    HistoryDeviation,
    MaxChecks,
    MaxTime,
    MaxUpdates,
    MinUpdates,
    NoStopping,
    RankCorrelation,
    StoppingCriterion,
)
from datamatters.valuation.torch_utility import TorchUtility
from datamatters.valuation.utility import ModelUtility, Utility, UtilityCache

__all__ = [
    "AbsoluteStandardError", "BanzhafCoefficient", "BanzhafValuation", "BetaCoefficient", "BetaShapleyValuation",
    "ClasswiseScorer", "ClasswiseShapleyValuation", "DataOOBValuation", "Dataset", "ExactLeastCoreValuation",
    "ExactShapleyValuation", "HistoryDeviation", "KNNClassifierUtility", "KNNShapleyValuation", "LOOValuation",
    "LeastCoreValuation", "LogisticUtility", "MonteCarloLeastCoreValuation", "TorchUtility",
    "MSRBanzhafValuation", "MaxChecks", "MaxTime", "MaxUpdates", "MinUpdates", "ModelUtility", "NoStopping",
    "RankCorrelation", "Scorer", "SemivalueValuation", "ShapleyCoefficient", "ShapleyValuation",
    "StoppingCriterion", "SupervisedScorer", "TMCShapleyValuation", "Utility", "UtilityCache", "Valuation",
    "ValuationResult", *_samplers,
]
