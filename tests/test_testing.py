"""The conformance check: every catalogue entry passes; broken systems are caught."""

import numpy as np
import pytest

import rdsim
from rdsim.testing import check_system


@pytest.mark.parametrize("name", sorted(rdsim.systems.CATALOGUE))
def test_catalogue_passes_conformance(name):
    report = check_system(rdsim.systems.CATALOGUE[name]())
    assert report.ok, str(report)
    assert set(report.checks) == {"determinism", "tangent_vs_finite_differences", "tangent_block_vs_jacobian",
                                  "sum_rule", "noise_chunk_invariance"}


def _henon_step(x, p, xi):
    return np.array([1.0 - 1.4 * x[0] * x[0] + x[1], 0.3 * x[0]])


def _wrong_jac(x, p, xi):  # sign error in the (0, 0) entry
    return np.array([[2.8 * x[0], 1.0], [0.3, 0.0]])


def test_wrong_jacobian_is_caught():
    m = rdsim.Map(_henon_step, _wrong_jac, 2, x0=[0.1, 0.1])
    report = check_system(m, raise_on_failure=False)
    assert not report.checks["tangent_vs_finite_differences"][0]
    with pytest.raises(AssertionError, match="tangent_vs_finite_differences"):
        check_system(m)


def _noisy_step(x, p, xi):
    return np.array([0.5 * x[0] + xi[0]])


def _noisy_jac(x, p, xi):
    return np.array([[0.5]])


def test_chunk_dependent_noise_is_caught():
    def bad_noise(rng, n):  # depends on how many steps are asked for at once
        return rng.standard_normal((n, 1)) * n

    m = rdsim.Map(_noisy_step, _noisy_jac, 1, noise=bad_noise, x0=[0.0])
    report = check_system(m, raise_on_failure=False)
    assert not report.checks["noise_chunk_invariance"][0]
    assert report.checks["tangent_vs_finite_differences"][0]

    def good_noise(rng, n):
        return rng.standard_normal((n, 1))

    assert check_system(rdsim.Map(_noisy_step, _noisy_jac, 1, noise=good_noise, x0=[0.0])).ok


def test_check_system_rejects_non_system():
    with pytest.raises(TypeError, match="system"):
        check_system(object())
