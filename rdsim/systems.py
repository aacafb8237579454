"""A catalogue of ready systems, each with the reference values a user can check against.

Every factory returns a :class:`rdsim.Map` or :class:`rdsim.Flow` with a default initial state
``x0`` and a ``reference`` dict of literature or exact values (exponents per unit time).

======================  =====================================================================
system                  reference
======================  =====================================================================
henon                   0.41922, -1.62319 (a=1.4, b=0.3); sum = ln b exactly; D_KY ~ 1.2583
logistic                ln 2 at r = 4
standard_map            sum 0 exactly (area preserving); lambda_1 ~ ln(K/2) for K >~ 4
cat_map                 +-ln((3 + sqrt 5)/2) = +-0.9624236501 exactly
linear_map              log|eig(A)| (sorted), exact for any constant A
lorenz                  0.9056, 0, -14.5723; sum -(sigma + 1 + beta) = -41/3; D_KY ~ 2.0621
lorenz96                N=40, F=8: 13 positive exponents, one ~ 0, sum -N
gaussian_matrix_product Newman (1986): lambda_i = (ln(2 sigma^2) + digamma((n - i + 1)/2)) / 2
random_fibonacci        +-ln(1.13198824...) (Viswanath's constant); sum 0
gbm                     mu - sigma^2/2 (Ito)
noisy_pitchfork         alpha - 3 E[x^2] under the stationary density (always < 0)
======================  =====================================================================
"""

from __future__ import annotations

import numpy as np
from scipy import integrate, special

from ._systems import Flow, Map
from ._validate import check_array, check_int, check_positive_float, check_real

__all__ = ["henon", "logistic", "standard_map", "cat_map", "linear_map", "lorenz", "lorenz96",
           "gaussian_matrix_product", "random_fibonacci", "gbm", "noisy_pitchfork",
           "newman_exponents", "pitchfork_exponent", "CATALOGUE"]

TWO_PI = 2.0 * np.pi


# --- maps ------------------------------------------------------------------------------------

def _henon_step(x, p, xi):
    return np.array([1.0 - p[0] * x[0] * x[0] + x[1], p[1] * x[0]])


def _henon_jac(x, p, xi):
    return np.array([[-2.0 * p[0] * x[0], 1.0], [p[1], 0.0]])


def henon(a: float = 1.4, b: float = 0.3) -> Map:
    """Hénon map (x, y) -> (1 - a x^2 + y, b x).

    Reference (a=1.4, b=0.3): lambda = 0.41922, -1.62319; the sum is ln|b| exactly at every
    step (det Df = -b); D_KY ~ 1.2583.
    """
    a, b = check_real("a", a), check_real("b", b)
    m = Map(_henon_step, _henon_jac, 2, params=(a, b), name="henon", x0=[0.1, 0.1])
    m.reference = {"sum": float(np.log(abs(b)))}
    if (a, b) == (1.4, 0.3):
        m.reference.update(exponents=[0.41922, -1.62319], dimension=1.2583)
    return m


def _logistic_step(x, p, xi):
    return np.array([p[0] * x[0] * (1.0 - x[0])])


def _logistic_jac(x, p, xi):
    return np.array([[p[0] * (1.0 - 2.0 * x[0])]])


def logistic(r: float = 4.0) -> Map:
    """Logistic map x -> r x (1 - x) on [0, 1].

    Reference: lambda = ln 2 at r = 4 (beware the floating-point orbit 0.5 -> 1 -> 0, which
    sticks at the repelling fixed point 0; the default x0 avoids it).
    """
    r = check_real("r", r)
    m = Map(_logistic_step, _logistic_jac, 1, params=(r,), name="logistic", x0=[0.3141592653589793])
    m.reference = {"exponents": [float(np.log(2.0))]} if r == 4.0 else {}
    return m


def _standard_step(x, p, xi):
    pn = x[1] + p[0] * np.sin(x[0])
    th = x[0] + pn
    return np.array([th % (2.0 * np.pi), pn % (2.0 * np.pi)])


def _standard_jac(x, p, xi):
    c = p[0] * np.cos(x[0])
    return np.array([[1.0 + c, 1.0], [c, 1.0]])


