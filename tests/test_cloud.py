"""Point-cloud dimensions (rdsim.stats): controls of known dimension, argument checks; the fractal
toy's separability (its Jacobian is diagonal in the rotated coordinates)."""

import math

import numpy as np
import pytest

from rdsim import stats


@pytest.fixture(scope="module")
def controls():
    return stats.control_clouds(20_000, seed=1)


@pytest.mark.parametrize("name", ["gaussian-2d", "segment", "gaussian-1d", "sierpinski"])
def test_correlation_and_information_dimension_on_controls(controls, name):
    pts, true = controls[name]
    d2 = stats.correlation_dimension(pts, seed=0)
    d1 = stats.information_dimension(pts, seed=0)
    assert abs(d2.value - true) < 0.03, d2
    assert abs(d1.value - true) < 0.1, d1  # fixed-mass D_1 is biased low by a few % at 2e4 points
    assert d2.fit.sum() >= 3 and d1.fit.sum() >= 3
    assert "correlation" in repr(d2) and float(d1) == d1.value


def test_box_counting_on_controls(controls):
    seg = stats.box_counting_dimension(controls["segment"][0])
    assert abs(seg.value - 1.0) < 0.1
    # the documented bias: a genuinely 2-D Gaussian cloud box-counts well below 2 at this size
    g = stats.box_counting_dimension(controls["gaussian-2d"][0])
    assert 1.5 < g.value < 1.95


def test_cloud_dimension_inputs():
    pts = np.random.default_rng(0).standard_normal((100, 2))
    with pytest.raises(ValueError, match="points"):
        stats.correlation_dimension(pts[:5])
    with pytest.raises(ValueError, match="points"):
        stats.information_dimension(np.full((100, 2), np.nan))
    with pytest.raises(ValueError, match="c_range"):
        stats.correlation_dimension(pts, c_range=(0.1, 0.01))
    with pytest.raises(ValueError, match="points: all points coincide"):
        stats.correlation_dimension(np.ones((100, 2)))
    with pytest.raises(TypeError, match="max_points"):
        stats.correlation_dimension(pts, max_points=1.5)
    with pytest.raises(ValueError, match="min_per_box"):
        stats.box_counting_dimension(pts, min_per_box=0)


def test_fractal_toy_separates_in_rotated_coordinates():
    """k1 = k2: R J R^T = diag(g(u), g(v)) with g the rotated 1-D map's derivative (exact algebra)."""
    from rdsim_experiments.reproduce import fractal as F

    two, one = F._system(0.15), F._system_1d(0.15)
    R = np.array([[1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2)  # (u, v) = R x
    rng = np.random.default_rng(0)
    for x in rng.uniform(-2, 2, size=(20, 2)):
        J = two.jacobian(x, np.zeros(2))
        u, v = R @ x
        D = R @ J @ R.T
        g = [one.jacobian(np.array([s]), np.zeros(1))[0, 0] for s in (u, v)]
        np.testing.assert_allclose(D, np.diag(g), atol=1e-12)
        # and the step: with zero noise each rotated coordinate follows the 1-D map
        y = R @ two.step(x, np.zeros(2))
        np.testing.assert_allclose(y, [one.step(np.array([s]), np.zeros(1))[0] for s in (u, v)], atol=1e-12)
    # k1 != k2 is not separable: the rotated Jacobian has off-diagonal entries somewhere
    J = F._system(0.15, 4.0, 3.0).jacobian(np.array([0.3, -0.7]), np.zeros(2))
    assert abs((R @ J @ R.T)[0, 1]) > 1e-3
