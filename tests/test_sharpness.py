"""The sharpness dimension (MATH.md §4): the formula, every estimator, both backends, bad input."""

import numpy as np
import pytest
import torch
from torch import nn

import rdsim
import rdsim.torch as rt
from models import MLP, DiagonalLinearNetwork, sparse_regression
from rdsim._dimension import weighted_kaplan_yorke
from rdsim._sharpness import _minibatches, pseudo_spectrum

F = nn.functional


def _mse_half(out, target):
    return 0.5 * ((out - target) ** 2).mean()


# --- the formula ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lambdas, expected", [
    ([0.5, -0.1, -1.0], 2.4),            # S_2 = 0.4, 2 + 0.4 / 1
    ([1.0, -1.0, -1.0], 2.0),            # a sum of exactly zero counts
    ([1.0, 1.0, 1.0], 3.0),              # all expanding: the full dimension
    ([-1.0, -2.0], 0.0),                 # all contracting
    ([0.0, 0.0, -1.0], 2.0),             # neutral directions count
    ([0.3, -np.inf], 1.0),               # a singular direction: S_1 / inf = 0
    ([-0.2, 0.5, -0.4], 2.75),           # unsorted input is sorted: 0.5 - 0.2 = 0.3, 2 + 0.3/0.4 = 2.75
])
def test_formula_hand_worked(lambdas, expected):
    assert float(rdsim.sharpness_dimension(lambdas)) == pytest.approx(expected, abs=1e-12)


def test_weighted_formula_of_the_pseudo_spectrum():
    from rdsim._dimension import weighted_kaplan_yorke

    # D = sum_{r<=j} w_r + (sum_{r<=j} w_r z_r) / |z_{j+1}|: values (0.2, -0.1, -1) with weights (3, 2, 5):
    # S_1 = 0.6, S_2 = 0.4, S_3 = -4.6 -> j = 2, D = 5 + 0.4 / 1 = 5.4
    assert float(weighted_kaplan_yorke([0.2, -0.1, -1.0], [3.0, 2.0, 5.0])) == pytest.approx(5.4)
    # equal-mass weights N/M reproduce the unweighted formula scaled by N/M on repeated values
    z = np.array([0.5, -0.1, -1.0])
    assert float(weighted_kaplan_yorke(z, np.full(3, 4.0))) == pytest.approx(4 * float(rdsim.sharpness_dimension(z)))


# --- GD on a quadratic: RDS sharpness = sorted log|1 - eta alpha| = the Lyapunov spectrum ----------

@pytest.fixture(scope="module")
def linear_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    alpha = np.linalg.eigvalsh((X.T @ X / 40).numpy())  # Hessian of (1/2n)||Xw - y||^2
    return X, y, alpha


def _linear_model():
    m = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        m.weight.fill_(0.1)
    return m


def test_gd_on_quadratic_torch_exact(linear_regression):
    X, y, alpha = linear_regression
    lr = 1.9 / alpha.max() * 1.3  # above 2/lambda_max for the top direction only
    exact = np.sort(np.log(np.abs(1 - lr * alpha)))[::-1]
    loss = lambda out, t: _mse_half(out.squeeze(-1), t)  # noqa: E731
    res = rt.sharpness_dimension(_linear_model(), loss, (X, y), lr=lr, batch_size=40)
    np.testing.assert_allclose(res.lambdas, exact, rtol=1e-10, atol=1e-12)
    assert res.n_batches == 1 and res.rds_sharpness == pytest.approx(exact[0])
    assert res.lambda_max == pytest.approx(alpha.max(), rel=1e-8)
    assert res.trace == pytest.approx(alpha.sum(), rel=1e-10)
    assert 0 < float(res.value) < 5
    # SD = Kaplan-Yorke dimension of the QR Lyapunov spectrum of GD. Df = I - lr H is constant, so
    # with the start block in its eigenbasis (ordered by |1 - lr alpha|) every R is diagonal and
    # the QR exponents are exact after any number of steps (GD itself diverges along the top
    # direction, so the run is kept short).
    H = (X.T @ X / 40).numpy()
    a, U = np.linalg.eigh(H)
    Q0 = U[:, np.argsort(-np.abs(1 - lr * a))]
    gd = rt.OptimizerMap(_linear_model(), loss, (X, y), rdsim.optim.gd(lr), dtype=torch.float64)
    ly = rdsim.lyapunov_spectrum(gd, None, 50, seed=0, Q0=Q0)
    np.testing.assert_allclose(ly.exponents, exact, rtol=1e-9, atol=1e-12)
    assert float(res.value) == pytest.approx(float(ly.dimension), abs=1e-9)


