"""RDS sharpness and the dimension ladder (MATH.md §4-5): exact cases, Hénon, the stable product."""

import numpy as np
import pytest

import rdsim
from rdsim import systems as S
from rdsim._ladder import LadderResult, dimension_ladder, log_singular_values_of_product, rds_sharpness
from rdsim._lyapunov import _seeds
from rdsim._systems import AbstractSystem, NoiseStream

HENON_DKY = 1.2583  # MATH.md §8


def _orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


@pytest.fixture(scope="module")
def gd_quadratic():
    """GD (eta = 0.5) on 1/2 x^T A x, A = U diag(alpha) U^T non-diagonal: Df = I - eta A constant."""
    rng = np.random.default_rng(3)
    alpha = np.array([0.5, 1.5, 3.0, 4.5])
    U = _orthogonal(4, rng)
    A = U @ np.diag(alpha) @ U.T
    A = 0.5 * (A + A.T)
    system = rdsim.optimizer_map(rdsim.losses.quadratic(A), rdsim.optim.gd(0.5))
    exact = np.sort(np.log(np.abs(1 - 0.5 * alpha)))[::-1]  # 0.223, -0.288, -0.693, -1.386
    return system, exact


@pytest.fixture(scope="module")
def henon_ladder():
    return dimension_ladder(S.henon(), None, ms=(1, 2, 4, 8, 16), n_samples=256, transient=1000, seed=0,
                            return_details=True)


# --- the stable product --------------------------------------------------------------------------

def test_product_of_rotated_diagonals_spanning_1e200():
    # m = 50 steps of diag(2, 1e-4) rotated: singular values 2^50 ~ 1e15 and 1e-200
    R = _rotation(0.7)
    J = R @ np.diag([2.0, 1e-4]) @ R.T
    got = log_singular_values_of_product([J] * 50)
    exact = np.array([50 * np.log(2.0), 50 * np.log(1e-4)])
    np.testing.assert_allclose(got, exact, rtol=1e-10)
    # a direct product loses the small one entirely
    direct = np.log(np.linalg.svd(np.linalg.matrix_power(J, 50), compute_uv=False))
    assert abs(direct[1] - exact[1]) > 100


def test_product_of_diagonals_between_fixed_orthogonal_matrices():
    # M_t = U_t D_t U_{t-1}^T telescopes: the product is U_m (prod D_t) U_0^T, so its singular
    # values are prod_t |D_t,ii| exactly (unsorted diagonals; spread e^{~400}, i.e. 1e+-87). Each
    # factor has condition number <= e^12: the rounding of M_t itself perturbs the small singular
    # values by ~eps * cond(M_t) per step, which no method applied to the float M_t can undo.
    rng = np.random.default_rng(7)
    d, m = 5, 40
    U = [_orthogonal(d, rng) for _ in range(m + 1)]
    logD = rng.uniform(-1.0, 1.0, size=(m, d)) + np.array([5.0, 2.5, 0.0, -2.5, -5.0])[rng.permutation(d)]
    signs = rng.choice([-1.0, 1.0], size=(m, d))
    mats = [U[t + 1] @ np.diag(signs[t] * np.exp(logD[t])) @ U[t].T for t in range(m)]
    exact = np.sort(logD.sum(axis=0))[::-1]
    assert exact[0] - exact[-1] > 300
    np.testing.assert_allclose(log_singular_values_of_product(mats), exact, rtol=1e-10, atol=1e-9)


def test_product_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(11)
    d = 4
    mats = [rng.standard_normal((d, d)) * np.exp(rng.uniform(-3, 3, size=(1, d))) for _ in range(30)]
    got = log_singular_values_of_product(mats)
    with mpmath.workdps(400):
        P = mpmath.eye(d)
        for M in mats:
            P = mpmath.matrix(M.tolist()) * P
        ref = sorted((float(mpmath.log(s)) for s in mpmath.svd_r(P, compute_uv=False)), reverse=True)
    assert ref[0] - ref[-1] > 50
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-10)


def test_product_with_a_zero_singular_value():
    got = log_singular_values_of_product([np.diag([0.0, -2.0])] * 3)
    assert got[0] == pytest.approx(3 * np.log(2.0), rel=1e-14) and got[1] == -np.inf


# --- rds_sharpness ---------------------------------------------------------------------------------

