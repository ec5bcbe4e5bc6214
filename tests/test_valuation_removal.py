"""Point-removal curves and the valuation plots (evaluation/removal.py)."""
import numpy as np

from datamatters.evaluation.removal import (
    detection_curve,
    fractions_grid,
    plot_noisy_detection,
    plot_removal,
    point_removal_curves,
    removal_masks,
    removal_order,
    removal_summary,
)


def test_orders_and_masks():
    v = np.array([0.3, np.nan, 0.9, -0.2])
    np.testing.assert_array_equal(removal_order(v, True), [2, 0, 3, 1])  # NaN counts as lowest
    np.testing.assert_array_equal(removal_order(v, False), [1, 3, 0, 2])
    np.testing.assert_allclose(fractions_grid(0.05, 0.2), [0, 0.05, 0.1, 0.15, 0.2])
    m = removal_masks(np.array([2, 0, 3, 1]), 4, np.array([0.0, 0.25, 0.5]))
    np.testing.assert_array_equal(m, [[1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 0, 1]])


def test_curves_follow_the_values(tmp_path):
    rng = np.random.default_rng(0)
    quality = rng.normal(size=200)  # a point helps in proportion to its quality
    calls = []

    def score(masks):
        calls.append(len(masks))
        return (masks * quality).sum(1) / 200

    c = point_removal_curves(quality, score, step=0.05, max_fraction=0.5, n_random=4, seed=1)
    assert calls == [11 * 6]  # every retraining in one call
    assert np.all(np.diff(c["high"]) < 0) and np.all(np.diff(c["low"]) > 0)
    assert np.all(c["high"][1:] < c["random"][1:]) and np.all(c["low"][1:] > c["random"][1:])
    s = removal_summary(c)
    assert s["removal/high_mean_acc"] < s["removal/random_mean_acc"] < s["removal/low_mean_acc"]
    assert plot_removal(c, tmp_path / "removal.png").stat().st_size > 1000


def test_detection_curve_and_plot(tmp_path):
    flipped = np.zeros(10, bool)
    flipped[[1, 4]] = True
    values = np.arange(10.0)
    values[[1, 4]] = [-5, -4]
    x, found = detection_curve(values, flipped)
    assert found[1] == 1.0 and x[1] == 0.2
    assert plot_noisy_detection(values, flipped, tmp_path / "noisy.png").stat().st_size > 1000