def test_gd_on_quadratic_numba_exact():
    A = np.diag([5.0, 3.0, 1.0, 0.5])
    loss = rdsim.losses.quadratic(A)
    lr = 0.5
    res = rdsim.loss_sharpness_dimension(loss, np.ones(4), lr=lr)
    exact = np.sort(np.log(np.abs(1 - lr * np.diag(A))))[::-1]
    np.testing.assert_allclose(res.lambdas, exact, rtol=1e-12)
    gd = rdsim.optimizer_map(loss, rdsim.optim.gd(lr))
    Q0 = np.eye(4)[:, np.argsort(-np.abs(1 - lr * np.diag(A)))]
    ly = rdsim.lyapunov_spectrum(gd, np.ones(4), 100, seed=0, Q0=Q0)
    np.testing.assert_allclose(ly.exponents, exact, rtol=1e-12)
    assert float(res.value) == pytest.approx(float(ly.dimension), abs=1e-12)
    np.testing.assert_allclose(rdsim.rds_sharpness(gd, np.ones((1, 4))), exact, rtol=1e-12)


# --- the exact method with minibatches -------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_problem():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(48, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    model = MLP(5, 3, width=6, depth=2, seed=1).double()
    return model, X, y


def test_exact_is_the_indexwise_mean_over_minibatches(mlp_problem):
    model, X, y = mlp_problem
    lr, bs, K = 3.0, 12, 5
    res = rt.sharpness_dimension(model, F.cross_entropy, (X, y), lr=lr, batch_size=bs, n_batches=K, seed=3)
    Z = []
    for idx in _minibatches(48, bs, K, 3):
        H = rt.dense_hessian(model, F.cross_entropy, (X[idx], y[idx])).numpy()
        Z.append(np.sort(np.log(np.abs(1 - lr * np.linalg.eigvalsh(H))))[::-1])
    lam = np.mean(Z, axis=0)
    np.testing.assert_allclose(res.lambdas, lam, atol=1e-10)
    assert float(res.value) == pytest.approx(float(rdsim.sharpness_dimension(lam)), abs=1e-9)
    assert np.isfinite(res.stderr) and res.stderr > 0
    assert res.eigenvalues.shape == (K, res.n_params)
    full = np.linalg.eigvalsh(rt.dense_hessian(model, F.cross_entropy, (X, y)).numpy())
    assert res.lambda_max == pytest.approx(full[-1], rel=1e-6)


def test_range_finder_route_equals_dense_route(mlp_problem):
    model, X, y = mlp_problem
    kw = dict(lr=3.0, batch_size=4, n_batches=3, seed=0, baselines=False)
    dense = rt.sharpness_dimension(model, F.cross_entropy, (X, y), **kw)
    rf = rt.sharpness_dimension(model, F.cross_entropy, (X, y), dense_max=8, **kw)
    np.testing.assert_allclose(rf.eigenvalues, dense.eigenvalues, atol=1e-10)
    assert float(rf.value) == pytest.approx(float(dense.value), abs=1e-8)
    # 4 samples: the minibatch Hessian is far from full rank, and small blocks find its range
    # with fewer products than the dimension
    op = rt.HessianOperator(model, F.cross_entropy, (X[:4], y[:4]))
    ev = rt.minibatch_hessian_eigenvalues(op, dense_max=8, block=6)
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(op.dense().numpy()), atol=1e-10)
    assert op.n_hvp - op.n_params < op.n_params  # (the dense check above cost n_params products)


class _MatrixOperator:
    """The parts of a HessianOperator that minibatch_hessian_eigenvalues uses, over a fixed matrix."""

    def __init__(self, A):
        self.A = torch.as_tensor(A)
        self.n_params, self.device, self.dtype = A.shape[0], torch.device("cpu"), torch.float64

    def _rows(self, R):
        return R @ self.A


