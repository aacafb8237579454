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
For large systems (``dimension_ladder(..., k=...)``) only the top k log singular values are
estimated, matrix-free, by block subspace iteration through the tangents and their transposes
(:func:`tangent_transpose`), with the same QR-after-every-factor and graded-Jacobi bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings

import numpy as np

from ._dimension import weighted_kaplan_yorke
from ._lyapunov import _check_int, _seeds
from ._lyapunov import start_block as _start_block
from ._systems import AbstractSystem, NoiseStream
from ._validate import call_user, check_bool, check_seed

__all__ = ["LadderDims", "LadderResult", "dimension_ladder", "rds_sharpness", "log_singular_values_of_product", "tangent_transpose"]


# ---------------------------------------------------------------------------------------------
# stable log singular values of a product of matrices


def _check_system(system):
    if not isinstance(system, AbstractSystem):
        raise TypeError(f"system: expected an rdsim system (Map, Flow, optimizer map, ...), got {type(system).__name__}")


def _log_abs(a):
    with np.errstate(divide="ignore"):
        return np.log(np.abs(a))


class _GradedProduct:
    """The product J_t ... J_1 Q_0 = Q T, with T = R_t ... R_1 kept as diag(exp(s)) Y (QR-based).

    ``Q0`` (d, p) with orthonormal columns starts a block product (p <= d; default the identity,
    the full product). ``push`` multiplies by a dense J, ``push_block`` takes J Q computed elsewhere
    (a matrix-free tangent).
    """

    def __init__(self, d: int, Q0=None):
        self.Q = np.eye(d) if Q0 is None else np.array(Q0, dtype=np.float64)
        p = self.Q.shape[1]
        self.Y = np.eye(p)
        self.s = np.zeros(p)

    def push(self, J) -> bool:
        """Multiply by J on the left; False if the product became non-finite."""
        return self.push_block(np.asarray(J, dtype=np.float64) @ self.Q)

    def push_block(self, M) -> bool:
        """Absorb M = J Q (J the next factor, Q = ``self.Q``); False if M is non-finite."""
        M = np.asarray(M, dtype=np.float64)
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
    seed = check_seed(seed)
    if not isinstance(reduce, str):
        raise TypeError(f"reduce: expected 'mean' or 'sup', got {type(reduce).__name__}")
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
    xis = call_user("noise", _noise_draws, system, n_noise, seed, where=f"drawing {n_noise} noise vectors")
    d = system.tangent_dim
    z = np.empty((xis.shape[0], P.shape[0], d))
    with np.errstate(divide="ignore"):
        for r, xi in enumerate(xis):
            for n, x in enumerate(P):
                J = np.asarray(call_user("jacobian", system.jacobian, x, xi,
                                         where=f"{system.name}, point {n}, noise draw {r}"), dtype=np.float64)
                if J.shape != (d, d) or not np.all(np.isfinite(J)):
                    raise ValueError(f"points: the Jacobian of {system.name} at point {n} (noise draw {r}) is "
                                     f"{'not finite' if J.shape == (d, d) else f'of shape {J.shape}'}")
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
        Lambda: {m: (k,) Lambda_j^(m), j = 1..k}, per unit time (divided by m * dt); k = tangent_dim
            for the dense ladder.
        increments: {m: (k,) Lambda_j^(m) - Lambda_{j-1}^(m)}, the values D^(m) is the
            Kaplan-Yorke formula of (for m = 1 the mean one-step log singular values).
        points: (n_samples, dim) the attractor states at which the windows start.
        n_samples: number of windows.
        status: "ok" or "diverged" (the state, a Jacobian or a tangent block became non-finite;
            then every D^(m) is NaN).
        diverged_at: index of the step (counted from the start of the transient) at which the
            run became non-finite, or None.
        message: a human-readable account of the status.
        seed: the seed used.
        k: the number of top singular values per window (``tangent_dim`` for the dense ladder);
            with k < tangent_dim, Lambda and increments have length k and ``dims`` are
            :class:`rdsim.Dimension` values flagged ``lower_bound`` when the k-th partial sum is >= 0.
        n_power: power iterations of the top-k estimate (None for the dense ladder).
        samples: {m: (n_samples, k) per-window sorted log singular values of Dphi(m) per unit time
            (``increments[m]`` is their mean): for paired comparisons across m and custom errors.
        power_change: {m: the largest change, over windows and j <= k, of the per-unit-time
            partial sums (1/(m dt)) ln||Dphi(m)||_j in the last power iteration} (top-k only; an
            a-posteriori convergence indicator, empty for the dense ladder).
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
    k: int | None = None
    n_power: int | None = None
    power_change: dict = dataclasses.field(default_factory=dict)
    samples: dict = dataclasses.field(default_factory=dict, repr=False)
    diverged_at: int | None = None
    message: str = "ok"

    def __repr__(self) -> str:
        rows = ", ".join(f"{m}: {self.dims[m]:.4f} ± {self.stderr[m]:.2g}" for m in self.ms)
        top = "" if self.n_power is None else f", k={self.k}"
        return f"LadderResult({{{rows}}}, n_samples={self.n_samples}{top}, status={self.status!r})"


class LadderDims(dict):
    """The plain result of :func:`dimension_ladder`: a dict {m: D^(m)} that also carries the run's
    ``status`` ("ok" or "diverged"), ``diverged_at`` (step index or None) and ``message``.

    It compares equal to a plain dict with the same entries.
    """

    def __init__(self, dims, status: str = "ok", diverged_at: int | None = None, message: str = "ok"):
        super().__init__(dims)
        self.status, self.diverged_at, self.message = status, diverged_at, message

    def __repr__(self) -> str:
        base = dict.__repr__(self)
        return base if self.status == "ok" else f"{base} (status={self.status!r}: {self.message})"

    def __reduce__(self):
        return (type(self), (dict(self), self.status, self.diverged_at, self.message))


def _jackknife_dimension(samples: np.ndarray) -> float:
    """Jackknife standard error of the Kaplan-Yorke dimension of the mean of (n, d) samples."""
    n = samples.shape[0]
    if n < 2 or not np.all(np.isfinite(samples)):
        return float("nan")
    loo = (samples.sum(axis=0)[None, :] - samples) / (n - 1)
    vals = np.array([float(weighted_kaplan_yorke(v)) for v in loo])
    return float(math.sqrt((n - 1) / n * np.sum((vals - vals.mean()) ** 2)))


#: largest tangent dimension for which a system without a transpose gets dense Jacobians instead
DENSE_TRANSPOSE_MAX = 512


def _symmetric_optimizer_map(system) -> bool:
    """(S)GD optimizer maps (torch or numba, exact tangent): Df = I - eta H_B is symmetric."""
    spec = getattr(system, "spec", None)
    if spec is None or getattr(spec, "kind", None) not in ("gd", "sgd"):
        return False
    if getattr(system, "tangent_kind", "exact") != "exact":
        return False
    for modname in ("rdsim.torch._optimizer_map", "rdsim._optimizer_map"):
        mod = sys.modules.get(modname)
        if mod is not None and isinstance(system, mod.OptimizerMap):
            return True
    return False


def tangent_transpose(system: AbstractSystem, x, xi, U) -> np.ndarray:
    """Df(x, xi)^T @ U for a (tangent_dim, k) block U, matrix-free where the system allows it.

    Dispatch: the system's own ``tangent_transpose(x, xi, U)`` if it has one; for an (S)GD
    optimizer map (``rdsim.torch.OptimizerMap`` or :func:`rdsim.optimizer_map`, exact tangent) the
    one-step Jacobian I - eta H_B is symmetric, so the transpose is the tangent itself; otherwise
    the dense ``jacobian(x, xi).T @ U`` when tangent_dim <= :data:`DENSE_TRANSPOSE_MAX`.

    Args:
        system: any rdsim system.
        x: state (dim,). xi: noise vector (noise_dim,) (None for deterministic systems).
        U: (tangent_dim, k) block.

    Returns:
        (tangent_dim, k) float64 array.

    Raises:
        ValueError: a system of tangent_dim > DENSE_TRANSPOSE_MAX with neither a transpose nor a
            symmetric Jacobian.

    Example:
        >>> import numpy as np, rdsim
        >>> A = np.array([[2.0, 1.0], [1.0, 3.0]])
        >>> gd = rdsim.optimizer_map(rdsim.losses.quadratic(A), rdsim.optim.gd(0.1))
        >>> bool(np.allclose(tangent_transpose(gd, np.ones(2), None, np.eye(2)), np.eye(2) - 0.1 * A))
        True
    """
    kind = _transpose_kind(system)
    U = np.asarray(U, dtype=np.float64)
    if kind == "method":
        return np.asarray(system.tangent_transpose(x, xi, U), dtype=np.float64)
    if kind == "symmetric":
        return np.asarray(system.tangent(x, xi, U), dtype=np.float64)
    return np.asarray(system.jacobian(x, xi), dtype=np.float64).T @ U


def _transpose_kind(system) -> str:
    if callable(getattr(system, "tangent_transpose", None)):
        return "method"
    if _symmetric_optimizer_map(system):
        return "symmetric"
    if system.tangent_dim <= DENSE_TRANSPOSE_MAX:
        return "dense"
    raise ValueError(f"k: the top-k ladder needs the transpose of the one-step Jacobian; {system.name} "
                     f"(tangent_dim {system.tangent_dim} > {DENSE_TRANSPOSE_MAX}) has no tangent_transpose "
                     "method and no symmetric Jacobian, and dense Jacobians are too large: use k=None "
                     "on a smaller system or give the system a tangent_transpose(x, xi, U) method")


def _topk_window(fwd, bwd, m, d, p, k, n_power, rng):
    """Top-k log singular values of Dphi(m) = J_m ... J_1 by block subspace iteration.

    ``fwd(t, V)`` = J_{t+1} V and ``bwd(t, U)`` = J_{t+1}^T U (t = 0..m-1). Every pass re-orthonormalises
    after each factor (the product is never formed); each forward pass keeps the graded triangular
    factor T of Dphi(m) V = Q T, whose singular values (scaled Jacobi) are the Ritz values
    sigma_j(Dphi(m) V) <= sigma_j(Dphi(m)). Returns (top-k logs, largest change of a partial sum
    between the last two forward passes), or (None, None) if a block became non-finite.
    """
    V = _start_block(d, p, rng)
    prev = None
    change = 0.0
    for it in range(n_power + 1):
        prod = _GradedProduct(d, V)
        for t in range(m):
            if not prod.push_block(fwd(t, prod.Q)):
                return None, None
        z = prod.log_singular_values()[:k]
        if prev is not None:
            with np.errstate(invalid="ignore"):
                dz = np.abs(np.cumsum(z) - np.cumsum(prev))
            change = float(np.max(np.where(np.isnan(dz), 0.0, dz)))
        prev = z
        if it == n_power:
            break
        U = prod.Q
        for t in reversed(range(m)):
            M = np.asarray(bwd(t, U), dtype=np.float64)
            if not np.all(np.isfinite(M)):
                return None, None
            U, _ = np.linalg.qr(M)
        V = U
    return prev, change


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
                     transient: int = 1000, seed: int = 0, return_details: bool = False,
                     k: int | None = None, n_power: int = 4, oversample: int = 5):
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

    Top-k (``k`` < tangent_dim, for large systems such as ``rdsim.torch.OptimizerMap``): no dense
    Jacobian is formed. For each window and each m, a block of p = min(k + oversample, d) random
    orthonormal vectors (seeded by ``seed``, drawn apart from the noise, so the windows are those of
    the dense ladder) goes through ``n_power`` rounds of block subspace iteration on
    Dphi(m)^T Dphi(m): forward through the m tangents ``system.tangent`` and back through their
    transposes (:func:`tangent_transpose`: the system's ``tangent_transpose`` method, the tangent
    itself for (S)GD optimizer maps, whose Df = I - eta H_B is symmetric, else dense Jacobians when
    tangent_dim <= 512), with a QR after every factor so nothing overflows. A last forward pass keeps
    the graded triangular factor of Dphi(m) V = Q T; the singular values of T (scaled Jacobi) are the
    estimates. Accuracy: sigma_j(Dphi(m) V) <= sigma_j(Dphi(m)) for orthonormal V, so every estimate
    of ln sigma_j, and every partial sum ln||Dphi(m)||_j, is a lower bound that increases to the
    exact value with ``n_power``; the error of sigma_j decays like (sigma_{p+1}/sigma_j)^(4 n_power).
    For m >= 2 the gaps of Dphi(m) are those of one step raised to the power m, so a few iterations
    suffice; for m = 1 with clustered singular values (the many near-neutral directions of an
    overparametrised network) raise ``n_power`` or ``oversample`` and watch
    ``LadderResult.power_change``. Cost per window: (2 n_power + 1) sum(ms) tangent pushes of p
    columns. D^(m) from k < d values is a :class:`rdsim.Dimension` flagged ``lower_bound`` when the
    k-th partial sum is >= 0 (the full spectrum might push it higher), as in
    :func:`rdsim.kaplan_yorke_dimension`.

    Sampling error: the jackknife over windows (``return_details=True``). Consecutive windows are
    adjacent pieces of one trajectory; for mixing systems with windows longer than the correlation
    time (max(ms) steps) they are close to independent, otherwise the error is underestimated.

    Args:
        system: any rdsim system (numba or torch; its ``step`` and ``jacobian`` are called, or with
            ``k`` its ``tangent`` and the transpose).
        x0: initial state (None: the system's default).
        ms: window lengths m (positive integers; duplicates removed, sorted).
        n_samples: number of windows (>= 2).
        transient: steps run before the first window (>= 0).
        seed: seeds the noise (the same stream as ``lyapunov_spectrum(..., seed=seed)``) and, apart
            from it, the start blocks of the top-k iteration.
        return_details: return a :class:`LadderResult` instead of the dict.
        k: None (or tangent_dim): all d log singular values from dense Jacobians; 1 <= k <
            tangent_dim: the top k, matrix-free (above).
        n_power: power iterations of the top-k estimate (>= 0; ignored for the dense ladder).
        oversample: extra block columns of the top-k estimate (>= 0).

    Returns:
        {m: D^(m)} (floats, m ascending; a :class:`LadderDims`, a dict that also carries
        ``status``, ``diverged_at`` and ``message``), or a :class:`LadderResult`. A trajectory
        that becomes non-finite does not raise: it gives NaN values with status "diverged" and
        the step index, and the plain dict form also emits a RuntimeWarning.

    Raises:
        TypeError / ValueError: bad arguments, named in the message (``k`` outside 1..tangent_dim;
            ``k`` < tangent_dim for a large system without a usable transpose; ``seed`` not a
            non-negative integer).
        UserFunctionError (rdsim._validate; a RuntimeError): the system's step, jacobian, tangent or noise
            function raised; the message names it and the step, the original error is chained.

    Example:
        >>> import numpy as np, rdsim
        >>> A = np.diag([1.0, 3.0, 5.0])
        >>> gd = rdsim.optimizer_map(rdsim.losses.quadratic(A), rdsim.optim.gd(0.5))
        >>> ladder = dimension_ladder(gd, np.ones(3), ms=(1, 4), n_samples=4, transient=0)
        >>> [round(v, 6) for v in ladder.values()]
        [1.584963, 1.584963]
        >>> top = dimension_ladder(gd, np.ones(3), ms=(1, 4), n_samples=4, transient=0, k=1, oversample=1)
        >>> top[4], top[4].lower_bound  # ln 1.5 > 0: one value cannot place the crossing
        (1.0 (lower bound), True)

    References:
        Tuci, Korkmaz, Simsekli, Birdal, arXiv 2604.19740 (Eq. 70 is the m -> infinity end);
        Demmel & Veselic (1992) for the accuracy of one-sided Jacobi on graded matrices;
        Halko, Martinsson & Tropp (2011) for randomized subspace iteration.
    """
    _check_system(system)
    ms = _check_ms(ms)
    n_samples = _check_int(n_samples, "n_samples", 2)
    transient = _check_int(transient, "transient", 0)
    seed = check_seed(seed)
    return_details = check_bool("return_details", return_details)
    d = system.tangent_dim
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k: expected an integer or None, got {type(k).__name__}")
        if not 1 <= k <= d:
            raise ValueError(f"k: expected 1 <= k <= tangent_dim = {d}, got {k}")
        k = int(k)
    n_power = _check_int(n_power, "n_power", 0)
    oversample = _check_int(oversample, "oversample", 0)
    topk = k is not None and k < d
    if topk:
        tkind = _transpose_kind(system)
        p = min(k + oversample, d)
    else:
        k = d
    x = system.initial_state(x0)
    M = ms[-1]
    _, noise_rng = _seeds(seed)
    block_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    noise = NoiseStream(system, noise_rng)
    t_global = 0  # steps done so far (transient included), for the messages

    def take(n):
        return call_user("noise", noise.take, n, step=t_global, where=f"{system.name}: drawing {n} noise vectors")

    def step(x, xi):
        return np.asarray(call_user("step", system.step, x, xi, step=t_global, where=system.name), dtype=np.float64)

    def jac(x, xi, t):
        return call_user("jacobian", system.jacobian, x, xi, step=t, where=system.name)

    logs = {m: np.full((n_samples, k), np.nan) for m in ms}
    change = {m: 0.0 for m in ms} if topk else {}
    points = np.full((n_samples, system.dim), np.nan)
    status = "ok"
    fail_at, what = None, ""
    done = 0
    while done < transient and status == "ok":
        n = min(4096, transient - done)
        for xi in take(n):
            x = step(x, xi)
            if not np.all(np.isfinite(x)):
                status, fail_at, what = "diverged", t_global, "state"
                break
            t_global += 1
        done += n
    want = set(ms)
    for s in range(n_samples):
        if status != "ok":
            break
        points[s] = x
        if not topk:
            prod = _GradedProduct(d)
            for t, xi in enumerate(take(M), start=1):
                J = jac(x, xi, t_global)
                x = step(x, xi)
                if not prod.push(J):
                    status, fail_at, what = "diverged", t_global, "Jacobian product"
                    break
                if not np.all(np.isfinite(x)):
                    status, fail_at, what = "diverged", t_global, "state"
                    break
                t_global += 1
                if t in want:
                    logs[t][s] = prod.log_singular_values()
            continue
        # top-k: record the window's states and noise, then iterate on each Dphi(m)
        xis = take(M)
        xs = np.empty((M, system.dim))
        t0 = t_global
        for t in range(M):
            xs[t] = x
            x = step(x, xis[t])
            if not np.all(np.isfinite(x)):
                status, fail_at, what = "diverged", t_global, "state"
                break
            t_global += 1
        if status != "ok":
            break
        if tkind == "dense":
            Js = [np.asarray(jac(xs[t], xis[t], t0 + t), dtype=np.float64) for t in range(M)]
            fwd = lambda t, V: Js[t] @ V  # noqa: E731
            bwd = lambda t, U: Js[t].T @ U  # noqa: E731
        else:
            fwd = lambda t, V: call_user("tangent", system.tangent, xs[t], xis[t], V, step=t0 + t,  # noqa: E731
                                         where=system.name)
            bwd = lambda t, U: call_user("tangent_transpose", tangent_transpose, system, xs[t],  # noqa: E731
                                         xis[t], U, step=t0 + t, where=system.name)
        for m in ms:
            z, dz = _topk_window(fwd, bwd, m, d, p, k, n_power, block_rng)
            if z is None:
                status, fail_at, what = "diverged", t0, f"tangent block of the window starting at step {t0}"
                break
            logs[m][s] = z
            change[m] = max(change[m], dz / (m * float(system.dt)))
    message = "ok" if status == "ok" else (
        f"the {what} became non-finite at step {fail_at} (counted from the start of the transient); "
        "every D^(m) is NaN")

    dt = float(system.dt)
    dims, stderr, Lam, inc, per = {}, {}, {}, {}, {}
    for m in ms:
        per[m] = logs[m] / (m * dt)
        if status != "ok":
            dims[m], stderr[m] = float("nan"), float("nan")
            Lam[m] = inc[m] = np.full(k, np.nan)
            continue
        z = logs[m] / (m * dt)  # per-sample increments (sorted log singular values per unit time)
        inc[m] = z.mean(axis=0)
        with np.errstate(invalid="ignore"):
            Lam[m] = np.cumsum(inc[m])
        dims[m] = weighted_kaplan_yorke(inc[m], dim=d, argname="increments")
        stderr[m] = _jackknife_dimension(z)
    if not return_details:
        if status != "ok":
            warnings.warn(f"dimension_ladder: {system.name} diverged: {message} (the returned dict has "
                          "status='diverged'; return_details=True gives a LadderResult)", RuntimeWarning,
                          stacklevel=2)
        return LadderDims(dims, status, fail_at, message)
    return LadderResult(ms=ms, dims=dims, stderr=stderr, Lambda=Lam, increments=inc, points=points,
                        n_samples=n_samples, status=status, seed=seed, k=k,
                        n_power=n_power if topk else None, power_change=change, samples=per,
                        diverged_at=fail_at, message=message)
