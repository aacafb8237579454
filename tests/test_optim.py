"""Optimizer specs, minibatch sampling, toy losses and optimizer maps (MATH.md §1, §2, §7).

Numbers, not shapes: exact GD / momentum spectra, tangents against finite differences for every
optimizer on every toy loss, one-step agreement with torch.optim in float64, and the minibatch
sequence replayed by hand through a numpy QR loop. Every random thing is seeded.

numba compiles the QR engine once per optimizer map, so the maps are built once per module and
shared (see ``system``).
"""

import dataclasses
import math

import numpy as np
import pytest

import rdsim
from rdsim import losses as L
from rdsim import optim as O
from rdsim._lyapunov import _seeds, start_block
from rdsim.testing import check_system

# --- shared data and systems --------------------------------------------------------------------

QUAD_ALPHAS = np.array([0.5, 1.5, 3.0, 7.0])


def _orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _quad_matrix():
    O_ = _orthogonal(4, seed=1)
    A = O_ @ np.diag(QUAD_ALPHAS) @ O_.T
    return 0.5 * (A + A.T)  # exactly symmetric, not diagonal


def _ls_data(n=12, p=3, seed=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    y = X @ rng.standard_normal(p) + 0.3 * rng.standard_normal(n)
    return X, y


def _dln_data(n=10, p=3, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    y = X @ np.array([1.0, 0.0, -0.5])[:p] + 0.1 * rng.standard_normal(n)
    return X, y


@pytest.fixture(scope="module")
def toy_losses():
    return {
        "quadratic": L.quadratic(_quad_matrix()),
        "least_squares": L.least_squares(*_ls_data()),
        "dln2": L.dln(*_dln_data(), depth=2, init=0.5),
        "cosine": L.cosine_landscape(A=2.0, k=4.0, dim=2),
    }


# per loss: (learning rate for GD/SGD/momentum, learning rate for Adam, minibatch size, start)
LOSS_SETTINGS = {
    "quadratic": (0.3, 0.02, 1, np.array([1.0, -0.5, 0.3, 0.8])),
    "least_squares": (0.2, 0.02, 4, np.array([0.5, -1.0, 0.2])),
    "dln2": (0.1, 0.02, 4, np.array([0.6, 0.4, 0.5, 0.7, -0.3, 0.5])),
    "cosine": (0.02, 0.02, 1, np.array([0.3, -0.2])),
}

OPTIMIZERS = ("gd", "sgd_iid", "sgd_epoch", "momentum", "adam", "adamw")


def _spec(opt, loss_name):
    lr, lr_adam, b, _ = LOSS_SETTINGS[loss_name]
    return {
        "gd": lambda: O.gd(lr),
        "sgd_iid": lambda: O.sgd(lr, b),
        "sgd_epoch": lambda: O.sgd(lr, b, sampling="epoch"),
        "momentum": lambda: O.momentum(lr, beta=0.9, batch_size=b),
        "adam": lambda: O.adam(lr_adam),
        "adamw": lambda: O.adam(lr_adam, weight_decay=0.1, decoupled=True, batch_size=b),
        "adam_l2": lambda: O.adam(lr_adam, weight_decay=0.1, decoupled=False, batch_size=b),
    }[opt]()


@pytest.fixture(scope="module")
def system(toy_losses):
    """system(loss_name, opt_name): the optimizer map, built once per module."""
    cache = {}

    def get(loss_name, opt):
        key = (loss_name, opt)
        if key not in cache:
            cache[key] = rdsim.optimizer_map(toy_losses[loss_name], _spec(opt, loss_name))
        return cache[key]

    return get


# --- specs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, name, error", [
    (lambda: O.gd(0.0), "lr", ValueError),
    (lambda: O.gd(-0.1), "lr", ValueError),
    (lambda: O.gd(math.nan), "lr", ValueError),
    (lambda: O.gd(math.inf), "lr", ValueError),
    (lambda: O.gd("fast"), "lr", TypeError),
    (lambda: O.sgd(0.0, 2), "lr", ValueError),
    (lambda: O.momentum(0.1, beta=1.0), "beta", ValueError),
    (lambda: O.momentum(0.1, beta=-0.01), "beta", ValueError),
    (lambda: O.adam(0.1, beta1=1.0), "beta1", ValueError),
    (lambda: O.adam(0.1, beta1=-0.5), "beta1", ValueError),
    (lambda: O.adam(0.1, beta2=1.5), "beta2", ValueError),
    (lambda: O.adam(0.1, beta2=math.nan), "beta2", ValueError),
    (lambda: O.adam(0.1, eps=math.nan), "eps", ValueError),  # eps=0 is accepted, as by torch.optim
    (lambda: O.adam(0.1, eps=-1e-8), "eps", ValueError),
    (lambda: O.adam(0.1, weight_decay=-0.01), "weight_decay", ValueError),
    (lambda: O.adam(0.1, weight_decay=math.inf), "weight_decay", ValueError),
    (lambda: O.sgd(0.1, 0), "batch_size", ValueError),
    (lambda: O.sgd(0.1, -3), "batch_size", ValueError),
    (lambda: O.sgd(0.1, 2.0), "batch_size", TypeError),
    (lambda: O.sgd(0.1, True), "batch_size", TypeError),
    (lambda: O.sgd(0.1, None), "batch_size", ValueError),
    (lambda: O.momentum(0.1, batch_size=0), "batch_size", ValueError),
    (lambda: O.adam(0.1, batch_size="4"), "batch_size", TypeError),
    (lambda: O.sgd(0.1, 2, sampling="shuffle"), "sampling", ValueError),
    (lambda: O.momentum(0.1, batch_size=2, sampling="cyclic"), "sampling", ValueError),
    (lambda: O.adam(0.1, batch_size=2, sampling="IID"), "sampling", ValueError),
])
def test_spec_validation_names_the_argument(build, name, error):
    with pytest.raises(error, match=rf"^{name}:"):
        build()


