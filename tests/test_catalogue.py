"""The catalogue (rdsim.systems) against exact and literature values (MATH.md §8).

Every tolerance is stated where it is used. For random systems the tolerance is 5 standard errors
(``res.stderr``, from block means) plus, for SDEs, an allowance for the O(dt) bias of the
Euler-Maruyama map, derived in the test. Every run is seeded.
"""

import math

import numpy as np
import pytest
from scipy import integrate, special

import rdsim
from rdsim import systems as S

LN2 = math.log(2.0)


# --- exact: constant Jacobians ---------------------------------------------------------------


def test_cat_map_exact():
    lam = math.log((3.0 + math.sqrt(5.0)) / 2.0)
    m = S.cat_map()
    assert m.reference["exponents"] == pytest.approx([lam, -lam], abs=1e-15)
    res = rdsim.lyapunov_spectrum(m, None, 2000, transient=100, seed=1)
    assert res.status == "ok"
    # constant Jacobian, start block aligned to the Schur vectors during the transient:
    # every step contributes log|eig| exactly, up to rounding
    np.testing.assert_allclose(res.exponents, [lam, -lam], rtol=0, atol=1e-10)
    assert float(res.dimension) == 2.0  # sum 0 counts as non-negative


# --- Hénon and the logistic map ----------------------------------------------------------------


def test_henon_sum_rule(henon_result):
    # det Df = -b at every step, so sum log R_ii = T ln b exactly, whatever the orbit
    assert henon_result.status == "ok"
    assert abs(henon_result.exponents.sum() - math.log(0.3)) < 1e-10


def test_henon_literature_values(henon, henon_result):
    ref = np.array([0.41922, -1.62319])
    assert henon.reference["exponents"] == pytest.approx(ref)
    # statistical error ~ 7e-4 (5 stderr ~ 3.6e-3) at 200k steps
    assert np.all(5 * henon_result.stderr < 5e-3)
    np.testing.assert_allclose(henon_result.exponents, ref, rtol=0, atol=5e-3)


def test_henon_kaplan_yorke(henon_result):
    D = henon_result.dimension
    # D = 1 + lambda_1 / |lambda_2|; an error of 5e-3 in lambda_1 moves D by 3e-3
    assert float(D) == pytest.approx(1.2583, abs=0.01)
    assert not D.lower_bound
    assert float(D) == pytest.approx(1 + henon_result.exponents[0] / abs(henon_result.exponents[1]), abs=1e-12)
    assert float(D) == float(rdsim.kaplan_yorke_dimension(henon_result.exponents))


def test_logistic_r4_is_ln2():
    m = S.logistic(4.0)
    res = rdsim.lyapunov_spectrum(m, None, 100_000, seed=0)
    assert res.status == "ok"
    # conjugate to the doubling map: finite-time sums telescope, so the error is O(1/T), not
    # O(1/sqrt T); the stderr would make a far too tight tolerance, use 2e-3
    assert abs(res.exponents[0] - LN2) < 2e-3
    assert float(res.dimension) == 1.0


# --- standard map -------------------------------------------------------------------------------


def test_standard_map_K10():
    m = S.standard_map(10.0)
    res = rdsim.lyapunov_spectrum(m, None, 100_000, transient=1000, seed=0)
    assert res.status == "ok"
    # area preserving: det Df = 1 at every step
    assert abs(res.exponents.sum()) < 1e-10
    # Chirikov: lambda_1 ~ ln(K/2) for large K (corrections O(1/K^2) plus statistics, ~3e-3)
    assert abs(res.exponents[0] - math.log(5.0)) < 0.05
    np.testing.assert_allclose(res.exponents[1], -res.exponents[0], rtol=0, atol=1e-10)


# --- Lorenz and Lorenz-96 -----------------------------------------------------------------------


def test_lorenz_literature_values(lorenz, lorenz_result):
    res = lorenz_result
    assert res.status == "ok"
    l1, l2, l3 = res.exponents
    # stderr at T = 1000: ~8e-3, 2e-3, 7e-3; the tolerances are at least 3 (observed 5) stderr
    assert np.all(3 * res.stderr < [0.05, 0.02, 0.1])
    assert abs(l1 - 0.9056) < 0.05
    assert abs(l2) < 0.02  # autonomous flow: the flow direction is neutral
    assert abs(l3 + 14.5723) < 0.1


