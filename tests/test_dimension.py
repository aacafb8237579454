"""Kaplan-Yorke / sharpness-dimension formula (MATH.md §3-4): hand-worked values and edge cases."""

import numpy as np
import pytest

import rdsim
from rdsim._dimension import weighted_kaplan_yorke


@pytest.mark.parametrize(
    "exponents, expected",
    [
        ([1.0, -1.0, -1.0], 2.0),  # MATH.md §8: S_2 = 0 counts as non-negative
        ([1.0, 1.0, 1.0], 3.0),
        ([-1.0, -2.0], 0.0),
        ([0.41922, -1.62319], 1 + 0.41922 / 1.62319),  # Hénon
        ([0.9056, 0.0, -14.5723], 2 + 0.9056 / 14.5723),  # Lorenz
        ([0.0, -1.0], 1.0),  # lambda_1 = 0 exactly: S_1 = 0 >= 0
        ([2.0, -1.0, -3.0], 2 + 1.0 / 3.0),
        ([0.5], 1.0),
        ([-0.5], 0.0),
        ([1.0, -np.inf], 1.0),  # a super-stable direction
    ],
)
def test_kaplan_yorke_hand_values(exponents, expected):
    assert float(rdsim.kaplan_yorke_dimension(exponents)) == pytest.approx(expected, abs=1e-12)
    # one shared formula: the sharpness dimension gives the same number on the same values
    assert float(rdsim.sharpness_dimension(exponents)) == pytest.approx(expected, abs=1e-12)


def test_order_does_not_matter():
    assert rdsim.kaplan_yorke_dimension([-1.0, 1.0, -1.0]) == 2.0
    assert rdsim.kaplan_yorke_dimension([-3.0, 2.0, -1.0]) == pytest.approx(2 + 1 / 3)


def test_partial_spectrum_flagged_lower_bound():
    full = rdsim.kaplan_yorke_dimension([0.5, -0.1, -2.0])
    assert not full.lower_bound
    part = rdsim.kaplan_yorke_dimension([0.5, -0.1], dim=3)
    assert part == 2.0 and part.lower_bound
    assert "lower bound" in repr(part)
    # a partial spectrum whose sum already turned negative gives the exact value
    exact = rdsim.kaplan_yorke_dimension([0.5, -1.0], dim=5)
    assert exact == pytest.approx(1.5) and not exact.lower_bound
    # all exponents given: no flag even if the sum is non-negative
    assert not rdsim.kaplan_yorke_dimension([1.0, 1.0], dim=2).lower_bound


def test_weighted_formula_matches_repeated_values():
    # weights act as multiplicities: (z=1, w=2), (z=-1.5, w=3) == [1, 1, -1.5, -1.5, -1.5]
    a = weighted_kaplan_yorke([1.0, -1.5], [2.0, 3.0])
    b = rdsim.kaplan_yorke_dimension([1.0, 1.0, -1.5, -1.5, -1.5])
    assert float(a) == pytest.approx(float(b), abs=1e-12)
    assert float(a) == pytest.approx(2 + 2 / 1.5)
    # MATH.md §4 pseudo-spectrum formula with equal weights N/M
    z = np.array([0.3, 0.1, -0.2, -0.5])
    w = np.full(4, 2.5)
    S = np.cumsum(w * z)
    j = int(np.max(np.nonzero(S >= 0)[0]))
    expected = w[: j + 1].sum() + S[j] / abs(z[j + 1])
    assert float(weighted_kaplan_yorke(z, w)) == pytest.approx(expected)


def test_gd_quadratic_sharpness_dimension_hand_worked():
    eta, alpha = 0.5, np.array([5.0, 1.0, 0.5])  # 1 - eta*alpha = -1.5, 0.5, 0.75
    lam = np.log(np.abs(1 - eta * alpha))
    expected = 2 + (np.log(1.5) + np.log(0.75)) / abs(np.log(0.5))
    assert float(rdsim.sharpness_dimension(lam)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [np.nan, 1.0], [np.inf, -1.0]])
def test_bad_input(bad):
    with pytest.raises(ValueError, match="exponents"):
        rdsim.kaplan_yorke_dimension(bad)
    with pytest.raises(ValueError, match="lambdas"):
        rdsim.sharpness_dimension(bad)


def test_bad_type_and_weights():
    with pytest.raises(TypeError, match="exponents"):
        rdsim.kaplan_yorke_dimension(["a", "b"])
    with pytest.raises(ValueError, match="weights"):
        weighted_kaplan_yorke([1.0, -1.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="dim"):
        rdsim.kaplan_yorke_dimension([1.0, -1.0, 0.5], dim=2)
