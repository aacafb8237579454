"""Sharpness-dimension estimators of arXiv 2604.19740 (MATH.md §4), backend-independent (private).

Given Hessian spectra of minibatch losses (exact eigenvalues, or SLQ Ritz values and weights),
these functions turn them into RDS sharpness values z = log|1 - eta alpha| and the sharpness
dimension:

* ``exact``: z_B = sorted log|1 - eta eig(H_B)| per minibatch, lambda = index-wise mean, SD =
  Kaplan-Yorke formula (Definition 4.2 with the minibatch average in place of E sup).
* ``slq``: z = log(|1 - eta alpha| + eps) of the pooled Ritz values with their masses (total mass
  N = parameter count), a weighted histogram with ``bins`` bins of equal width, placed so that
  z = 0 is a bin edge (no bin mixes expanding and contracting mass: with the large neutral bulk
  of a trained network straddling 0, a mixed bin's sign would decide the whole dimension); each
  non-empty bin is a pseudo-eigenvalue (its mass-weighted mean z, or its centre) with
  multiplicity = its mass.
* ``kde``: a Gaussian kernel density of z (bandwidth ``bandwidth``) on a grid of ``grid`` points,
  each grid point a pseudo-eigenvalue with multiplicity density * spacing (normalised to N).
* ``ps``: the alpha-density smoothed with a Gaussian kernel, cut into M equal-mass quantiles
  alpha_r (r = 1..M, at levels (r - 1/2)/M), each of multiplicity N / M, z_r = log(|1 - eta
  alpha_r| + eps).

All end in the weighted Kaplan-Yorke formula D = sum_{r<=j} w_r + S_j / |z_{j+1}| of MATH.md §4.

Neutral directions and the zero tolerance (issue 12): a minibatch Hessian of rank below N has
exactly-zero eigenvalues that ``eigvalsh`` returns as +-1e-17; their z = log|1 - eta alpha| come out
as +-1e-17 and a partial sum of -1e-17 stops the Kaplan-Yorke count one direction early. So, per
minibatch, an eigenvalue alpha with min(|alpha|, |alpha - 2/eta|) <= ``rank_tol * ||H_B||`` (||H_B|| =
max |alpha| of that minibatch; default ``rank_tol`` = 1e-9, the range finder's own tolerance) is
*neutral*: its z is set to exactly 0 before the formula (|1 - eta alpha| = 1 to that tolerance).
Directions with z > 0 after this are *expanding*, z < 0 *contracting*. SLQ-based methods classify
the Ritz values the same way (band ``max(rank_tol, 1e3 eps(dtype)) * max|alpha~|``, their masses
counted: density-weighted estimates); their formula values keep the +eps of the paper's transform.

Defaults (rdsim's choices; the paper does not fix them): eps = 1e-6, bins = 200 with bin means,
KDE grid 2000 points and Silverman's bandwidth on the weighted sample, M = min(N, 2000) quantiles.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ._dimension import Dimension, weighted_kaplan_yorke
from ._validate import check_choice, check_int, check_nonneg_float, check_positive_float

__all__ = ["SharpnessResult", "pseudo_spectrum", "exact_sharpness_values", "silverman_bandwidth",
           "loss_sharpness_dimension", "SD_METHODS", "DEFAULTS"]

SD_METHODS = ("exact", "slq", "kde", "ps")

#: documented defaults of the SLQ-based estimators
DEFAULTS = {"eps": 1e-6, "bins": 200, "bin_value": "mean", "grid": 2000, "bandwidth": None,
            "n_quantiles": 2000, "n_iter": 100}


@dataclasses.dataclass(frozen=True)
class SharpnessResult:
    """A sharpness-dimension estimate and the baselines it is compared against (frozen).

    Attributes:
        value: the sharpness dimension (a :class:`rdsim.Dimension`, i.e. a float).
        method: "exact", "slq", "kde" or "ps".
        lambdas: the values the Kaplan-Yorke formula was applied to, descending: the RDS
            sharpness values lambda_1 >= ... >= lambda_N ("exact") or the pseudo-spectrum z_r.
        weights: multiplicities of ``lambdas`` (all ones for "exact").
        rds_sharpness: lambda_1, the top RDS sharpness value ("RDS sharpness" of the paper).
        lambda_max: lambda_max(H) of the full-data Hessian (NaN if not computed).
        trace: tr(H) of the full-data Hessian, estimated as the mean of tr(H_B) over the
            minibatches (unbiased); NaN if not computed.
        lr, batch_size, n_batches: the settings; n_params: N.
        stderr: standard error of ``value`` over minibatches (jackknife; NaN for SLQ methods).
        eigenvalues: "exact": (n_batches, N) eigenvalues of each H_B, ascending; else None.
        density: SLQ methods: the :class:`rdsim.torch.SpectralDensity` (Ritz values and weights).
        options: the estimator settings used (eps, bins, bandwidth, ...).
        n_hvp: Hessian-vector products used (0 for analytic Hessians).
        n_expanding, n_neutral, n_contracting: directions with z = log|1 - eta alpha| above, within
            and below the neutral tolerance (module docstring: min(|alpha|, |alpha - 2/eta|) <=
            ``rank_tol * ||H_B||``), averaged over the minibatches ("exact"); for the SLQ-based
            methods the Ritz masses in each class, pooled (density-weighted estimates, summing to N).
        neutral_share: the share of ``value`` contributed by neutral directions: the neutral
            weight among the formula's values (the lambda_i that are exactly 0 for "exact"; the
            neutral Ritz mass for SLQ methods) over ``value``. Neutral values (z = 0, or +eps) are
            always counted in full, since the partial sums are non-negative up to them. NaN if
            ``value`` is 0.
    """

    value: Dimension
    method: str
    lambdas: np.ndarray
    weights: np.ndarray
    rds_sharpness: float
    lambda_max: float
    trace: float
    lr: float
    batch_size: int
    n_batches: int
    n_params: int
    stderr: float = float("nan")
    eigenvalues: np.ndarray | None = None
    density: object | None = None
    options: dict = dataclasses.field(default_factory=dict)
    n_hvp: int = 0
    n_expanding: float = float("nan")
    n_neutral: float = float("nan")
    n_contracting: float = float("nan")
    neutral_share: float = float("nan")

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        err = f" ± {self.stderr:.3g}" if np.isfinite(self.stderr) else ""
        cnt = ""
        if np.isfinite(self.n_neutral):
            cnt = (f", expanding/neutral/contracting={self.n_expanding:.4g}/{self.n_neutral:.4g}/"
                   f"{self.n_contracting:.4g} (neutral share {self.neutral_share:.3g})")
        return (f"SharpnessResult(value={float(self.value):.4f}{err}, method={self.method!r}{cnt}, "
                f"rds_sharpness={self.rds_sharpness:.4g}, lambda_max={self.lambda_max:.4g}, "
                f"trace={self.trace:.4g}, lr={self.lr:g}, batch_size={self.batch_size}, N={self.n_params})")


def check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    return float(lr)


def check_method(method) -> str:
    if method not in SD_METHODS:
        raise ValueError(f"method: expected one of {SD_METHODS}, got {method!r}")
    return method


def check_batch_size(batch_size, n_samples) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if batch_size > n_samples:
        raise ValueError(f"batch_size: {batch_size} is larger than the data set ({n_samples} samples)")
    return int(batch_size)


def check_options(options):
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; estimator options are {sorted(DEFAULTS)}")
    # the values too, before any Hessian is computed (an eps < 0 would give log of a negative number)
    for name, val in options.items():
        if val is None:
            continue
        if name == "eps":
            check_nonneg_float("eps", val)
        elif name in ("bins", "grid", "n_quantiles"):
            check_int(name, val, 1)
        elif name == "bandwidth":
            check_positive_float("bandwidth", val)
        elif name == "bin_value":
            check_choice("bin_value", val, ("mean", "center"))


def log_contraction(alphas, lr, eps=0.0) -> np.ndarray:
    """z = log(|1 - lr * alpha| + eps) (-inf where exactly zero and eps = 0)."""
    with np.errstate(divide="ignore"):
        return np.log(np.abs(1.0 - lr * np.asarray(alphas, dtype=np.float64)) + eps)


#: default relative tolerance of a neutral eigenvalue (min(|alpha|, |alpha - 2/eta|) <= rank_tol ||H_B||)
RANK_TOL = 1e-9


def check_rank_tol(rank_tol) -> float:
    if (isinstance(rank_tol, bool) or not isinstance(rank_tol, (int, float, np.integer, np.floating))
            or not math.isfinite(rank_tol) or not 0 <= rank_tol < 1):
        raise ValueError(f"rank_tol: expected a number in [0, 1), got {rank_tol!r}")
    return float(rank_tol)


def check_pos_int(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def neutral_mask(alphas, lr, tol, scale=None) -> np.ndarray:
    """Where min(|alpha|, |alpha - 2/lr|) <= tol * scale (scale: max |alpha| by default; rows of a 2-D
    array each get their own scale), i.e. |1 - lr alpha| = 1 to the tolerance."""
    A = np.asarray(alphas, dtype=np.float64)
    if scale is None:
        scale = np.max(np.abs(A), axis=-1, keepdims=True) if A.size else 0.0
    band = tol * scale
    return (np.abs(A) <= band) | (np.abs(A - 2.0 / lr) <= band)


def exact_sharpness_values(eigenvalues, lr, rank_tol=RANK_TOL):
    """(lambdas (N,) descending, per-batch z (K, N), counts) from per-minibatch eigenvalues (K, N).

    Neutral eigenvalues (:func:`neutral_mask` with ``rank_tol``, per minibatch) get z = 0 exactly;
    ``counts`` = (n_expanding, n_neutral, n_contracting), each the mean over minibatches.
    """
    E = np.atleast_2d(np.asarray(eigenvalues, dtype=np.float64))
    if not np.all(np.isfinite(E)):
        raise ValueError("eigenvalues: the minibatch Hessian has non-finite entries or eigenvalues "
                         "(NaN or inf in the loss, its gradient or its curvature at these parameters)")
    neutral = neutral_mask(E, lr, rank_tol)
    Z = log_contraction(E, lr)
    Z[neutral] = 0.0
    counts = (float(np.mean(np.sum(Z > 0, axis=1))), float(np.mean(np.sum(neutral, axis=1))),
              float(np.mean(np.sum(Z < 0, axis=1))))
    Z = -np.sort(-Z, axis=1)
    with np.errstate(invalid="ignore"):
        lam = Z.mean(axis=0)
    return lam, Z, counts


def neutral_share(value, n_neutral_counted) -> float:
    """The share of the dimension ``value`` from neutral values (counted in full, see SharpnessResult)."""
    v = float(value)
    return float(n_neutral_counted) / v if v > 0 else float("nan")


def slq_counts(alphas, masses, lr, rank_tol, dtype_eps=np.finfo(np.float64).eps):
    """(n_expanding, n_neutral, n_contracting) masses of pooled Ritz values (density-weighted)."""
    a = np.asarray(alphas, dtype=np.float64)
    w = np.asarray(masses, dtype=np.float64)
    tol = max(rank_tol, 1e3 * float(dtype_eps))
    neutral = neutral_mask(a, lr, tol, scale=float(np.max(np.abs(a))) if a.size else 0.0)
    z = np.abs(1.0 - lr * a)
    return (float(w[~neutral & (z > 1)].sum()), float(w[neutral].sum()), float(w[~neutral & (z < 1)].sum())), tol


def jackknife_sd(Z) -> float:
    """Jackknife standard error of the SD of the index-wise mean of the rows of Z (K, N)."""
    K = Z.shape[0]
    if K < 2 or not np.all(np.isfinite(Z)):
        return float("nan")
    loo = (Z.sum(axis=0)[None, :] - Z) / (K - 1)
    vals = np.array([float(weighted_kaplan_yorke(v, argname="lambdas")) for v in loo])
    return float(math.sqrt((K - 1) / K * np.sum((vals - vals.mean()) ** 2)))


def silverman_bandwidth(values, weights) -> float:
    """Silverman's rule 0.9 min(sd, IQR/1.34) n_eff^(-1/5) on a weighted sample (n_eff = (sum w)^2 / sum w^2)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    W = w.sum()
    mu = float(np.sum(w * v) / W)
    sd = math.sqrt(max(float(np.sum(w * (v - mu) ** 2) / W), 0.0))
    order = np.argsort(v)
    cdf = np.cumsum(w[order]) / W
    q1, q3 = np.interp([0.25, 0.75], cdf, v[order])
    spread = min(sd, (q3 - q1) / 1.34) if q3 > q1 else sd
    n_eff = W * W / float(np.sum(w * w))
    h = 0.9 * spread * n_eff ** (-0.2)
    if not h > 0:
        h = 1e-3 * max(float(np.max(np.abs(v))), 1.0)
    return float(h)