def test_rds_sharpness_gd_quadratic_exact(gd_quadratic):
    system, exact = gd_quadratic
    pts = np.random.default_rng(0).standard_normal((3, 4))
    for reduce in ("mean", "sup"):
        lam = rds_sharpness(system, pts, reduce=reduce)
        assert lam.shape == (4,)
        np.testing.assert_allclose(lam, exact, rtol=0, atol=1e-12)
    # SD equals the Kaplan-Yorke dimension of the Lyapunov spectrum (exactly, up to QR convergence)
    res = rdsim.lyapunov_spectrum(system, np.zeros(4), 20_000, transient=1000)
    np.testing.assert_allclose(res.exponents, exact, atol=2e-3)
    sd = rdsim.sharpness_dimension(rds_sharpness(system, pts))
    assert float(sd) == pytest.approx(1 + exact[0] / abs(exact[1]), abs=1e-12)
    assert float(sd) == pytest.approx(float(res.dimension), abs=1e-2)


def test_rds_sharpness_zero_singular_value():
    # eta * alpha = 1: one direction is annihilated, log 0 = -inf
    system = rdsim.optimizer_map(rdsim.losses.quadratic(np.diag([1.0, 3.0])), rdsim.optim.gd(1.0))
    lam = rds_sharpness(system, np.ones(2))
    assert lam[0] == pytest.approx(np.log(2.0), abs=1e-14) and lam[1] == -np.inf
    assert rdsim.sharpness_dimension(lam) == 1.0


def test_rds_sharpness_random_system_uses_seeded_noise():
    # i.i.d. Gaussian matrices: Df = the noise matrix, independent of x
    system = S.gaussian_matrix_product(3)
    pts = np.random.default_rng(1).standard_normal((4, 3))
    _, rng = _seeds(5)
    xis = NoiseStream(system, rng).take(16)
    z = np.array([np.log(np.linalg.svd(system.jacobian(pts[0], xi), compute_uv=False)) for xi in xis])
    np.testing.assert_allclose(rds_sharpness(system, pts, n_noise=16, seed=5), z.mean(axis=0), rtol=1e-13)
    # every point sees the same draws, so the sup over points equals the mean here
    np.testing.assert_allclose(rds_sharpness(system, pts, n_noise=16, seed=5, reduce="sup"), z.mean(axis=0),
                               rtol=1e-13)
    assert not np.allclose(rds_sharpness(system, pts, n_noise=16, seed=6), z.mean(axis=0))


def test_rds_sharpness_sup_is_index_by_index():
    h = S.henon()
    pts = np.array([[0.5, 0.0], [-1.0, 0.1], [0.0, 0.2]])
    z = np.array([np.log(np.linalg.svd(h.jacobian(p), compute_uv=False)) for p in pts])
    np.testing.assert_allclose(rds_sharpness(h, pts, reduce="sup"), z.max(axis=0), rtol=1e-14)
    np.testing.assert_allclose(rds_sharpness(h, pts, reduce="mean"), z.mean(axis=0), rtol=1e-14)


# --- the ladder ------------------------------------------------------------------------------------

def test_ladder_gd_quadratic_constant_and_equal_to_dky(gd_quadratic):
    system, exact = gd_quadratic
    dky = 1 + exact[0] / abs(exact[1])
    res = dimension_ladder(system, np.zeros(4), ms=(1, 2, 4, 8, 16), n_samples=4, transient=10,
                           return_details=True)
    assert isinstance(res, LadderResult) and res.ms == (1, 2, 4, 8, 16)
    for m in res.ms:
        assert res.dims[m] == pytest.approx(dky, abs=1e-10)
        np.testing.assert_allclose(res.Lambda[m], np.cumsum(exact), atol=1e-10)
        assert res.stderr[m] == pytest.approx(0.0, abs=1e-10)
    plain = dimension_ladder(system, np.zeros(4), ms=(16, 1, 4), n_samples=4, transient=10)
    assert isinstance(plain, dict) and list(plain) == [1, 4, 16]
    assert all(isinstance(v, float) for v in plain.values())


def test_ladder_zero_singular_value():
    system = rdsim.optimizer_map(rdsim.losses.quadratic(np.diag([1.0, 3.0])), rdsim.optim.gd(1.0))
    dims = dimension_ladder(system, np.zeros(2), ms=(1, 3), n_samples=3, transient=0)
    assert dims == {1: 1.0, 3: 1.0}