def test_range_finder_reports_eigenvalues_below_rank_tol_as_zero():
    # rank 120 of 300, eigenvalue magnitudes log-spaced from 1 down to 1e-12 (random signs)
    rng = np.random.default_rng(0)
    n = 300
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    e = np.zeros(n)
    e[:120] = np.logspace(0, -12, 120) * np.where(rng.random(120) < 0.5, -1.0, 1.0)
    A = (Q * e) @ Q.T
    ev = rt.minibatch_hessian_eigenvalues(_MatrixOperator(0.5 * (A + A.T)), dense_max=8, block=64, rank_tol=1e-9)
    big = np.sort(e[np.abs(e) > 1e-9])
    assert np.count_nonzero(ev) == big.size and np.all(np.abs(ev[ev != 0]) > 1e-9)
    np.testing.assert_allclose(ev[ev != 0], big, rtol=0, atol=1e-9)  # accurate to rank_tol * ||H||


# --- SLQ, KDE and PS ---------------------------------------------------------------------------

def test_slq_estimators_integrate_to_n_and_converge_to_exact():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    model = MLP(4, 3, width=5, depth=2, seed=2).double()
    n = sum(p.numel() for p in model.parameters())
    lr = 3.0
    ex = rt.sharpness_dimension(model, F.cross_entropy, (X, y), lr=lr, batch_size=32)
    exact = float(ex.value)
    assert 0 < exact < n and ex.lambdas[0] > 0

    # one lockstep SLQ call with 6 * 4 + 3 * 128 runs (one Rademacher start each), then disjoint
    # groups of runs as independent estimates: a seeded budget of R = 4 (6 groups) vs R = 128 (3 groups)
    r = rt.sharpness_dimension(model, F.cross_entropy, (X, y), lr=lr, batch_size=32, method="slq",
                               n_batches=6 * 4 + 3 * 128, n_iter=n, seed=0, baselines=False)
    a, w = r.density.pooled()
    assert w.sum() == pytest.approx(n, rel=1e-12)  # the density integrates to the parameter count
    assert r.weights.sum() == pytest.approx(n, rel=1e-12)
    nodes, weights = r.density.nodes, r.density.weights

    def errs(rows):
        keep = weights[rows] > 0
        a, w = nodes[rows][keep], weights[rows][keep] * (n / len(rows))
        out = {}
        for method in ("slq", "kde", "ps"):
            v, m, _ = pseudo_spectrum(a, w, lr, method)
            assert m.sum() == pytest.approx(n, rel=1e-9)
            out[method] = abs(float(weighted_kaplan_yorke(v, m)) - exact)
        return out

    small = [errs(np.arange(4 * i, 4 * i + 4)) for i in range(6)]
    large = [errs(np.arange(24 + 128 * i, 24 + 128 * (i + 1))) for i in range(3)]
    # the Monte Carlo error of the masses falls like R^(-1/2): 32x the runs, about 5.7x smaller
    for method in ("slq", "kde", "ps"):
        e_small = np.mean([e[method] for e in small])
        e_large = np.mean([e[method] for e in large])
        assert e_large < 0.5 * e_small, (method, e_small, e_large)
        assert e_large < 0.03 * n, (method, e_large)
    # the estimator on the first 4 runs is what sharpness_dimension returns with n_batches=4
    r4 = rt.sharpness_dimension(model, F.cross_entropy, (X, y), lr=lr, batch_size=32, method="slq",
                                n_batches=4, n_iter=n, seed=0, baselines=False)
    np.testing.assert_allclose(r4.density.nodes, nodes[:4], atol=1e-9)