def test_batch_size_above_data_size(toy_losses):
    ls = toy_losses["least_squares"]  # n = 12
    with pytest.raises(ValueError, match=r"batch_size: 13 exceeds the number of samples \(12\)"):
        rdsim.optimizer_map(ls, O.sgd(0.1, 13))
    with pytest.raises(ValueError, match="batch_size"):
        rdsim.optimizer_map(toy_losses["quadratic"], O.momentum(0.1, batch_size=2))  # n = 1
    with pytest.raises(ValueError, match="batch_size"):
        O.minibatch_sampler(O.sgd(0.1, 5), 4, np.random.default_rng(0))
    rdsim.optimizer_map(ls, O.sgd(0.1, 12))  # b = n is allowed


def test_spec_frozen_and_values():
    s = O.adam(1e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01, decoupled=True, batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 4
    assert (s.kind, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, s.decoupled, s.batch_size) == \
        ("adam", 1e-3, 0.8, 0.99, 1e-6, 0.01, True, 8)
    assert s == O.adam(1e-3, 0.8, 0.99, 1e-6, 0.01, True, 8) and hash(s) == hash(O.adam(1e-3, 0.8, 0.99, 1e-6, 0.01, True, 8))
    assert s != O.adam(1e-3, 0.8, 0.99, 1e-6, 0.01, False, 8)
    assert [O.gd(0.1).n_buffers, O.sgd(0.1, 2).n_buffers, O.momentum(0.1).n_buffers, s.n_buffers] == [0, 0, 1, 2]
    assert not O.gd(0.1).stochastic and O.sgd(0.1, 2).stochastic and not O.momentum(0.1).stochastic
    assert O.momentum(0.1).beta == 0.9 and O.momentum(0.1, 0.5).beta == 0.5
    assert isinstance(O.gd(1).lr, float) and O.gd(1).lr == 1.0


def test_spec_labels():
    assert O.gd(0.1).label() == "gd(lr=0.1)"
    assert O.sgd(0.05, 16).label() == "sgd(lr=0.05, b=16)"
    assert O.sgd(0.05, 16, sampling="epoch").label() == "sgd(lr=0.05, b=16, sampling=epoch)"
    assert O.momentum(0.1, 0.9).label() == "momentum(lr=0.1, beta=0.9)"
    assert O.momentum(0.1, 0.5, batch_size=4).label() == "momentum(lr=0.1, b=4, beta=0.5)"
    assert O.adam(1e-3).label() == "adam(lr=0.001, betas=(0.9, 0.999))"
    assert O.adam(1e-3, weight_decay=0.01).label() == "adam(lr=0.001, betas=(0.9, 0.999), wd=0.01)"
    assert O.adam(1e-3, weight_decay=0.01, decoupled=True).label() == \
        "adam(lr=0.001, betas=(0.9, 0.999), wd=0.01 (AdamW))"
    # distinct specs get distinct labels (they name systems and result tables)
    specs = [O.gd(0.1), O.sgd(0.1, 4), O.sgd(0.1, 4, "epoch"), O.momentum(0.1, batch_size=4),
             O.adam(0.1, batch_size=4), O.adam(0.1, weight_decay=0.1, batch_size=4),
             O.adam(0.1, weight_decay=0.1, decoupled=True, batch_size=4)]
    assert len({s.label() for s in specs}) == len(specs)


def test_optimizer_map_argument_errors(toy_losses):
    ls = toy_losses["least_squares"]
    with pytest.raises(TypeError, match="^loss:"):
        rdsim.optimizer_map(lambda x: x, O.gd(0.1))
    with pytest.raises(TypeError, match="^optimizer:"):
        rdsim.optimizer_map(ls, {"lr": 0.1})
    with pytest.raises(ValueError, match="^tangent:"):
        rdsim.optimizer_map(ls, O.adam(0.1), tangent="diagonal")
    with pytest.raises(ValueError, match="^tangent:"):
        rdsim.optimizer_map(ls, O.momentum(0.1), tangent="frozen")


# --- minibatch sampler ------------------------------------------------------------------------------


def test_iid_sampler_subsets_and_uniform_marginals():
    n, b, T = 10, 4, 20_000
    out = O.minibatch_sampler(O.sgd(0.1, b), n, np.random.default_rng(12345))(T)
    assert out.shape == (T, b) and out.dtype == np.float64
    assert np.array_equal(out, np.floor(out)) and out.min() >= 0 and out.max() <= n - 1
    assert np.all(np.diff(out, axis=1) > 0)  # sorted and distinct within each batch
    idx = out.astype(int)
    # marginals: each index is in a batch with probability p = b/n. The counts of a uniform
    # b-subset scheme have covariance T p (1-p) n/(n-1) (I - 11^T/n), so the statistic below is
    # approximately chi-square with n - 1 = 9 degrees of freedom (99.9% quantile 27.88)
    counts = np.bincount(idx.ravel(), minlength=n)
    p = b / n
    chi2 = float(np.sum((counts - T * p) ** 2) / (T * p * (1 - p) * n / (n - 1)))
    assert chi2 < 27.88, (chi2, counts)
    # pairs: each pair {i, j} is together with probability b(b-1)/(n(n-1)); 5-sigma bound per pair
    pair = np.zeros((n, n))
    for r in idx:
        pair[np.ix_(r, r)] += 1
    q = b * (b - 1) / (n * (n - 1))
    off = pair[~np.eye(n, dtype=bool)]
    assert np.max(np.abs(off - T * q)) < 5 * math.sqrt(T * q * (1 - q))
    # different seeds, different sequences; b = n is the whole data set every step
    other = O.minibatch_sampler(O.sgd(0.1, b), n, np.random.default_rng(1))(T)
    assert not np.array_equal(out, other)
    full = O.minibatch_sampler(O.sgd(0.1, n), n, np.random.default_rng(0))(3)
    assert np.array_equal(full, np.tile(np.arange(n, dtype=float), (3, 1)))
    assert O.minibatch_sampler(O.gd(0.1), n, np.random.default_rng(0))(5).shape == (5, 0)


@pytest.mark.parametrize("sampling", ["iid", "epoch"])
def test_sampler_chunk_invariance(sampling):
    spec = O.sgd(0.1, 3, sampling=sampling)
    n = 11  # 3 steps per epoch, one sample dropped each epoch
    whole = O.minibatch_sampler(spec, n, np.random.default_rng(7))(700)
    s = O.minibatch_sampler(spec, n, np.random.default_rng(7))
    parts = [s(k) for k in (1, 2, 5, 300, 256, 1, 135)]
    assert sum(p.shape[0] for p in parts) == 700
    assert np.array_equal(np.concatenate(parts), whole)


def test_epoch_sampler_covers_each_sample_once_per_epoch():
    n, b = 12, 4
    out = O.minibatch_sampler(O.sgd(0.1, b, "epoch"), n, np.random.default_rng(3))(3 * 50)
    epochs = out.reshape(50, 3 * b)  # n // b = 3 steps per epoch
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(n, dtype=float))
    assert len({tuple(e) for e in epochs}) > 40  # reshuffled every epoch
    assert np.all(np.diff(out, axis=1) > 0)
    # n not a multiple of b: n // b batches per epoch, no repeats within an epoch, a partial batch dropped
    n, b = 10, 3
    out = O.minibatch_sampler(O.sgd(0.1, b, "epoch"), n, np.random.default_rng(4))(3 * 400)
    epochs = out.reshape(400, 3 * b)
    assert all(len(set(e)) == 3 * b for e in epochs)
    dropped = [(set(range(n)) - set(e.astype(int))).pop() for e in epochs]
    assert set(dropped) == set(range(n))  # every sample is sometimes the one left out


