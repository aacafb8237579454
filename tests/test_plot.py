"""Tests for rdsim.plot: every figure draws on synthetic inputs (Agg), saves a PNG, and bad inputs
raise ValueError naming the argument; uv_bifurcation is checked against the map's known orbits."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import rdsim  # noqa: E402
from rdsim import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _save(obj, tmp_path, name):
    fig = obj if isinstance(obj, Figure) else obj.figure
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _lyap_result(k=3, n=50, status="ok"):
    """A synthetic LyapunovResult whose running estimates converge like T^(-1/2) to fixed values."""
    rng = np.random.default_rng(0)
    exps = np.array([0.5, 0.0, -1.5])[:k]
    steps = np.arange(1, n + 1) * 100
    hist = exps[None, :] + rng.normal(0, 1, (n, k)) / np.sqrt(steps)[:, None]
    return rdsim.LyapunovResult(
        exponents=hist[-1].copy(), stderr=np.full(k, 0.01), dimension=rdsim.Dimension(2.33),
        status=status, diverged_at=None, n_steps=int(steps[-1]), history=hist, history_steps=steps,
        x_final=np.zeros(k))


# -------------------------------------------------------------------------------------------------
# spectrum_convergence


def test_spectrum_convergence_estimate(tmp_path):
    res = _lyap_result()
    ax = plot.spectrum_convergence(res, reference=[0.5, 0.0, -1.5])
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 6  # 3 running estimates + 3 reference lines
    assert len(ax.collections) == 3  # one ±stderr band per exponent
    assert ax.get_xlabel() and ax.get_ylabel()
    np.testing.assert_allclose(ax.lines[0].get_ydata(), res.history[:, 0])
    assert "D_KY = 2.33" in ax.get_title()
    _save(ax, tmp_path, "conv")


def test_spectrum_convergence_error_mode_and_existing_ax(tmp_path):
    fig, ax0 = plt.subplots()
    res = _lyap_result()
    ax = plot.spectrum_convergence(res, reference=[0.5, 0.0], mode="error", ax=ax0)
    assert ax is ax0
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) == 3  # 2 error curves + the T^-1/2 guide
    guide = ax.lines[-1]
    T, g = guide.get_xdata(), guide.get_ydata()
    np.testing.assert_allclose(g * np.sqrt(T), g[0] * np.sqrt(T[0]))  # slope -1/2
    _save(fig, tmp_path, "conv_err")


def test_spectrum_convergence_max_exponents_and_status():
    ax = plot.spectrum_convergence(_lyap_result(status="diverged"), max_exponents=1)
    assert len(ax.lines) == 1
    assert "diverged" in ax.get_title()


def test_spectrum_convergence_bad_inputs():
    res = _lyap_result()
    with pytest.raises(ValueError, match="reference"):
        plot.spectrum_convergence(res, mode="error")
    with pytest.raises(ValueError, match="reference"):
        plot.spectrum_convergence(res, reference=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="mode"):
        plot.spectrum_convergence(res, mode="bogus")
    bad = rdsim.LyapunovResult(**{**res.__dict__, "history_steps": res.history_steps[:-1]})
    with pytest.raises(ValueError, match="history_steps"):
        plot.spectrum_convergence(bad)
    bad = rdsim.LyapunovResult(**{**res.__dict__, "history": res.history[:, :2]})
    with pytest.raises(ValueError, match="history"):
        plot.spectrum_convergence(bad)
    with pytest.raises(ValueError, match="result"):
        plot.spectrum_convergence({"exponents": [1.0]})


# -------------------------------------------------------------------------------------------------
# exponents and dimensions vs learning rate


def test_exponents_vs_lr(tmp_path):
    lrs = np.linspace(0.04, 0.6, 15)
    alphas = np.array([4.0, 1.0])
    lam = np.log(np.abs(1 - lrs[:, None] * alphas))  # GD on a quadratic (MATH.md §7)
    ax = plot.exponents_vs_lr(lrs, lam, stderr=0.01 * np.ones_like(lam), threshold=2 / 4.0)
    assert isinstance(ax, Axes)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["η = 2/λ_max", "λ₁", "λ₂"]
    assert len(ax.containers) == 2  # one errorbar container per exponent
    vlines = [ln for ln in ax.lines if np.allclose(ln.get_xdata(), 0.5)]
    assert len(vlines) == 1
    assert ax.get_xscale() == "linear"  # a factor 15 range: linear by default
    _save(ax, tmp_path, "exlr")


def test_exponents_vs_lr_log_and_1d():
    ax = plot.exponents_vs_lr([1e-3, 1e-2, 1e-1], [-1.0, -0.5, 0.1])
    assert ax.get_xscale() == "log"  # automatic for a factor 100+ range
    assert ax.get_legend().get_texts()[0].get_text() == "λ₁"
    ax = plot.exponents_vs_lr([1e-3, 1e-2, 1e-1], [-1.0, -0.5, 0.1], logx=False)
    assert ax.get_xscale() == "linear"


def test_exponents_vs_lr_bad_inputs():
    with pytest.raises(ValueError, match="exponents"):
        plot.exponents_vs_lr([0.1, 0.2], [[1.0], [2.0], [3.0]])
    with pytest.raises(ValueError, match="stderr"):
        plot.exponents_vs_lr([0.1, 0.2], [1.0, 2.0], stderr=[0.1])
    with pytest.raises(ValueError, match="lrs"):
        plot.exponents_vs_lr([[0.1, 0.2]], [1.0, 2.0])
    with pytest.raises(ValueError, match="labels"):
        plot.exponents_vs_lr([0.1, 0.2], [1.0, 2.0], labels=["a", "b"])
    with pytest.raises(ValueError, match="threshold"):
        plot.exponents_vs_lr([0.1, 0.2], [1.0, 2.0], threshold=math.inf)


def test_dimensions_vs_lr(tmp_path):
    lrs = [0.1, 0.2, 0.3, 0.4]
    ax = plot.dimensions_vs_lr(lrs, {"D_KY": [0.0, 0.5, 1.0, 1.5], "SD": [0.2, 0.8, 1.4, 2.0]},
                               errors={"SD": [0.1] * 4}, threshold=0.35)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["η = 2/λ_max", "D_KY", "SD"]
    assert len(ax.containers) == 2
    assert ax.containers[1].has_yerr and not ax.containers[0].has_yerr
    assert ax.get_xlabel() == "learning rate η" and ax.get_ylabel() == "dimension"
    _save(ax, tmp_path, "dimlr")


def test_dimensions_vs_lr_bad_inputs():
    with pytest.raises(ValueError, match=r"dims\['SD'\]"):
        plot.dimensions_vs_lr([0.1, 0.2], {"SD": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="dims"):
        plot.dimensions_vs_lr([0.1, 0.2], {})
    with pytest.raises(ValueError, match="errors"):
        plot.dimensions_vs_lr([0.1, 0.2], {"SD": [1.0, 2.0]}, errors={"D_KY": [0.1, 0.1]})
    with pytest.raises(ValueError, match=r"errors\['SD'\]"):
        plot.dimensions_vs_lr([0.1, 0.2], {"SD": [1.0, 2.0]}, errors={"SD": [0.1]})


# -------------------------------------------------------------------------------------------------
# bifurcation


def test_uv_bifurcation_period_one_below_a_1():
    a = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    orb = plot.uv_bifurcation(a, n_transient=3000, n_keep=20)
    assert orb.shape == (5, 20)
    np.testing.assert_allclose(orb, 1.0, atol=1e-9)  # fixed point x = 1, multiplier 1 - 2a


def test_uv_bifurcation_period_two_between_1_and_sqrt5_minus_1():
    a = np.array([1.05, 1.1, 1.15, 1.2])
    orb = plot.uv_bifurcation(a, n_transient=5000, n_keep=20)
    for row, ai in zip(orb, a):
        vals = np.unique(np.round(row, 8))
        assert vals.size == 2, (ai, vals)
        np.testing.assert_allclose(row[::2], row[0], atol=1e-8)  # period exactly 2
        np.testing.assert_allclose(row[1::2], row[1], atol=1e-8)
        # the 2-cycle of x' = x(1 + a - a x^2): x1 + x2 = ... check it is a 2-cycle of the map
        x1, x2 = row[0], row[1]
        np.testing.assert_allclose(x1 * (1 + ai - ai * x1 * x1), x2, atol=1e-12)
        np.testing.assert_allclose(x2 * (1 + ai - ai * x2 * x2), x1, atol=1e-12)
        assert abs(x1 - x2) > 1e-3
    # beyond sqrt(5) - 1 the period-2 orbit is unstable: a period-4 orbit appears
    row = plot.uv_bifurcation([1.26], n_transient=20000, n_keep=40)[0]
    assert np.unique(np.round(row, 6)).size == 4


def test_uv_bifurcation_divergence_policy():
    a = np.array([1.9, 2.0, 2.05, 2.5])
    orb = plot.uv_bifurcation(a, n_transient=500, n_keep=100)
    assert np.all(np.isfinite(orb[0])) and np.all(np.abs(orb[0]) <= math.sqrt(2) + 1e-9)
    assert np.all(np.isnan(orb[3]))  # a > 2: diverged rows are NaN, never clipped
    # a row is either all finite (bounded orbit) or all NaN (diverged)
    for row in orb:
        assert np.all(np.isfinite(row)) or np.all(np.isnan(row))
    # a bound of 10 makes the a = 2.5 orbit NaN sooner, a bounded orbit is unaffected
    orb10 = plot.uv_bifurcation(a, n_transient=500, n_keep=100, bound=10.0)
    np.testing.assert_array_equal(orb10[0], orb[0])


def test_uv_bifurcation_bad_inputs():
    with pytest.raises(ValueError, match="a_values"):
        plot.uv_bifurcation([1.0, np.nan])
    with pytest.raises(ValueError, match="a_values"):
        plot.uv_bifurcation([[1.0, 2.0]])
    with pytest.raises(ValueError, match="n_keep"):
        plot.uv_bifurcation([1.0], n_keep=0)
    with pytest.raises(ValueError, match="n_transient"):
        plot.uv_bifurcation([1.0], n_transient=-1)
    with pytest.raises(ValueError, match="bound"):
        plot.uv_bifurcation([1.0], bound=0.0)


def test_bifurcation_plot(tmp_path):
    a = np.linspace(0.5, 2.2, 120)
    orb = plot.uv_bifurcation(a, 300, 40)
    ax = plot.bifurcation(a, orb, landmarks=plot.UV_LANDMARKS)
    assert isinstance(ax, Axes)
    assert len(ax.collections) == 1 and isinstance(ax.collections[0], PathCollection)
    pts = ax.collections[0]
    assert pts.get_rasterized()
    assert pts.get_offsets().shape[0] == int(np.isfinite(orb).sum())  # diverged points left out
    assert len(ax.lines) == 3
    np.testing.assert_allclose([ln.get_xdata()[0] for ln in ax.lines], [1.0, math.sqrt(5) - 1, 2.0])
    _save(ax, tmp_path, "bif")


def test_uv_bifurcation_diagram(tmp_path):
    ax = plot.uv_bifurcation_diagram(n_a=80, n_transient=200, n_keep=20)
    assert ax.get_xlabel() == "a = ηy"
    assert len(ax.get_legend().get_texts()) == 3
    _save(ax, tmp_path, "uvbif")


def test_bifurcation_bad_inputs():
    with pytest.raises(ValueError, match="orbits"):
        plot.bifurcation([1.0, 2.0], np.zeros((3, 5)))
    with pytest.raises(ValueError, match="orbits"):
        plot.bifurcation([1.0, 2.0], np.zeros((2, 5, 1)))
    with pytest.raises(ValueError, match="landmarks"):
        plot.bifurcation([1.0, 2.0], np.zeros((2, 5)), landmarks={"x": "oops"})


# -------------------------------------------------------------------------------------------------
# Hessian spectra


def _ritz(R=8, m=30, seed=0):
    rng = np.random.default_rng(seed)
    a = np.concatenate([rng.gamma(0.3, 0.05, (R, m - 5)), rng.normal(6.0, 1.0, (R, 5))], axis=1)
    w = rng.dirichlet(np.ones(m), R)
    a[0, -2:] = np.nan  # a run that stopped early: NaN padding, zero weight
    w[0, -2:] = 0.0
    w[0] /= w[0].sum()
    return a, w


def test_spectral_density(tmp_path):
    a, w = _ritz()
    ax = plot.spectral_density(a, w, lr=0.4, bandwidth=0.05)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 2
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[1].get_xdata()[0], 2 / 0.4)
    x, y = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
    np.testing.assert_allclose(np.trapezoid(y, x), 1.0, rtol=1e-3)  # normalised density
    _save(ax, tmp_path, "density")


def test_spectral_density_total_mass_and_linear():
    a = np.array([1.0, 2.0, 3.0])
    ax = plot.spectral_density(a, np.array([2.0, 2.0, 2.0]), normalize=False, log_density=False, bandwidth=0.1)
    x, y = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
    assert ax.get_yscale() == "linear" and len(ax.lines) == 1
    np.testing.assert_allclose(np.trapezoid(y, x), 6.0, rtol=1e-3)
    peaks = np.interp([1.0, 2.0, 3.0], x, y)
    np.testing.assert_allclose(peaks, 2.0 / (0.1 * math.sqrt(2 * math.pi)), rtol=1e-3)  # well-separated bumps
    assert np.interp(1.5, x, y) < 1e-3  # 5 bandwidths from each bump


def test_spectral_density_accepts_pooled_object():
    class Pooled:
        def pooled(self):
            return np.array([0.5, 1.0, 1.5]), np.array([1.0, 1.0, 2.0])

    ax = plot.spectral_density(Pooled(), lr=1.0)
    assert len(ax.lines) == 2


def test_pushforward_density(tmp_path):
    a, w = _ritz()
    eta = 0.4
    ax = plot.pushforward_density(a, w, eta, eps=1e-6)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 2
    assert ax.lines[1].get_xdata()[0] == 0.0  # the z = 0 line
    assert ax.get_xlabel().startswith("z = log")
    # the reported expanding mass is the weight of z > 0: alpha > 2/eta, alpha < 0, and (through
    # eps) the numerically neutral 0 <= alpha < eps/eta
    keep = np.isfinite(a) & (w > 0)
    ak, wk = a[keep], w[keep]
    expanding = (ak > 2 / eta) | (ak < 0) | (ak < 1e-6 / eta)
    frac = wk[expanding].sum() / wk.sum()
    assert f"expanding mass {frac:.3g}" in [t.get_text() for t in ax.texts]
    _save(ax, tmp_path, "pushforward")


def test_hessian_spectrum_figure(tmp_path):
    a, w = _ritz()
    fig = plot.hessian_spectrum_figure(a, w, lr=0.4)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "Hessian eigenvalue α"
    assert "2/η" in [t.get_text() for t in ax1.get_legend().get_texts()][1]
    assert ax2.get_xlabel().startswith("z = log")
    _save(fig, tmp_path, "hessfig")


def test_hessian_spectra_bad_inputs():
    a, w = _ritz()
    with pytest.raises(ValueError, match="weights"):
        plot.spectral_density(a, w[:, :-1])
    with pytest.raises(ValueError, match="weights"):
        plot.spectral_density([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="alphas"):
        plot.spectral_density(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="alphas"):
        plot.spectral_density([np.nan, np.nan])
    with pytest.raises(ValueError, match="lr"):
        plot.spectral_density(a, w, lr=-1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        plot.spectral_density(a, w, bandwidth=0.0)
    with pytest.raises(ValueError, match="lr"):
        plot.pushforward_density(a, w)
    with pytest.raises(ValueError, match="eps"):
        plot.pushforward_density(a, w, 0.1, eps=-1.0)
    with pytest.raises(ValueError, match="lr"):
        plot.hessian_spectrum_figure(a, w)


# -------------------------------------------------------------------------------------------------
# generalization


def test_sd_vs_gap(tmp_path):
    lrs = np.repeat([0.01, 0.03, 0.1], 3)
    bs = np.tile([32, 128, 512], 3)
    m = np.arange(9.0)
    g = np.arange(9.0) * 0.01
    m[4] = np.nan  # a diverged run
    ax = plot.sd_vs_gap(m, g, lr=lrs, batch_size=bs, tau=True)
    assert isinstance(ax, Axes)
    sc = ax.collections[0]
    assert sc.get_offsets().shape[0] == 8
    sizes = sc.get_sizes()
    assert sizes.min() < sizes.max()  # size grows with batch size
    assert "Kendall τ = 1 (n = 8)" in ax.get_title() and "1 diverged" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["B = 32", "B = 128", "B = 512"]
    assert len(ax.figure.axes) == 2  # the learning-rate colour bar
    _save(ax, tmp_path, "sdgap")


def test_sd_vs_gap_given_tau_and_plain():
    ax = plot.sd_vs_gap([1.0, 2.0], [0.1, 0.2], tau=-0.25)
    assert ax.get_title() == "Kendall τ = -0.25 (n = 2)"
    ax = plot.sd_vs_gap([1.0, 2.0], [0.1, 0.2])
    assert ax.get_title() == "" and ax.get_legend() is None


def test_sd_vs_gap_bad_inputs():
    with pytest.raises(ValueError, match="gap"):
        plot.sd_vs_gap([1.0, 2.0], [0.1])
    with pytest.raises(ValueError, match="lr"):
        plot.sd_vs_gap([1.0, 2.0], [0.1, 0.2], lr=[0.1])
    with pytest.raises(ValueError, match="batch_size"):
        plot.sd_vs_gap([1.0, 2.0], [0.1, 0.2], batch_size=[32, 64, 128])
    with pytest.raises(ValueError, match="lr"):
        plot.sd_vs_gap([1.0, 2.0], [0.1, 0.2], lr=[0.1, 0.0])


# -------------------------------------------------------------------------------------------------
# attractor and ladder


def _henon_orbit(n):
    x = np.empty(n)
    y = np.empty(n)
    xx, yy = 0.1, 0.1
    for i in range(n):
        xx, yy = 1 - 1.4 * xx * xx + yy, 0.3 * xx
        x[i], y[i] = xx, yy
    return np.column_stack([x, y])


def test_attractor_scatter_and_hist(tmp_path):
    P = _henon_orbit(5000)
    ax = plot.attractor(P)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 1 and ax.lines[0].get_rasterized()
    assert ax.lines[0].get_xdata().size == 5000
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x₀", "x₁")
    _save(ax, tmp_path, "att_scatter")
    ax = plot.attractor(P, method="hist", bins=50, labels=("x", "y"))
    assert len(ax.collections) == 1 and len(ax.lines) == 0
    assert ax.get_xlabel() == "x"
    _save(ax, tmp_path, "att_hist")


def test_attractor_many_points_fast(tmp_path):
    import time

    rng = np.random.default_rng(0)
    P = rng.normal(size=(600_000, 3))
    P[::1000] = np.nan
    for method in ("scatter", "hist"):
        t0 = time.perf_counter()
        ax = plot.attractor(P, method=method, dims=(0, 2))
        ax.figure.savefig(tmp_path / f"big_{method}.png", dpi=60)
        assert time.perf_counter() - t0 < 10.0  # ~0.5 s on one core
        plt.close(ax.figure)
    ax = plot.attractor(P)  # auto: histogram above 2e5 points
    assert len(ax.lines) == 0 and len(ax.collections) == 1


def test_attractor_bad_inputs():
    with pytest.raises(ValueError, match="points"):
        plot.attractor(np.zeros(10))
    with pytest.raises(ValueError, match="dims"):
        plot.attractor(np.zeros((10, 2)), dims=(0, 2))
    with pytest.raises(ValueError, match="method"):
        plot.attractor(np.zeros((10, 2)), method="kde")
    with pytest.raises(ValueError, match="labels"):
        plot.attractor(np.zeros((10, 2)), labels=("x",))


def test_ladder_from_result(tmp_path):
    ms = (1, 2, 4, 8)
    res = rdsim.LadderResult(ms=ms, dims={1: 1.8, 2: 1.6, 4: 1.5, 8: 1.45},
                             stderr={1: 0.05, 2: 0.04, 4: 0.03, 8: float("nan")}, Lambda={}, increments={},
                             points=np.zeros((4, 2)), n_samples=4)
    ax = plot.ladder(res, d_ky=(1.2583, 0.01), sd=2.0)
    assert isinstance(ax, Axes)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["D_KY = 1.258", "SD = 2", "D⁽ᵐ⁾"]
    assert ax.get_xscale() == "log"
    cont = ax.containers[0]
    np.testing.assert_allclose(cont.lines[0].get_xdata(), ms)
    np.testing.assert_allclose(cont.lines[0].get_ydata(), [1.8, 1.6, 1.5, 1.45])
    assert cont.has_yerr
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    _save(ax, tmp_path, "ladder")


def test_ladder_from_dict_and_lyapunov_result():
    ax = plot.ladder({4: 1.5, 1: 1.8}, d_ky=_lyap_result())
    np.testing.assert_allclose(ax.containers[0].lines[0].get_xdata(), [1, 4])
    assert not ax.containers[0].has_yerr
    assert "D_KY = 2.33" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_ladder_bad_inputs():
    with pytest.raises(ValueError, match="result"):
        plot.ladder({})
    with pytest.raises(ValueError, match="result"):
        plot.ladder({0: 1.0})
    with pytest.raises(ValueError, match="result"):
        plot.ladder([1.0, 2.0])
    with pytest.raises(ValueError, match="stderr"):
        plot.ladder({1: 1.0}, stderr={2: 0.1})
    with pytest.raises(ValueError, match="sd"):
        plot.ladder({1: 1.0}, sd=(1.0, 0.1, 3))
    with pytest.raises(ValueError, match="d_ky"):
        plot.ladder({1: 1.0}, d_ky=math.nan)


def test_import_does_not_load_pyplot():
    import subprocess
    import sys

    code = "import sys, rdsim.plot; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
