"""Dimensions of a point cloud (an attractor sampled by many particles): correlation dimension
(Grassberger & Procaccia 1983) and box counting, with the curves behind them.

Both are slopes of a log-log curve over a scaling range, and both are biased on finite clouds
(a 2-D Gaussian cloud of 6e5 points box-counts to 1.6-1.8): compare a cloud's value with controls
of known dimension at the same size (:func:`control_clouds`), never with the integer alone.

* correlation dimension: C(r) = (pairs at distance < r) / (M (M - 1) / 2) on a random subsample of M
  points; nu = slope of log C against log r where C(r) lies in ``c_range`` (default 1e-4 .. 1e-2,
  small scales with enough pairs). Pair counts by ``scipy.spatial.cKDTree.count_neighbors``.
* information dimension (the one the Kaplan-Yorke conjecture is about, D_1 >= D_2): the slope
  of the mean over centres of log mu(B(x, r)), mu the cloud's empirical measure, against log r,
  over the radii where the mean mass lies in ``c_range`` (pointwise dimensions averaged).
* box counting: the cloud scaled into the unit cube, N(eps) occupied boxes of side eps = 2^-j;
  D_0 = slope of log N against log(1/eps) over the scales with N(eps) <= n / ``min_per_box``
  (coarser scales only: finer ones see the sample, not the set).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ._validate import check_array, check_int, check_seed

__all__ = ["CloudDimension", "box_counting_dimension", "control_clouds", "correlation_dimension",
           "information_dimension"]


@dataclasses.dataclass(frozen=True, repr=False)
class CloudDimension:
    """A dimension estimated as a log-log slope (frozen).

    Attributes:
        value: the fitted slope over the scaling range.
        stderr: the standard error of the slope from the least-squares fit (local scatter; it
            does not include the estimator's finite-sample bias, which the controls show).
        method: "correlation" or "box".
        scales: (n,) r (correlation) or eps (box) on the grid.
        counts: (n,) C(r) or N(eps).
        fit: (n,) bool, the points of the scaling range.
        local_slopes: (n - 1,) slopes between neighbouring grid points (a plateau is a scaling range).
        n_points: points used.
    """

    value: float
    stderr: float
    method: str
    scales: np.ndarray
    counts: np.ndarray
    fit: np.ndarray
    local_slopes: np.ndarray
    n_points: int

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        s = self.scales[self.fit]
        rng = f"{s.min():.3g}..{s.max():.3g}" if s.size else "none"
        return (f"CloudDimension({self.method}: {self.value:.4g} ± {self.stderr:.2g}, n_points={self.n_points}, "
                f"scaling range {rng}, {int(self.fit.sum())} grid points)")


def _slope(x, y):
    if x.size < 2:
        return math.nan, math.nan
    A = np.vstack([x, np.ones_like(x)]).T
    coef, res, *_ = np.linalg.lstsq(A, y, rcond=None)
    if x.size > 2:
        resid = y - A @ coef
        s2 = float(resid @ resid) / (x.size - 2)
        se = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
    else:
        se = math.nan
    return float(coef[0]), se


def _points(points, name="points"):
    P = check_array(name, points, ndim=2)
    if P.shape[0] < 10 or P.shape[1] < 1:
        raise ValueError(f"{name}: expected at least 10 points (rows), got shape {P.shape}")
    return P


def _prepare(points, max_points, c_range, n_r, seed):
    """Checked (points subsampled to max_points, rng, low, high, n_r) shared by the estimators."""
    P = _points(points)
    max_points = check_int("max_points", max_points, 10)
    n_r = check_int("n_r", n_r, 4)
    rng = np.random.default_rng(check_seed(seed))
    lo, hi = (float(c) for c in c_range)
    if not 0 < lo < hi <= 1:
        raise ValueError(f"c_range: expected 0 < low < high <= 1, got {c_range!r}")
    if P.shape[0] > max_points:
        P = P[rng.choice(P.shape[0], max_points, replace=False)]
    return P, rng, lo, hi, n_r


def correlation_dimension(points, *, max_points: int = 20_000, c_range=(1e-4, 1e-2), n_r: int = 40,
                          seed: int = 0) -> CloudDimension:
    """Grassberger-Procaccia correlation dimension of a cloud (rows are points).

    Args:
        points: (n, d) finite coordinates (non-finite rows are refused: drop diverged particles first).
        max_points: random subsample size M (pairs M (M - 1) / 2).
        c_range: (low, high) of C(r) defining the scaling range.
        n_r: grid points in r (log-spaced between the smallest and largest relevant distances).
        seed: for the subsample.

    Example:
        >>> import numpy as np, rdsim
        >>> x = np.random.default_rng(0).uniform(size=(20000, 1)) @ np.ones((1, 2))  # a segment in 2-D
        >>> round(rdsim.stats.correlation_dimension(x).value, 1)
        1.0
    """
    from scipy.spatial import cKDTree

    P, rng, lo, hi, n_r = _prepare(points, max_points, c_range, n_r, seed)
    M = P.shape[0]
    # the range of distances from random pairs: r from the 1e-6 quantile region to the diameter
    i, j = rng.integers(0, M, size=(2, 20_000))
    d = np.linalg.norm(P[i] - P[j], axis=1)
    d = d[d > 0]
    if d.size == 0:
        raise ValueError("points: all points coincide")
    r = np.geomspace(max(np.quantile(d, 1e-3) / 30, d.min() * 0.5, 1e-300), d.max() * 1.01, n_r)
    tree = cKDTree(P)
    counts = tree.count_neighbors(tree, r).astype(np.float64)
    C = (counts - M) / (M * (M - 1.0))  # ordered pairs / (M(M-1)) = unordered / (M(M-1)/2)
    fit = (C >= lo) & (C <= hi)
    with np.errstate(divide="ignore"):
        lr, lc = np.log(r), np.log(C)
        local = np.diff(lc) / np.diff(lr)
    value, se = _slope(lr[fit], lc[fit])
    return CloudDimension(value, se, "correlation", r, C, fit, local, M)


def information_dimension(points, *, n_centers: int = 2_000, max_points: int = 200_000,
                          c_range=(1e-4, 1e-2), n_r: int = 24, seed: int = 0) -> CloudDimension:
    """Information dimension D_1 of a cloud by the fixed-mass method (Badii & Politi 1985).

    For masses p = k / (M - 1) log-spaced in ``c_range``, r_k(x) is the distance from a centre x
    to its k-th neighbour among M points (a random subsample of ``max_points``), averaged as
    E_x[log r_k(x)] over ``n_centers`` random centres; D_1 = slope of log p against E log r_k.
    ``scales`` holds exp(E log r_k), ``counts`` the masses p.
    """
    from scipy.spatial import cKDTree

    n_centers = check_int("n_centers", n_centers, 10)
    P, rng, lo, hi, n_r = _prepare(points, max_points, c_range, n_r, seed)
    M = P.shape[0]
    ks = np.unique(np.clip(np.round(np.geomspace(lo, hi, n_r) * (M - 1)), 1, M - 1).astype(np.int64))
    if ks.size < 3:
        raise ValueError(f"points: {M} points are too few for masses {c_range} (need k >= 1 neighbours over 3 scales)")
    centers = rng.choice(M, min(n_centers, M), replace=False)
    tree = cKDTree(P)
    dist, _ = tree.query(P[centers], k=int(ks[-1]) + 1)  # column 0 is the centre itself
    rk = dist[:, ks]
    with np.errstate(divide="ignore"):
        elog = np.log(rk).mean(axis=0)  # exact duplicates (r = 0) give -inf: not a scaling range
    p = ks / (M - 1.0)
    fit = np.isfinite(elog)
    lp = np.log(p)
    with np.errstate(invalid="ignore"):
        local = np.diff(lp) / np.diff(elog)
    value, se = _slope(elog[fit], lp[fit])
    return CloudDimension(value, se, "information", np.exp(elog), p, fit, local, M)


def box_counting_dimension(points, *, min_per_box: float = 10.0, max_level: int = 24) -> CloudDimension:
    """Box-counting dimension of a cloud: slope of log N(eps) against log(1/eps), eps = 2^-j.

    The fit uses the levels j >= 1 with N(eps) <= n / ``min_per_box`` (on average at least that many
    points per occupied box); at finer levels N(eps) saturates at the number of points.
    """
    P = _points(points)
    if not min_per_box >= 1:
        raise ValueError(f"min_per_box: expected a number >= 1, got {min_per_box!r}")
    max_level = check_int("max_level", max_level, 2)
    n = P.shape[0]
    lo, span = P.min(axis=0), np.ptp(P, axis=0)
    span = np.where(span > 0, span, 1.0)
    U = (P - lo) / span.max()  # the same scale in every coordinate (a segment stays a segment)
    levels, N = [], []
    for j in range(0, max_level + 1):
        cells = np.minimum(np.floor(U * 2 ** j), 2 ** j - 1).astype(np.int64)
        N.append(np.unique(cells, axis=0).shape[0])
        levels.append(j)
        if N[-1] >= n:
            break
    levels, N = np.asarray(levels), np.asarray(N, dtype=np.float64)
    eps = 2.0 ** -levels
    fit = (levels >= 1) & (N <= n / min_per_box)
    x, y = np.log(1 / eps), np.log(N)
    local = np.diff(y) / np.diff(x)
    value, se = _slope(x[fit], y[fit])
    return CloudDimension(value, se, "box", eps, N, fit, local, n)


def control_clouds(n: int, *, seed: int = 0) -> dict[str, tuple[np.ndarray, float]]:
    """Clouds of known dimension with n points in the plane: {name: (points, dimension)}.

    "gaussian-2d" (dimension 2), "segment" (1, a diagonal segment), "sierpinski" (log 3 / log 2 =
    1.585, chaos game), "point-cloud-1d-gaussian" (1, Gaussian along a line).
    """
    n = check_int("n", n, 10)
    rng = np.random.default_rng(check_seed(seed))
    t = rng.uniform(size=n)
    verts = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    picks = rng.integers(0, 3, size=n + 50)
    s = np.empty((n + 50, 2))
    z = np.array([0.3, 0.3])
    for m, v in enumerate(picks):
        z = 0.5 * (z + verts[v])
        s[m] = z
    g = rng.standard_normal(n)
    return {
        "gaussian-2d": (rng.standard_normal((n, 2)), 2.0),
        "segment": (np.column_stack([t, 0.5 * t]), 1.0),
        "gaussian-1d": (np.column_stack([g, -0.3 * g]), 1.0),
        "sierpinski": (s[50:], math.log(3) / math.log(2)),
    }