def standard_map(K: float = 1.0) -> Map:
    """Chirikov standard map on the torus, state (theta, p): p' = p + K sin theta, theta' = theta + p'.

    Reference: area preserving, so the exponents sum to 0 exactly (det Df = 1); in the chaotic
    sea lambda_1 ~ ln(K/2) for K >~ 4 (Chirikov 1979). At K = 1 the phase space is mixed and the
    value depends on the orbit.
    """
    K = check_real("K", K)
    m = Map(_standard_step, _standard_jac, 2, params=(K,), name="standard_map", x0=[0.5, 0.2])
    m.reference = {"sum": 0.0}
    if K >= 4:
        m.reference["exponents_approx"] = [float(np.log(K / 2)), -float(np.log(K / 2))]
    return m


def _cat_step(x, p, xi):
    return np.array([(2.0 * x[0] + x[1]) % 1.0, (x[0] + x[1]) % 1.0])


def _cat_jac(x, p, xi):
    return np.array([[2.0, 1.0], [1.0, 1.0]])


def cat_map() -> Map:
    """Arnold's cat map (x, y) -> (2x + y, x + y) mod 1.

    Reference: exponents +-ln((3 + sqrt 5)/2) = +-0.9624236501192069 exactly (constant Jacobian).
    """
    lam = float(np.log((3.0 + np.sqrt(5.0)) / 2.0))
    m = Map(_cat_step, _cat_jac, 2, name="cat_map", x0=[0.1234, 0.5678])
    m.reference = {"exponents": [lam, -lam], "sum": 0.0}
    return m


def _linear_step(x, p, xi):
    return p[0] @ x


def _linear_jac(x, p, xi):
    return p[0].copy()


def linear_map(A) -> Map:
    """Linear map x -> A x (deterministic).

    Reference: the exponents are log|eig(A)| sorted descending, for any constant A (exact for
    normal A; a Jordan block converges like log(t)/t). The default x0 is the fixed point 0.
    """
    A = check_array("A", A)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"A: expected a non-empty square matrix, got shape {A.shape}")
    n = A.shape[0]
    m = Map(_linear_step, _linear_jac, n, params=(A,), name="linear_map", x0=np.zeros(n))
    m.reference = {"exponents": sorted(np.log(np.abs(np.linalg.eigvals(A))).tolist(), reverse=True)}
    return m


def _gauss_step(x, p, xi):
    n = x.shape[0]
    A = p[0] * xi.reshape((n, n))
    return A @ x


def _gauss_jac(x, p, xi):
    n = x.shape[0]
    return p[0] * xi.reshape((n, n)).copy()


def newman_exponents(n: int, sigma: float = 1.0) -> np.ndarray:
    """Newman (1986): exponents of products of i.i.d. n x n matrices with N(0, sigma^2) entries.

    lambda_i = (ln(2 sigma^2) + digamma((n - i + 1)/2)) / 2, i = 1..n (descending).
    """
    n = check_int("n", n, 1)
    sigma = check_positive_float("sigma", sigma)
    i = np.arange(1, n + 1)
    return 0.5 * (np.log(2.0 * sigma ** 2) + special.digamma((n - i + 1) / 2.0))


def gaussian_matrix_product(n: int, sigma: float = 1.0) -> Map:
    """Random linear map x -> A_t x, A_t with i.i.d. N(0, sigma^2) entries (the noise xi_t).

    Reference: Newman's formula, :func:`newman_exponents`. The default x0 is 0, a fixed point of
    every A_t, so the tangent cocycle is exactly the matrix product and the state never overflows.
    """
    n = check_int("n", n, 1)
    sigma = check_positive_float("sigma", sigma)

    def noise(rng, steps):
        return rng.standard_normal((steps, n * n))

    m = Map(_gauss_step, _gauss_jac, n, params=(float(sigma),), noise=noise,
            name=f"gaussian_matrix_product(n={n})", x0=np.zeros(n))
    m.reference = {"exponents": newman_exponents(n, sigma).tolist()}
    return m


