"""GD on the scalar diagonal linear network (the uv model) reproduces the landmarks of MATH.md §7.

L(u, v) = 1/2 (uv - y)^2 is ``rdsim.losses.dln(X=[[1]], y=[y], depth=2)``; GD with step eta:

    r = uv - y,   u' = u - eta r v,   v' = v - eta r u.

Balanced reduction. If u = v = s then u' = v' = s (1 - eta (s^2 - y)) = s (1 + eta y - eta s^2): the
diagonal u = v is invariant (exactly, in floating point too: both coordinates do the same
operations). With x = s / sqrt(y) and a = eta y this is

    x' = x (1 + a - a x^2),                                       (the 1-D map of MATH.md §7)

so x = u / sqrt(y), not u itself, is the variable of the 1-D map (y = 2 below, so the scaling
matters). The GD Jacobian is [[1 - eta v^2, -eta (2uv - y)], [-eta (2uv - y), 1 - eta u^2]]; at
u = v = s it is symmetric with the fixed eigenvectors (1, 1) and (1, -1):

    along (1, 1):   1 + eta y - 3 eta s^2 = 1 + a - 3 a x^2 = f'(x)      (the 1-D map's derivative)
    along (1, -1):  1 - eta y + eta s^2 = 1 + eta r = 1 - a + a x^2      (transverse to the diagonal)

so on a balanced orbit the GD spectrum is {mean log|f'(x_t)|, mean log|1 - a + a x_t^2|} exactly.
Off the diagonal, u^2 - v^2 is multiplied by (1 - eta^2 r^2) = (1 + eta r)(1 - eta r) each step.

Closed forms used below (derived in the tests): the fixed point x = 1 has multiplier 1 - 2a (stable
for 0 < a < 1); the 2-cycle born at a = 1 has x1 + x2 = sqrt(1 + 3/a), x1 x2 = 1/a, multiplier
f'(x1) f'(x2) = 9 - 2 (1 + a)^2 (in (-1, 1) iff 1 < a < sqrt(5) - 1) and transverse multiplier
3 - 2a over the cycle. For a <= 2 the interval |x| <= f_max maps into itself; beyond a = 2 the
orbits escape.
"""

import math

import numpy as np
import pytest

import rdsim
from rdsim import losses as L
from rdsim import optim as O

Y = 2.0
SQY = math.sqrt(Y)


@pytest.fixture(scope="module")
def uv_loss():
    return L.dln(X=[[1.0]], y=[Y], depth=2)


@pytest.fixture(scope="module")
def gd_uv(uv_loss):
    """gd_uv(a): GD with eta = a / y on the uv model (one map per a, built once)."""
    cache = {}

    def get(a):
        if a not in cache:
            cache[a] = rdsim.optimizer_map(uv_loss, O.gd(a / Y))
        return cache[a]

    return get


def _cubic_step(x, p, xi):
    a = p[0][0]
    return np.array([x[0] * (1.0 + a - a * x[0] * x[0])])


def _cubic_jac(x, p, xi):
    a = p[0][0]
    return np.array([[1.0 + a - 3.0 * a * x[0] * x[0]]])


@pytest.fixture(scope="module")
def cubic():
    """cubic(a): the 1-D map x' = x (1 + a - a x^2) as an rdsim.Map. One map (one compilation):
    a lives in a one-element parameter array that is set in place for each use."""
    a_arr = np.array([1.0])
    m = rdsim.Map(_cubic_step, _cubic_jac, 1, params=(a_arr,), name="cubic")

    def at(a):
        a_arr[0] = a
        assert m.jacobian(np.array([1.0]))[0, 0] == pytest.approx(1.0 - 2.0 * a, abs=1e-14)  # a is in effect
        return m

    return at


def _replay(system, z0, n):
    """States z_0 .. z_n of the deterministic GD map (the engine's own kernel, step by step)."""
    zs = np.empty((n + 1, 2))
    zs[0] = z0
    for t in range(n):
        zs[t + 1] = system.step(zs[t])
    return zs


def _two_cycle(a):
    s = math.sqrt(1.0 + 3.0 / a)
    disc = math.sqrt(s * s - 4.0 / a)
    return (s - disc) / 2.0, (s + disc) / 2.0


def _f(x, a):
    return x * (1.0 + a - a * x * x)


def _fprime(x, a):
    return 1.0 + a - 3.0 * a * x * x


# --- the reduction itself --------------------------------------------------------------------------