def test_pseudo_spectrum_options_and_defaults():
    a = np.array([0.0, 0.5, 1.0, 2.8])
    w = np.array([1.0, 1.0, 1.0, 1.0])
    v, m, o = pseudo_spectrum(a, w, 0.5, "slq", bins=1000)
    assert m.sum() == pytest.approx(4.0) and o["bins"] == 1000 and o["eps"] == 1e-6
    np.testing.assert_allclose(np.sort(v), np.sort(np.log(np.abs(1 - 0.5 * a) + 1e-6)))  # one value per bin
    v, m, o = pseudo_spectrum(a, w, 0.5, "ps", n_quantiles=400, bandwidth=1e-4)
    assert m.sum() == pytest.approx(4.0) and len(v) == 400
    # tiny bandwidth: the quantiles sit on the atoms, 100 each
    np.testing.assert_allclose(np.sort(v)[::100], np.sort(np.log(np.abs(1 - 0.5 * a) + 1e-6)), atol=1e-3)
    v, m, o = pseudo_spectrum(a, w, 0.5, "kde")
    assert m.sum() == pytest.approx(4.0) and o["bandwidth"] > 0 and len(v) <= 2000
    with pytest.raises(ValueError, match="bin_value"):
        pseudo_spectrum(a, w, 0.5, "slq", bin_value="median")
    with pytest.raises(ValueError, match="bandwidth"):
        pseudo_spectrum(a, w, 0.5, "kde", bandwidth=-1.0)


# --- toy losses (numba, analytic Hessians) agree with torch ---------------------------------------------

@pytest.mark.parametrize("method", ["exact", "slq"])
def test_dln_numba_and_torch_agree(method):
    data = sparse_regression(20, 6, 2, seed=0, dtype=torch.float64)
    X, y = data.train
    loss = rdsim.losses.dln(X.numpy(), y.numpy(), depth=2)
    rng = np.random.default_rng(0)
    x = 0.5 + 0.3 * rng.standard_normal(loss.dim)
    kw = dict(lr=0.4, batch_size=5, method=method, n_batches=4, seed=2)
    toy = rdsim.loss_sharpness_dimension(loss, x, **kw)
    net = DiagonalLinearNetwork(6, depth=2).double().set_flat(x)
    tor = rt.sharpness_dimension(net, _mse_half, (X, y), **kw)
    if method == "exact":
        np.testing.assert_allclose(toy.eigenvalues, tor.eigenvalues, atol=1e-10)
        np.testing.assert_allclose(toy.lambdas, tor.lambdas, atol=1e-10)
    assert float(toy.value) == pytest.approx(float(tor.value), abs=1e-6)
    assert toy.lambda_max == pytest.approx(tor.lambda_max, rel=1e-6)
    if method == "exact":  # (for SLQ the toy path uses the exact minibatch traces, torch the SLQ estimate)
        assert toy.trace == pytest.approx(tor.trace, rel=1e-8)


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs(mlp_problem):
    model, X, y = mlp_problem
    sd = rt.sharpness_dimension
    with pytest.raises(ValueError, match="lr: expected a positive"):
        sd(model, F.cross_entropy, (X, y), lr=0.0, batch_size=4)
    with pytest.raises(ValueError, match="lr"):
        sd(model, F.cross_entropy, (X, y), lr=-1.0, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size: 49 is larger than the data set \(48 samples\)"):
        sd(model, F.cross_entropy, (X, y), lr=1.0, batch_size=49)
    with pytest.raises(ValueError, match="method: expected one of"):
        sd(model, F.cross_entropy, (X, y), lr=1.0, batch_size=4, method="hutch")
    with pytest.raises(TypeError, match="estimator options"):
        sd(model, F.cross_entropy, (X, y), lr=1.0, batch_size=4, method="slq", bandwith=0.1)
    with pytest.raises(ValueError, match="n_batches"):
        sd(model, F.cross_entropy, (X, y), lr=1.0, batch_size=4, n_batches=0)
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        sd(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (X, y), lr=1.0, batch_size=4)
    with pytest.raises(TypeError, match="data"):
        sd(model, F.cross_entropy, X, lr=1.0, batch_size=4)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        sd(bn, F.cross_entropy, (X, y), lr=1.0, batch_size=4)
    bn.eval()
    assert np.isfinite(float(sd(bn, F.cross_entropy, (X, y), lr=1.0, batch_size=4, n_batches=2).value))
    loss = rdsim.losses.quadratic(np.eye(2))
    with pytest.raises(ValueError, match="batch_size"):
        rdsim.loss_sharpness_dimension(loss, np.zeros(2), lr=1.0, batch_size=2)
    with pytest.raises(ValueError, match="x: expected 2"):
        rdsim.loss_sharpness_dimension(loss, np.zeros(3), lr=1.0)


# --- neutral directions: the zero tolerance and the counts (issues 12, 13) ----------------------------

def test_zero_eigenvalues_of_rank_deficient_minibatches_count_as_neutral():
    # least squares, 4 parameters, minibatches of 2: H_B = X_B^T X_B / 2 has two exact zeros, which
    # eigvalsh returns as +-1e-17; lr = 0.1 contracts the other two, so SD = 2 exactly. Before the
    # tolerance this seed gave 1.0 (a partial sum of -1.4e-17 stopped the count).
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 4)), rng.standard_normal(20)
    loss = rdsim.losses.least_squares(X, y)
    res = rdsim.loss_sharpness_dimension(loss, np.zeros(4), lr=0.1, batch_size=2, n_batches=8, seed=0)
    assert float(res.value) == 2.0
    assert np.any(res.eigenvalues[:, :2] != 0)  # the raw eigenvalues are not exactly zero ...
    assert res.lambdas[0] == 0.0 and res.lambdas[1] == 0.0  # ... their z are, before the formula
    assert (res.n_expanding, res.n_neutral, res.n_contracting) == (0.0, 2.0, 2.0)
    assert res.neutral_share == 1.0
    assert res.options["rank_tol"] == 1e-9
    # SD = 2 at every seed of ten
    for s in range(10):
        r = rdsim.loss_sharpness_dimension(loss, np.zeros(4), lr=0.1, batch_size=2, n_batches=8, seed=s)
        assert float(r.value) == 2.0, s
    # rank_tol = 0: only exact zeros are neutral (the old behaviour at this seed)
    r0 = rdsim.loss_sharpness_dimension(loss, np.zeros(4), lr=0.1, batch_size=2, n_batches=8, seed=0, rank_tol=0.0)
    assert float(r0.value) != 2.0