def _fib_step(x, p, xi):
    return np.array([x[0] + xi[0] * x[1], x[0]])


def _fib_jac(x, p, xi):
    return np.array([[1.0, xi[0]], [1.0, 0.0]])


def _random_signs(rng, steps):
    return np.where(rng.random((steps, 1)) < 0.5, -1.0, 1.0)


VISWANATH = 1.13198824


def random_fibonacci() -> Map:
    """Random Fibonacci recurrence x_{n+1} = x_n +- x_{n-1} (fair signs), state (x_n, x_{n-1}).

    Reference: lambda_1 = ln(1.13198824...) = 0.1239755 (Viswanath 2000), lambda_2 = -lambda_1
    (|det| = 1). Default x0 = 0 (fixed point; the tangent cocycle is the random matrix product).
    """
    lam = float(np.log(VISWANATH))
    m = Map(_fib_step, _fib_jac, 2, noise=_random_signs, name="random_fibonacci", x0=np.zeros(2))
    m.reference = {"exponents": [lam, -lam], "sum": 0.0}
    return m


# --- flows -----------------------------------------------------------------------------------

def _lorenz_rhs(x, p):
    return np.array([p[0] * (x[1] - x[0]), x[0] * (p[1] - x[2]) - x[1], x[0] * x[1] - p[2] * x[2]])


def _lorenz_jac(x, p):
    return np.array([[-p[0], p[0], 0.0], [p[1] - x[2], -1.0, -x[0]], [x[1], x[0], -p[2]]])


def lorenz(sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0, dt: float = 0.01) -> Flow:
    """Lorenz system, RK4 with step dt.

    Reference (10, 28, 8/3): 0.9056, 0, -14.5723 per unit time; the sum is -(sigma + 1 + beta)
    = -41/3 (exactly, up to the RK4 error in log det); D_KY ~ 2.0621.
    """
    sigma, rho, beta = check_real("sigma", sigma), check_real("rho", rho), check_real("beta", beta)
    dt = check_positive_float("dt", dt)
    f = Flow(_lorenz_rhs, _lorenz_jac, 3, dt=dt, params=(sigma, rho, beta),
             name="lorenz", x0=[1.0, 1.0, 20.0])
    f.reference = {"sum": -(sigma + 1.0 + beta)}
    if (sigma, rho, beta) == (10.0, 28.0, 8.0 / 3.0):
        f.reference.update(exponents=[0.9056, 0.0, -14.5723], dimension=2.0621)
    return f


def _l96_rhs(x, p):
    n = x.shape[0]
    out = np.empty(n)
    for i in range(n):
        out[i] = (x[(i + 1) % n] - x[(i - 2) % n]) * x[(i - 1) % n] - x[i] + p[0]
    return out


def _l96_jac(x, p):
    n = x.shape[0]
    J = np.zeros((n, n))
    for i in range(n):
        J[i, (i + 1) % n] += x[(i - 1) % n]
        J[i, (i - 2) % n] -= x[(i - 1) % n]
        J[i, (i - 1) % n] += x[(i + 1) % n] - x[(i - 2) % n]
        J[i, i] -= 1.0
    return J


def lorenz96(N: int = 40, F: float = 8.0, dt: float = 0.01) -> Flow:
    """Lorenz-96: dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, cyclic, RK4 with step dt.

    Reference (N = 40, F = 8): 13 positive exponents, one ~ 0 (autonomous flow), lambda_1 ~ 1.7,
    sum -N (the divergence of the vector field is -N everywhere).
    """
    N = check_int("N", N, 4)
    F = check_real("F", F)
    dt = check_positive_float("dt", dt)
    x0 = np.full(N, float(F))
    x0[0] += 0.01
    f = Flow(_l96_rhs, _l96_jac, N, dt=dt, params=(float(F),), name=f"lorenz96(N={N}, F={F:g})", x0=x0)
    f.reference = {"sum": -float(N)}
    if (N, F) == (40, 8.0):
        f.reference["n_positive"] = 13
    return f


def _gbm_rhs(x, p):
    return p[0] * x


def _gbm_jac(x, p):
    return np.array([[p[0]]])