def test_uv_loss_is_the_scalar_model(uv_loss):
    assert (uv_loss.dim, uv_loss.n) == (2, 1)
    rng = np.random.default_rng(0)
    for u, v in rng.uniform(-2, 2, (5, 2)):
        r = u * v - Y
        assert uv_loss.value([u, v]) == pytest.approx(0.5 * r * r, rel=1e-14)
        np.testing.assert_allclose(uv_loss.grad([u, v]), [r * v, r * u], rtol=1e-14)
        np.testing.assert_allclose(uv_loss.hessian([u, v]), [[v * v, 2 * u * v - Y], [2 * u * v - Y, u * u]],
                                   rtol=1e-14, atol=1e-15)
    # at a minimum (uv = y): Hessian eigenvalues {0, u^2 + v^2}, top eigenvector along (v, u)
    u = 1.7
    v = Y / u
    w, V = np.linalg.eigh(uv_loss.hessian([u, v]))
    np.testing.assert_allclose(w, [0.0, u * u + v * v], atol=1e-14)
    assert abs(V[:, 1] @ np.array([v, u])) / math.hypot(u, v) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("a", [0.8, 1.1, 1.9])
def test_balanced_gd_is_the_cubic_map_in_x_equal_u_over_sqrt_y(gd_uv, a):
    gd = gd_uv(a)
    z = np.array([0.6, 0.6])
    for _ in range(300):
        z_next = gd.step(z)
        assert z_next[0] == z_next[1]  # the diagonal is exactly invariant
        x = z[0] / SQY
        assert z_next[0] / SQY == pytest.approx(_f(x, a), rel=1e-13, abs=1e-15)
        J = gd.jacobian(z)
        np.testing.assert_allclose(J @ [1.0, 1.0], _fprime(x, a) * np.array([1.0, 1.0]), rtol=0, atol=1e-13)
        np.testing.assert_allclose(J @ [1.0, -1.0], (1 - a + a * x * x) * np.array([1.0, -1.0]), rtol=0,
                                   atol=1e-13)
        z = z_next
    # off the diagonal: u^2 - v^2 is multiplied by 1 - eta^2 r^2 (an identity, not a limit)
    eta = a / Y
    for u, v in np.random.default_rng(1).uniform(0.3, 1.8, (20, 2)):
        u2, v2 = gd.step(np.array([u, v]))
        r = u * v - Y
        assert u2 * u2 - v2 * v2 == pytest.approx((u * u - v * v) * (1 - eta * eta * r * r), rel=1e-10, abs=1e-14)


# --- (i) a < 1: a stable fixed point ------------------------------------------------------------------


def test_fixed_point_stable_below_a_equal_one(cubic, gd_uv):
    a = 0.8
    eta = a / Y
    # 1-D map: x = 1 with multiplier f'(1) = 1 - 2a
    res = rdsim.lyapunov_spectrum(cubic(a), [0.3], 1000, transient=200)
    assert res.status == "ok" and res.x_final[0] == pytest.approx(1.0, abs=1e-14)
    assert res.exponents[0] == pytest.approx(math.log(abs(1 - 2 * a)), abs=1e-10) and res.exponents[0] < 0
    gd = gd_uv(a)
    # balanced start: converges to u = v = sqrt(y); the transverse multiplier there is 1 - a + a = 1
    # (the valley uv = y of minima is a curve of fixed points), the other is the 1-D map's
    res = rdsim.lyapunov_spectrum(gd, [0.6, 0.6], 1000, transient=300)
    assert res.status == "ok"
    np.testing.assert_allclose(res.x_final, [SQY, SQY], rtol=1e-14)
    np.testing.assert_allclose(res.exponents, [0.0, math.log(abs(1 - 2 * a))], atol=1e-10)
    # unbalanced start: GD converges to an unbalanced minimum (no balancing for a < 1). The top
    # exponent is 0 (neutral, along the valley), not negative; the other is log|1 - eta (u^2 + v^2)|,
    # the Hessian's non-zero eigenvalue at the limit point
    res = rdsim.lyapunov_spectrum(gd, [1.6, 1.1], 1000, transient=500)
    u, v = res.x_final
    assert res.status == "ok" and u * v == pytest.approx(Y, rel=1e-14)
    assert u * u - v * v > 1.0  # still unbalanced (u^2 - v^2 = 1.35 at the start)
    assert abs(res.exponents[0]) < 1e-10
    sharp = u * u + v * v
    assert res.exponents[1] == pytest.approx(math.log(abs(1 - eta * sharp)), abs=1e-10)
    assert res.exponents[1] < -0.1 and eta * sharp < 2