# --- losses ---------------------------------------------------------------------------------------------


def _fd_grad(loss, x, idx, h=1e-5):
    g = np.empty(x.size)
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = h
        d1 = (loss.value(x + e, idx) - loss.value(x - e, idx)) / (2 * h)
        d2 = (loss.value(x + e / 2, idx) - loss.value(x - e / 2, idx)) / h
        g[j] = (4 * d2 - d1) / 3  # Richardson: O(h^4)
    return g


def _fd_hessian(loss, x, idx, h=1e-5):
    H = np.empty((x.size, x.size))
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = h
        d1 = (loss.grad(x + e, idx) - loss.grad(x - e, idx)) / (2 * h)
        d2 = (loss.grad(x + e / 2, idx) - loss.grad(x - e / 2, idx)) / h
        H[:, j] = (4 * d2 - d1) / 3
    return H


def _loss_cases():
    X, y = _ls_data(n=9, p=3, seed=21)
    Xd, yd = _dln_data(n=9, p=3, seed=22)
    return {
        "quadratic": (L.quadratic(_quad_matrix()), [None, [0]]),
        "least_squares": (L.least_squares(X, y), [None, [0, 3, 4, 8], [5]]),
        "dln1": (L.dln(Xd, yd, depth=1), [None, [1, 2, 6]]),
        "dln2": (L.dln(Xd, yd, depth=2), [None, [0, 2, 7, 8]]),
        "dln3": (L.dln(Xd, yd, depth=3), [None, [4], [1, 3, 5]]),
        "cosine": (L.cosine_landscape(A=2.0, k=4.0, dim=3), [None, [0]]),
    }