def _gbm_diff(x, p):
    return p[1] * x


def _gbm_djac(x, p):
    return np.array([[p[1]]])


def gbm(mu: float = 0.5, sigma: float = 0.5, dt: float = 1e-3) -> Flow:
    """Geometric Brownian motion dx = mu x dt + sigma x dW (Ito), Euler-Maruyama with step dt.

    Reference: lambda = mu - sigma^2/2 (the Euler-Maruyama map differs by O(dt)). The default x0
    is 0, a fixed point: the tangent cocycle (1 + mu dt + sigma dW) does not depend on x, and a
    growing state would overflow on long runs.
    """
    mu, sigma = check_real("mu", mu), check_real("sigma", sigma)
    dt = check_positive_float("dt", dt)
    f = Flow(_gbm_rhs, _gbm_jac, 1, dt=dt, params=(mu, sigma), diffusion=_gbm_diff,
             diffusion_jacobian=_gbm_djac, name="gbm", x0=[0.0])
    f.reference = {"exponents": [mu - 0.5 * sigma ** 2]}
    return f


def _pf_rhs(x, p):
    return np.array([p[0] * x[0] - x[0] ** 3])


def _pf_jac(x, p):
    return np.array([[p[0] - 3.0 * x[0] ** 2]])


def _pf_diff(x, p):
    return np.array([p[1]])


def _pf_djac(x, p):
    return np.zeros((1, 1))


def pitchfork_exponent(alpha: float, sigma: float) -> float:
    """Exact Lyapunov exponent of dx = (alpha x - x^3) dt + sigma dW.

    With the stationary density p(x) ~ exp((alpha x^2 - x^4/2) / sigma^2), lambda = E[alpha - 3x^2]
    (computed by quadrature). It is negative for every alpha: additive noise destroys the
    pitchfork bifurcation (Crauel & Flandoli 1998).
    """
    alpha = check_real("alpha", alpha)
    sigma = check_positive_float("sigma", sigma)
    s2 = sigma ** 2

    def logw(x):
        return (alpha * x * x - 0.5 * x ** 4) / s2

    xs = np.linspace(-10, 10, 20001)
    shift = logw(xs).max()
    lim = max(6.0, 3 * np.sqrt(max(alpha, 0) + 1) + 4 * sigma)
    Z = integrate.quad(lambda x: np.exp(logw(x) - shift), -lim, lim, limit=200, epsabs=0, epsrel=1e-12)[0]
    M = integrate.quad(lambda x: (alpha - 3 * x * x) * np.exp(logw(x) - shift), -lim, lim, limit=200,
                       epsabs=0, epsrel=1e-12)[0]
    return float(M / Z)


def noisy_pitchfork(alpha: float = 1.0, sigma: float = 1.0, dt: float = 1e-3) -> Flow:
    """Noisy pitchfork dx = (alpha x - x^3) dt + sigma dW (additive noise), Euler-Maruyama.

    Reference: lambda = alpha - 3 E[x^2] under the stationary density (:func:`pitchfork_exponent`);
    e.g. alpha = 1, sigma = 1 gives a negative exponent although 0 is unstable without noise.
    """
    alpha, sigma = check_real("alpha", alpha), check_positive_float("sigma", sigma)
    dt = check_positive_float("dt", dt)
    f = Flow(_pf_rhs, _pf_jac, 1, dt=dt, params=(alpha, sigma), diffusion=_pf_diff,
             diffusion_jacobian=_pf_djac, name="noisy_pitchfork", x0=[0.1])
    f.reference = {"exponents": [pitchfork_exponent(alpha, sigma)]}
    return f


#: name -> factory with default arguments, for demos and conformance runs
CATALOGUE = {
    "henon": henon,
    "logistic": logistic,
    "standard_map": standard_map,
    "cat_map": cat_map,
    "lorenz": lorenz,
    "lorenz96": lorenz96,
    "gaussian_matrix_product": lambda: gaussian_matrix_product(4),
    "random_fibonacci": random_fibonacci,
    "gbm": gbm,
    "noisy_pitchfork": noisy_pitchfork,
}
