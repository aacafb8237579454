"""Rank correlations for generalization studies: Kendall's tau-b and the granulated Kendall
coefficient of Jiang et al. 2019 (MATH.md §4).

:func:`kendall_tau` is Kendall's tau-b (ties in either variable are allowed),
tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2)) with C, D the concordant and discordant pairs,
n0 = n(n-1)/2 and n1, n2 the pairs tied in x and in y; it equals ``scipy.stats.kendalltau``
(variant "b").

:func:`granulated_kendall` follows "Fantastic generalization measures and where to find them"
(Jiang, Neyshabur, Mobahi, Krishnan, Bengio, ICLR 2020, arXiv 1912.02178), §4, Eqs. 4-5: for each
hyperparameter axis i, psi_i is the average, over all combinations of values of the other
hyperparameters, of the tau between the measure and the target over the runs that differ only
in hyperparameter i; Psi is the mean of the psi_i.

Point-cloud dimensions (of an attractor sampled by many particles): :func:`correlation_dimension`
(Grassberger-Procaccia), :func:`information_dimension`, :func:`box_counting_dimension`, and :func:`control_clouds` of known
dimension to show their finite-sample bias (see ``rdsim._cloud``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ._cloud import (CloudDimension, box_counting_dimension, control_clouds, correlation_dimension,
                     information_dimension)

__all__ = ["CloudDimension", "box_counting_dimension", "control_clouds", "correlation_dimension", "granulated_kendall",
           "information_dimension", "kendall_tau"]


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of two equally long sequences (ties allowed).

    Returns nan when fewer than two pairs are comparable (n < 2, or x or y constant) or when an
    input is nan (as ``scipy.stats.kendalltau`` with its default ``nan_policy="propagate"``).

    Example:
        >>> kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
        0.6666666666666666
        >>> kendall_tau([1, 1, 2], [1, 2, 3])  # tie in x: (C - D) / sqrt((3 - 1) * 3)
        0.8164965809277261
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x, y: expected sequences of the same length, got {x.size} and {y.size}")
    n = x.size
    if n < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    s = 0
    nx = 0
    ny = 0
    # pairs i < j, a block of rows at a time (bounded memory for long tables)
    step = max(1, 4_000_000 // n)
    for start in range(0, n - 1, step):
        stop = min(n - 1, start + step)
        rows = np.arange(start, stop)
        sx = np.sign(x[rows, None] - x[None, :])
        sy = np.sign(y[rows, None] - y[None, :])
        upper = np.arange(n)[None, :] > rows[:, None]
        sx, sy = sx * upper, sy * upper
        s += int(np.sum(sx * sy))
        nx += int(np.sum(np.abs(sx)))
        ny += int(np.sum(np.abs(sy)))
    if nx == 0 or ny == 0:
        return math.nan
    return float(s / math.sqrt(nx * ny))


def _records(table) -> list[dict]:
    """A table as a list of row dicts: a list of mappings, a mapping of columns, or a DataFrame."""
    if hasattr(table, "to_dict") and not isinstance(table, Mapping):
        return list(table.to_dict("records"))
    if isinstance(table, Mapping):
        cols = {k: list(v) for k, v in table.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ValueError("table: columns of different lengths")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if isinstance(table, Sequence):
        rows = list(table)
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("table: expected a list of dicts (rows), a dict of columns or a DataFrame")
        return [dict(r) for r in rows]
    raise TypeError("table: expected a list of dicts (rows), a dict of columns or a DataFrame, "
                    f"got {type(table).__name__}")


def _number(v) -> float:
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _key(v):
    """Hashable, order-stable grouping key of a hyperparameter value (1 and 1.0 are the same)."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return ("n", float(v))
    return ("s", str(v))


def granulated_kendall(table, measure: str, target: str, axes=("lr", "batch_size"),
                       fixed=("seed",)) -> dict:
    """Granulated Kendall coefficients (Jiang et al. 2019, Eqs. 4-5) of ``measure`` vs ``target``.

    For each axis i in ``axes``, the rows are grouped by the values of all the other axes and of
    the ``fixed`` columns present in the table (by default the seed: runs with different seeds
    are different "other hyperparameter" values, as in the paper); within each group only axis
    i varies, and tau_i(group) = :func:`kendall_tau` of (measure, target) over its rows.
    psi_i = mean of tau_i over the groups where it is defined (groups of one row, or with a
    constant measure or target, have no tau and are left out). Psi = mean of the psi_i that are
    defined (an axis with a single value in the grid has no psi and does not count).

    Rows where the measure or the target is missing or nan (diverged runs) are dropped first.

    Args:
        table: a list of row dicts, a dict of columns, or a pandas DataFrame.
        measure, target: column names (e.g. "sd" and "acc_gap").
        axes: the hyperparameter axes (columns) to granulate along.
        fixed: further columns that index the runs (held fixed within a group) if present.

    Returns:
        dict with one entry per axis (psi_i), "mean" (Psi), "tau" (the overall tau over all rows),
        "n" (rows used) and "groups" ({axis: number of groups with a tau}).

    Example:
        A 2 x 2 grid: along batch size the measure ranks the target right at both learning
        rates; along lr it is right at batch size 8 and wrong at 16:

        >>> rows = [dict(lr=0.1, batch_size=8, m=1, g=1), dict(lr=0.2, batch_size=8, m=2, g=2),
        ...         dict(lr=0.1, batch_size=16, m=4, g=3), dict(lr=0.2, batch_size=16, m=3, g=4)]
        >>> r = granulated_kendall(rows, "m", "g")
        >>> r["lr"], r["batch_size"], r["mean"]
        (0.0, 1.0, 0.5)
    """
    rows = _records(table)
    axes = tuple(axes)
    if not axes:
        raise ValueError("axes: expected at least one axis")
    for name in (measure, target, *axes):
        if rows and not any(name in r for r in rows):
            raise ValueError(f"{name}: no such column in the table")
    used = []
    for r in rows:
        m, t = _number(r.get(measure)), _number(r.get(target))
        if math.isfinite(m) and math.isfinite(t):
            used.append((r, m, t))
    present_fixed = tuple(f for f in fixed if any(f in r for r, _, _ in used) and f not in axes)
    out: dict = {}
    groups_used: dict = {}
    for axis in axes:
        others = tuple(a for a in axes if a != axis) + present_fixed
        groups: dict = {}
        for r, m, t in used:
            groups.setdefault(tuple(_key(r.get(o)) for o in others), []).append((m, t))
        taus = []
        for members in groups.values():
            if len(members) < 2:
                continue
            tau = kendall_tau([m for m, _ in members], [t for _, t in members])
            if math.isfinite(tau):
                taus.append(tau)
        out[axis] = float(np.mean(taus)) if taus else math.nan
        groups_used[axis] = len(taus)
    psis = [out[a] for a in axes if math.isfinite(out[a])]
    out["mean"] = float(np.mean(psis)) if psis else math.nan
    out["tau"] = kendall_tau([m for _, m, _ in used], [t for _, _, t in used]) if used else math.nan
    out["n"] = len(used)
    out["groups"] = groups_used
    return out