def test_counts_oracle_numba_and_torch():
    # lr = 0.5: 1 - lr alpha = -1.5, 0.5, 0.75, 1, 1, 1.1 -> expanding {5, -0.2}, neutral {0, 0}, contracting {1, 0.5}
    A = np.diag([5.0, 1.0, 0.5, 0.0, 0.0, -0.2])
    z = np.log(np.abs(1 - 0.5 * np.diag(A)))
    expected = float(rdsim.sharpness_dimension(z))  # S: log 1.5 + log 1.1 + 0 + 0 + log .75 = 0.19 > 0
    for method in ("exact", "slq"):
        res = rdsim.loss_sharpness_dimension(rdsim.losses.quadratic(A), np.zeros(6), lr=0.5, method=method)
        # (exact: integers; SLQ: Ritz masses, 2 to rounding)
        assert (res.n_expanding, res.n_neutral, res.n_contracting) == pytest.approx((2, 2, 2), abs=1e-12), method
        assert res.neutral_share == pytest.approx(2 / float(res.value))
        assert "expanding/neutral/contracting=2/2/2" in repr(res)
    assert float(rdsim.loss_sharpness_dimension(rdsim.losses.quadratic(A), np.zeros(6), lr=0.5).value) == \
        pytest.approx(expected, abs=1e-12)
    # torch: L(w) = 0.5 w^T A w as a one-sample "network" (the sample carries diag A), H = A
    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(6, dtype=torch.float64))

        def forward(self, x):
            return 0.5 * (self.w * x[0] * self.w).sum().reshape(1)

    data = (torch.tensor(np.diag(A), dtype=torch.float64).reshape(1, 6), torch.zeros(1, dtype=torch.float64))
    lossf = lambda out, t: out.sum()  # noqa: E731
    for method in ("exact", "slq"):
        res = rt.sharpness_dimension(Quad(), lossf, data, lr=0.5, batch_size=1, method=method, n_batches=4,
                                     n_iter=6, baselines=False)
        assert (res.n_expanding, res.n_neutral, res.n_contracting) == pytest.approx((2, 2, 2)), method
        assert float(res.value) == pytest.approx(expected, abs=1e-9 if method == "exact" else 0.05)