@pytest.mark.parametrize("name", ["quadratic", "least_squares", "dln1", "dln2", "dln3", "cosine"])
def test_loss_gradient_and_hessian_vs_finite_differences(name):
    loss, batches = _loss_cases()[name]
    rng = np.random.default_rng(5)
    for trial in range(3):
        x = rng.uniform(-1.2, 1.2, loss.dim)
        for idx in batches:
            g = loss.grad(x, idx)
            gfd = _fd_grad(loss, x, idx)
            np.testing.assert_allclose(g, gfd, rtol=0, atol=1e-8 * max(1.0, np.abs(gfd).max()))
            H = loss.hessian(x, idx)
            Hfd = _fd_hessian(loss, x, idx)
            np.testing.assert_allclose(H, Hfd, rtol=0, atol=1e-8 * max(1.0, np.abs(Hfd).max()))
            np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-13 * max(1.0, np.abs(H).max()))
            V = rng.standard_normal((loss.dim, 3))
            np.testing.assert_allclose(loss.hvp(x, V, idx), H @ V, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(loss.hvp(x, V[:, 0], idx), H @ V[:, 0], rtol=1e-13, atol=1e-13)
            if idx is not None and loss.n > 1:
                # the minibatch loss is the mean of the per-sample losses
                np.testing.assert_allclose(loss.value(x, idx), np.mean([loss.value(x, [i]) for i in idx]),
                                           rtol=1e-13)
                np.testing.assert_allclose(g, np.mean([loss.grad(x, [i]) for i in idx], axis=0),
                                           rtol=1e-12, atol=1e-14)
        if loss.n > 1:
            np.testing.assert_allclose(loss.value(x), loss.value(x, np.arange(loss.n)), rtol=1e-14)


def test_loss_values_match_their_formulas():
    rng = np.random.default_rng(6)
    A = _quad_matrix()
    q = L.quadratic(A)
    x = rng.standard_normal(4)
    assert q.dim == 4 and q.n == 1
    np.testing.assert_allclose(q.value(x), 0.5 * x @ A @ x, rtol=1e-14)
    np.testing.assert_allclose(q.grad(x), A @ x, rtol=1e-14)
    np.testing.assert_allclose(q.hessian(x), A, rtol=0, atol=1e-15)
    np.testing.assert_allclose(q.info["eigenvalues"], QUAD_ALPHAS, rtol=1e-13)

    X, y = _ls_data(n=9, p=3, seed=21)
    ls = L.least_squares(X, y)
    w = rng.standard_normal(3)
    assert (ls.dim, ls.n) == (3, 9)
    np.testing.assert_allclose(ls.value(w), np.sum((X @ w - y) ** 2) / 18, rtol=1e-14)
    B = [2, 5, 6]
    np.testing.assert_allclose(ls.value(w, B), np.sum((X[B] @ w - y[B]) ** 2) / 6, rtol=1e-14)
    np.testing.assert_allclose(ls.hessian(w, B), X[B].T @ X[B] / 3, rtol=1e-13)
    np.testing.assert_allclose(ls.info["eigenvalues"], np.linalg.eigvalsh(X.T @ X / 9), rtol=1e-13)

    Xd, yd = _dln_data(n=9, p=3, seed=22)
    d3 = L.dln(Xd, yd, depth=3)
    wv = rng.standard_normal(9)
    beta = wv[:3] * wv[3:6] * wv[6:]
    assert (d3.dim, d3.n, d3.info["depth"], d3.info["p"]) == (9, 9, 3, 3)
    np.testing.assert_allclose(d3.value(wv), np.sum((Xd @ beta - yd) ** 2) / 18, rtol=1e-14)
    gb = Xd.T @ (Xd @ beta - yd) / 9
    np.testing.assert_allclose(d3.grad(wv), np.concatenate([gb * wv[3:6] * wv[6:], gb * wv[:3] * wv[6:],
                                                            gb * wv[:3] * wv[3:6]]), rtol=1e-12)
    np.testing.assert_allclose(L.dln(Xd, yd, depth=2).x0, np.full(6, 0.1))
    np.testing.assert_allclose(L.dln(Xd, yd, depth=2, init=0.7).x0, np.full(6, 0.7))

    c = L.cosine_landscape(A=1.5, k=3.0, dim=3)
    xc = rng.standard_normal(3)
    np.testing.assert_allclose(c.value(xc), 0.5 * xc @ xc - 1.5 * np.prod(np.cos(3.0 * xc)), rtol=1e-14)
    np.testing.assert_allclose(c.hessian(np.zeros(3)), (1 + 1.5 * 9.0) * np.eye(3), rtol=1e-14)


def test_dln_depth_one_is_least_squares():
    X, y = _ls_data(n=9, p=3, seed=23)
    ls, d1 = L.least_squares(X, y), L.dln(X, y, depth=1)
    assert (d1.dim, d1.n) == (ls.dim, ls.n)
    rng = np.random.default_rng(8)
    for _ in range(4):
        w = rng.standard_normal(3)
        for idx in (None, [0, 4, 8], [2]):
            assert d1.value(w, idx) == pytest.approx(ls.value(w, idx), rel=1e-15)
            np.testing.assert_allclose(d1.grad(w, idx), ls.grad(w, idx), rtol=1e-14, atol=1e-15)
            np.testing.assert_allclose(d1.hessian(w, idx), ls.hessian(w, idx), rtol=1e-14, atol=1e-15)


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match="^A:.*square"):
        L.quadratic(np.ones((2, 3)))
    with pytest.raises(ValueError, match="^A:.*square"):
        L.quadratic(np.ones(3))
    with pytest.raises(ValueError, match="^A:.*symmetric"):
        L.quadratic(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="^A:.*finite"):
        L.quadratic(np.diag([1.0, np.inf]))
    with pytest.raises(ValueError, match="^A:.*finite"):
        L.quadratic(np.diag([1.0, np.nan]))
    X, y = _ls_data(n=6, p=2, seed=0)
    for make in (L.least_squares, lambda X, y: L.dln(X, y, depth=2)):
        with pytest.raises(ValueError, match="^X:"):
            make(X[:, 0], y)
        with pytest.raises(ValueError, match="^y:.*6 targets"):
            make(X, y[:5])
        Xn = X.copy()
        Xn[2, 1] = np.nan
        with pytest.raises(ValueError, match="finite"):
            make(Xn, y)
        yi = y.copy()
        yi[0] = np.inf
        with pytest.raises(ValueError, match="finite"):
            make(X, yi)
    for depth in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="^depth:"):
            L.dln(X, y, depth=depth)
    with pytest.raises(ValueError, match="^init:"):
        L.dln(X, y, depth=2, init=np.ones(3))
    with pytest.raises(ValueError, match="^dim:"):
        L.cosine_landscape(dim=0)
    ls = L.least_squares(X, y)
    with pytest.raises(ValueError, match="^x:"):
        ls.grad(np.ones(3))
    with pytest.raises(ValueError, match="^idx:"):
        ls.value(np.ones(2), [0, 6])
    with pytest.raises(ValueError, match="^idx:"):
        ls.value(np.ones(2), [-1])
    with pytest.raises(ValueError, match="^idx:"):
        ls.value(np.ones(2), [0.5])


