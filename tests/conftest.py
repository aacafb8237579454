"""Shared, session-scoped systems and runs for the Lyapunov and catalogue tests.

numba compiles the QR engine once per system (a few seconds each), so systems that several tests
use are built once here, and the standard runs on them are done once and shared.
"""

import numpy as np
import pytest

import rdsim
from rdsim import systems as S


@pytest.fixture(scope="session")
def henon():
    return S.henon()


@pytest.fixture(scope="session")
def henon_result(henon):
    # 200k steps: stderr of each exponent ~ 7e-4, well inside the 5e-3 tolerance against the
    # literature values
    return rdsim.lyapunov_spectrum(henon, None, 200_000, transient=1000, seed=0)


@pytest.fixture(scope="session")
def lorenz():
    return S.lorenz()  # sigma=10, rho=28, beta=8/3, RK4 with dt=0.01


@pytest.fixture(scope="session")
def lorenz_result(lorenz):
    # T = 1000 time units after a transient of 20: stderr ~ 8e-3 (lambda_1), 2e-3 (lambda_2)
    return rdsim.lyapunov_spectrum(lorenz, None, 100_000, transient=2000, seed=0)


@pytest.fixture(scope="session")
def diag_map():
    """x -> diag(0.5, 2, 1) x: decoupled, with the largest exponent not in the first coordinate."""
    return S.linear_map(np.diag([0.5, 2.0, 1.0]))


@pytest.fixture(scope="session")
def gaussian_product():
    """gaussian_product(n, sigma): Newman's random matrix product, built once per (n, sigma)."""
    cache = {}

    def get(n, sigma):
        key = (int(n), float(sigma))
        if key not in cache:
            cache[key] = S.gaussian_matrix_product(n, sigma)
        return cache[key]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when selected with ``-m`` (e.g. ``-m slow``)."""
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