def test_lorenz_sum_rule(lorenz_result):
    # div F = -(sigma + 1 + beta) = -41/3 everywhere; log det of one RK4 step equals -41/3 dt up to
    # O((dt |DF|)^5) per step, i.e. ~1e-4 per unit time at dt = 0.01 (observed 1e-4)
    assert abs(lorenz_result.exponents.sum() + 41.0 / 3.0) < 1e-3


def test_lorenz_kaplan_yorke(lorenz_result):
    D = lorenz_result.dimension
    # D = 2 + lambda_1/|lambda_3| (when lambda_1 + lambda_2 >= 0): an error of 0.05 in lambda_1
    # moves it by 3.4e-3
    assert float(D) == pytest.approx(2.0621, abs=0.01)
    assert not D.lower_bound


def test_lorenz96_spectrum():
    m = S.lorenz96(40, 8.0)
    res = rdsim.lyapunov_spectrum(m, None, 20_000, transient=2000, seed=0)
    assert res.status == "ok"
    ex = res.exponents
    # div F = -N everywhere; RK4 error on log det is ~3e-5 here
    assert abs(ex.sum() + 40.0) < 1e-3
    # 13 positive exponents, then the neutral one of the autonomous flow, then negative ones.
    # At T = 200 lambda_13 ~ 0.05 and the neighbours of the zero exponent carry stderr ~ 0.02,
    # so the bounds are: the 13 leading ones strictly positive, exactly one of size < 0.02
    # (the neutral direction, whose finite-time error is O(1/T)), and a gap below it. (Checked
    # over 8 perturbed initial states: worst cases lambda_13 = 0.025, |lambda_14| = 0.019,
    # lambda_15 = -0.055; the slow test below makes the count with T = 2000.)
    assert np.all(ex[:13] > 0)
    assert abs(ex[13]) < 0.02
    assert np.count_nonzero(np.abs(ex) < 0.02) == 1
    assert np.all(ex[14:] < -0.03)
    assert ex[0] > 1.5 and ex[0] < 1.9  # lambda_1 ~ 1.7 (Karimi & Paul 2010)


@pytest.mark.slow
def test_lorenz96_spectrum_long():
    m = S.lorenz96(40, 8.0)
    res = rdsim.lyapunov_spectrum(m, None, 200_000, transient=5000, seed=0)
    ex = res.exponents
    assert abs(ex.sum() + 40.0) < 1e-3
    # T = 2000: lambda_13 = 0.030 +- 0.006, the neutral one 4e-4 +- 4e-3, lambda_15 = -0.073
    assert np.count_nonzero(ex > 0.015) == 13
    assert np.count_nonzero(np.abs(ex) < 0.015) == 1
    assert 26.5 < float(res.dimension) < 27.7  # D_KY ~ 27.1


# --- Newman's Gaussian products ------------------------------------------------------------------


def test_newman_formula_values():
    # lambda_i = (ln(2 sigma^2) + digamma((n - i + 1)/2)) / 2; hand values for n = 1, 2
    # n = 1: E ln|sigma g| = ln sigma + (ln 2 + digamma(1/2))/2 = ln sigma - (gamma + ln 2)/2
    euler_gamma = 0.5772156649015329
    assert S.newman_exponents(1, 1.0)[0] == pytest.approx(-(euler_gamma + LN2) / 2, abs=1e-14)
    # n = 2, sigma = 1: lambda_1 = (ln 2 - gamma)/2, lambda_2 = (ln 2 + digamma(1/2))/2 = -(gamma + ln 2)/2
    np.testing.assert_allclose(S.newman_exponents(2, 1.0), [(LN2 - euler_gamma) / 2, -(euler_gamma + LN2) / 2],
                               rtol=0, atol=1e-14)
    # sum = E ln|det A| = n ln sigma + sum_i (ln 2 + digamma((n - i + 1)/2))/2; scaling by sigma
    # shifts every exponent by ln sigma
    np.testing.assert_allclose(S.newman_exponents(4, 2.0) - S.newman_exponents(4, 1.0), math.log(2.0), atol=1e-14)