# --- exactness: GD, momentum, Adam ------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["quadratic", "least_squares"])
def test_gd_spectrum_is_log_abs_one_minus_eta_alpha(system, toy_losses, loss_name):
    sysm = system(loss_name, "gd")
    loss, lr = toy_losses[loss_name], LOSS_SETTINGS[loss_name][0]
    expected = np.sort(np.log(np.abs(1.0 - lr * loss.info["eigenvalues"])))[::-1]
    if loss_name == "quadratic":  # |1 - 0.3 alpha| = 0.85, 0.55, 0.1, 1.1: one expanding direction
        np.testing.assert_allclose(expected, np.log([1.1, 0.85, 0.55, 0.1]), atol=1e-14)
    assert len(set(np.round(expected, 6))) == loss.dim  # distinct: the block aligns quickly
    res = rdsim.lyapunov_spectrum(sysm, LOSS_SETTINGS[loss_name][3], 1000, transient=300, seed=4)
    assert res.status == "ok"
    np.testing.assert_allclose(res.exponents, expected, rtol=0, atol=1e-8)
    # constant Jacobian: every block gives the same per-step value, and the Jacobian is I - eta A
    np.testing.assert_allclose(res.stderr, 0.0, atol=1e-10)
    x = np.random.default_rng(0).standard_normal(loss.dim)
    np.testing.assert_allclose(sysm.jacobian(x), np.eye(loss.dim) - lr * loss.hessian(x), rtol=0, atol=1e-15)