def test_counts_of_the_exact_method_are_minibatch_means(mlp_problem):
    model, X, y = mlp_problem
    res = rt.sharpness_dimension(model, F.cross_entropy, (X, y), lr=3.0, batch_size=4, n_batches=3, seed=0,
                                 baselines=False)
    E = res.eigenvalues
    scale = np.abs(E).max(axis=1, keepdims=True)
    neutral = (np.abs(E) <= 1e-9 * scale) | (np.abs(E - 2 / 3.0) <= 1e-9 * scale)
    assert res.n_neutral == pytest.approx(neutral.sum(axis=1).mean())
    z = np.log(np.abs(1 - 3.0 * E))
    assert res.n_expanding == pytest.approx(((z > 0) & ~neutral).sum(axis=1).mean())
    assert res.n_expanding + res.n_neutral + res.n_contracting == pytest.approx(res.n_params)
    assert res.n_neutral > 0  # 4 samples: rank-deficient
    assert res.neutral_share == pytest.approx(np.count_nonzero(res.lambdas == 0) / float(res.value))


# --- bad input (issue 12): exception type and the argument's name --------------------------------------

def test_loss_sd_rejects_non_finite_parameters_and_hessians():
    loss = rdsim.losses.quadratic(np.eye(3))
    with pytest.raises(ValueError, match="x: the parameters must be finite"):
        rdsim.loss_sharpness_dimension(loss, np.array([0.0, np.nan, 0.0]), lr=0.5)
    with pytest.raises(ValueError, match="x: the parameters must be finite"):
        rdsim.loss_sharpness_dimension(loss, np.array([0.0, np.inf, 0.0]), lr=0.5, method="slq")
    # a finite point where the Hessian overflows: the DLN's curvature at huge weights
    X = np.random.default_rng(0).standard_normal((5, 2))
    dln = rdsim.losses.dln(X, np.ones(5), depth=3)
    with pytest.raises(ValueError, match="Hessian .* not finite"):
        rdsim.loss_sharpness_dimension(dln, np.full(dln.dim, 1e120), lr=0.5)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(n_batches=0), ValueError, "n_batches"),
    (dict(n_batches=2.5), ValueError, "n_batches"),
    (dict(n_batches=True), ValueError, "n_batches"),
    (dict(method="slq", n_iter=0), ValueError, "n_iter"),
    (dict(method="slq", n_iter=-3), ValueError, "n_iter"),
    (dict(method="slq", n_iter=2.0), ValueError, "n_iter"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=1.0), ValueError, "batch_size"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), ValueError, "lr"),
    (dict(rank_tol=-1e-9), ValueError, "rank_tol"),
    (dict(rank_tol=1.0), ValueError, "rank_tol"),
    (dict(baselines="yes"), TypeError, "baselines"),
    (dict(method="exakt"), ValueError, "method"),
    (dict(method="slq", bins=0), ValueError, "bins"),
    (dict(method="slq", eps=-1.0), ValueError, "eps"),
    (dict(bandwith=1.0), TypeError, "estimator options"),
])
def test_loss_sd_argument_errors_name_the_argument(kw, exc, name):
    loss = rdsim.losses.least_squares(np.random.default_rng(0).standard_normal((6, 3)), np.zeros(6))
    args = dict(lr=0.5, batch_size=2)
    args.update(kw)
    with pytest.raises(exc, match=name):
        rdsim.loss_sharpness_dimension(loss, np.zeros(3), **args)


def test_loss_sd_rejects_a_non_loss():
    with pytest.raises(TypeError, match="loss: expected a rdsim.losses.ToyLoss"):
        rdsim.loss_sharpness_dimension(np.eye(3), np.zeros(3), lr=0.5)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(method="slq", n_iter=0), ValueError, "n_iter"),
    (dict(method="kde", n_iter=-1), ValueError, "n_iter"),
    (dict(n_batches=1.5), ValueError, "n_batches"),
    (dict(seed=-2), ValueError, "seed"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=2.0), ValueError, "batch_size"),
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(rank_tol=2.0), ValueError, "rank_tol"),
    (dict(eval_batch=0), ValueError, "eval_batch"),
    (dict(dense_max=-1), ValueError, "dense_max"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(basis_bytes=0), ValueError, "basis_bytes"),
    (dict(baselines=1), TypeError, "baselines"),
    (dict(structured="auto"), TypeError, "structured"),
    (dict(progress=None), TypeError, "progress"),
])
def test_torch_sd_argument_errors_name_the_argument(mlp_problem, kw, exc, name):
    model, X, y = mlp_problem
    args = dict(lr=1.0, batch_size=4, n_batches=2, baselines=False)
    args.update(kw)
    with pytest.raises(exc, match=name):
        rt.sharpness_dimension(model, F.cross_entropy, (X, y), **args)


