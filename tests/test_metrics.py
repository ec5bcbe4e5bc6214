"""evaluation/metrics.py's one NaN convention: an undefined correlation is NaN and aggregates skip it; a point without
a value ranks lowest (as in the removal curves)."""
import warnings

import numpy as np
import pytest
from scipy import stats

from datamatters.evaluation.metrics import lds, noisy_label_detection


def test_lds_skips_undefined_targets_and_matches_scipy():
    rng = np.random.default_rng(0)
    pred, actual = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    actual[:, 1] = 2.0  # a constant target: Spearman undefined
    out = lds(pred, actual, n_boot=50)
    ref = [stats.spearmanr(pred[:, j], actual[:, j]).statistic for j in (0, 2)]
    assert np.isnan(out["per_target"][1])
    assert out["mean"] == pytest.approx(np.mean(ref), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all undefined: NaN, without numpy's empty-slice warning
        assert np.isnan(lds(pred, np.ones_like(actual), n_boot=10)["mean"])


def test_a_missing_value_ranks_lowest():
    noisy = np.array([True, False, False, True])
    # low values flag noise: the NaN point ranks lowest, so it is flagged first (it is noisy: perfect detection)
    assert noisy_label_detection([np.nan, 2.0, 3.0, 1.0], noisy) == {"auc": 1.0, "f1": 1.0}
    # high scores flag noise (self-influence): the same NaN point is now the least suspicious
    assert noisy_label_detection([np.nan, 0.5, 0.2, 3.0], noisy, low_is_noisy=False)["auc"] == 0.5
