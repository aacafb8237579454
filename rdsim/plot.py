"""Figures for rdsim results (matplotlib only).

Every plotting function takes an optional ``ax=`` (a new figure is made when it is None), labels its
axes with symbols and units, never calls ``plt.show()``, and returns the Axes it drew on (the
Figure for multi-panel figures). ``matplotlib.pyplot`` is imported only when a new figure is needed,
so importing this module does not choose a backend; scripts and tests can call
``matplotlib.use("Agg")`` first.

Functions:

* :func:`spectrum_convergence`: running Lyapunov estimates of a :class:`rdsim.LyapunovResult` vs
  steps (or their error against reference values on log-log axes with a T^(-1/2) guide).
* :func:`exponents_vs_lr`, :func:`dimensions_vs_lr`: exponents or dimensions vs learning rate with
  the stability threshold (e.g. eta = 2/lambda_max) marked.
* :func:`bifurcation`, :func:`uv_bifurcation`, :func:`uv_bifurcation_diagram`: bifurcation diagrams,
  in particular of the balanced uv map x' = x(1 + a - a x^2) (MATH.md §7).
* :func:`spectral_density`, :func:`pushforward_density`, :func:`hessian_spectrum_figure`: Hessian
  spectral density from SLQ Ritz values and weights, and the density of
  z = log(|1 - eta alpha| + eps) (expanding z > 0 vs contracting z < 0 directions, MATH.md §4).
* :func:`sd_vs_gap`: a complexity measure vs the generalization gap over a (lr x batch size) grid.
* :func:`attractor`: a 2-D projection of attractor samples (fast for ~1e6 points).
* :func:`ladder`: the dimension ladder D^(m) vs m with D_KY and SD (MATH.md §5).
* :func:`monitor_records`: a monitored training run (:class:`rdsim.torch.TrainingMonitor`):
  sharpness against 2/eta(t), the top exponents, SD and tr H over the steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "UV_LANDMARKS",
    "spectrum_convergence",
    "exponents_vs_lr",
    "dimensions_vs_lr",
    "bifurcation",
    "uv_bifurcation",
    "uv_bifurcation_diagram",
    "spectral_density",
    "pushforward_density",
    "hessian_spectrum_figure",
    "sd_vs_gap",
    "attractor",
    "ladder",
    "monitor_records",
]

#: Landmarks of the balanced uv map x' = x(1 + a - a x^2) (MATH.md §7): the fixed point x = 1 loses
#: stability at a = 1 (period 2), the period-2 orbit at a = sqrt(5) - 1 (period 4), and beyond
#: a = 2 typical orbits diverge.
UV_LANDMARKS = {"a = 1": 1.0, "a = √5 − 1": math.sqrt(5.0) - 1.0, "a = 2": 2.0}

_EPS_DEFAULT = 1e-6  # as rdsim._sharpness.DEFAULTS["eps"]


# -------------------------------------------------------------------------------------------------
# helpers


def _new_axes(ax, figsize=(5.0, 3.6)):
    """Return ``ax`` or the Axes of a new figure (pyplot imported only here)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _vector(x, name: str, *, min_size: int = 1) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__}") from err
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if a.size < min_size:
        raise ValueError(f"{name}: expected at least {min_size} values, got {a.size}")
    return a


def _array(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__}") from err


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_b}: expected {a.shape[0]} rows (one per value of {name_a}), "
                         f"got {b.shape[0]}")


def _auto_logx(x: np.ndarray, logx) -> bool:
    """logx=None: log scale when all values are positive and span a factor of 100 or more."""
    if logx is not None:
        return bool(logx)
    x = x[np.isfinite(x)]
    return bool(x.size and np.all(x > 0) and x.max() / x.min() >= 100.0 * (1 - 1e-9))