def test_momentum_spectrum_is_log_abs_eig_of_its_jacobian(toy_losses):
    loss = toy_losses["quadratic"]
    A, d = _quad_matrix(), 4
    lr, beta = 0.1, 0.3
    sysm = rdsim.optimizer_map(loss, O.momentum(lr, beta))
    J = np.block([[np.eye(d) - lr * A, -lr * beta * np.eye(d)], [A, beta * np.eye(d)]])
    np.testing.assert_allclose(sysm.jacobian(np.arange(2 * d, dtype=float)), J, rtol=0, atol=1e-15)
    mods = np.sort(np.abs(np.linalg.eigvals(J)))[::-1]
    # per alpha: mu^2 - (1 + beta - lr alpha) mu + beta = 0. alpha = 0.5, 1.5 give real pairs
    # (0.926, 0.324), (0.75, 0.4); alpha = 3, 7 complex pairs of modulus sqrt(beta), four equal values
    assert np.sum(np.abs(mods - math.sqrt(beta)) < 1e-9) == 4
    expected = np.log(mods)
    res = rdsim.lyapunov_spectrum(sysm, np.ones(d), 20_000, transient=500, seed=1)
    assert res.status == "ok"
    # distinct real moduli: exact once aligned with the Schur vectors
    np.testing.assert_allclose(res.exponents[[0, 1, 6, 7]], expected[[0, 1, 6, 7]], rtol=0, atol=1e-8)
    # the four exponents of the two rotating planes (equal modulus, a non-normal block) only
    # converge like 1/T; their sum is exact (log|det| of the invariant subspace)
    np.testing.assert_allclose(res.exponents[2:6], expected[2:6], rtol=0, atol=1e-3)
    assert res.exponents[2:6].sum() == pytest.approx(2 * math.log(beta), abs=1e-9)
    assert res.exponents.sum() == pytest.approx(d * math.log(beta), abs=1e-10)  # det J = beta^d


@pytest.mark.parametrize("loss_name", ["least_squares", "dln2"])
@pytest.mark.parametrize("opt", ["adam", "adamw", "adam_l2"])
def test_adam_exact_tangent_vs_finite_differences(system, loss_name, opt):
    sysm = system(loss_name, opt)
    assert sysm.dim == sysm.tangent_dim == 3 * sysm.n_params
    report = check_system(sysm, LOSS_SETTINGS[loss_name][3], n_points=4, spacing=25, n_sum_steps=200, seed=2)
    assert report.ok, str(report)
    assert not report.checks["tangent_vs_finite_differences"][1].startswith("skipped")


@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_frozen_tangent(toy_losses, wd, decoupled):
    loss = toy_losses["least_squares"]
    d = loss.dim
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
    spec = O.adam(lr, b1, b2, eps, weight_decay=wd, decoupled=decoupled, batch_size=4)
    frozen = rdsim.optimizer_map(loss, spec, tangent="frozen")
    exact = rdsim.optimizer_map(loss, spec)
    assert (frozen.dim, frozen.tangent_dim, exact.tangent_dim) == (3 * d, d, 3 * d)
    assert frozen.tangent_kind == "frozen"
    sampler = frozen.noise_sampler(np.random.default_rng(0))
    z = frozen.initial_state(np.array([0.5, -1.0, 0.2]))
    for xi in sampler(12):
        z_next = frozen.step(z, xi)
        np.testing.assert_array_equal(z_next, exact.step(z, xi))  # same update, only the tangent differs
        t, idx = xi[0], xi[1:]
        P = np.sqrt(z_next[2 * d:] / (1 - b2 ** t)) + eps  # preconditioner from the state after the step
        H = loss.hessian(z[:d], idx)
        l2 = 0.0 if decoupled else wd
        shrink = 1 - lr * wd if decoupled else 1.0
        expected = shrink * np.eye(d) - lr * (H + l2 * np.eye(d)) / P[:, None]
        np.testing.assert_allclose(frozen.jacobian(z, xi), expected, rtol=1e-13, atol=1e-15)
        z = z_next
    report = check_system(frozen, np.array([0.5, -1.0, 0.2]), n_points=2, spacing=5)
    assert report.checks["tangent_vs_finite_differences"][1].startswith("skipped")
    if wd == 0.0:
        res = rdsim.lyapunov_spectrum(frozen, np.array([0.5, -1.0, 0.2]), 300, seed=0)
        assert res.status == "ok" and res.exponents.shape == (d,) and np.all(np.isfinite(res.exponents))