def test_torch_sd_rejects_empty_mismatched_and_non_finite(mlp_problem):
    model, X, y = mlp_problem
    sd = rt.sharpness_dimension
    with pytest.raises(ValueError, match="data: the training set is empty"):
        sd(model, F.cross_entropy, (X[:0], y[:0]), lr=1.0, batch_size=1)
    with pytest.raises(ValueError, match="data: inputs have 48 samples, targets 47"):
        sd(model, F.cross_entropy, (X, y[:47]), lr=1.0, batch_size=4)
    with pytest.raises(TypeError, match="data"):
        sd(model, F.cross_entropy, ([1, 2], [3, 4]), lr=1.0, batch_size=1)
    bad = MLP(5, 3, width=6, depth=2, seed=1).double()
    with torch.no_grad():
        next(bad.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="params: the parameters are not finite"):
        sd(bad, F.cross_entropy, (X, y), lr=1.0, batch_size=4)
    # finite parameters, non-finite curvature: a loss that is NaN on the data
    Xn = X.clone()
    Xn[3, 2] = float("nan")
    for method, kw in (("exact", {}), ("exact", dict(dense_max=8, structured=False)), ("slq", {})):
        with pytest.raises(ValueError, match="non-finite"):
            sd(model, F.cross_entropy, (Xn, y), lr=1.0, batch_size=48, method=method, baselines=False, **kw)


def test_weight_decay_shifts_the_jacobian_eigenvalues():
    """weight_decay = wd: SD of H + wd I (oracle: the quadratic with the shifted diagonal); the exact
    zeros become contracting (log(1 - lr wd) < 0), so the neutral count drops to 0."""
    d = np.array([5.0, 1.0, 0.5, 0.0, 0.0, -0.2])
    base = rdsim.loss_sharpness_dimension(rdsim.losses.quadratic(np.diag(d)), np.zeros(6), lr=0.5)
    assert (base.n_expanding, base.n_neutral, base.n_contracting) == (2, 2, 2)
    wd = 0.1
    got = rdsim.loss_sharpness_dimension(rdsim.losses.quadratic(np.diag(d)), np.zeros(6), lr=0.5, weight_decay=wd)
    ref = rdsim.loss_sharpness_dimension(rdsim.losses.quadratic(np.diag(d + wd)), np.zeros(6), lr=0.5)
    np.testing.assert_allclose(got.lambdas, ref.lambdas, rtol=0, atol=1e-15)
    assert float(got.value) == float(ref.value) and got.n_neutral == 0
    np.testing.assert_allclose(got.eigenvalues, base.eigenvalues)  # the H_B eigenvalues are kept unshifted
    assert got.options["weight_decay"] == wd
    with pytest.raises(ValueError, match="weight_decay"):
        rdsim.loss_sharpness_dimension(rdsim.losses.quadratic(np.diag(d)), np.zeros(6), lr=0.5, weight_decay=-1)


def test_weight_decay_torch_matches_numba():
    import torch

    import rdsim.torch as rt

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((12, 5)), rng.standard_normal(12)
    model = torch.nn.Linear(5, 1, bias=False).double()

    def mse(out, t):
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    x = model.weight.detach().numpy().ravel()
    for wd in (0.0, 0.3):
        t = rt.sharpness_dimension(model, mse, (torch.as_tensor(X), torch.as_tensor(y)), lr=0.4, batch_size=3,
                                   n_batches=6, seed=2, weight_decay=wd)
        n = rdsim.loss_sharpness_dimension(rdsim.losses.least_squares(X, y), x, lr=0.4, batch_size=3, n_batches=6,
                                           seed=2, weight_decay=wd)
        np.testing.assert_allclose(t.lambdas, n.lambdas, atol=1e-10)
        assert abs(float(t.value) - float(n.value)) < 1e-9
    assert t.n_neutral == 0 < n.n_contracting