@pytest.mark.parametrize("n, sigma, n_steps", [(2, 1.0, 200_000), (3, 0.5, 200_000), (5, 2.0, 100_000)])
def test_gaussian_products_match_newman(gaussian_product, n, sigma, n_steps):
    m = gaussian_product(n, sigma)
    ref = S.newman_exponents(n, sigma)
    np.testing.assert_allclose(m.reference["exponents"], ref, rtol=0, atol=0)
    res = rdsim.lyapunov_spectrum(m, None, n_steps, seed=3)
    assert res.status == "ok"
    # A_t Q_t is again a Gaussian matrix whatever Q_t is (rotation invariance), so the log R_ii
    # are i.i.d. from the first step: no bias, and the block stderr is the right error bar
    assert np.all(res.stderr > 0)
    assert np.all(np.abs(res.exponents - ref) < 5 * res.stderr), (res.exponents - ref) / res.stderr
    assert res.stderr.max() < 0.01  # the test has teeth


# --- random Fibonacci ---------------------------------------------------------------------------


def test_random_fibonacci_viswanath():
    m = S.random_fibonacci()
    lam = math.log(1.13198824)  # Viswanath (2000)
    res = rdsim.lyapunov_spectrum(m, None, 1_000_000, seed=0)
    assert res.status == "ok"
    assert np.all(np.abs(res.exponents - [lam, -lam]) < 5 * res.stderr), (res.exponents - [lam, -lam]) / res.stderr
    assert res.stderr[0] < 1e-3
    # |det| = 1 at every step
    assert abs(res.exponents.sum()) < 1e-10


# --- SDEs: geometric Brownian motion and the noisy pitchfork -----------------------------------


def _em_gbm_exponent(mu, sigma, dt):
    """Exact exponent of the Euler-Maruyama GBM map: E log|1 + mu dt + sigma sqrt(dt) xi| / dt."""
    a, b = 1.0 + mu * dt, sigma * math.sqrt(dt)
    z0 = -a / b  # the factor vanishes there (|z0| = 20 here: negligible mass, but integrable)
    f = lambda z: math.log(abs(a + b * z)) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    val = sum(integrate.quad(f, lo, hi, limit=200, epsabs=1e-15)[0]
              for lo, hi in [(-np.inf, z0), (z0, 0.0), (0.0, np.inf)])
    return val / dt


def test_gbm_ito_exponent():
    mu, sigma, dt = 0.5, 0.5, 1e-2
    m = S.gbm(mu=mu, sigma=sigma, dt=dt)
    exact = mu - sigma ** 2 / 2  # 0.375 (Ito)
    assert m.reference["exponents"] == pytest.approx([exact])
    res = rdsim.lyapunov_spectrum(m, None, 1_000_000, seed=0)
    assert res.status == "ok"
    # O(dt) bias of the EM map: with u = mu dt + sigma sqrt(dt) xi,
    # E log(1 + u)/dt = mu - sigma^2/2 + dt (-mu^2/2 + mu sigma^2 - 3 sigma^4/4) + O(dt^2)
    # (= -4.7e-4 here); allow twice the leading term for the O(dt^2) rest.
    lead = dt * (-mu ** 2 / 2 + mu * sigma ** 2 - 0.75 * sigma ** 4)
    em = _em_gbm_exponent(mu, sigma, dt)
    assert abs(em - exact - lead) < 0.1 * abs(lead)  # the expansion, checked by quadrature
    allowance = 2 * abs(lead)
    assert res.stderr[0] < 0.01  # sigma / sqrt(T), T = 1e4
    assert abs(res.exponents[0] - exact) < 5 * res.stderr[0] + allowance
    # and the discrete map's own exponent (no bias at all) within 5 stderr
    assert abs(res.exponents[0] - em) < 5 * res.stderr[0]


def _pitchfork_moment2(alpha, sigma):
    """E[x^2] under p(x) ~ exp((alpha x^2 - x^4/2) / sigma^2), by adaptive quadrature."""
    peak = math.sqrt(max(alpha, 0.0))  # the modes +-sqrt(alpha)
    shift = max(alpha, 0.0) ** 2 / (2 * sigma ** 2)  # log of the maximum of the weight
    L = 2 * peak + 8 * math.sqrt(sigma) + 1  # weight < exp(-500) beyond L
    w = lambda x: math.exp((alpha * x * x - 0.5 * x ** 4) / sigma ** 2 - shift)  # noqa: E731
    kw = dict(epsabs=0, epsrel=1e-12, limit=400, points=[-peak, peak] if peak else [0.0])
    Z = integrate.quad(w, -L, L, **kw)[0]
    M = integrate.quad(lambda x: x * x * w(x), -L, L, **kw)[0]
    return M / Z