def _gauss_cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def pseudo_spectrum(alphas, masses, lr, method, *, eps=None, bins=None, bin_value=None, grid=None,
                    bandwidth=None, n_quantiles=None):
    """(values z_r, multiplicities w_r, options) of the SLQ-based estimators (module docstring).

    Args:
        alphas: pooled Ritz values; masses: their masses (summing to N).
        lr: learning rate eta; method: "slq", "kde" or "ps".
        eps, bins, bin_value ("mean" or "center"), grid, bandwidth, n_quantiles: see ``DEFAULTS``
            (None takes the default; ``bandwidth`` None is Silverman's rule, in z for "kde" and
            in alpha for "ps").
    """
    a = np.asarray(alphas, dtype=np.float64).ravel()
    w = np.asarray(masses, dtype=np.float64).ravel()
    if a.shape != w.shape or a.size == 0:
        raise ValueError("alphas, masses: expected non-empty arrays of the same length")
    keep = w > 0
    a, w = a[keep], w[keep]
    N = float(w.sum())
    eps = DEFAULTS["eps"] if eps is None else float(eps)
    if not eps >= 0:
        raise ValueError(f"eps: expected eps >= 0, got {eps!r}")
    opts = {"eps": eps}
    if method == "slq":
        bins = DEFAULTS["bins"] if bins is None else int(bins)
        bin_value = DEFAULTS["bin_value"] if bin_value is None else bin_value
        if bins < 1:
            raise ValueError(f"bins: expected a positive integer, got {bins!r}")
        if bin_value not in ("mean", "center"):
            raise ValueError(f"bin_value: expected 'mean' or 'center', got {bin_value!r}")
        z = log_contraction(a, lr, eps)
        lo, hi = float(z.min()), float(z.max())
        if hi <= lo:
            hi = lo + 1e-12
        width = (hi - lo) / bins
        if lo < 0.0 < hi:
            # z = 0 is a bin edge: no bin mixes expanding (z > 0) and contracting (z < 0) mass, whose
            # balance is what the dimension measures (the neutral bulk sits on both sides of 0)
            k0 = int(np.floor(lo / width))
            edges = width * np.arange(k0, k0 + bins + 2, dtype=np.float64)
        else:
            edges = lo + width * np.arange(bins + 1, dtype=np.float64)
        nb = edges.size - 1
        which = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, nb - 1)
        mass = np.bincount(which, weights=w, minlength=nb)
        if bin_value == "mean":
            sz = np.bincount(which, weights=w * z, minlength=nb)
            with np.errstate(invalid="ignore", divide="ignore"):
                vals = sz / mass
        else:
            vals = 0.5 * (edges[:-1] + edges[1:])
        nz = mass > 0
        opts.update(bins=bins, bin_value=bin_value)
        return vals[nz], mass[nz], opts
    if method == "kde":
        grid = DEFAULTS["grid"] if grid is None else int(grid)
        if grid < 2:
            raise ValueError(f"grid: expected at least 2 points, got {grid!r}")
        z = log_contraction(a, lr, eps)
        h = silverman_bandwidth(z, w) if bandwidth is None else float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth: expected a positive number, got {bandwidth!r}")
        g = np.linspace(z.min() - 4 * h, z.max() + 4 * h, grid)
        dens = np.zeros(grid)
        for s in range(0, z.size, 4096):  # bounded memory
            u = (g[:, None] - z[None, s:s + 4096]) / h
            dens += (np.exp(-0.5 * u * u) * w[None, s:s + 4096]).sum(axis=1)
        mass = dens / dens.sum() * N
        opts.update(grid=grid, bandwidth=h)
        nz = mass > 0
        return g[nz], mass[nz], opts
    if method == "ps":
        M = DEFAULTS["n_quantiles"] if n_quantiles is None else int(n_quantiles)
        M = max(1, min(M, int(round(N)))) if n_quantiles is None else M
        if M < 1:
            raise ValueError(f"n_quantiles: expected a positive integer, got {n_quantiles!r}")
        h = silverman_bandwidth(a, w) if bandwidth is None else float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth: expected a positive number, got {bandwidth!r}")
        G = 8192
        g = np.linspace(a.min() - 6 * h, a.max() + 6 * h, G)
        cdf = np.zeros(G)
        for s in range(0, a.size, 2048):
            cdf += (_gauss_cdf((g[:, None] - a[None, s:s + 2048]) / h) * w[None, s:s + 2048]).sum(axis=1)
        cdf /= N
        cdf = np.maximum.accumulate(cdf)
        levels = (np.arange(M) + 0.5) / M
        # invert the smooth CDF: piecewise-linear on a fine grid, then Newton-polished
        q = np.interp(levels, cdf, g)
        for _ in range(3):
            F = np.zeros(M)
            f = np.zeros(M)
            for s in range(0, a.size, 2048):
                u = (q[:, None] - a[None, s:s + 2048]) / h
                F += (_gauss_cdf(u) * w[None, s:s + 2048]).sum(axis=1)
                f += (np.exp(-0.5 * u * u) * w[None, s:s + 2048]).sum(axis=1)
            F /= N
            f /= N * h * math.sqrt(2 * math.pi)
            step = np.where(f > 1e-300, (F - levels) / np.maximum(f, 1e-300), 0.0)
            q = q - np.clip(step, -h, h)
        z = log_contraction(q, lr, eps)
        opts.update(n_quantiles=M, bandwidth=h)
        return z, np.full(M, N / M), opts
    raise ValueError(f"method: expected 'slq', 'kde' or 'ps' here, got {method!r}")