def test_ladder_henon_decreases_to_dky(henon_ladder):
    res = henon_ladder
    d, se = res.dims, res.stderr
    for m in res.ms:
        assert 0 < se[m] < 0.03
    # non-increasing along m = 1, 2, 4, 8, 16 within sampling error
    for m1, m2 in zip(res.ms[:-1], res.ms[1:]):
        assert d[m1] >= d[m2] - 3 * np.hypot(se[m1], se[m2])
    assert d[1] >= d[16]
    assert d[1] - d[16] > 0.05  # the ladder really descends (D^(1) ~ 1.38, D^(16) ~ 1.27)
    assert abs(d[16] - HENON_DKY) < 0.05
    assert d[16] >= HENON_DKY - 3 * se[16]  # D_KY <= D^(m) in expectation
    # the sum rule: Lambda_2^(m) = ln b = ln 0.3 exactly for every window
    for m in res.ms:
        assert res.Lambda[m][-1] == pytest.approx(np.log(0.3), abs=1e-12)


def test_sharpness_dimension_bounds_d1_on_henon(henon_ladder):
    res = henon_ladder
    h = S.henon()
    # the mean over the ladder's own sample points is exactly D^(1) (deterministic map)
    lam_mean = rds_sharpness(h, res.points, reduce="mean")
    np.testing.assert_allclose(lam_mean, res.increments[1], rtol=1e-12)
    assert float(rdsim.sharpness_dimension(lam_mean)) == pytest.approx(res.dims[1], abs=1e-12)
    # the sup over the same points dominates index by index, so SD >= D^(1) (here SD = 2)
    lam_sup = rds_sharpness(h, res.points, reduce="sup")
    assert np.all(lam_sup >= lam_mean)
    assert float(rdsim.sharpness_dimension(lam_sup)) >= res.dims[1]


def test_ladder_generic_python_system_matches_numba():
    class PyHenon(AbstractSystem):
        dim, noise_dim, dt, name, backend = 2, 0, 1.0, "py-henon", "python"

        def step(self, x, xi):
            return np.array([1.0 - 1.4 * x[0] * x[0] + x[1], 0.3 * x[0]])

        def tangent(self, x, xi, V):
            return np.array([[-2.8 * x[0], 1.0], [0.3, 0.0]]) @ V

        def sample_noise(self, rng, n):
            return np.empty((n, 0))

    a = dimension_ladder(PyHenon(), [0.1, 0.1], ms=(1, 4), n_samples=16, transient=100)
    b = dimension_ladder(S.henon(), [0.1, 0.1], ms=(1, 4), n_samples=16, transient=100)
    assert a == pytest.approx(b, abs=1e-12)


def test_ladder_random_system_is_seeded():
    system = S.gaussian_matrix_product(3, 1.0)
    a = dimension_ladder(system, None, ms=(1, 8), n_samples=32, transient=10, seed=1)
    b = dimension_ladder(system, None, ms=(1, 8), n_samples=32, transient=10, seed=1)
    c = dimension_ladder(system, None, ms=(1, 8), n_samples=32, transient=10, seed=2)
    assert a == b and a != c


def test_ladder_divergence_is_a_result():
    system = S.linear_map(np.array([[1e100]]))
    res = dimension_ladder(system, [1.0], ms=(1, 2), n_samples=4, transient=10, return_details=True)
    assert res.status == "diverged" and np.isnan(res.dims[1]) and np.isnan(res.dims[2])


# --- errors -----------------------------------------------------------------------------------------

def test_bad_inputs():
    h = S.henon()
    pts = np.zeros((3, 2))
    with pytest.raises(TypeError, match="system"):
        rds_sharpness("henon", pts)
    with pytest.raises(ValueError, match="points"):
        rds_sharpness(h, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="points"):
        rds_sharpness(h, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="points"):
        rds_sharpness(h, [[np.nan, 0.0]])
    with pytest.raises(ValueError, match="reduce"):
        rds_sharpness(h, pts, reduce="max")
    with pytest.raises(ValueError, match="n_noise"):
        rds_sharpness(h, pts, n_noise=0)
    with pytest.raises(TypeError, match="n_noise"):
        rds_sharpness(h, pts, n_noise=2.5)
    with pytest.raises(TypeError, match="system"):
        dimension_ladder(None, [0.1, 0.1])
    with pytest.raises(ValueError, match="ms"):
        dimension_ladder(h, None, ms=())
    with pytest.raises(ValueError, match="ms"):
        dimension_ladder(h, None, ms=(0, 2))
    with pytest.raises(ValueError, match="ms"):
        dimension_ladder(h, None, ms=(1, 2.5))
    with pytest.raises(ValueError, match="n_samples"):
        dimension_ladder(h, None, n_samples=1)
    with pytest.raises(ValueError, match="transient"):
        dimension_ladder(h, None, transient=-1)
    with pytest.raises(ValueError, match="x0"):
        dimension_ladder(h, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="matrices"):
        log_singular_values_of_product([])
