"""Influence functions: exact and approximate inverse-curvature methods with one interface, and calculators.

``model.fit(train_loader)``, ``model.influence_factors(x, y)``, ``model.influences(x_test, y_test, x, y, mode)``,
``model.influences_from_factors(factors, x, y, mode)``; ``SequentialInfluenceCalculator`` and
``DaskInfluenceCalculator`` for whole test x train matrices. See ``base`` for definitions and the sign convention.
"""
from datamatters.influence.arnoldi import ArnoldiInfluence
from datamatters.influence.base import MODES, InfluenceModel
from datamatters.influence.cg import CgInfluence, batched_cg, block_cg
from datamatters.influence.datainf import DataInfInfluence, InverseHarmonicMeanInfluence
from datamatters.influence.direct import DirectInfluence
from datamatters.influence.ekfac import EkfacInfluence
from datamatters.influence.lissa import LissaInfluence
from datamatters.influence.nystroem import NystroemSketchInfluence
from datamatters.influence.preconditioners import JacobiPreconditioner, NystroemPreconditioner
from datamatters.influence.trak import TrakInfluence

METHODS = {
    "direct": DirectInfluence,
    "cg": CgInfluence,
    "lissa": LissaInfluence,
    "arnoldi": ArnoldiInfluence,
    "ekfac": EkfacInfluence,
    "nystroem": NystroemSketchInfluence,
    "datainf": DataInfInfluence,
    "trak": TrakInfluence,
}

__all__ = [
    "METHODS", "MODES", "InfluenceModel", "DirectInfluence", "CgInfluence", "LissaInfluence", "ArnoldiInfluence",
    "EkfacInfluence", "NystroemSketchInfluence", "DataInfInfluence", "InverseHarmonicMeanInfluence", "TrakInfluence",
    "JacobiPreconditioner", "NystroemPreconditioner", "batched_cg", "block_cg",
]