def slq_pooled(nodes, weights, n):
    """Pool per-run Ritz values (R, m) and weights (rows summing to 1) into masses summing to n."""
    keep = weights > 0
    R = nodes.shape[0]
    return nodes[keep], weights[keep] * (n / R)


def sd_from_pseudo(values, weights, n):
    return weighted_kaplan_yorke(values, weights, dim=n, argname="lambdas")


# -------------------------------------------------------------------------------------------------
# numba toy losses (analytic Hessians)


def _minibatches(n_samples, batch_size, n_batches, seed):
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    if batch_size == n_samples:
        return [np.arange(n_samples, dtype=np.int64)] * n_batches
    return [np.sort(rng.choice(n_samples, size=batch_size, replace=False)).astype(np.int64) for _ in range(n_batches)]


def check_n_iter(n_iter, n):
    """Lanczos steps per SLQ run: None (min(n, 100)) or a positive integer (capped at n)."""
    if n_iter is None:
        return min(n, DEFAULTS["n_iter"])
    return min(n, check_pos_int(n_iter, "n_iter"))


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def check_flag(value, name) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def loss_sharpness_dimension(loss, x, *, lr, batch_size=None, method="exact", n_batches=32, seed=0,
                             n_iter=None, baselines=True, rank_tol=RANK_TOL, weight_decay=0.0,
                             **options) -> SharpnessResult:
    """The sharpness dimension of (S)GD on a toy loss (:mod:`rdsim.losses`) at the point x.

    The same estimators as :func:`rdsim.torch.sharpness_dimension`, with the minibatch Hessians
    H_B from the loss's analytic (numba) HVPs: "exact" uses eig(H_B) of ``n_batches`` random
    minibatches; "slq", "kde" and "ps" run one Lanczos (``n_iter`` steps, Rademacher start) per
    minibatch on the dense H_B and pool the Ritz values.

    ``weight_decay`` (wd >= 0, SGD's coupled weight decay, the gradient plus wd x): the Jacobian is
    I - lr (H_B + wd I), so every eigenvalue is shifted by wd before the formula (exact zeros of a
    rank-deficient H_B become contracting). The eigenvalues kept in the result are those of H_B.

    Neutral directions: an eigenvalue with min(|alpha|, |alpha - 2/lr|) <= ``rank_tol * ||H_B||``
    (||H_B|| = max |eig(H_B)| of that minibatch) is treated as exactly neutral, z = 0, before the
    formula (the zero eigenvalues of a rank-deficient H_B come out of ``eigvalsh`` as +-1e-17 and
    would otherwise stop the Kaplan-Yorke count early). The result counts expanding, neutral and
    contracting directions (``n_expanding``, ``n_neutral``, ``n_contracting``, ``neutral_share``).

    Args:
        loss: a :class:`rdsim.losses.ToyLoss`.
        x: the parameters (dim,), finite.
        lr: learning rate (> 0); batch_size: minibatch size (None: full batch, one batch).
        method: "exact", "slq", "kde" or "ps"; n_batches: minibatches (SLQ runs), a positive integer.
        seed: seeds the minibatches and the Lanczos start vectors (a non-negative integer).
        n_iter: Lanczos steps per SLQ run, a positive integer (default min(dim, 100); capped at dim).
        baselines: also compute lambda_max(H) of the full loss.
        rank_tol: the neutral tolerance above, in [0, 1) (default 1e-9).
        **options: eps, bins, bin_value, grid, bandwidth, n_quantiles (see ``DEFAULTS``).

    Returns:
        :class:`SharpnessResult`.

    Raises:
        TypeError: ``loss`` not a ToyLoss, ``baselines`` not a bool, an unknown option.
        ValueError: naming the argument: non-finite or wrongly sized ``x``, ``lr`` <= 0,
            ``batch_size``/``n_batches``/``n_iter`` not positive integers (or ``batch_size`` above
            the sample count), a negative ``seed``, ``rank_tol`` outside [0, 1), an unknown
            ``method``; a non-finite Hessian at ``x``.

    Example:
        >>> import numpy as np, rdsim
        >>> loss = rdsim.losses.quadratic(np.diag([5.0, 1.0, 0.5]))
        >>> round(float(loss_sharpness_dimension(loss, np.zeros(3), lr=0.5).value), 4)
        2.1699
    """
    from .losses import ToyLoss  # noqa: PLC0415

    if not isinstance(loss, ToyLoss):
        raise TypeError(f"loss: expected a rdsim.losses.ToyLoss, got {type(loss).__name__}")
    lr = check_lr(lr)
    method = check_method(method)
    check_options(options)
    n_batches = check_pos_int(n_batches, "n_batches")
    seed = check_seed(seed)
    baselines = check_flag(baselines, "baselines")
    rank_tol = check_rank_tol(rank_tol)
    wd = check_nonneg_float("weight_decay", weight_decay)
    try:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"x: expected an array of {loss.dim} real numbers") from err
    if x.size != loss.dim:
        raise ValueError(f"x: expected {loss.dim} parameters, got {x.size}")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))
        raise ValueError(f"x: the parameters must be finite; {bad.size} are not (first at index {bad[0]})")
    if loss.n < 1:
        raise ValueError("loss: has no samples")
    bs = loss.n if batch_size is None else check_batch_size(batch_size, loss.n)
    m = check_n_iter(n_iter, loss.dim) if method != "exact" else None
    if bs == loss.n and method == "exact":
        n_batches = 1
    batches = _minibatches(loss.n, bs, n_batches, seed)
    N = loss.dim
    lam_max = trace = float("nan")

    def hess(idx=None):
        H = loss.hessian(x) if idx is None else loss.hessian(x, idx)
        if not np.all(np.isfinite(H)):
            raise ValueError("x: the Hessian of the loss at x is not finite (NaN or inf)"
                             + ("" if idx is None else " on a minibatch"))
        return 0.5 * (H + H.T)

    if baselines:
        evf = np.linalg.eigvalsh(hess())
        lam_max = float(evf[-1])
    if method == "exact":
        E = np.empty((len(batches), N))
        for i, idx in enumerate(batches):
            E[i] = np.linalg.eigvalsh(hess(idx))
        lam, Z, (n_exp, n_neu, n_con) = exact_sharpness_values(E + wd, lr, rank_tol)
        value = weighted_kaplan_yorke(lam, argname="lambdas")
        trace = float(E.sum(axis=1).mean())
        return SharpnessResult(value=value, method=method, lambdas=lam, weights=np.ones(N), rds_sharpness=float(lam[0]),
                               lambda_max=lam_max, trace=trace, lr=lr, batch_size=bs, n_batches=len(batches),
                               n_params=N, stderr=jackknife_sd(Z), eigenvalues=E,
                               options={"rank_tol": rank_tol, "weight_decay": wd},
                               n_expanding=n_exp, n_neutral=n_neu, n_contracting=n_con,
                               neutral_share=neutral_share(value, np.count_nonzero(lam == 0.0)))
    from .torch._hessian import SpectralDensity, lanczos  # noqa: PLC0415 (torch only when asked)

    seeds = np.random.SeedSequence([int(seed), 7]).generate_state(len(batches))  # as rdsim.torch
    nodes = np.full((len(batches), m), np.nan)
    wts = np.zeros((len(batches), m))
    traces = []
    for r, idx in enumerate(batches):
        H = hess(idx)
        traces.append(float(np.trace(H)))
        res = lanczos(H, 1, n_iter=m, seed=int(seeds[r]))
        nodes[r, :res.ritz_values.size] = res.ritz_values
        wts[r, :res.ritz_weights.size] = res.ritz_weights / res.ritz_weights.sum()
    dens = SpectralDensity(nodes=nodes, weights=wts, n=N, n_hvp=0)
    a, w = dens.pooled()
    a = a + wd
    vals, mult, opts = pseudo_spectrum(a, w, lr, method, **options)
    order = np.argsort(-vals, kind="stable")
    vals, mult = vals[order], mult[order]
    value = weighted_kaplan_yorke(vals, mult, argname="lambdas")
    (n_exp, n_neu, n_con), ntol = slq_counts(a, w, lr, rank_tol)
    return SharpnessResult(value=value, method=method, lambdas=vals, weights=mult, rds_sharpness=float(vals[0]),
                           lambda_max=lam_max, trace=float(np.mean(traces)), lr=lr, batch_size=bs,
                           n_batches=len(batches), n_params=N, density=dens,
                           options={**opts, "n_iter": m, "rank_tol": rank_tol, "neutral_tol": ntol,
                                    "weight_decay": wd},
                           n_expanding=n_exp, n_neutral=n_neu, n_contracting=n_con,
                           neutral_share=neutral_share(value, n_neu))
