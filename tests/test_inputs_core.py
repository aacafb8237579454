"""Input hardening (issue 12): bad inputs to optim, losses, systems, ladder, plot get named errors."""

import importlib
import math
import warnings

import matplotlib
import numpy as np
import pytest

import rdsim
from rdsim import losses as L
from rdsim import optim as O
from rdsim import systems as S
from rdsim._validate import UserFunctionError, call_user, check_seed

matplotlib.use("Agg")


@pytest.mark.parametrize("build, name, error", [
    (lambda: O.gd("0.1"), "lr", TypeError),
    (lambda: O.gd(True), "lr", TypeError),
    (lambda: O.gd(None), "lr", TypeError),
    (lambda: O.gd([0.1]), "lr", TypeError),
    (lambda: O.gd(math.inf), "lr", ValueError),
    (lambda: O.sgd(0.1, 4, sampling=None), "sampling", TypeError),
    (lambda: O.momentum(0.1, beta="0.9"), "beta", TypeError),
    (lambda: O.adam(0.1, decoupled="yes"), "decoupled", TypeError),
    (lambda: O.adam(0.1, decoupled=1), "decoupled", TypeError),
    (lambda: O.adam(0.1, eps=math.nan), "eps", ValueError),
    (lambda: O.adam(0.1, eps="1e-8"), "eps", TypeError),
    (lambda: O.adam(0.1, weight_decay="0"), "weight_decay", TypeError),
    (lambda: O.OptimizerSpec("adam", "0.1"), "lr", TypeError),
    (lambda: O.OptimizerSpec("rmsprop", 0.1), "kind", ValueError),
])
def test_optimizer_spec_inputs(build, name, error):
    with pytest.raises(error, match=rf"^{name}:"):
        build()


def test_adam_eps_zero_accepted_like_torch():
    assert O.adam(0.1, eps=0).eps == 0.0


@pytest.mark.parametrize("build, name, error", [
    (lambda: L.least_squares(np.empty((0, 3)), np.empty(0)), "X", ValueError),
    (lambda: L.least_squares(np.empty((3, 0)), np.ones(3)), "X", ValueError),
    (lambda: L.least_squares([["a", "b"]], [1.0]), "X", TypeError),
    (lambda: L.least_squares(1j * np.ones((2, 2)), [1.0, 2.0]), "X", TypeError),
    (lambda: L.least_squares(np.ones((2, 2)), np.ones((2, 2))), "y", ValueError),
    (lambda: L.quadratic(np.empty((0, 0))), "A", ValueError),
    (lambda: L.quadratic("abc"), "A", TypeError),
    (lambda: L.cosine_landscape(A="2"), "A", TypeError),
    (lambda: L.cosine_landscape(k=math.nan), "k", ValueError),
    (lambda: L.dln(np.ones((2, 2)), np.ones(2), init=math.nan), "init", ValueError),
    (lambda: L.least_squares(np.ones((2, 2)), np.ones(2)).hvp(np.ones(2), np.ones(3)), "V", ValueError),
])
def test_loss_inputs(build, name, error):
    with pytest.raises(error, match=rf"^{name}:"):
        build()


@pytest.mark.parametrize("build, name, error", [
    (lambda: S.henon(a="1.4"), "a", TypeError),
    (lambda: S.logistic(r=math.nan), "r", ValueError),
    (lambda: S.gaussian_matrix_product(2.5), "n", TypeError),
    (lambda: S.gaussian_matrix_product(2, sigma=0.0), "sigma", ValueError),
    (lambda: S.lorenz96(N=3), "N", ValueError),
    (lambda: S.lorenz(dt=-0.01), "dt", ValueError),
    (lambda: S.noisy_pitchfork(sigma=0.0), "sigma", ValueError),
    (lambda: S.linear_map(np.empty((0, 0))), "A", ValueError),
])
def test_system_inputs(build, name, error):
    with pytest.raises(error, match=rf"^{name}:"):
        build()


@pytest.mark.parametrize("seed, error", [(-1, ValueError), ("abc", TypeError), (1.5, TypeError),
                                         (True, TypeError), (2 ** 64, ValueError)])
def test_seed_named(seed, error):
    with pytest.raises(error, match="^seed:"):
        check_seed(seed)
    with pytest.raises(error, match="^seed:"):
        rdsim.dimension_ladder(S.henon(), None, ms=(1,), n_samples=2, transient=0, seed=seed)
    with pytest.raises(error, match="^seed:"):
        rdsim.rds_sharpness(S.henon(), np.zeros((1, 2)), seed=seed)


def test_ladder_reports_divergence():
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = rdsim.dimension_ladder(S.logistic(5.0), None, ms=(1, 2), n_samples=4, transient=10)
    assert r.status == "diverged" and r.diverged_at is not None
    assert all(math.isnan(v) for v in r.values())
    d = rdsim.dimension_ladder(S.logistic(5.0), None, ms=(1, 2), n_samples=4, transient=10,
                               return_details=True)
    assert d.status == "diverged" and d.diverged_at == r.diverged_at
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = rdsim.dimension_ladder(S.henon(), None, ms=(1,), n_samples=2, transient=10)
    assert ok.status == "ok" and ok == dict(ok)


def test_user_function_error_chained():
    def bad(x):
        raise KeyError("boom")

    with pytest.raises(UserFunctionError, match="^step:.*KeyError.*at step 7") as info:
        call_user("step", bad, 1.0, step=7)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("call, name", [
    (lambda P: rdsim.plot.attractor(np.empty((0, 2))), "points"),
    (lambda P: rdsim.plot.attractor(np.full((5, 2), np.nan)), "points"),
    (lambda P: rdsim.plot.attractor(np.ones((5, 2)), bins=0), "bins"),
    (lambda P: rdsim.plot.exponents_vs_lr([0.1, 0.2], [np.nan, np.nan]), "exponents"),
    (lambda P: rdsim.plot.sd_vs_gap([np.nan], [0.1]), "measure"),
    (lambda P: rdsim.plot.ladder({1: np.nan, 2: np.nan}), "result"),
    (lambda P: rdsim.plot.bifurcation([], np.empty((0, 3))), "params|orbits"),
])
def test_plot_inputs(call, name):
    importlib.import_module("rdsim.plot")  # rdsim.plot is imported lazily
    with pytest.raises(ValueError, match=rf"^({name})"):
        call(None)