def test_gd_cannot_stay_near_a_minimum_sharper_than_two_over_eta(gd_uv):
    a = 0.8
    eta = a / Y
    u0, v0 = 2.6, 0.75  # uv = 1.95, next to the minimum (2.6, 0.769) whose sharpness 7.35 > 2/eta = 5
    assert eta * (u0 * u0 + v0 * v0) > 2
    res = rdsim.lyapunov_spectrum(gd_uv(a), [u0, v0], 1000, transient=3000)
    u, v = res.x_final
    assert res.status == "ok" and u * v == pytest.approx(Y, rel=1e-14)
    # it settles at a flatter, more balanced minimum, stable for GD: sharpness < 2/eta
    assert eta * (u * u + v * v) < 2 and (u * u - v * v) < 0.5 * (u0 * u0 - v0 * v0)
    assert res.exponents[1] == pytest.approx(math.log(abs(1 - eta * (u * u + v * v))), abs=1e-10)


# --- (ii) 1 < a < sqrt(5) - 1: a period-2 orbit ------------------------------------------------------


def test_two_cycle_closed_form():
    for a in (1.05, 1.1, 1.2, math.sqrt(5) - 1, 1.5):
        x1, x2 = _two_cycle(a)
        assert _f(x1, a) == pytest.approx(x2, rel=1e-13) and _f(x2, a) == pytest.approx(x1, rel=1e-13)
        assert _fprime(x1, a) * _fprime(x2, a) == pytest.approx(9 - 2 * (1 + a) ** 2, abs=1e-12)
        assert (1 - a + a * x1 * x1) * (1 - a + a * x2 * x2) == pytest.approx(3 - 2 * a, abs=1e-12)
    # born at a = 1 (the fixed point's multiplier 1 - 2a crosses -1), loses stability at sqrt(5) - 1
    assert _two_cycle(1.0)[0] == pytest.approx(1.0, abs=1e-12) and _two_cycle(1.0)[1] == pytest.approx(1.0, abs=1e-12)
    x1, x2 = _two_cycle(math.sqrt(5) - 1)
    assert _fprime(x1, math.sqrt(5) - 1) * _fprime(x2, math.sqrt(5) - 1) == pytest.approx(-1.0, abs=1e-12)


def _orbit_1d(a, x0, n_transient, n):
    x = x0
    for _ in range(n_transient):
        x = _f(x, a)
    out = np.empty(n)
    for t in range(n):
        out[t] = x
        x = _f(x, a)
    return out