@pytest.mark.parametrize("alpha, sigma", [(1.0, 1.0), (-1.0, 0.5), (2.0, 0.3), (0.5, 2.0)])
def test_pitchfork_exponent_quadrature(alpha, sigma):
    # lambda = E[alpha - 3 x^2], independently of rdsim's own quadrature
    assert S.pitchfork_exponent(alpha, sigma) == pytest.approx(alpha - 3 * _pitchfork_moment2(alpha, sigma), rel=1e-9)
    assert S.pitchfork_exponent(alpha, sigma) < 0  # additive noise destroys the bifurcation


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_pitchfork_exponent_closed_form_at_alpha_zero(sigma):
    # alpha = 0: p ~ exp(-x^4 / (2 sigma^2)), E[x^2] = sqrt(2) sigma Gamma(3/4) / Gamma(1/4)
    m2 = math.sqrt(2.0) * sigma * special.gamma(0.75) / special.gamma(0.25)
    assert S.pitchfork_exponent(0.0, sigma) == pytest.approx(-3 * m2, rel=1e-10)


def _pitchfork_allowance(alpha, sigma, dt):
    """O(dt) bias allowance of the EM exponent for dx = (alpha x - x^3) dt + sigma dW.

    log|1 + dt f'(x)|/dt = f'(x) - dt f'(x)^2 / 2 + O(dt^2): the leading bias is -dt E[f'^2]/2,
    with E[f'^2] = alpha^2 - 6 alpha E[x^2] + 9 E[x^4] and E[x^4] = alpha E[x^2] + sigma^2/2 (the
    generator applied to x^2 has mean 0). The EM invariant law also differs from the exact one by
    O(dt), of the same size (it partly cancels: measured total bias ~ -2.4 dt at alpha = sigma = 1,
    leading term -4.1 dt), so allow twice the leading term: dt E[f'^2].
    """
    m2 = _pitchfork_moment2(alpha, sigma)
    m4 = alpha * m2 + sigma ** 2 / 2
    return dt * (alpha ** 2 - 6 * alpha * m2 + 9 * m4)


def test_noisy_pitchfork_exponent():
    alpha, sigma, dt = 1.0, 1.0, 1e-2
    m = S.noisy_pitchfork(alpha, sigma, dt=dt)
    exact = S.pitchfork_exponent(alpha, sigma)  # -1.68039...
    assert m.reference["exponents"] == pytest.approx([exact])
    # T = 2e4 time units: stderr ~ 0.015
    res = rdsim.lyapunov_spectrum(m, None, 2_000_000, transient=1000, seed=0)
    assert res.status == "ok"
    allowance = _pitchfork_allowance(alpha, sigma, dt)  # 0.082
    assert res.stderr[0] < 0.03
    assert abs(res.exponents[0] - exact) < 5 * res.stderr[0] + allowance


@pytest.mark.slow
def test_noisy_pitchfork_exponent_small_dt():
    alpha, sigma, dt = 1.0, 1.0, 1e-3
    m = S.noisy_pitchfork(alpha, sigma, dt=dt)
    exact = S.pitchfork_exponent(alpha, sigma)
    res = rdsim.lyapunov_spectrum(m, None, 20_000_000, transient=10_000, seed=1)  # T = 2e4
    assert abs(res.exponents[0] - exact) < 5 * res.stderr[0] + _pitchfork_allowance(alpha, sigma, dt)


# --- the catalogue's reference dicts ------------------------------------------------------------


def test_catalogue_reference_values():
    # reference values stated by the factories (literature / exact), checked once here
    assert S.henon().reference["sum"] == pytest.approx(math.log(0.3), abs=1e-15)
    assert S.logistic().reference["exponents"] == pytest.approx([LN2], abs=1e-15)
    lor = S.lorenz()
    assert lor.reference["sum"] == pytest.approx(-41.0 / 3.0, abs=1e-12)
    assert lor.reference["exponents"] == pytest.approx([0.9056, 0.0, -14.5723])
    assert S.random_fibonacci().reference["exponents"] == pytest.approx([math.log(1.13198824), -math.log(1.13198824)])
    A = np.array([[2.0, 1.0], [0.0, -0.5]])
    assert S.linear_map(A).reference["exponents"] == pytest.approx([LN2, math.log(0.5)], abs=1e-15)
