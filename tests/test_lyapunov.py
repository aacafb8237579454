"""The QR engine and ``lyapunov_spectrum`` (MATH.md §2-3): exact spectra, the start block, k,
determinism and chunking of the noise, divergence as a result, qr_every, transient, history,
flows per unit time, and argument validation.

Tolerances are stated where they are used; every random thing is seeded.
"""

import math

import numpy as np
import pytest

import rdsim
from rdsim import _config
from rdsim import systems as S

LN2 = math.log(2.0)


def _rotation(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


# --- linear maps: exact spectra ---------------------------------------------------------------


def test_linear_map_diagonal_exact(diag_map):
    res = rdsim.lyapunov_spectrum(diag_map, None, 1000, transient=200, seed=0)
    assert res.status == "ok"
    # once the block is aligned with the eigenvectors every step contributes log|eig| exactly
    np.testing.assert_allclose(res.exponents, [LN2, 0.0, math.log(0.5)], rtol=0, atol=1e-10)
    np.testing.assert_allclose(diag_map.reference["exponents"], [LN2, 0.0, math.log(0.5)], atol=1e-15)


def test_linear_map_normal_exact():
    # normal, non-symmetric: O (1.5 Rot(0.7) (+) 0.9 (+) -0.4) O^T, a complex pair of modulus 1.5
    B = np.zeros((4, 4))
    B[:2, :2] = 1.5 * _rotation(0.7)
    B[2, 2], B[3, 3] = 0.9, -0.4
    O = _orthogonal(4, seed=11)
    A = O @ B @ O.T
    assert np.allclose(A @ A.T, A.T @ A, atol=1e-12) and not np.allclose(A, A.T)
    expected = [math.log(1.5), math.log(1.5), math.log(0.9), math.log(0.4)]
    m = S.linear_map(A)
    np.testing.assert_allclose(m.reference["exponents"], expected, atol=1e-12)
    res = rdsim.lyapunov_spectrum(m, None, 2000, transient=300, seed=0)  # x0 = 0
    assert res.status == "ok"
    # the pair shares an invariant plane on which A is 1.5 x a rotation: R = 1.5 I there, exactly
    np.testing.assert_allclose(res.exponents, expected, rtol=0, atol=1e-10)


def test_linear_map_nonnormal_diagonalisable():
    # A = V diag(2, 0.8, -0.5) V^-1 with a non-orthogonal V: once the block has aligned with the
    # Schur vectors (A Q = Q T, T triangular with the eigenvalues on its diagonal) every step's R
    # has |eig| on its diagonal, so the exponents are exact again; alignment goes at the smallest
    # gap log(0.8/0.5) = 0.47 per step. Looser than the normal case: 1e-8 after 300 steps.
    V = np.array([[1.0, 0.9, 0.3], [0.0, 0.5, 0.8], [0.2, 0.0, 1.0]])
    A = V @ np.diag([2.0, 0.8, -0.5]) @ np.linalg.inv(V)
    assert not np.allclose(A @ A.T, A.T @ A)
    m = S.linear_map(A)
    res = rdsim.lyapunov_spectrum(m, None, 3000, transient=300, seed=0)
    np.testing.assert_allclose(res.exponents, [LN2, math.log(0.8), math.log(0.5)], rtol=0, atol=1e-8)
    # without a transient the start-up error is bounded, so it is O(1/T)
    res0 = rdsim.lyapunov_spectrum(m, None, 3000, seed=0)
    np.testing.assert_allclose(res0.exponents, [LN2, math.log(0.8), math.log(0.5)], rtol=0, atol=5e-3)


# --- the start block and k ---------------------------------------------------------------------


def test_k1_on_decoupled_system_gives_top_exponent(diag_map):
    # identity columns would return log 0.5 (the first coordinate never sees the others);
    # the random orthonormal start block finds log 2
    res = rdsim.lyapunov_spectrum(diag_map, None, 500, k=1, transient=100, seed=0)
    assert res.exponents.shape == (1,)
    assert res.exponents[0] == pytest.approx(LN2, abs=1e-10)
    # a top-k spectrum with a non-negative sum gives only a lower bound of the dimension
    assert float(res.dimension) == 1.0 and res.dimension.lower_bound


def test_k2_gives_top_two(diag_map):
    res = rdsim.lyapunov_spectrum(diag_map, None, 500, k=2, transient=100, seed=0)
    np.testing.assert_allclose(res.exponents, [LN2, 0.0], rtol=0, atol=1e-10)
    assert float(res.dimension) == 2.0 and res.dimension.lower_bound
    full = rdsim.lyapunov_spectrum(diag_map, None, 500, transient=100, seed=0)
    # sum = log 2 + log 1 + log 0.5 = 0 (up to rounding): D = 3, exact since k = dim
    assert float(full.dimension) == pytest.approx(3.0, abs=1e-9) and not full.dimension.lower_bound


def test_unsorted_raw_order_is_sorted_with_history(diag_map):
    # identity start block on a diagonal map: the raw accumulators come out in the order
    # (log .5, log 2, log 1); the result must sort them, and the history columns with them
    res = rdsim.lyapunov_spectrum(diag_map, None, 400, Q0=np.eye(3), record_every=50)
    np.testing.assert_allclose(res.exponents, [LN2, 0.0, math.log(0.5)], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.history[-1], res.exponents, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(res.history, np.tile(res.exponents, (res.history.shape[0], 1)), atol=1e-12)


def test_kaplan_yorke_of_result_matches_formula(henon_result, lorenz_result):
    for res in (henon_result, lorenz_result):
        assert float(res.dimension) == float(rdsim.kaplan_yorke_dimension(res.exponents))


# --- determinism and noise chunking ---------------------------------------------------------------


def _assert_identical(a, b):
    assert a.status == b.status == "ok"
    for name in ("exponents", "stderr", "history", "history_steps", "x_final", "block_means", "Q_final"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


X0_GP = np.array([1.0, -0.5])


def test_same_seed_bitwise_identical(gaussian_product):
    m = gaussian_product(2, 1.0)
    a = rdsim.lyapunov_spectrum(m, X0_GP, 5000, transient=700, seed=42)
    b = rdsim.lyapunov_spectrum(m, X0_GP, 5000, transient=700, seed=42)
    _assert_identical(a, b)


def test_different_seeds_differ(gaussian_product):
    m = gaussian_product(2, 1.0)
    a = rdsim.lyapunov_spectrum(m, X0_GP, 5000, seed=1)
    b = rdsim.lyapunov_spectrum(m, X0_GP, 5000, seed=2)
    assert not np.array_equal(a.exponents, b.exponents)
    assert not np.array_equal(a.x_final, b.x_final)


@pytest.mark.parametrize("qr_every, k", [(1, None), (3, 1)])
def test_results_independent_of_segment_length(gaussian_product, monkeypatch, qr_every, k):
    # the noise is drawn in fixed chunks of NOISE_CHUNK (1024) steps, whatever the segmentation;
    # 1000 is neither a multiple of 1024 nor of qr_every = 3
    m = gaussian_product(2, 1.0)
    kw = dict(k=k, transient=700, qr_every=qr_every, seed=5, record_every=300)
    ref = rdsim.lyapunov_spectrum(m, X0_GP, 5000, **kw)
    monkeypatch.setattr(_config, "SEGMENT_STEPS", 1000)
    seg = rdsim.lyapunov_spectrum(m, X0_GP, 5000, **kw)
    _assert_identical(ref, seg)


def test_tangent_sees_the_noise_of_the_state(gaussian_product, monkeypatch):
    # x_{t+1} = A_t x_t and the tangent is A_t too: starting the k = 1 block at x0/|x0|, the
    # accumulated log|R_11| is log(|x_T| / |x0|) exactly (up to rounding), across noise chunks
    # and segments
    monkeypatch.setattr(_config, "SEGMENT_STEPS", 1000)
    m = gaussian_product(2, 1.0)
    n = 3000
    res = rdsim.lyapunov_spectrum(m, X0_GP, n, k=1, seed=9, Q0=X0_GP.reshape(2, 1))
    growth = math.log(np.linalg.norm(res.x_final) / np.linalg.norm(X0_GP))
    assert res.exponents[0] * n == pytest.approx(growth, rel=1e-10)


class _PyGaussianProduct(rdsim.AbstractSystem):
    """Newman's product as a pure-Python system: the driver's Python loop, not the numba engine."""

    backend = "python"
    dt = 1.0

    def __init__(self, n, sigma):
        self.dim, self.noise_dim, self.sigma, self.name = n, n * n, sigma, "py_gaussian_product"

    def _A(self, xi):
        return self.sigma * np.asarray(xi).reshape(self.dim, self.dim)

    def step(self, x, xi):
        return self._A(xi) @ x

    def tangent(self, x, xi, V):
        return self._A(xi) @ V

    def sample_noise(self, rng, n):
        return rng.standard_normal((n, self.noise_dim))  # as rdsim.systems.gaussian_matrix_product


@pytest.mark.parametrize("qr_every, k", [(1, None), (3, 1)])
def test_python_driver_matches_numba_engine(gaussian_product, qr_every, k):
    # same seed -> same start block and the same noise sequence on both drivers; they differ only
    # in the QR (LAPACK Householder vs Gram-Schmidt), i.e. by rounding
    kw = dict(k=k, transient=100, qr_every=qr_every, seed=8, record_every=300)
    nb_res = rdsim.lyapunov_spectrum(gaussian_product(2, 1.0), X0_GP, 2000, **kw)
    py_res = rdsim.lyapunov_spectrum(_PyGaussianProduct(2, 1.0), X0_GP, 2000, **kw)
    assert py_res.status == "ok"
    np.testing.assert_allclose(py_res.exponents, nb_res.exponents, rtol=0, atol=1e-12)
    np.testing.assert_allclose(py_res.stderr, nb_res.stderr, rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(py_res.history_steps, nb_res.history_steps)
    np.testing.assert_allclose(py_res.history, nb_res.history, rtol=0, atol=1e-12)
    np.testing.assert_allclose(py_res.x_final, nb_res.x_final, rtol=1e-12)
    assert py_res.n_qr == nb_res.n_qr


# --- divergence is a result ------------------------------------------------------------------------


def _double_step(x, p, xi):
    return 2.0 * x


def _double_jac(x, p, xi):
    return np.array([[2.0]])


def test_state_overflow_is_a_result():
    m = rdsim.Map(_double_step, _double_jac, 1, name="doubling")
    res = rdsim.lyapunov_spectrum(m, [1.0], 5000, transient=500)
    assert res.status == "diverged"
    # step g maps 2^g to 2^(g+1): the step with index 1023 (counted from the start of the
    # transient) produces inf; the last finite state is 2^1023
    assert res.diverged_at == 1023
    assert np.all(np.isfinite(res.x_final)) and res.x_final[0] == 2.0 ** 1023
    assert np.all(np.isnan(res.exponents))
    assert res.n_steps == 5000


def _shift_step(x, p, xi):
    return x + 2.0


def _log_jac(x, p, xi):
    # -inf at x = p[0], NaN beyond (never exactly 0 on the orbits below: that would be a
    # degenerate tangent, also reported, but not what this test is about)
    return np.array([[np.log(p[0] - x[0])]])


@pytest.fixture(scope="module")
def log_jac_map():
    return rdsim.Map(_shift_step, _log_jac, 1, params=(4.5,), name="log_jacobian")


# x0 = 0.5: x = 0.5, 2.5, 4.5 -> Jacobian log(0) = -inf at step 2;
# x0 = 0: x = 0, 2, 4, 6 -> log(-1.5) = NaN at step 3, while the state stays finite
@pytest.mark.parametrize("x0, at", [(0.5, 2), (0.0, 3)])
def test_nonfinite_jacobian_is_a_result(log_jac_map, x0, at):
    res = rdsim.lyapunov_spectrum(log_jac_map, [x0], 100)
    assert res.status == "diverged"
    assert res.diverged_at == at
    assert np.all(np.isfinite(res.x_final))
    assert np.all(np.isnan(res.exponents))
    # the same inside the transient: the index counts from its start
    res_t = rdsim.lyapunov_spectrum(log_jac_map, [x0], 100, transient=10)
    assert res_t.status == "diverged" and res_t.diverged_at == at


# --- qr_every, transient, history ------------------------------------------------------------------


def test_qr_every_same_exponents(henon):
    # R of a product is the product of the R's: QR every 5 steps accumulates the same sums as
    # every step, up to rounding ((lambda_1 - lambda_2) * 5 = 10 < 18 keeps the block well
    # conditioned). n_steps is not a multiple of 5: the last partial product is factorised too.
    r1 = rdsim.lyapunov_spectrum(henon, None, 50_003, transient=1000, seed=0)
    r5 = rdsim.lyapunov_spectrum(henon, None, 50_003, transient=1000, qr_every=5, seed=0)
    assert r5.status == "ok" and r5.n_steps == 50_003
    np.testing.assert_allclose(r5.exponents, r1.exponents, rtol=0, atol=1e-10)
    assert r5.n_qr < r1.n_qr / 4
    assert abs(r5.exponents.sum() - math.log(0.3)) < 1e-10


def test_transient_is_not_counted(henon):
    # one run of 1000 + 5000 steps (transient not accumulated) vs 6000 accumulated steps:
    # the same trajectory and block, so 5000 * A = 6000 * B - 1000 * B(at 1000)
    a = rdsim.lyapunov_spectrum(henon, None, 5000, transient=1000, record_every=1000, seed=0)
    b = rdsim.lyapunov_spectrum(henon, None, 6000, record_every=1000, seed=0)
    assert a.n_steps == 5000 and b.n_steps == 6000
    assert list(a.history_steps) == [1000, 2000, 3000, 4000, 5000]
    at1000 = b.history[list(b.history_steps).index(1000)]
    np.testing.assert_allclose(5000 * a.exponents, 6000 * b.exponents - 1000 * at1000, rtol=0, atol=1e-9)


def test_history_shape_and_last_row(henon_result, lorenz_result):
    for res in (henon_result, lorenz_result):
        n_rec, k = res.history.shape
        assert k == res.exponents.shape[0] and n_rec == res.history_steps.shape[0] >= 100
        assert np.all(np.diff(res.history_steps) > 0)
        assert res.history_steps[-1] == res.n_steps
        np.testing.assert_allclose(res.history[-1], res.exponents, rtol=1e-13, atol=0)
    # the running estimate converges: the last records agree within a few stderr
    h = henon_result.history
    assert np.all(np.abs(h[-20] - h[-1]) < 5 * henon_result.stderr)


def test_record_every_rounds_to_qr_every(henon):
    res = rdsim.lyapunov_spectrum(henon, None, 1000, qr_every=3, record_every=100, seed=0)
    # records every 102 steps (the multiple of 3 at or above 100) and at the end
    assert np.all(res.history_steps[:-1] % 3 == 0)
    assert res.history_steps[0] == 102 and res.history_steps[-1] == 1000


# --- flows: per unit time, one zero exponent --------------------------------------------------------


def _lin_rhs(x, p):
    return p[0] @ x


def _lin_jac(x, p):
    return p[0].copy()


def test_linear_ode_per_unit_time():
    # dx/dt = B x, B = O diag(0.3, -1.2) O^T. One RK4 step is P(dt B), P(h) = 1 + h + h^2/2 +
    # h^3/6 + h^4/24, so the exponents per unit time are log|P(dt mu)| / dt exactly, and differ
    # from mu by ~ mu^5 dt^4 / 120 (2e-6 for mu = -1.2, dt = 0.1)
    dt = 0.1
    mus = np.array([0.3, -1.2])
    O = _orthogonal(2, seed=4)
    B = O @ np.diag(mus) @ O.T
    flow = rdsim.Flow(_lin_rhs, _lin_jac, 2, dt=dt, params=(B,), name="linear_ode")
    res = rdsim.lyapunov_spectrum(flow, [1e-3, -2e-3], 2000, transient=100, seed=0)
    assert res.status == "ok"
    h = dt * mus
    exact_rk4 = np.log(np.abs(1 + h + h ** 2 / 2 + h ** 3 / 6 + h ** 4 / 24)) / dt
    np.testing.assert_allclose(res.exponents, exact_rk4, rtol=0, atol=1e-10)
    err = np.abs(res.exponents - mus)
    assert np.all(err < 1.5 * np.abs(mus) ** 5 * dt ** 4 / 120 + 1e-10)
    assert err[1] > 1e-7  # the RK4 error is visible, so the per-unit-time scaling is tested
    # the history is per unit time too
    np.testing.assert_allclose(res.history[-1], res.exponents, rtol=1e-12)


def test_autonomous_flow_has_a_zero_exponent(lorenz_result):
    # Lorenz: one exponent within 0.02 of 0 (stderr ~ 2e-3), the others far from it
    ex = lorenz_result.exponents
    near_zero = np.abs(ex) < 0.02
    assert np.count_nonzero(near_zero) == 1 and near_zero[1]
    assert ex[0] > 0.8 and ex[2] < -14


# --- argument validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, argname",
    [
        (dict(x0=[0.1, 0.1, 0.1]), ValueError, "x0"),
        (dict(x0=[[0.1, 0.1]]), ValueError, "x0"),
        (dict(x0=[np.nan, 0.1]), ValueError, "x0"),
        (dict(x0=[np.inf, 0.1]), ValueError, "x0"),
        (dict(k=0), ValueError, "k"),
        (dict(k=3), ValueError, "k"),
        (dict(k=1.5), TypeError, "k"),
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(n_steps=-5), ValueError, "n_steps"),
        (dict(n_steps=10.0), TypeError, "n_steps"),
        (dict(transient=-1), ValueError, "transient"),
        (dict(qr_every=0), ValueError, "qr_every"),
        (dict(n_blocks=1), ValueError, "n_blocks"),
        (dict(n_blocks=0), ValueError, "n_blocks"),
        (dict(record_every=0), ValueError, "record_every"),
        (dict(Q0=np.eye(3)), ValueError, "Q0"),
    ],
)
def test_bad_arguments_named(henon, kwargs, exc, argname):
    args = dict(x0=[0.1, 0.1], n_steps=10)
    args.update(kwargs)
    x0, n_steps = args.pop("x0"), args.pop("n_steps")
    with pytest.raises(exc, match=rf"\b{argname}\b"):
        rdsim.lyapunov_spectrum(henon, x0, n_steps, **args)


def test_not_a_system():
    with pytest.raises(TypeError, match="system"):
        rdsim.lyapunov_spectrum(lambda x: x, [0.0], 10)


def _step_ok(x, p, xi):
    return 0.5 * x


def _jac_ok(x, p, xi):
    return 0.5 * np.eye(x.shape[0])


def _step_uncompilable(x, p, xi):
    return x + "not a number"


def test_map_uncompilable_step_raises_typeerror():
    with pytest.raises(TypeError, match="numba") as info:
        rdsim.Map(_step_uncompilable, _jac_ok, 2)
    assert "step" in str(info.value)


def _noise_1d(rng, n):
    return rng.standard_normal(n)


def _noise_fixed(rng, n):
    return rng.standard_normal((3, 2))  # right shape only for n = 3


@pytest.mark.parametrize("noise", [_noise_1d, _noise_fixed])
def test_map_noise_wrong_shape(noise):
    with pytest.raises(ValueError, match="noise"):
        rdsim.Map(_step_ok, _jac_ok, 2, noise=noise)


def _step_short(x, p, xi):
    return x[:1].copy()


def test_map_step_wrong_shape():
    with pytest.raises(ValueError, match="step"):
        rdsim.Map(_step_short, _jac_ok, 2)


@pytest.mark.parametrize("dim", [0, -1, 2.0])
def test_map_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        rdsim.Map(_step_ok, _jac_ok, dim)


def test_map_params_not_tuple():
    with pytest.raises(TypeError, match="params"):
        rdsim.Map(_step_ok, _jac_ok, 2, params=[1.0, 2.0])


def _rhs(x, p):
    return -x


def _rhs_jac(x, p):
    return -np.eye(x.shape[0])


@pytest.mark.parametrize("dt", [0.0, -0.01, np.inf, np.nan])
def test_flow_bad_dt(dt):
    with pytest.raises(ValueError, match="dt"):
        rdsim.Flow(_rhs, _rhs_jac, 2, dt=dt)


def test_flow_diffusion_without_jacobian():
    with pytest.raises(ValueError, match="diffusion_jacobian"):
        rdsim.Flow(_rhs, _rhs_jac, 2, dt=0.01, diffusion=_rhs)


def test_flow_bad_dim_and_params():
    with pytest.raises(ValueError, match="dim"):
        rdsim.Flow(_rhs, _rhs_jac, 0, dt=0.01)
    with pytest.raises(TypeError, match="params"):
        rdsim.Flow(_rhs, _rhs_jac, 2, dt=0.01, params=1.0)


# --- degenerate and rank-lost tangent blocks (issue 12) ----------------------------------------


def test_zero_jacobian_is_minus_inf_not_divergence():
    # logistic r = 4 from 0.5: f'(0.5) = 0, so the tangent is exactly zero from step 0 on
    res = rdsim.lyapunov_spectrum(rdsim.systems.logistic(4.0), [0.5], 100)
    assert res.status == "ok" and res.diverged_at is None
    assert res.exponents[0] == -np.inf
    assert float(res.dimension) == 0.0


@pytest.mark.parametrize("qr_every", [30, 1000])
def test_rank_loss_is_reported(qr_every):
    with pytest.warns(RuntimeWarning, match="qr_every"):
        res = rdsim.lyapunov_spectrum(rdsim.systems.henon(), [0.1, 0.1], 3000, qr_every=qr_every, transient=100)
    assert res.status == "rank_lost" and res.diverged_at is None  # a bounded orbit never "diverged"
    assert "qr_every" in res.message
    assert np.all(np.isfinite(res.x_final))


def test_well_conditioned_qr_every_has_no_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = rdsim.lyapunov_spectrum(rdsim.systems.henon(), [0.1, 0.1], 3000, qr_every=5, transient=100)
    assert res.status == "ok"