def test_period_doubling_of_the_1d_map():
    # period 2 just above a = 1 and below sqrt(5) - 1 = 1.236; period 4 just above; the cascade
    # continues (period 8 at a = 1.29, 16 at 1.3)
    for a, period in ((1.1, 2), (1.2, 2), (1.26, 4), (1.29, 8)):
        xs = _orbit_1d(a, 0.5, 5000, 16)
        np.testing.assert_allclose(xs[period:], xs[:-period], rtol=0, atol=1e-10)
        assert np.min(np.abs(xs[period // 2:] - xs[:-(period // 2)])) > 1e-3  # not half the period
    np.testing.assert_allclose(np.sort(_orbit_1d(1.1, 0.5, 5000, 2)), _two_cycle(1.1), atol=1e-12)


def test_period_two_orbit(cubic, gd_uv):
    a = 1.1
    x1, x2 = _two_cycle(a)
    lam = 0.5 * math.log(abs(9 - 2 * (1 + a) ** 2))  # = log(0.18) / 2
    lam_perp = 0.5 * math.log(3 - 2 * a)  # = log(0.8) / 2
    res = rdsim.lyapunov_spectrum(cubic(a), [0.5], 1000, transient=1000)
    assert res.status == "ok" and res.exponents[0] == pytest.approx(lam, abs=1e-10)
    gd = gd_uv(a)
    z0 = np.array([1.5, 1.2])  # unbalanced: u^2 - v^2 = 0.81
    zs = _replay(gd, z0, 1010)[1000:]
    np.testing.assert_allclose(zs[:, 0], zs[:, 1], rtol=0, atol=1e-13)  # balanced by now
    u = zs[:, 0]
    np.testing.assert_allclose(u[2:], u[:-2], rtol=0, atol=1e-13)  # period 2 ...
    assert np.all(np.abs(np.diff(u)) > 0.2)  # ... alternating between two values
    np.testing.assert_allclose(np.sort(u[:2]) / SQY, [x1, x2], rtol=0, atol=1e-12)
    # spectrum: the transverse exponent is on top here; both negative (a stable cycle)
    res = rdsim.lyapunov_spectrum(gd, z0, 1000, transient=1000)
    assert res.status == "ok"
    np.testing.assert_allclose(res.exponents, [lam_perp, lam], rtol=0, atol=1e-10)


# --- (iii) chaos ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chaotic_runs(cubic, gd_uv):
    a = 1.9
    T = 100_000
    return dict(
        a=a,
        cubic=rdsim.lyapunov_spectrum(cubic(a), [0.3], T, transient=1000, seed=0),
        gd_unbalanced=rdsim.lyapunov_spectrum(gd_uv(a), [1.3, 0.9], T, transient=1000, seed=0),
    )


def test_chaos_positive_exponent_on_the_1d_map_and_on_gd(chaotic_runs):
    a = chaotic_runs["a"]
    m, g = chaotic_runs["cubic"], chaotic_runs["gd_unbalanced"]
    assert m.status == g.status == "ok"
    # a = 1.9 is in the chaotic range: lambda = 0.877 (+- 0.003 from the block means)
    assert m.exponents[0] > 0.8 and m.stderr[0] < 0.01
    # GD from an unbalanced start: it balances, then follows the chaotic 1-D dynamics
    assert g.exponents[0] > 0.8
    assert abs(g.exponents[0] - m.exponents[0]) < 5 * math.hypot(g.stderr[0], m.stderr[0]) + 5e-3
    # the same statistic from a plain numpy orbit of the 1-D map
    xs = _orbit_1d(a, 0.41, 1000, 100_000)
    lam_np = np.mean(np.log(np.abs(_fprime(xs, a))))
    assert abs(lam_np - m.exponents[0]) < 5 * math.hypot(m.stderr[0], m.stderr[0]) + 5e-3
    assert np.max(np.abs(xs)) < math.sqrt((2 + a) / a)  # bounded: inside the escape threshold


def test_balanced_chaotic_gd_spectrum_is_the_1d_exponent_and_the_transverse_one(gd_uv):
    a, n_tr, T = 1.9, 300, 20_000
    gd = gd_uv(a)
    eta = a / Y
    z0 = np.array([0.5, 0.5])
    res = rdsim.lyapunov_spectrum(gd, z0, T, transient=n_tr, seed=3)
    zs = _replay(gd, z0, n_tr + T)
    s = zs[n_tr:n_tr + T, 0]
    assert np.array_equal(zs[:, 0], zs[:, 1]) and np.array_equal(res.x_final, zs[-1])
    along = np.mean(np.log(np.abs(1 + eta * Y - 3 * eta * s * s)))  # mean log|f'(x_t)|
    transverse = np.mean(np.log(np.abs(1 - eta * Y + eta * s * s)))  # mean log|1 - a + a x_t^2|
    assert along > 0.8 and transverse < -0.1
    np.testing.assert_allclose(res.exponents, [along, transverse], rtol=0, atol=1e-10)


# --- (iv) a > 2: divergence ----------------------------------------------------------------------------


def test_divergence_beyond_a_equal_two(cubic, gd_uv):
    res = rdsim.lyapunov_spectrum(cubic(2.2), [0.3], 10_000)
    assert res.status == "diverged" and res.diverged_at < 1000
    for z0 in ([0.5, 0.5], [1.3, 0.9], [1.0, 1.0 + 1e-3]):
        res = rdsim.lyapunov_spectrum(gd_uv(2.2), z0, 10_000)
        assert res.status == "diverged" and res.diverged_at < 1000, z0
        assert np.all(np.isnan(res.exponents))
    # just below a = 2 the balanced orbit stays bounded (and chaotic)
    res = rdsim.lyapunov_spectrum(gd_uv(1.99), [0.5, 0.5], 20_000, transient=100)
    assert res.status == "ok" and res.exponents[0] > 0.8
    assert np.max(np.abs(res.x_final)) / SQY < math.sqrt((2 + 1.99) / 1.99)


# --- (v) 1 < a < 2: balancing, a negative transverse exponent -------------------------------------------


@pytest.mark.parametrize("a", [1.1, 1.5, 1.9])
def test_balancing_negative_transverse_exponent(gd_uv, chaotic_runs, a):
    gd = gd_uv(a)
    eta = a / Y
    z0 = np.array([1.3, 0.9])
    zs = _replay(gd, z0, 400)
    u, v = zs[:, 0], zs[:, 1]
    d = u * u - v * v
    r = u * v - Y
    # the exact one-step law, checked while u^2 - v^2 is well above rounding
    big = np.abs(d[:-1]) > 1e-6
    assert big.sum() >= 10
    np.testing.assert_allclose(d[1:][big], (d[:-1] * (1 - eta * eta * r[:-1] ** 2))[big], rtol=1e-8)
    # |u^2 - v^2| decays to rounding level
    assert abs(d[0]) == pytest.approx(0.88) and np.max(np.abs(d[300:])) < 1e-12
    # the second Lyapunov exponent (transverse to the diagonal) is negative
    if a == 1.9:
        res = chaotic_runs["gd_unbalanced"]
    else:
        res = rdsim.lyapunov_spectrum(gd, z0, 20_000, transient=500, seed=0)
    assert res.status == "ok"
    assert res.exponents[1] < -0.05
    if a != 1.1:  # chaotic bands: the top exponent is the 1-D map's, positive
        assert res.exponents[0] > 0.3