# --- every optimizer on every toy loss: tangent vs finite differences ------------------------------


@pytest.mark.parametrize("loss_name", ["quadratic", "least_squares", "dln2", "cosine"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_tangent_vs_finite_differences(system, toy_losses, loss_name, opt):
    sysm = system(loss_name, opt)
    loss = toy_losses[loss_name]
    assert sysm.n_params == loss.dim
    assert sysm.dim == loss.dim * (1 + sysm.spec.n_buffers) == sysm.tangent_dim
    assert sysm.noise_dim == (sysm.spec.batch_size or 0) + (1 if sysm.spec.kind == "adam" else 0)
    report = check_system(sysm, LOSS_SETTINGS[loss_name][3], n_points=3, spacing=30, n_sum_steps=200, seed=1)
    assert report.ok, str(report)
    assert not report.checks["tangent_vs_finite_differences"][1].startswith("skipped")


# --- the updates are torch.optim's ------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd_iid", "momentum", "adam", "adamw", "adam_l2"])
def test_updates_match_torch_optim(system, toy_losses, opt):
    torch = pytest.importorskip("torch")
    sysm = system("least_squares", opt)
    spec, loss = sysm.spec, toy_losses["least_squares"]
    X, y = (torch.tensor(a, dtype=torch.float64) for a in loss.data)
    d = loss.dim
    x0 = np.array([0.5, -1.0, 0.2])
    w = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    if spec.kind == "sgd":
        topt = torch.optim.SGD([w], lr=spec.lr)
    elif spec.kind == "momentum":
        topt = torch.optim.SGD([w], lr=spec.lr, momentum=spec.beta)
    else:
        cls = torch.optim.AdamW if spec.decoupled else torch.optim.Adam
        topt = cls([w], lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                   weight_decay=spec.weight_decay, foreach=False)
    z = sysm.initial_state(x0)
    noise = sysm.noise_sampler(np.random.default_rng(11))(6)
    adam = spec.kind == "adam"
    for t, xi in enumerate(noise, start=1):
        idx = xi[1:] if adam else xi
        rows = torch.arange(loss.n) if idx.size == 0 else torch.tensor(idx.astype(np.int64))
        topt.zero_grad()
        tl = 0.5 * ((X[rows] @ w - y[rows]) ** 2).mean()
        tl.backward()
        np.testing.assert_allclose(w.grad.numpy(), loss.grad(z[:d], None if idx.size == 0 else idx),
                                   rtol=1e-13, atol=1e-15)
        topt.step()
        z = sysm.step(z, xi)
        np.testing.assert_allclose(z[:d], w.detach().numpy(), rtol=1e-12, atol=1e-14)
        state = topt.state[w]
        if spec.kind == "momentum":
            np.testing.assert_allclose(z[d:], state["momentum_buffer"].numpy(), rtol=1e-12, atol=1e-14)
        if adam:
            assert xi[0] == t == float(state["step"])
            np.testing.assert_allclose(z[d:2 * d], state["exp_avg"].numpy(), rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(z[2 * d:], state["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-16)
    assert np.max(np.abs(z[:d] - x0)) > 1e-3  # the parameters did move


# --- x0 handling, divergence, seeds ---------------------------------------------------------------------


def test_x0_parameters_or_full_state(system, toy_losses):
    mom = system("least_squares", "momentum")
    adam = system("least_squares", "adam")
    p = np.array([0.5, -1.0, 0.2])
    np.testing.assert_array_equal(mom.initial_state(p), np.concatenate([p, np.zeros(3)]))
    np.testing.assert_array_equal(adam.initial_state(p), np.concatenate([p, np.zeros(6)]))
    full = np.concatenate([p, [0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(mom.initial_state(full), full)
    np.testing.assert_array_equal(mom.initial_state(None), np.zeros(6))  # least_squares' default x0 = 0
    r1 = rdsim.lyapunov_spectrum(mom, p, 300, seed=5)
    r2 = rdsim.lyapunov_spectrum(mom, np.concatenate([p, np.zeros(3)]), 300, seed=5)
    np.testing.assert_array_equal(r1.exponents, r2.exponents)
    np.testing.assert_array_equal(r1.x_final, r2.x_final)
    r3 = rdsim.lyapunov_spectrum(mom, full, 300, seed=5)
    assert not np.array_equal(r3.x_final, r1.x_final)  # a non-zero momentum buffer is used
    with pytest.raises(ValueError, match="^x0:.*shape"):
        mom.initial_state(np.ones(4))
    with pytest.raises(ValueError, match="^x0:"):
        rdsim.lyapunov_spectrum(mom, np.ones(5), 10)
    with pytest.raises(ValueError, match="^x0:.*finite"):
        mom.initial_state(np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="^x0:.*non-negative"):
        adam.initial_state(np.concatenate([p, np.zeros(3), [0.1, -1e-3, 0.2]]))
    with pytest.raises(TypeError, match="^x0:"):
        mom.initial_state(["a", "b", "c"])
    gd = system("least_squares", "gd")
    np.testing.assert_array_equal(gd.initial_state(p), p)


def test_gd_beyond_two_over_lambda_max_diverges(toy_losses):
    loss = toy_losses["quadratic"]  # alpha_max = 7
    sysm = rdsim.optimizer_map(loss, O.gd(4.0 / 7.0))  # 1 - eta alpha_max = -3
    res = rdsim.lyapunov_spectrum(sysm, np.ones(4), 5000, transient=10, seed=0)
    assert res.status == "diverged" and res.message.startswith("the state")
    # |x_t| ~ c 3^t overflows after about log(1.8e308) / log 3 = 646 steps
    assert 600 < res.diverged_at < 700
    assert np.all(np.isnan(res.exponents)) and np.all(np.isfinite(res.x_final))
    # just below the threshold it is fine: |1 - eta alpha_max| = 0.96
    stable = rdsim.optimizer_map(loss, O.gd(1.96 / 7.0))
    ok = rdsim.lyapunov_spectrum(stable, np.ones(4), 500, transient=300, seed=0)
    assert ok.status == "ok" and ok.exponents[0] == pytest.approx(math.log(0.96), abs=1e-8)


def test_same_seed_same_sgd_spectrum(system):
    sysm = system("least_squares", "sgd_iid")
    x0 = LOSS_SETTINGS["least_squares"][3]
    a = rdsim.lyapunov_spectrum(sysm, x0, 3000, transient=100, seed=9)
    b = rdsim.lyapunov_spectrum(sysm, x0, 3000, transient=100, seed=9)
    c = rdsim.lyapunov_spectrum(sysm, x0, 3000, transient=100, seed=10)
    assert a.status == b.status == c.status == "ok"
    for f in ("exponents", "stderr", "history", "x_final", "block_means"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert not np.array_equal(a.exponents, c.exponents)
    # two seeds agree within their statistical error (same RDS, different noise)
    assert np.all(np.abs(a.exponents - c.exponents) < 6 * np.hypot(a.stderr, c.stderr) + 1e-3)


@pytest.mark.parametrize("opt", ["sgd_iid", "sgd_epoch"])
def test_spectrum_replays_the_minibatch_sequence(system, toy_losses, opt):
    """The engine's SGD spectrum equals a numpy QR loop over I - eta H_B for the batches B_t that
    minibatch_sampler draws from the run's noise generator (least squares: H_B is constant in w)."""
    sysm = system("least_squares", opt)
    loss, lr = toy_losses["least_squares"], sysm.spec.lr
    T, seed = 1500, 13
    res = rdsim.lyapunov_spectrum(sysm, LOSS_SETTINGS["least_squares"][3], T, seed=seed)
    assert res.status == "ok"
    block_rng, noise_rng = _seeds(seed)
    Q = start_block(loss.dim, loss.dim, block_rng)
    batches = O.minibatch_sampler(sysm.spec, loss.n, noise_rng)(T)
    if opt == "sgd_epoch":
        epochs = batches[: (T // 3) * 3].reshape(-1, 12)  # n = 12, b = 4: 3 steps per epoch
        assert all(np.array_equal(np.sort(e), np.arange(12.0)) for e in epochs)
    w = np.zeros(loss.dim)
    sums = np.zeros(loss.dim)
    for B in batches:
        Q, R = np.linalg.qr((np.eye(loss.dim) - lr * loss.hessian(w, B)) @ Q)
        sums += np.log(np.abs(np.diag(R)))
    expected = np.sort(sums / T)[::-1]
    np.testing.assert_allclose(res.exponents, expected, rtol=0, atol=1e-10)
    # and SGD's spectrum is not GD's: the minibatch noise changes it
    gd_exps = np.sort(np.log(np.abs(1 - lr * loss.info["eigenvalues"])))[::-1]
    assert np.max(np.abs(res.exponents - gd_exps)) > 1e-2
