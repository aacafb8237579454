"""RDS sharpness values and the dimension ladder (MATH.md §4-5): ``rds_sharpness``, ``dimension_ladder``.

The ladder compares the one-step picture (sharpness values, the singular values of one Jacobian)
with the long-time one (Lyapunov exponents) through the m-step Jacobian products
Dphi(m, omega, x) = Df(x_{m-1}, xi_{m-1}) ... Df(x_0, xi_0). Their log singular values span
(lambda_1 - lambda_d) * m nats, so they are computed without ever forming the product: a QR-based
product decomposition Dphi(m) = Q_m R_m ... R_1 keeps the triangular factor T = R_m ... R_1 in
row-scaled form T = diag(exp(s)) Y (log row scales s, rows of Y of max-norm 1), and the singular
values of T come from a one-sided (Hestenes) Jacobi iteration carried out on that scaled form.
Jacobi on a row-graded matrix is relatively accurate (Demmel & Veselic 1992), so the small singular
values keep their relative accuracy, and nothing overflows or underflows however far apart they are.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ._dimension import weighted_kaplan_yorke
from ._lyapunov import _check_int, _seeds
from ._systems import AbstractSystem, NoiseStream

__all__ = ["LadderResult", "dimension_ladder", "rds_sharpness", "log_singular_values_of_product"]


# ---------------------------------------------------------------------------------------------
# stable log singular values of a product of matrices


def _check_system(system):
    if not isinstance(system, AbstractSystem):
        raise TypeError(f"system: expected an rdsim system (Map, Flow, optimizer map, ...), got {type(system).__name__}")


def _log_abs(a):
    with np.errstate(divide="ignore"):
        return np.log(np.abs(a))


class _GradedProduct:
    """The product J_t ... J_1 = Q T, with T = R_t ... R_1 kept as diag(exp(s)) Y (QR-based)."""

    def __init__(self, d: int):
        self.Q = np.eye(d)
        self.Y = np.eye(d)
        self.s = np.zeros(d)

    def push(self, J) -> bool:
        """Multiply by J on the left; False if the product became non-finite."""
        M = np.asarray(J, dtype=np.float64) @ self.Q
        if not np.all(np.isfinite(M)):
            return False
        self.Q, R = np.linalg.qr(M)
        # rows of R T = sum_k R_ik exp(s_k) Y_k, summed relative to the largest term of each row
        L = _log_abs(R) + self.s[None, :]
        top = L.max(axis=1)
        alive = np.isfinite(top)
        W = np.zeros_like(R)
        W[alive] = np.sign(R[alive]) * np.exp(L[alive] - top[alive, None])
        Y = W @ self.Y
        nrm = np.abs(Y).max(axis=1)
        ok = nrm > 0
        s = np.full_like(self.s, -np.inf)
        s[ok] = top[ok] + np.log(nrm[ok])
        Y[ok] /= nrm[ok, None]
        Y[~ok] = 0.0
        self.Y, self.s = Y, s
        return True

    def log_singular_values(self, tol: float = 1e-15, max_sweeps: int = 100) -> np.ndarray:
        return _scaled_jacobi(self.Y, self.s, tol, max_sweeps)


def _scaled_jacobi(Y, s, tol=1e-15, max_sweeps=100) -> np.ndarray:
    """Log singular values (descending) of diag(exp(s)) Y by one-sided Jacobi on the rows.

    Each rotation orthogonalises two rows x_p = exp(s_p) y_p, x_q = exp(s_q) y_q (Hestenes) with
    the angle written in terms of rho = exp(s_small - s_big) <= 1, so no quantity over- or
    underflows: for rho -> 0 the rotation becomes the projection of the small row off the big one.
    """
    Y = np.array(Y, dtype=np.float64)
    s = np.array(s, dtype=np.float64)
    d = s.shape[0]
    for _ in range(max_sweeps):
        rotated = False
        for p in range(d - 1):
            for q in range(p + 1, d):
                if not (np.isfinite(s[p]) and np.isfinite(s[q])):
                    continue
                i, k = (p, q) if s[p] >= s[q] else (q, p)
                yi, yk = Y[i], Y[k]
                a = float(yi @ yi)
                b = float(yk @ yk)
                c = float(yi @ yk)
                if abs(c) <= tol * math.sqrt(a * b):
                    continue
                rotated = True
                rho = math.exp(s[k] - s[i])
                z = (rho * rho * b - a) / (2.0 * c)
                u = math.copysign(1.0, z) / (abs(z) + math.sqrt(rho * rho + z * z))  # tan(angle) / rho
                t = u * rho
                cs = 1.0 / math.sqrt(1.0 + t * t)
                new_i = cs * (yi - (u * rho * rho) * yk)
                new_k = cs * (u * yi + yk)
                for r, row in ((i, new_i), (k, new_k)):
                    n = float(np.abs(row).max())
                    if n > 0 and np.isfinite(n):
                        Y[r] = row / n
                        s[r] += math.log(n)
                    else:
                        Y[r] = 0.0
                        s[r] = -np.inf
        if not rotated:
            break
    with np.errstate(divide="ignore"):
        out = s + np.log(np.sqrt(np.einsum("ij,ij->i", Y, Y)))
    out[~np.isfinite(s)] = -np.inf
    return np.sort(out)[::-1]


def log_singular_values_of_product(matrices) -> np.ndarray:
    """Log singular values, descending, of the product M_t ... M_1 of a sequence [M_1, ..., M_t].

    Computed stably (QR-based product decomposition and scaled one-sided Jacobi, see the module
    docstring): small singular values keep their relative accuracy, however many orders of
    magnitude below the largest they are. A zero singular value gives -inf.

    Example:
        >>> import numpy as np
        >>> A = np.diag([2.0, 1e-4])
        >>> v = log_singular_values_of_product([A] * 50)
        >>> bool(np.allclose(v, [50 * np.log(2.0), 50 * np.log(1e-4)], rtol=1e-13))
        True
    """
    mats = [np.asarray(M, dtype=np.float64) for M in matrices]
    if not mats:
        raise ValueError("matrices: expected at least one matrix")
    d = mats[0].shape[0]
    for M in mats:
        if M.shape != (d, d):
            raise ValueError(f"matrices: expected square matrices of shape ({d}, {d}), got {M.shape}")
    prod = _GradedProduct(d)
    for M in mats:
        if not prod.push(M):
            return np.full(d, np.nan)
    return prod.log_singular_values()


# ---------------------------------------------------------------------------------------------
# RDS sharpness (MATH.md §4)


def _noise_draws(system, n, seed):
    if system.noise_dim == 0:
        return np.empty((1, 0))
    _, noise_rng = _seeds(seed)
    return NoiseStream(system, noise_rng).take(n)


def rds_sharpness(system: AbstractSystem, points, *, n_noise: int = 32, reduce: str = "mean",
                  seed: int = 0) -> np.ndarray:
    """RDS sharpness values lambda_1 >= ... >= lambda_d from one-step Jacobians (MATH.md §4).

    For every point x (a row of ``points``) and every noise draw xi_r (r = 1..n_noise, the first
    n_noise noise vectors of the system's sampler seeded by ``seed``, shared by all points; a
    deterministic system uses a single draw), z(x, xi_r) = sorted log singular values of
    Df(x, xi_r) (``np.linalg.svd``; a zero singular value gives -inf). Then

    * ``reduce="mean"``: lambda_k = mean over draws and points of z_k(x, xi_r);
    * ``reduce="sup"``:  lambda_k = mean over draws r of max over points of z_k(x, xi_r)
      (Definition 4.1, E_omega[sup_x ln sigma_k]). The sup is taken index by index: lambda_k is
      the largest k-th value over the points, and different k may come from different points.

    ``rdsim.sharpness_dimension(rds_sharpness(...))`` is the sharpness dimension SD.

    Args:
        system: any rdsim system.
        points: (n_points, dim) full states on the attractor (a single state (dim,) is accepted).
        n_noise: number of noise draws (>= 1; ignored for deterministic systems).
        reduce: "mean" or "sup" over points.
        seed: seeds the noise draws (the same stream as ``lyapunov_spectrum(..., seed=seed)``).

    Returns:
        (tangent_dim,) array, descending (entries may be -inf).

    Raises:
        TypeError / ValueError: invalid system, points, reduce or n_noise (named in the message).

    Example:
        >>> import numpy as np, rdsim
        >>> A = np.diag([1.0, 3.0, 5.0])
        >>> gd = rdsim.optimizer_map(rdsim.losses.quadratic(A), rdsim.optim.gd(0.5))
        >>> lam = rds_sharpness(gd, np.ones((1, 3)))
        >>> bool(np.allclose(lam, np.log([1.5, 0.5, 0.5])))
        True

    References:
        Tuci, Korkmaz, Simsekli, Birdal, "Generalization at the Edge of Stability", arXiv 2604.19740.
    """
    _check_system(system)
    n_noise = _check_int(n_noise, "n_noise", 1)
    if reduce not in ("mean", "sup"):
        raise ValueError(f"reduce: expected 'mean' or 'sup', got {reduce!r}")
    try:
        P = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError("points: expected an array of states, shape (n_points, dim)") from err
    if P.ndim == 1:
        P = P.reshape(1, -1)
    if P.ndim != 2 or P.shape[1] != system.dim or P.shape[0] == 0:
        raise ValueError(f"points: expected shape (n_points, {system.dim}) with n_points >= 1, got {np.shape(points)}")
    if not np.all(np.isfinite(P)):
        raise ValueError("points: must be finite")
    xis = _noise_draws(system, n_noise, seed)
    d = system.tangent_dim
    z = np.empty((xis.shape[0], P.shape[0], d))
    with np.errstate(divide="ignore"):
        for r, xi in enumerate(xis):
            for n, x in enumerate(P):
                J = np.asarray(system.jacobian(x, xi), dtype=np.float64)
                z[r, n] = np.log(np.linalg.svd(J, compute_uv=False))
    if reduce == "mean":
        return z.mean(axis=(0, 1))
    return z.max(axis=1).mean(axis=0)


# ---------------------------------------------------------------------------------------------
# dimension ladder (MATH.md §5)


@dataclasses.dataclass(frozen=True)
class LadderResult:
    """Details of :func:`dimension_ladder` (frozen).

    Attributes:
        ms: the window lengths m, ascending.
        dims: {m: D^(m)}.
        stderr: {m: jackknife standard error of D^(m) over the samples} (NaN if not computable).
        Lambda: {m: (tangent_dim,) Lambda_j^(m), j = 1..d}, per unit time (divided by m * dt).
        increments: {m: (tangent_dim,) Lambda_j^(m) - Lambda_{j-1}^(m)}, the values D^(m) is the
            Kaplan-Yorke formula of (for m = 1 the mean one-step log singular values).
        points: (n_samples, dim) the attractor states at which the windows start.
        n_samples: number of windows.
        status: "ok" or "diverged".
        seed: the seed used.
    """

    ms: tuple
    dims: dict
    stderr: dict
    Lambda: dict
    increments: dict
    points: np.ndarray
    n_samples: int
    status: str = "ok"
    seed: int | None = None

    def __repr__(self) -> str:
        rows = ", ".join(f"{m}: {self.dims[m]:.4f} ± {self.stderr[m]:.2g}" for m in self.ms)
        return f"LadderResult({{{rows}}}, n_samples={self.n_samples}, status={self.status!r})"


def _jackknife_dimension(samples: np.ndarray) -> float:
    """Jackknife standard error of the Kaplan-Yorke dimension of the mean of (n, d) samples."""
    n = samples.shape[0]
    if n < 2 or not np.all(np.isfinite(samples)):
        return float("nan")
    loo = (samples.sum(axis=0)[None, :] - samples) / (n - 1)
    vals = np.array([float(weighted_kaplan_yorke(v)) for v in loo])
    return float(math.sqrt((n - 1) / n * np.sum((vals - vals.mean()) ** 2)))


def _check_ms(ms):
    try:
        vals = list(ms)
    except TypeError:
        raise TypeError(f"ms: expected a sequence of positive integers, got {type(ms).__name__}") from None
    if not vals:
        raise ValueError("ms: expected at least one window length")
    out = []
    for m in vals:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"ms: window lengths must be positive integers, got {m!r}")
        out.append(int(m))
    return tuple(sorted(set(out)))


def dimension_ladder(system: AbstractSystem, x0, ms=(1, 2, 4, 8, 16), *, n_samples: int = 64,
                     transient: int = 1000, seed: int = 0, return_details: bool = False):
    """The dimension ladder D^(m) (MATH.md §5): Kaplan-Yorke dimensions of m-step Jacobian products.

    The system runs from x0 for ``transient`` steps; then n_samples consecutive windows of
    max(ms) steps follow along one trajectory (the noise continues; the state x_n at the start of
    window n is an attractor sample). In every window the product Dphi(m, omega, x_n) of the
    one-step Jacobians along the actual noise is built for each m in ``ms`` and its log singular
    values ln sigma_1 >= ... >= ln sigma_d are computed stably (QR-based product decomposition and
    scaled one-sided Jacobi; accurate even when they span hundreds of orders of magnitude). Then
    Lambda_j^(m) = (1/(m dt)) mean_n sum_{i<=j} ln sigma_i and D^(m) = Kaplan-Yorke formula of the
    increments of Lambda^(m). In expectation D_KY <= D^(m) <= D^(1) <= SD, D^(m) is
    non-increasing along m = 1, 2, 4, ... and tends to D_KY; equality holds throughout when Df is
    constant (GD on a quadratic).

    Sampling error: the jackknife over windows (``return_details=True``). Consecutive windows are
    adjacent pieces of one trajectory; for mixing systems with windows longer than the correlation
    time (max(ms) steps) they are close to independent, otherwise the error is underestimated.

    Args:
        system: any rdsim system (numba or torch; its ``step`` and ``jacobian`` are called).
        x0: initial state (None: the system's default).
        ms: window lengths m (positive integers; duplicates removed, sorted).
        n_samples: number of windows (>= 2).
        transient: steps run before the first window (>= 0).
        seed: seeds the noise (the same stream as ``lyapunov_spectrum(..., seed=seed)``).
        return_details: return a :class:`LadderResult` instead of the dict.

    Returns:
        {m: D^(m)} (floats, m ascending), or a :class:`LadderResult`. A trajectory that becomes
        non-finite gives NaN values (status "diverged" in the details); it does not raise.

    Example:
        >>> import numpy as np, rdsim
        >>> A = np.diag([1.0, 3.0, 5.0])
        >>> gd = rdsim.optimizer_map(rdsim.losses.quadratic(A), rdsim.optim.gd(0.5))
        >>> ladder = dimension_ladder(gd, np.ones(3), ms=(1, 4), n_samples=4, transient=0)
        >>> [round(v, 6) for v in ladder.values()]
        [1.584963, 1.584963]

    References:
        Tuci, Korkmaz, Simsekli, Birdal, arXiv 2604.19740 (Eq. 70 is the m -> infinity end);
        Demmel & Veselic (1992) for the accuracy of one-sided Jacobi on graded matrices.
    """
    _check_system(system)
    ms = _check_ms(ms)
    n_samples = _check_int(n_samples, "n_samples", 2)
    transient = _check_int(transient, "transient", 0)
    x = system.initial_state(x0)
    d = system.tangent_dim
    M = ms[-1]
    _, noise_rng = _seeds(seed)
    noise = NoiseStream(system, noise_rng)

    logs = {m: np.full((n_samples, d), np.nan) for m in ms}
    points = np.full((n_samples, system.dim), np.nan)
    status = "ok"
    done = 0
    while done < transient and status == "ok":
        n = min(4096, transient - done)
        for xi in noise.take(n):
            x = np.asarray(system.step(x, xi), dtype=np.float64)
        if not np.all(np.isfinite(x)):
            status = "diverged"
        done += n
    want = set(ms)
    for s in range(n_samples):
        if status != "ok":
            break
        points[s] = x
        prod = _GradedProduct(d)
        for t, xi in enumerate(noise.take(M), start=1):
            J = system.jacobian(x, xi)
            x = np.asarray(system.step(x, xi), dtype=np.float64)
            if not prod.push(J) or not np.all(np.isfinite(x)):
                status = "diverged"
                break
            if t in want:
                logs[t][s] = prod.log_singular_values()

    dt = float(system.dt)
    dims, stderr, Lam, inc = {}, {}, {}, {}
    for m in ms:
        if status != "ok":
            dims[m], stderr[m] = float("nan"), float("nan")
            Lam[m] = inc[m] = np.full(d, np.nan)
            continue
        z = logs[m] / (m * dt)  # per-sample increments (sorted log singular values per unit time)
        inc[m] = z.mean(axis=0)
        with np.errstate(invalid="ignore"):
            Lam[m] = np.cumsum(inc[m])
        dims[m] = float(weighted_kaplan_yorke(inc[m], argname="increments"))
        stderr[m] = _jackknife_dimension(z)
    if not return_details:
        return dims
    return LadderResult(ms=ms, dims=dims, stderr=stderr, Lambda=Lam, increments=inc, points=points,
                        n_samples=n_samples, status=status, seed=seed)
