"""The Kaplan-Yorke formula (MATH.md §3), shared by the Lyapunov and the sharpness dimension."""

from __future__ import annotations

import numpy as np

__all__ = ["Dimension", "kaplan_yorke_dimension", "sharpness_dimension", "weighted_kaplan_yorke"]


class Dimension(float):
    """A dimension value (a ``float``) that also says whether it is only a lower bound.

    ``lower_bound`` is True when only k < d exponents were given and their sum is still
    non-negative: the true dimension of the full spectrum is then at least this value.
    """

    lower_bound: bool

    def __new__(cls, value: float, lower_bound: bool = False):
        obj = super().__new__(cls, value)
        obj.lower_bound = bool(lower_bound)
        return obj

    def __repr__(self) -> str:
        return f"{float(self)!r} (lower bound)" if self.lower_bound else repr(float(self))


def _as_values(values, argname: str) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argname}: expected a 1-D array of real numbers") from err
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{argname}: expected a non-empty 1-D array, got shape {v.shape}")
    if np.any(np.isnan(v)) or np.any(v == np.inf):
        raise ValueError(f"{argname}: values must be finite or -inf, got {v}")
    return v


def weighted_kaplan_yorke(values, weights=None, *, dim=None, argname="values") -> Dimension:
    """Kaplan-Yorke formula on values z_r with multiplicities w_r (all 1 by default).

    Values are sorted descending (weights with them). With partial sums
    S_j = sum_{r<=j} w_r z_r and j* the last index with S_j >= 0 (a sum of exactly 0 counts):
    D = 0 if z_1 < 0; D = sum of all weights if S_n >= 0; otherwise
    D = sum_{r<=j*} w_r + S_{j*} / |z_{j*+1}|. This is MATH.md §3 for unit weights and the
    pseudo-spectrum formula of MATH.md §4 (SD-SLQ, SD-PS) otherwise.

    Args:
        values: 1-D array (finite or -inf).
        weights: non-negative multiplicities, same length (None: all ones).
        dim: the full dimension, when ``values`` is a partial (top-k) spectrum. If the sum of
            the given values is non-negative and their total weight is below ``dim``, the result
            is flagged ``lower_bound``.

    Returns:
        A :class:`Dimension` (a float with a ``lower_bound`` flag).
    """
    z = _as_values(values, argname)
    if weights is None:
        w = np.ones_like(z)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != z.shape:
            raise ValueError(f"weights: expected shape {z.shape}, got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights: must be finite and non-negative")
    order = np.argsort(-z, kind="stable")
    z, w = z[order], w[order]
    total = float(w.sum())
    if dim is not None and (dim < total - 1e-9):
        raise ValueError(f"dim: {dim} is smaller than the number of values ({total:g})")
    keep = w > 0
    z, w = z[keep], w[keep]
    if z.size == 0 or z[0] < 0:
        return Dimension(0.0)
    with np.errstate(invalid="ignore"):
        S = np.cumsum(w * z)
    nonneg = S >= 0
    if nonneg.all():
        partial = dim is not None and total < dim - 1e-9
        return Dimension(total, lower_bound=partial)
    j = int(np.argmin(nonneg))  # first index with S < 0; j* = j - 1 (0-based), j >= 1 here
    D = float(w[:j].sum()) + float(S[j - 1]) / abs(float(z[j]))
    return Dimension(D)


def kaplan_yorke_dimension(exponents, *, dim=None) -> Dimension:
    """Kaplan-Yorke (Lyapunov) dimension of a Lyapunov spectrum (MATH.md §3).

    D = j* + S_{j*} / |lambda_{j*+1}|, with S_j the sum of the j largest exponents and j* the
    largest j with S_j >= 0; D = 0 if lambda_1 < 0 and D = d if the whole sum is >= 0.

    Args:
        exponents: 1-D array of exponents (any order; sorted descending here). -inf is allowed.
        dim: full state dimension when ``exponents`` is a top-k spectrum; a non-negative sum of
            k < dim exponents then gives a value flagged ``lower_bound``.

    Returns:
        :class:`Dimension`, a float with attribute ``lower_bound``.

    Raises:
        ValueError: empty input, NaN or +inf values.

    Example:
        >>> kaplan_yorke_dimension([1.0, -1.0, -1.0]), kaplan_yorke_dimension([-1.0, -2.0])
        (2.0, 0.0)
        >>> kaplan_yorke_dimension([0.5, -0.1], dim=4).lower_bound
        True

    References:
        Kaplan & Yorke (1979); Frederickson, Kaplan, Yorke & Yorke (1983).
    """
    return weighted_kaplan_yorke(exponents, dim=dim, argname="exponents")


def sharpness_dimension(lambdas, *, dim=None) -> Dimension:
    """Sharpness dimension (arXiv 2604.19740, Definition 4.2) of RDS sharpness values lambda_k.

    The Kaplan-Yorke formula applied to lambda_1 >= ... >= lambda_d, where
    lambda_k = E sup_x ln sigma_k(Df(x, xi)) (Definition 4.1; see :func:`rdsim.rds_sharpness`).
    For (S)GD, sigma(I - eta H_B) = |1 - eta alpha_i|.

    Example:
        >>> import numpy as np
        >>> round(float(sharpness_dimension(np.log(np.abs(1 - 0.5 * np.array([5.0, 1.0, 0.5]))))), 4)
        2.1699

    References:
        Tuci, Korkmaz, Simsekli, Birdal, "Generalization at the Edge of Stability", arXiv 2604.19740.
    """
    return weighted_kaplan_yorke(lambdas, dim=dim, argname="lambdas")