def _set_logx(ax) -> None:
    """Log x-axis with plain-number tick labels at 1, 2, 5 x 10^k and unlabelled minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _mark_threshold(ax, threshold, label: str | None) -> None:
    if threshold is None:
        return
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
    ax.axvline(t, color="0.3", ls="--", lw=1.0, label=label if label is not None else f"threshold {t:.3g}")


def _finite_scalar(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a number, got {v!r}") from err
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return f


# -------------------------------------------------------------------------------------------------
# Lyapunov spectra


def spectrum_convergence(result, *, reference=None, mode: str = "estimate", max_exponents: int | None = None,
                         ax=None):
    """Running Lyapunov estimates vs accumulated steps (or their error against references).

    ``mode="estimate"``: lambda_i(T) from ``result.history`` vs T = ``result.history_steps``, one
    line per exponent, with a shaded band lambda_i ± stderr_i at the final value and dashed
    reference lines (same colour) if ``reference`` is given. ``mode="error"``:
    |lambda_i(T) - reference_i| on log-log axes with a c T^(-1/2) guide (the rate of a
    block-mean estimate; the bias of the QR method decays as 1/T). Zero or non-finite errors are
    left out of the log plot.

    Args:
        result: a :class:`rdsim.LyapunovResult` (or any object with ``exponents`` (k,),
            ``stderr`` (k,), ``history`` (n_records, k), ``history_steps`` (n_records,), and
            optionally ``status`` and ``dimension``).
        reference: (r,) reference exponents, r <= k, compared with the first r exponents
            (required for ``mode="error"``).
        mode: ``"estimate"`` or ``"error"``.
        max_exponents: plot only the first (largest) exponents.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes. One line per exponent (plus one per reference value in ``"estimate"`` mode,
        plus the guide in ``"error"`` mode).

    Raises:
        ValueError: inconsistent shapes in ``result`` or ``reference``, an unknown ``mode``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np, rdsim
        >>> from rdsim import plot
        >>> res = rdsim.lyapunov_spectrum(rdsim.systems.henon(), None, 2000, seed=0)
        >>> ax = plot.spectrum_convergence(res, reference=[0.41922, -1.62319])
        >>> len(ax.lines)  # two estimates, two reference lines
        4
    """
    if mode not in ("estimate", "error"):
        raise ValueError(f"mode: expected 'estimate' or 'error', got {mode!r}")
    for attr in ("exponents", "stderr", "history", "history_steps"):
        if not hasattr(result, attr):
            raise ValueError(f"result: expected a LyapunovResult-like object with .{attr}")
    expo = _vector(result.exponents, "result.exponents")
    k = expo.size
    stderr = _array(result.stderr, "result.stderr").reshape(-1) if result.stderr is not None else np.full(k, np.nan)
    if stderr.size != k:
        raise ValueError(f"result.stderr: expected {k} values (one per exponent), got {stderr.size}")
    hist = _array(result.history, "result.history")
    if hist.ndim == 1 and k == 1:
        hist = hist[:, None]
    if hist.ndim != 2 or hist.shape[1] != k:
        raise ValueError(f"result.history: expected shape (n_records, {k}), got {hist.shape}")
    steps = _vector(result.history_steps, "result.history_steps", min_size=0)
    if steps.size != hist.shape[0]:
        raise ValueError(f"result.history_steps: expected {hist.shape[0]} values (one per record), "
                         f"got {steps.size}")
    if hist.shape[0] == 0:
        raise ValueError("result.history: no records to plot (run with more steps)")
    n_show = k if max_exponents is None else max(1, min(k, int(max_exponents)))
    ref = None
    if reference is not None:
        ref = np.atleast_1d(_array(reference, "reference")).reshape(-1)
        if ref.size > k:
            raise ValueError(f"reference: expected at most {k} values (one per exponent), got {ref.size}")
    if mode == "error" and ref is None:
        raise ValueError("reference: required for mode='error'")

    ax = _new_axes(ax)
    colors = [f"C{i % 10}" for i in range(n_show)]
    if mode == "estimate":
        for i in range(n_show):
            ax.plot(steps, hist[:, i], color=colors[i], lw=1.2, label=f"λ{_sub(i + 1)} = {expo[i]:.4g}")
            if np.isfinite(stderr[i]) and stderr[i] > 0:
                ax.fill_between([steps[0], steps[-1]], expo[i] - stderr[i], expo[i] + stderr[i],
                                color=colors[i], alpha=0.2, lw=0)
        if ref is not None:
            for i in range(min(ref.size, n_show)):
                ax.axhline(ref[i], color=colors[i], ls="--", lw=0.9,
                           label="reference" if i == 0 else None)
        ax.set_ylabel("running estimate λᵢ(T)")
        ax.set_xscale("log" if steps[0] > 0 and steps[-1] / steps[0] > 100 else "linear")
    else:
        keep = steps > 0
        T = steps[keep]
        guide_c = []
        for i in range(min(ref.size, n_show)):
            err = np.abs(hist[keep, i] - ref[i])
            ok = np.isfinite(err) & (err > 0)
            ax.plot(T[ok], err[ok], color=colors[i], lw=1.2, label=f"|λ{_sub(i + 1)}(T) − ref|")
            if ok.any():
                guide_c.append(np.median(err[ok] * np.sqrt(T[ok])))
        if T.size and guide_c:
            c = float(np.max(guide_c))
            ax.plot(T, c / np.sqrt(T), color="k", ls=":", lw=1.0, label="∝ T^(−1/2)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("|λᵢ(T) − λᵢ,ref|")
    ax.set_xlabel("accumulated steps T")
    title = "Lyapunov spectrum convergence"
    status = getattr(result, "status", "ok")
    if status != "ok":
        title += f" ({status})"
    dim = getattr(result, "dimension", None)
    if dim is not None and mode == "estimate":
        try:
            title += f", D_KY = {float(dim):.4g}"
        except (TypeError, ValueError):
            pass
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="best")
    return ax


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _sub(i: int) -> str:
    return str(i).translate(_SUBSCRIPTS)


def exponents_vs_lr(lrs, exponents, stderr=None, *, threshold=None, threshold_label: str | None = "η = 2/λ_max",
                    logx: bool | None = None, labels: Sequence[str] | None = None, ax=None):
    """Lyapunov exponents (or RDS sharpness values) vs learning rate.

    One line with markers (and error bars if ``stderr`` is given) per exponent, a horizontal line
    at 0 (expanding above, contracting below) and a vertical dashed line at the stability
    threshold, e.g. eta = 2/lambda_max for GD on a quadratic.

    Args:
        lrs: (n,) learning rates eta.
        exponents: (n,) or (n, k) exponents at each learning rate (NaN for diverged runs).
        stderr: standard errors of the same shape as ``exponents``, or None.
        threshold: learning rate to mark (None: no line).
        threshold_label: legend text of the threshold line.
        logx: log x-axis (None: automatic, log when the positive lrs span a factor 100 or more).
        labels: k legend labels (default λ₁, λ₂, ...).
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes.

    Raises:
        ValueError: ``exponents`` or ``stderr`` not matching ``lrs``, bad ``labels``.

    Example:
        GD on a quadratic with curvatures 1 and 4: lambda_i = log|1 - eta alpha_i|, stable for eta < 0.5.

        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np
        >>> from rdsim import plot
        >>> lrs = np.linspace(0.04, 0.6, 15)
        >>> lam = np.log(np.abs(1 - lrs[:, None] * np.array([4.0, 1.0])))
        >>> ax = plot.exponents_vs_lr(lrs, lam, threshold=2 / 4.0)
        >>> len(ax.get_legend().get_texts())
        3
    """
    lrs = _vector(lrs, "lrs")
    ex = _array(exponents, "exponents")
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.ndim != 2:
        raise ValueError(f"exponents: expected shape ({lrs.size},) or ({lrs.size}, k), got {ex.shape}")
    _check_same_length(lrs, ex, "lrs", "exponents")
    se = None
    if stderr is not None:
        se = _array(stderr, "stderr")
        if se.ndim == 1:
            se = se[:, None]
        if se.shape != ex.shape:
            raise ValueError(f"stderr: expected the shape of exponents {ex.shape}, got {se.shape}")
    k = ex.shape[1]
    if labels is None:
        labels = [f"λ{_sub(i + 1)}" for i in range(k)]
    elif len(labels) != k:
        raise ValueError(f"labels: expected {k} labels (one per exponent), got {len(labels)}")
    curves = [(labels[i], ex[:, i], None if se is None else se[:, i], "o", 3) for i in range(k)]
    return _curves_vs_lr(ax, lrs, curves, "exponent λᵢ (per step)", threshold, threshold_label, logx, zero_line=True)


def _curves_vs_lr(ax, lrs, curves, ylabel, threshold, threshold_label, logx, zero_line=False):
    """Draw (label, values, stderr or None, marker, marker size) curves against the sorted lrs."""
    if not np.all(np.isfinite(lrs)):
        raise ValueError("lrs: expected finite learning rates")
    if not any(np.isfinite(y).any() for _, y, _, _, _ in curves):
        raise ValueError(f"{'exponents' if zero_line else 'dims'}: no finite values to plot (all runs diverged?)")
    ax = _new_axes(ax)
    order = np.argsort(lrs, kind="stable")
    for label, y, e, marker, ms in curves:
        ax.errorbar(lrs[order], y[order], yerr=None if e is None else e[order], marker=marker, ms=ms, lw=1.2,
                    capsize=2, label=label)
    if zero_line:
        ax.axhline(0.0, color="0.6", lw=0.8)
    _mark_threshold(ax, threshold, threshold_label)
    if _auto_logx(lrs, logx):
        _set_logx(ax)
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", loc="best")
    return ax


def dimensions_vs_lr(lrs, dims: Mapping[str, Sequence[float]], *, errors: Mapping[str, Sequence[float]] | None = None,
                     threshold=None, threshold_label: str | None = "η = 2/λ_max", logx: bool | None = None, ax=None):
    """Dimensions (D_KY, SD, D^(m), ...) vs learning rate, one line per name.

    Args:
        lrs: (n,) learning rates eta.
        dims: {name: (n,) values}, e.g. ``{"D_KY": ..., "SD": ...}`` (NaN for diverged runs).
        errors: {name: (n,) standard errors} for some of the names, or None.
        threshold: learning rate to mark with a vertical dashed line (e.g. 2/lambda_max).
        threshold_label: legend text of the threshold line.
        logx: log x-axis (None: automatic, as in :func:`exponents_vs_lr`).
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes.

    Raises:
        ValueError: an empty ``dims``, values not matching ``lrs``, ``errors`` naming unknown keys or
            with the wrong length.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from rdsim import plot
        >>> ax = plot.dimensions_vs_lr([0.1, 0.2, 0.4], {"D_KY": [0, 0.5, 1.2], "SD": [0, 0.8, 1.5]},
        ...                           threshold=0.3)
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['η = 2/λ_max', 'D_KY', 'SD']
    """
    lrs = _vector(lrs, "lrs")
    if not isinstance(dims, Mapping) or not dims:
        raise ValueError("dims: expected a non-empty dict {name: values}")
    vals = {}
    for name, v in dims.items():
        a = _vector(v, f"dims[{name!r}]")
        if a.size != lrs.size:
            raise ValueError(f"dims[{name!r}]: expected {lrs.size} values (one per lr), got {a.size}")
        vals[name] = a
    errs = {}
    if errors is not None:
        if not isinstance(errors, Mapping):
            raise ValueError("errors: expected a dict {name: values}")
        for name, e in errors.items():
            if name not in vals:
                raise ValueError(f"errors: key {name!r} is not in dims")
            a = _vector(e, f"errors[{name!r}]")
            if a.size != lrs.size:
                raise ValueError(f"errors[{name!r}]: expected {lrs.size} values (one per lr), got {a.size}")
            errs[name] = a
    markers = "osD^v<>ph*"
    curves = [(name, a, errs.get(name), markers[j % len(markers)], 3.5) for j, (name, a) in enumerate(vals.items())]
    return _curves_vs_lr(ax, lrs, curves, "dimension", threshold, threshold_label, logx)


# -------------------------------------------------------------------------------------------------
# bifurcation diagrams


def bifurcation(params, orbits, *, landmarks: Mapping[str, float] | None = None, marker_size: float = 0.2,
                color="k", xlabel: str = "parameter a", ylabel: str = "x", ax=None):
    """Bifurcation diagram: for each parameter value, the points of its (post-transient) orbit.

    Drawn as one rasterized scatter of tiny markers (vector output stays small); non-finite orbit
    points (diverged orbits) are left out.

    Args:
        params: (P,) parameter values.
        orbits: (P, N) the last N orbit points at each parameter value.
        landmarks: {label: parameter value} marked with dotted vertical lines (e.g.
            :data:`UV_LANDMARKS`).
        marker_size: scatter marker size (points²).
        color: marker colour.
        xlabel, ylabel: axis labels.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes (one PathCollection for the points, one line per landmark).

    Raises:
        ValueError: ``orbits`` not of shape (P, N).

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np
        >>> from rdsim import plot
        >>> a = np.linspace(0.5, 2.0, 50)
        >>> ax = plot.bifurcation(a, plot.uv_bifurcation(a, 200, 50), landmarks=plot.UV_LANDMARKS)
        >>> len(ax.collections), len(ax.lines)
        (1, 3)
    """
    p = _vector(params, "params")
    orb = _array(orbits, "orbits")
    if orb.ndim == 1 and p.size == orb.size:
        orb = orb[:, None]
    if orb.ndim != 2:
        raise ValueError(f"orbits: expected shape ({p.size}, N), got {orb.shape}")
    _check_same_length(p, orb, "params", "orbits")
    X = np.broadcast_to(p[:, None], orb.shape)
    ok = np.isfinite(orb) & np.isfinite(X)
    if orb.size == 0:
        raise ValueError(f"orbits: no orbit points to plot (shape {orb.shape})")
    ax = _new_axes(ax, figsize=(6.4, 4.0))
    ax.scatter(X[ok], orb[ok], s=marker_size, c=color, marker=".", linewidths=0, rasterized=True)
    if landmarks:
        for j, (label, val) in enumerate(landmarks.items()):
            ax.axvline(_finite_scalar(val, f"landmarks[{label!r}]"), color=f"C{j % 10}", ls=":", lw=1.0,
                       label=label)
        ax.legend(fontsize="small", loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def uv_bifurcation(a_values, n_transient: int = 1000, n_keep: int = 200, *, x0: float = 0.5,
                   bound: float = 1e6) -> np.ndarray:
    """Orbits of the balanced uv map x' = x(1 + a - a x^2) for many a at once (MATH.md §7).

    GD on L = ½(uv - y)² with u = v keeps balanced orbits; with x = u/√y and a = eta y they reduce
    to this cubic map. The fixed point x = 1 has multiplier 1 - 2a: stable for 0 < a < 1; a period-2
    orbit is stable for 1 < a < √5 - 1, then a Feigenbaum cascade leads to chaos. At a = 2 the map
    is conjugate to the Chebyshev polynomial -T_3 on [-√2, √2] (x = √2 c); for a > 2 typical
    orbits leave every bounded set.

    Divergence policy: an orbit whose |x| exceeds ``bound`` (or becomes non-finite) is set to NaN
    from that step on; the rows of such parameter values are NaN in the output (they plot as
    nothing). No value is clipped.

    Args:
        a_values: (P,) values of a (finite).
        n_transient: iterations discarded first (>= 0).
        n_keep: iterations recorded after the transient (>= 1).
        x0: common initial value.
        bound: divergence threshold on |x|.

    Returns:
        (P, n_keep) orbit points, float64.

    Raises:
        ValueError: non-finite ``a_values``, bad counts or bound.

    Example:
        >>> import numpy as np
        >>> orb = uv_bifurcation([0.5, 1.1, 2.5], n_transient=2000, n_keep=4)
        >>> np.round(orb[0], 6).tolist()       # fixed point x = 1
        [1.0, 1.0, 1.0, 1.0]
        >>> len(set(np.round(orb[1], 6)))      # period 2
        2
        >>> bool(np.isnan(orb[2]).all())       # a > 2: diverged
        True
    """
    a = _vector(a_values, "a_values")
    if not np.all(np.isfinite(a)):
        raise ValueError("a_values: expected finite values")
    n_transient = _nonneg_int(n_transient, "n_transient", 0)
    n_keep = _nonneg_int(n_keep, "n_keep", 1)
    bound = _finite_scalar(bound, "bound")
    if bound <= 0:
        raise ValueError(f"bound: expected a positive number, got {bound!r}")
    x = np.full(a.shape, _finite_scalar(x0, "x0"))
    out = np.empty((a.size, n_keep))
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(n_transient + n_keep):
            x = x * (1.0 + a - a * x * x)
            x[~(np.abs(x) <= bound)] = np.nan  # NaN stays NaN
            if t >= n_transient:
                out[:, t - n_transient] = x
    out[np.isnan(out).any(axis=1)] = np.nan
    return out


def _nonneg_int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    return int(v)


def uv_bifurcation_diagram(a_min: float = 0.5, a_max: float = 2.0, n_a: int = 1200, *, n_transient: int = 1000,
                           n_keep: int = 200, x0: float = 0.5, ax=None):
    """Bifurcation diagram of the balanced uv map with the landmarks a = 1, √5 - 1 and 2 marked.

    Args:
        a_min, a_max: range of a = eta y.
        n_a: number of values of a.
        n_transient, n_keep, x0: as in :func:`uv_bifurcation`.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from rdsim import plot
        >>> ax = plot.uv_bifurcation_diagram(n_a=100, n_transient=200, n_keep=20)
        >>> ax.get_xlabel()
        'a = ηy'
    """
    a = np.linspace(float(a_min), float(a_max), _nonneg_int(n_a, "n_a", 2))
    orb = uv_bifurcation(a, n_transient, n_keep, x0=x0)
    ax = bifurcation(a, orb, landmarks=UV_LANDMARKS, xlabel="a = ηy", ylabel="x = u/√y (balanced u = v)", ax=ax)
    ax.set_title("balanced uv map  x′ = x(1 + a − a x²)", fontsize="medium")
    return ax


# -------------------------------------------------------------------------------------------------
# Hessian spectra


def _ritz(alphas, weights, name_a: str = "alphas", name_w: str = "weights"):
    """Flatten (R, m) or (n,) Ritz values and weights, dropping NaN padding and zero weights.

    ``alphas`` may also be an object with ``pooled()`` (an rdsim SpectralDensity) when weights is None.
    """
    if weights is None and hasattr(alphas, "pooled"):
        alphas, weights = alphas.pooled()
    a = _array(alphas, name_a)
    if weights is None:
        w = np.ones_like(a)
    else:
        w = _array(weights, name_w)
        if w.shape != a.shape:
            raise ValueError(f"{name_w}: expected the shape of {name_a} {a.shape}, got {w.shape}")
    if a.ndim not in (1, 2):
        raise ValueError(f"{name_a}: expected shape (n,) or (R, m), got {a.shape}")
    a = a.ravel()
    w = w.ravel()
    if np.any(w < 0):
        raise ValueError(f"{name_w}: expected non-negative weights")
    keep = np.isfinite(a) & np.isfinite(w) & (w > 0)
    if not keep.any():
        raise ValueError(f"{name_a}: no finite values with positive weight")
    return a[keep], w[keep]


def _smooth(values, weights, grid, bandwidth):
    """Gaussian-smoothed density of weighted points on ``grid`` (integrates to sum(weights))."""
    out = np.zeros_like(grid)
    step = max(1, 4_000_000 // max(grid.size, 1))
    for s in range(0, values.size, step):
        z = (grid[:, None] - values[None, s:s + step]) / bandwidth
        out += (np.exp(-0.5 * z * z) * weights[None, s:s + step]).sum(axis=1)
    return out / (bandwidth * math.sqrt(2.0 * math.pi))


def _default_bandwidth(v: np.ndarray, bandwidth) -> float:
    if bandwidth is not None:
        b = _finite_scalar(bandwidth, "bandwidth")
        if b <= 0:
            raise ValueError(f"bandwidth: expected a positive number, got {bandwidth!r}")
        return b
    span = float(v.max() - v.min())
    return 0.01 * (span if span > 0 else max(abs(float(v.max())), 1.0))


def _grid(v: np.ndarray, bw: float, n: int = 2000, extra=()) -> np.ndarray:
    lo = min([float(v.min())] + [float(e) for e in extra]) - 5 * bw
    hi = max([float(v.max())] + [float(e) for e in extra]) + 5 * bw
    return np.linspace(lo, hi, n)


def spectral_density(alphas, weights=None, *, lr: float | None = None, bandwidth: float | None = None,
                     log_density: bool = True, normalize: bool = True, ax=None):
    """Hessian spectral density from SLQ Ritz values and weights (Gaussian-smoothed).

    phi(alpha) = sum_r w_r N(alpha; alpha_r, sigma²) over the pooled Ritz values alpha_r with
    weights w_r (normalised to integrate to 1 unless ``normalize=False``). With ``lr`` the GD
    stability edge alpha = 2/eta is marked and the expanding regions alpha < 0 and alpha > 2/eta
    (where |1 - eta alpha| > 1) are shaded.

    Args:
        alphas: (n,) or (R, m) Ritz values (NaN padding allowed), or an
            ``rdsim.torch.SpectralDensity`` (then ``weights`` is None and its pooled values are used).
        weights: quadrature weights of the same shape (None: equal weights).
        lr: learning rate eta (marks 2/eta).
        bandwidth: Gaussian bandwidth sigma (default: 1% of the range of the Ritz values).
        log_density: log-scaled density axis (SLQ densities span many decades).
        normalize: normalise the density to integrate to 1 (else to the total weight).
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes (one line for the density, one for 2/eta if ``lr`` is given).

    Raises:
        ValueError: shapes that do not match, negative weights, no usable values, bad ``lr``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np
        >>> from rdsim import plot
        >>> rng = np.random.default_rng(0)
        >>> ax = plot.spectral_density(rng.gamma(0.5, 1.0, 500), lr=0.5)
        >>> len(ax.lines)
        2
    """
    a, w = _ritz(alphas, weights)
    bw = _default_bandwidth(a, bandwidth)
    edge = None
    if lr is not None:
        eta = _finite_scalar(lr, "lr")
        if eta <= 0:
            raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
        edge = 2.0 / eta
    grid = _grid(a, bw, extra=(0.0,) if edge is None else (0.0, edge))
    if normalize:
        w = w / w.sum()
    dens = _smooth(a, w, grid, bw)
    ax = _new_axes(ax)
    ax.plot(grid, dens, color="C0", lw=1.2, label="φ(α)")
    if log_density:
        pos = dens[dens > 0]
        if pos.size:
            ax.set_yscale("log")
            ax.set_ylim(max(float(pos.max()) * 1e-8, float(pos.min())), float(pos.max()) * 3.0)
    if edge is not None:
        ax.axvline(edge, color="C3", ls="--", lw=1.0, label="α = 2/η")
        lo, hi = grid[0], grid[-1]
        if hi > edge:
            ax.axvspan(edge, hi, color="C3", alpha=0.08, lw=0)
        if lo < 0:
            ax.axvspan(lo, 0.0, color="C3", alpha=0.08, lw=0)
        ax.set_xlim(lo, hi)
    ax.set_xlabel("Hessian eigenvalue α")
    ax.set_ylabel("spectral density φ(α)")
    ax.legend(fontsize="small", loc="best")
    return ax


def pushforward_density(alphas, weights=None, lr: float = None, *, eps: float = _EPS_DEFAULT,
                        bandwidth: float | None = None, log_density: bool = False, normalize: bool = True, ax=None):
    """Density of z = log(|1 - eta alpha| + eps), the one-step log singular values of I - eta H.

    z > 0: expanding directions (alpha < 0 or alpha > 2/eta); z < 0: contracting
    (0 < alpha < 2/eta); the line z = 0 separates them. The Gaussian smoothing is applied in z.
    The text in the corner gives the weight with z > 0 (with eps > 0 this includes the numerically
    neutral 0 <= alpha < eps/eta). With eps = 0 a Ritz value exactly at 1/eta gives z = -inf and is
    left out.

    Args:
        alphas: (n,) or (R, m) Ritz values, or an ``rdsim.torch.SpectralDensity`` with ``weights=None``.
        weights: quadrature weights of the same shape (None: equal weights).
        lr: learning rate eta (required).
        eps: the regulariser in the log (MATH.md §4; default 1e-6, as rdsim's SD estimators).
        bandwidth: Gaussian bandwidth in z (default: 1% of the range of z).
        log_density: log-scaled density axis.
        normalize: normalise the density to integrate to 1 (else to the total weight).
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes (one line for the density, one for z = 0).

    Raises:
        ValueError: missing or non-positive ``lr``, negative ``eps``, bad shapes.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np
        >>> from rdsim import plot
        >>> ax = plot.pushforward_density(np.linspace(0, 5, 200), lr=0.5)
        >>> len(ax.lines)
        2
    """
    if lr is None:
        raise ValueError("lr: a learning rate is required")
    eta = _finite_scalar(lr, "lr")
    if eta <= 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    eps = _finite_scalar(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps: expected eps >= 0, got {eps!r}")
    a, w = _ritz(alphas, weights)
    with np.errstate(divide="ignore"):
        z = np.log(np.abs(1.0 - eta * a) + eps)
    ok = np.isfinite(z)
    if not ok.any():
        raise ValueError("alphas: every z = log(|1 - lr alpha| + eps) is -inf (use eps > 0)")
    z, w = z[ok], w[ok]
    bw = _default_bandwidth(z, bandwidth)
    grid = _grid(z, bw, extra=(0.0,))
    if normalize:
        w = w / w.sum()
    dens = _smooth(z, w, grid, bw)
    ax = _new_axes(ax)
    ax.plot(grid, dens, color="C2", lw=1.2, label="density of z")
    ax.axvline(0.0, color="k", lw=1.0, label="z = 0")
    ax.axvspan(0.0, max(grid[-1], 0.0), color="C3", alpha=0.08, lw=0)
    ax.axvspan(min(grid[0], 0.0), 0.0, color="C0", alpha=0.08, lw=0)
    ax.set_xlim(grid[0], grid[-1])
    if log_density:
        pos = dens[dens > 0]
        if pos.size:
            ax.set_yscale("log")
            ax.set_ylim(max(float(pos.max()) * 1e-8, float(pos.min())), float(pos.max()) * 3.0)
    frac = float(w[z > 0].sum() / w.sum())
    ax.text(0.98, 0.95, f"expanding mass {frac:.3g}", transform=ax.transAxes, ha="right", va="top",
            fontsize="small")
    ax.set_xlabel("z = log(|1 − ηα| + ε)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small", loc="upper left")
    return ax


def hessian_spectrum_figure(alphas, weights=None, lr: float = None, *, eps: float = _EPS_DEFAULT,
                            bandwidth: float | None = None, z_bandwidth: float | None = None,
                            log_density: bool = True, figsize=(10.0, 3.8)):
    """Two panels: the Hessian spectral density with 2/eta marked, and the density of z.

    Left: :func:`spectral_density` (expanding regions alpha < 0 and alpha > 2/eta shaded); right:
    :func:`pushforward_density` of z = log(|1 - eta alpha| + eps) with the line z = 0.

    Args:
        alphas, weights: Ritz values and weights (see :func:`spectral_density`).
        lr: learning rate eta (required).
        eps: regulariser of z.
        bandwidth: Gaussian bandwidth in alpha; z_bandwidth: in z (defaults: 1% of the range).
        log_density: log-scaled density axes in both panels.
        figsize: figure size in inches.

    Returns:
        The Figure (``fig.axes`` holds the two Axes).

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np
        >>> from rdsim import plot
        >>> fig = plot.hessian_spectrum_figure(np.linspace(-0.1, 5, 100), lr=0.5)
        >>> len(fig.axes)
        2
    """
    if lr is None:
        raise ValueError("lr: a learning rate is required")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=figsize, layout="constrained")
    spectral_density(alphas, weights, lr=lr, bandwidth=bandwidth, log_density=log_density, ax=ax1)
    pushforward_density(alphas, weights, lr, eps=eps, bandwidth=z_bandwidth, log_density=log_density, ax=ax2)
    ax1.set_title("Hessian spectrum", fontsize="medium")
    ax2.set_title(f"log singular values of I − ηH (η = {float(lr):.3g})", fontsize="medium")
    return fig


# -------------------------------------------------------------------------------------------------
# generalization


def sd_vs_gap(measure, gap, *, lr=None, batch_size=None, tau=None, measure_label: str = "sharpness dimension SD",
              gap_label: str = "generalization gap (train − test acc.)", ax=None):
    """A complexity measure vs the generalization gap: colour by learning rate, size by batch size.

    Runs with a non-finite measure or gap (diverged) are left out and counted in the title.

    Args:
        measure: (n,) complexity measure (SD, SD-SLQ, lambda_1, tr H, ...).
        gap: (n,) generalization gap.
        lr: (n,) learning rates (colour, log-scaled with a colour bar), or None.
        batch_size: (n,) batch sizes (marker area grows with batch size; legend), or None.
        tau: Kendall tau to show in the title: a number, True to compute it with
            :func:`rdsim.stats.kendall_tau` over the plotted runs, or None.
        measure_label, gap_label: axis labels.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes (one PathCollection with the runs).

    Raises:
        ValueError: arrays of different lengths, non-positive learning rates or batch sizes.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from rdsim import plot
        >>> ax = plot.sd_vs_gap([1.0, 2.0, 3.0], [0.1, 0.3, 0.2], lr=[0.01, 0.1, 0.1],
        ...                     batch_size=[32, 32, 128], tau=True)
        >>> ax.get_title()
        'Kendall τ = 0.333 (n = 3)'
    """
    m = _vector(measure, "measure")
    g = _vector(gap, "gap")
    if g.size != m.size:
        raise ValueError(f"gap: expected {m.size} values (one per run in measure), got {g.size}")
    lr_a = bs = None
    if lr is not None:
        lr_a = _vector(lr, "lr")
        if lr_a.size != m.size:
            raise ValueError(f"lr: expected {m.size} values (one per run), got {lr_a.size}")
        if np.any(lr_a <= 0):
            raise ValueError("lr: expected positive learning rates")
    if batch_size is not None:
        bs = _vector(batch_size, "batch_size")
        if bs.size != m.size:
            raise ValueError(f"batch_size: expected {m.size} values (one per run), got {bs.size}")
        if np.any(bs <= 0):
            raise ValueError("batch_size: expected positive batch sizes")
    ok = np.isfinite(m) & np.isfinite(g)
    if not ok.any():
        raise ValueError(f"measure: no run with a finite measure and gap among {m.size} (all diverged?)")
    n_drop = int((~ok).sum())
    ax = _new_axes(ax, figsize=(5.4, 4.0))
    sizes = 30.0
    if bs is not None:
        # area from 15 to 120 points² over the log batch size range
        lb = np.log2(bs)
        span = lb.max() - lb.min()
        sizes_all = 15.0 + 105.0 * ((lb - lb.min()) / span if span > 0 else np.full_like(lb, 0.5))
        sizes = sizes_all[ok]
    if lr_a is not None:
        from matplotlib.colors import LogNorm, Normalize

        lo, hi = float(lr_a.min()), float(lr_a.max())
        norm = LogNorm(lo, hi) if hi > lo else Normalize(lo * 0.9, hi * 1.1)
        sc = ax.scatter(m[ok], g[ok], c=lr_a[ok], s=sizes, cmap="viridis", norm=norm, edgecolors="k",
                        linewidths=0.4)
        ax.figure.colorbar(sc, ax=ax, label="learning rate η")
    else:
        sc = ax.scatter(m[ok], g[ok], s=sizes, color="C0", edgecolors="k", linewidths=0.4)
    if bs is not None:
        handles = []
        for b in np.unique(bs[ok]):
            s = float(sizes_all[np.flatnonzero(bs == b)[0]])
            handles.append(ax.scatter([], [], s=s, color="0.6", edgecolors="k", linewidths=0.4,
                                      label=f"B = {b:g}"))
        if handles:
            ax.legend(handles=handles, title="batch size", fontsize="small", loc="best")
    ax.set_xlabel(measure_label)
    ax.set_ylabel(gap_label)
    parts = []
    if tau is True:
        from .stats import kendall_tau

        tau = kendall_tau(m[ok], g[ok])
    if tau is not None and tau is not False:
        parts.append(f"Kendall τ = {float(tau):.3g} (n = {int(ok.sum())})")
    if n_drop:
        parts.append(f"{n_drop} diverged run(s) not shown")
    ax.set_title("; ".join(parts), fontsize="medium")
    return ax


# -------------------------------------------------------------------------------------------------
# attractors and the dimension ladder


def attractor(points, *, dims: tuple[int, int] = (0, 1), method: str = "auto", bins: int = 500,
              marker_size: float | None = None, color="k", labels: Sequence[str] | None = None, ax=None):
    """2-D projection of attractor samples (e.g. the states of a long trajectory).

    ``method="scatter"``: a rasterized plot of single-pixel markers (fast: ~6e5 points render in
    well under a second). ``method="hist"``: a 2-D histogram with a logarithmic colour scale (shows
    the natural measure). ``"auto"``: scatter up to 2e5 points, histogram beyond. Non-finite points
    are left out.

    Args:
        points: (n, d) samples, d >= 2 (or (n, 1): plotted against the sample index).
        dims: the two coordinates to plot.
        method: ``"auto"``, ``"scatter"`` or ``"hist"``.
        bins: histogram bins per axis.
        marker_size: marker size for the scatter (default: one pixel).
        color: scatter colour.
        labels: axis labels for the two coordinates (default x_i, x_j).
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes.

    Raises:
        ValueError: ``points`` not 2-D, ``dims`` out of range, unknown ``method``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import numpy as np
        >>> from rdsim import plot
        >>> ax = plot.attractor(np.random.default_rng(0).normal(size=(1000, 3)), dims=(0, 2))
        >>> ax.get_xlabel(), ax.get_ylabel()
        ('x₀', 'x₂')
    """
    P = _array(points, "points")
    if P.ndim != 2:
        raise ValueError(f"points: expected shape (n, d), got {P.shape}")
    if P.shape[0] == 0 or P.shape[1] == 0:
        raise ValueError(f"points: no samples to plot (shape {P.shape})")
    if method not in ("auto", "scatter", "hist"):
        raise ValueError(f"method: expected 'auto', 'scatter' or 'hist', got {method!r}")
    if P.shape[1] == 1:
        P = np.column_stack([np.arange(P.shape[0], dtype=np.float64), P[:, 0]])
        dims = (0, 1)
        default_labels = ("sample n", "x₀")
    else:
        if (not isinstance(dims, Sequence) or isinstance(dims, str) or len(dims) != 2
                or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in dims)
                or any(not (0 <= int(i) < P.shape[1]) for i in dims)):
            raise ValueError(f"dims: expected two coordinates in [0, {P.shape[1]}), got {dims!r}")
        default_labels = (f"x{_sub(int(dims[0]))}", f"x{_sub(int(dims[1]))}")
    if labels is not None and (isinstance(labels, str) or len(labels) != 2):
        raise ValueError(f"labels: expected two labels, got {labels!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins: expected a positive integer, got {bins!r}")
    if marker_size is not None and not _finite_scalar(marker_size, "marker_size") > 0:
        raise ValueError(f"marker_size: expected a positive number, got {marker_size!r}")
    i, j = int(dims[0]), int(dims[1])
    x, y = P[:, i], P[:, j]
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError(f"points: none of the {P.shape[0]} samples is finite in coordinates {(i, j)} "
                         "(a diverged trajectory?)")
    x, y = x[ok], y[ok]
    if method == "auto":
        method = "scatter" if x.size <= 200_000 else "hist"
    ax = _new_axes(ax, figsize=(5.0, 4.2))
    if method == "scatter":
        if marker_size is None:
            ax.plot(x, y, ",", color=color, rasterized=True)
        else:
            ax.plot(x, y, ".", ms=marker_size, mew=0, color=color, rasterized=True)
    else:
        from matplotlib.colors import LogNorm

        if x.size:
            H, xe, ye = np.histogram2d(x, y, bins=int(bins))
            H = np.ma.masked_where(H == 0, H)
            mesh = ax.pcolormesh(xe, ye, H.T, norm=LogNorm(vmin=1, vmax=max(float(H.max()), 1.0)),
                                 cmap="magma_r", rasterized=True)
            ax.figure.colorbar(mesh, ax=ax, label="samples per bin")
    lx, ly = labels if labels is not None else default_labels
    ax.set_xlabel(lx)
    ax.set_ylabel(ly)
    return ax


def ladder(result, *, stderr: Mapping | None = None, d_ky=None, sd=None, ax=None):
    """The dimension ladder D^(m) vs m (log2 axis) with D_KY and SD as horizontal lines (MATH.md §5).

    In expectation D_KY <= D^(m) <= D^(1) <= SD and D^(m) decreases to D_KY; error bars are the
    jackknife standard errors of a :class:`rdsim.LadderResult`.

    Args:
        result: a :class:`rdsim.LadderResult` (``dims`` and ``stderr`` dicts) or a dict {m: D^(m)}
            as returned by ``rdsim.dimension_ladder``.
        stderr: {m: standard error} for a plain dict ``result`` (overrides the result's own).
        d_ky: the Kaplan-Yorke dimension: a number, a (value, stderr) pair, or a
            :class:`rdsim.LyapunovResult` (its ``dimension``); None: no line.
        sd: the sharpness dimension: a number or a (value, stderr) pair; None: no line.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The Axes (the D^(m) points with error bars, one line each for D_KY and SD).

    Raises:
        ValueError: an empty ladder, non-positive integer m, ``stderr`` keys not in the ladder.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from rdsim import plot
        >>> ax = plot.ladder({1: 1.8, 2: 1.6, 4: 1.5, 8: 1.45}, d_ky=1.4, sd=2.0)
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['D_KY = 1.4', 'SD = 2', 'D⁽ᵐ⁾']
    """
    if hasattr(result, "dims") and hasattr(result, "ms"):
        dims = dict(result.dims)
        errs = dict(getattr(result, "stderr", {}) or {})
    elif isinstance(result, Mapping):
        dims = dict(result)
        errs = {}
    else:
        raise ValueError(f"result: expected a LadderResult or a dict {{m: D}}, got {type(result).__name__}")
    if not dims:
        raise ValueError("result: the ladder is empty")
    for m in dims:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"result: expected positive integer window lengths m, got {m!r}")
    if stderr is not None:
        for m in stderr:
            if m not in dims:
                raise ValueError(f"stderr: key {m!r} is not a window length of the ladder")
        errs = dict(stderr)
    ms = np.array(sorted(dims), dtype=np.float64)
    D = np.array([float(dims[int(m)]) for m in ms])
    if not np.isfinite(D).any():
        st = getattr(result, "status", "ok")
        raise ValueError(f"result: no finite D^(m) to plot{' (status ' + repr(st) + ')' if st != 'ok' else ''}")
    E = np.array([float(errs.get(int(m), np.nan)) for m in ms])
    ax = _new_axes(ax)
    has_err = np.isfinite(E).any()
    ax.errorbar(ms, D, yerr=np.where(np.isfinite(E), E, 0.0) if has_err else None, marker="o", ms=4, lw=1.2,
                capsize=3, color="C0", label="D⁽ᵐ⁾")
    for val, name, color, ls in ((d_ky, "D_KY", "C3", "--"), (sd, "SD", "C2", "-.")):
        if val is None:
            continue
        if hasattr(val, "dimension"):
            val = val.dimension
        if isinstance(val, (tuple, list)):
            if len(val) != 2:
                raise ValueError(f"{name.lower()}: expected a number or a (value, stderr) pair")
            v, e = _finite_scalar(val[0], name.lower()), float(val[1])
        else:
            v, e = _finite_scalar(val, name.lower()), float("nan")
        ax.axhline(v, color=color, ls=ls, lw=1.0, label=f"{name} = {v:.4g}")
        if math.isfinite(e) and e > 0:
            ax.axhspan(v - e, v + e, color=color, alpha=0.12, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms)
    ax.set_xticklabels([f"{int(m)}" for m in ms])
    ax.set_xlabel("window length m (steps)")
    ax.set_ylabel("dimension D⁽ᵐ⁾")
    ax.legend(fontsize="small", loc="best")
    return ax


def _monitor_columns(records) -> dict[str, np.ndarray]:
    """Columns {name: float array} from a TrainingMonitor, its ``table()``, or its ``records`` list."""
    if hasattr(records, "table") and callable(records.table):
        return records.table()
    if isinstance(records, Mapping):
        return {str(k): np.asarray(v, dtype=np.float64) for k, v in records.items()}
    if isinstance(records, Sequence) and not isinstance(records, str) and all(isinstance(r, Mapping) for r in records):
        keys: list[str] = []
        for r in records:
            keys += [k for k in r if k not in keys]
        return {k: np.array([r.get(k, np.nan) for r in records], dtype=np.float64) for k in keys}
    raise ValueError("records: expected a TrainingMonitor, its table() {name: values} or its records "
                     f"[{{name: value}}, ...], got {type(records).__name__}")


def monitor_records(records, *, max_exponents: int = 4, figsize=None):
    """A training run seen by :class:`rdsim.torch.TrainingMonitor`: one panel per quantity recorded.

    Panels, in this order, where the records hold them: sharpness lambda_max(H) with the stability
    threshold 2/eta(t) of the current learning rate (log scale: the edge of stability is where the
    two meet); the top Lyapunov exponents per step (``lyapunov_1 ...``; the running estimates of the
    monitor) with zero marked; the sharpness dimension SD; tr H.

    Args:
        records: a TrainingMonitor, its ``table()`` or its ``records`` (list of dicts with a ``step``).
        max_exponents: at most this many exponents are drawn.
        figsize: default (5.5, 2.2 per panel).

    Returns:
        The Figure (one Axes per panel, sharing the step axis).

    Raises:
        ValueError: no records, no ``step`` column, or nothing to draw.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from rdsim import plot
        >>> recs = [{"step": s, "lr": 0.1, "sharpness": 5.0 + s / 100, "two_over_lr": 20.0,
        ...          "lyapunov_1": 0.01, "sd": 2.0} for s in (0, 100, 200)]
        >>> [ax.get_ylabel() for ax in plot.monitor_records(recs).axes]
        ['curvature', 'exponent per step', 'SD']
    """
    cols = _monitor_columns(records)
    if "step" not in cols or cols["step"].size == 0:
        raise ValueError("records: no records with a 'step' (the monitor records at every= steps)")
    if isinstance(max_exponents, bool) or not isinstance(max_exponents, (int, np.integer)) or max_exponents < 1:
        raise ValueError(f"max_exponents: expected a positive integer, got {max_exponents!r}")
    steps = cols["step"]
    exps = sorted((k for k in cols if k.startswith("lyapunov_") and k[9:].isdigit()), key=lambda k: int(k[9:]))
    exps = exps[:max_exponents]
    has = {name: name in cols and np.isfinite(cols[name]).any() for name in ("sharpness", "sd", "trace")}
    panels = [p for p, ok in (("sharpness", has["sharpness"]), ("lyapunov", bool(exps)), ("sd", has["sd"]),
                              ("trace", has["trace"])) if ok]
    if not panels:
        raise ValueError("records: nothing to draw (no sharpness, lyapunov_i, sd or trace values)")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=figsize or (5.5, 2.2 * len(panels)))
    axes = axes[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "sharpness":
            ax.plot(steps, cols["sharpness"], marker="o", ms=3, lw=1.2, color="C0", label="λ_max(H)")
            if "lr" in cols and np.isfinite(cols["lr"]).any():
                with np.errstate(divide="ignore"):
                    thr = np.where(cols["lr"] > 0, 2.0 / cols["lr"], np.nan)
                ax.plot(steps, thr, ls="--", lw=1.0, color="C3", label="2/η(t)")
            ax.set_yscale("log")
            ax.set_ylabel("curvature")
        elif panel == "lyapunov":
            for i, key in enumerate(exps):
                ax.plot(steps, cols[key], lw=1.2, color=f"C{i}", label=f"λ{_sub(int(key[9:]))}")
            ax.axhline(0.0, color="0.5", lw=0.8)
            ax.set_ylabel("exponent per step")
        elif panel == "sd":
            ax.plot(steps, cols["sd"], marker="o", ms=3, lw=1.2, color="C2", label="SD")
            ax.set_ylabel("SD")
        else:
            ax.plot(steps, cols["trace"], marker="o", ms=3, lw=1.2, color="C4", label="tr H")
            ax.set_ylabel("tr H")
        ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("training step")
    return fig
