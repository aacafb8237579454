"""The torch backend: rdsim.torch.OptimizerMap against exact spectra, the numba backend, torch.optim,
dense Jacobians (torch.func.jacrev / hessian) and the driver's reference loop.

Everything in float64 and seeded. CPU always; CUDA cases run when a GPU is present.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import rdsim
import rdsim.torch as rt
from rdsim import optim
from rdsim._engine import OK, STATE_NONFINITE
from rdsim._lyapunov import _run_python, _seeds, start_block
from rdsim._systems import NoiseStream

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the models here are tiny: a second intra-op thread only adds synchronisation overhead
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def mse(out, t):
    """0.5 * mean((out - t)^2): rdsim.losses.least_squares for a (n, 1) output."""
    return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()


def ls_data(n=24, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return X, y


def linear(p, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    net = nn.Linear(p, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(0.5 * torch.randn(1, p, generator=g, dtype=DT))
    return net


class DLN(nn.Module):
    """beta = w_1 * ... * w_D, f(X) = X beta: the twin of rdsim.losses.dln (flat layout w_1, ..., w_D)."""

    def __init__(self, ws):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.as_tensor(w, dtype=DT).clone()) for w in ws])

    def forward(self, X):
        b = self.w[0]
        for i in range(1, len(self.w)):
            b = b * self.w[i]
        return X @ b


class Quadratic(nn.Module):
    """0.5 x^T A x for a single dummy sample."""

    def __init__(self, A, x0):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=DT))
        self.x = nn.Parameter(torch.as_tensor(x0, dtype=DT).clone())

    def forward(self, inputs):
        return 0.5 * (self.x @ (self.A @ self.x)) * torch.ones(inputs.shape[0], dtype=DT, device=inputs.device)


def mlp49():
    """tanh MLP 4 -> 8 -> 1, 49 parameters, and regression data."""
    net = models.MLP(4, 1, width=8, depth=2, activation="tanh", seed=3, dtype=DT)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(16, 4, generator=g, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    return net, X, y


def mse2(out, t):
    return 0.5 * ((out - t) ** 2).mean()


# --------------------------------------------------------------------------------------------
# exact spectra


@pytest.mark.parametrize("device", DEVICES)
def test_gd_quadratic_exact_spectrum(device):
    alpha = np.array([1.0, 5.0, 8.0, 9.5, 14.0])  # |1 - lr alpha| = 0.9, 0.5, 0.2, 0.05, 0.4
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    A = U @ np.diag(alpha) @ U.T
    A = 0.5 * (A + A.T)
    lr = 0.1
    net = Quadratic(A, np.ones(5))
    system = rt.OptimizerMap(net, lambda out, t: out.mean(), (torch.zeros(1, 1), torch.zeros(1)),
                             optim.gd(lr), device=device)
    assert system.dim == system.tangent_dim == 5 and system.noise_dim == 0
    res = rdsim.lyapunov_spectrum(system, None, 50, transient=150)
    expected = np.sort(np.log(np.abs(1 - lr * alpha)))[::-1]
    np.testing.assert_allclose(res.exponents, expected, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_gd_least_squares_exact_spectrum(device):
    X, y = ls_data()
    lr = 1.2  # |1 - lr alpha| = 0.78, 0.62, 0.23, 0.10: fast alignment
    system = rt.OptimizerMap(linear(4), mse, (X, y), optim.gd(lr), device=device)
    res = rdsim.lyapunov_spectrum(system, None, 50, transient=150, seed=1)
    alpha = np.linalg.eigvalsh((X.T @ X).numpy() / X.shape[0])
    expected = np.sort(np.log(np.abs(1 - lr * alpha)))[::-1]
    np.testing.assert_allclose(res.exponents, expected, atol=1e-8)
    # the top-k block gives the top k exponents
    res2 = rdsim.lyapunov_spectrum(system, None, 50, k=2, transient=150, seed=1)
    np.testing.assert_allclose(res2.exponents, expected[:2], atol=1e-8)


def test_gd_mlp_matches_dense_qr_products():
    """GD on a 49-parameter tanh MLP: the jvp tangents equal QR products of dense I - lr H."""
    net, X, y = mlp49()
    lr, T = 0.2, 50
    system = rt.OptimizerMap(net, mse2, (X, y), optim.gd(lr))
    d = system.dim
    Q0 = start_block(d, d, np.random.default_rng(7))
    res = rdsim.lyapunov_spectrum(system, None, T, Q0=Q0)

    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def loss(x):
        params = {n: t.view(s) for n, t, s in zip(names, x.split(sizes), shapes)}
        return mse2(torch.func.functional_call(net, params, (X,)), y)

    x = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    Q = torch.as_tensor(Q0)
    sums = torch.zeros(d, dtype=DT)
    for _ in range(T):
        H = torch.func.hessian(loss)(x)
        Q, R = torch.linalg.qr((torch.eye(d, dtype=DT) - lr * H) @ Q)
        sums += torch.log(R.diagonal().abs())
        x = x - lr * torch.func.grad(loss)(x)
    expected = np.sort(sums.numpy() / T)[::-1]
    np.testing.assert_allclose(res.exponents, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.x_final, x.numpy(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# torch vs numba, same seed


@pytest.mark.parametrize("device", DEVICES)
def test_sgd_least_squares_matches_numba(device):
    X, y = ls_data(n=30, p=5)
    spec = optim.sgd(0.3, 6)
    net = linear(5)
    tsys = rt.OptimizerMap(net, mse, (X, y), spec, device=device)
    nsys = rdsim.optimizer_map(rdsim.losses.least_squares(X.numpy(), y.numpy()), spec)
    assert (tsys.dim, tsys.noise_dim, tsys.tangent_dim) == (nsys.dim, nsys.noise_dim, nsys.tangent_dim)
    # the same noise sampler: identical minibatches for the same seed
    np.testing.assert_array_equal(tsys.noise_sampler(np.random.default_rng(4))(50),
                                  nsys.noise_sampler(np.random.default_rng(4))(50))
    x0 = net.weight.detach().numpy().ravel()
    rt_ = rdsim.lyapunov_spectrum(tsys, None, 400, transient=50, seed=11)
    rn = rdsim.lyapunov_spectrum(nsys, x0, 400, transient=50, seed=11)
    np.testing.assert_allclose(rt_.exponents, rn.exponents, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rt_.x_final, rn.x_final, rtol=0, atol=1e-6)
    # in fact they agree to rounding, history and error bars included
    np.testing.assert_allclose(rt_.exponents, rn.exponents, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rt_.history, rn.history, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(rt_.history_steps, rn.history_steps)
    np.testing.assert_allclose(rt_.stderr, rn.stderr, rtol=1e-8, atol=1e-14)
    assert rt_.n_qr == rn.n_qr


def reference_spectrum(system, x0, n_steps, *, transient=0, seed=0):
    """lyapunov_spectrum's seeds, start block and phases, through the driver's reference loop
    (rdsim._lyapunov._run_python): for numba systems this avoids compiling the engine (seconds
    per system), while the maps compared are the numba ones."""
    k = system.tangent_dim
    block_rng, noise_rng = _seeds(seed)
    Q = start_block(k, k, block_rng)
    noise = NoiseStream(system, noise_rng)
    x = system.initial_state(x0)
    state = dict(sums=np.zeros(k), block_sums=np.zeros((2, k)), block_steps=np.zeros(2),
                 hist=np.zeros((1, k)), hist_steps=np.zeros(1, dtype=np.int64))
    for length, acc in ((transient, False), (n_steps, True)):
        if length:
            status, _, _ = _run_python(system, x, Q, noise, length, 1, acc, 2, 0, state, 0, None)
            assert status == OK
    return np.sort(state["sums"] / n_steps)[::-1], x


@pytest.mark.parametrize("spec, tangent", [
    (optim.momentum(0.1, 0.9, batch_size=6), "exact"),
    (optim.adam(0.02, batch_size=6), "exact"),
    (optim.adam(0.02, weight_decay=0.05, decoupled=True, batch_size=6), "exact"),
    (optim.adam(0.02, weight_decay=0.05, batch_size=6), "frozen"),
], ids=["momentum", "adam", "adamw", "adam-frozen"])
def test_momentum_adam_dln_match_numba(spec, tangent):
    X, y = ls_data(n=20, p=3, seed=2)
    g = torch.Generator().manual_seed(9)
    x0 = 0.7 + 0.3 * torch.randn(6, generator=g, dtype=DT)
    net = DLN([x0[:3], x0[3:]])
    tsys = rt.OptimizerMap(net, lambda out, t: 0.5 * ((out - t) ** 2).mean(), (X, y), spec, tangent=tangent)
    nsys = rdsim.optimizer_map(rdsim.losses.dln(X.numpy(), y.numpy(), depth=2), spec, tangent=tangent)
    assert (tsys.dim, tsys.noise_dim, tsys.tangent_dim) == (nsys.dim, nsys.noise_dim, nsys.tangent_dim)
    rt_ = rdsim.lyapunov_spectrum(tsys, None, 300, transient=30, seed=5)
    assert rt_.status == "ok"
    exps_n, x_n = reference_spectrum(nsys, x0.numpy(), 300, transient=30, seed=5)
    np.testing.assert_allclose(rt_.exponents, exps_n, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rt_.x_final, x_n, rtol=0, atol=1e-6)
    # and to rounding, one map at a time
    xi = tsys.noise_sampler(np.random.default_rng(0))(3)[-1]
    z = rt_.x_final
    np.testing.assert_allclose(tsys.jacobian(z, xi), nsys.jacobian(z, xi), rtol=0, atol=1e-11)
    np.testing.assert_allclose(tsys.step(z, xi), nsys.step(z, xi), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("spec", [optim.sgd(0.1, 4, sampling="epoch"), optim.momentum(0.1, batch_size=3),
                                  optim.adam(0.01, batch_size=5, sampling="epoch"), optim.adam(0.01)],
                         ids=["sgd-epoch", "momentum-iid", "adam-epoch", "adam-full"])
def test_noise_is_the_numba_noise(spec):
    X, y = ls_data(n=17, p=2)
    tsys = rt.OptimizerMap(linear(2), mse, (X, y), spec)
    nsys = rdsim.optimizer_map(rdsim.losses.least_squares(X.numpy(), y.numpy()), spec)
    assert (tsys.dim, tsys.noise_dim, tsys.tangent_dim) == (nsys.dim, nsys.noise_dim, nsys.tangent_dim)
    a, b = tsys.noise_sampler(np.random.default_rng(3)), nsys.noise_sampler(np.random.default_rng(3))
    for n in (5, 1, 40):
        np.testing.assert_array_equal(a(n), b(n))


# --------------------------------------------------------------------------------------------
# the update against torch.optim, the Adam tangent against jacrev


def _copy(net):
    new = models.MLP(4, 1, width=8, depth=2, activation="tanh", seed=0, dtype=DT)
    new.load_state_dict(net.state_dict())
    return new


@pytest.mark.parametrize("spec, make_opt", [
    (optim.sgd(0.1, 5), lambda p: torch.optim.SGD(p, lr=0.1)),
    (optim.momentum(0.1, 0.9, batch_size=5), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (optim.adam(0.01, 0.8, 0.95, 1e-6, batch_size=5), lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6)),
    (optim.adam(0.01, weight_decay=0.1, batch_size=5),
     lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
    (optim.adam(0.01, weight_decay=0.1, decoupled=True, batch_size=5),
     lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
], ids=["sgd", "momentum", "adam", "adam-l2", "adamw"])
def test_update_matches_torch_optim(spec, make_opt):
    net, X, y = mlp49()
    system = rt.OptimizerMap(net, mse2, (X, y), spec)
    ref = _copy(net)
    opt = make_opt(ref.parameters())
    noise = system.noise_sampler(np.random.default_rng(0))(4)
    z = system.initial_state(None)
    for xi in noise:
        z = system.step(z, xi)
        idx = torch.as_tensor(xi[-5:].astype(np.int64))
        opt.zero_grad()
        mse2(ref(X[idx]), y[idx]).backward()
        opt.step()
        x_ref = torch.cat([p.detach().reshape(-1) for p in ref.parameters()]).numpy()
        np.testing.assert_allclose(z[:system.n_params], x_ref, rtol=1e-13, atol=1e-15)
    d = system.n_params
    if spec.kind == "momentum":
        buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in ref.parameters()]).numpy()
        np.testing.assert_allclose(z[d:], buf, rtol=1e-13, atol=1e-15)
    if spec.kind == "adam":
        m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in ref.parameters()]).numpy()
        v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in ref.parameters()]).numpy()
        np.testing.assert_allclose(z[d:2 * d], m, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(z[2 * d:], v, rtol=1e-13, atol=1e-18)
    # the model itself is never touched
    np.testing.assert_array_equal(system.x0[:d], torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy())


def _adam_reference(X, y, spec):
    """An independent Adam/AdamW step on the DLN written from MATH.md §1, as a function of (z, idx, t)."""

    def step(z, idx, t):
        d = z.shape[0] // 3
        x, m, v = z[:d], z[d:2 * d], z[2 * d:]

        def loss(w):
            beta = w[:d // 2] * w[d // 2:]
            r = X[idx] @ beta - y[idx]
            return 0.5 * (r ** 2).mean()

        g = torch.func.grad(loss)(x)
        lam_w = 0.0
        if spec.decoupled:
            lam_w = spec.weight_decay
        else:
            g = g + spec.weight_decay * x
        m2 = spec.beta1 * m + (1 - spec.beta1) * g
        v2 = spec.beta2 * v + (1 - spec.beta2) * g ** 2
        mh = m2 / (1 - spec.beta1 ** t)
        vh = v2 / (1 - spec.beta2 ** t)
        x2 = x * (1 - spec.lr * lam_w) - spec.lr * mh / (torch.sqrt(vh) + spec.eps)
        return torch.cat([x2, m2, v2])

    return step


@pytest.mark.parametrize("spec", [optim.adam(0.05, batch_size=4, weight_decay=0.02),
                                  optim.adam(0.05, batch_size=4, weight_decay=0.02, decoupled=True)],
                         ids=["adam", "adamw"])
def test_adam_tangent_matches_jacrev_and_sum_rule(spec):
    X, y = ls_data(n=12, p=3, seed=4)
    g = torch.Generator().manual_seed(1)
    x0 = 0.8 + 0.2 * torch.randn(6, generator=g, dtype=DT)
    system = rt.OptimizerMap(DLN([x0[:3], x0[3:]]), lambda out, t: 0.5 * ((out - t) ** 2).mean(), (X, y), spec)
    ref = _adam_reference(X, y, spec)
    T = 60
    seed = 3
    res = rdsim.lyapunov_spectrum(system, None, T, seed=seed)  # full spectrum, 18 exponents
    assert res.exponents.shape == (18,)
    _, noise_rng = _seeds(seed)
    xis = NoiseStream(system, noise_rng).take(T)
    z = torch.as_tensor(system.initial_state(None))
    logdet = 0.0
    for s in range(T):
        t, idx = float(xis[s, 0]), torch.as_tensor(xis[s, 1:].astype(np.int64))
        J_ref = torch.func.jacrev(ref)(z, idx, t)
        if s in (0, 1, T - 1):
            J = system.jacobian(z.numpy(), xis[s])
            np.testing.assert_allclose(J, J_ref.numpy(), rtol=0, atol=1e-10 * max(1.0, float(J_ref.abs().max())))
            np.testing.assert_allclose(system.step(z.numpy(), xis[s]), ref(z, idx, t).numpy(), rtol=1e-12, atol=1e-15)
        logdet += torch.linalg.slogdet(J_ref)[1].item()
        z = ref(z, idx, t)
    assert abs(res.exponents.sum() - logdet / T) < 1e-9 * max(1.0, abs(logdet / T))
    np.testing.assert_allclose(res.x_final, z.numpy(), rtol=1e-10, atol=1e-12)


def test_conformance_small_mlp():
    net, X, y = mlp49()
    for spec in (optim.sgd(0.1, 4), optim.adam(0.01, batch_size=4)):
        system = rt.OptimizerMap(net, mse2, (X, y), spec)
        report = rdsim.testing.check_system(system, None, n_points=2, spacing=5, n_sum_steps=30)
        assert report.ok, str(report)


# --------------------------------------------------------------------------------------------
# the device loop against the driver's reference loop; divergence


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr", [0.05, 3.0, 4.0], ids=["ok", "diverges-at-a-qr-step", "diverges-between-qr-steps"])
def test_run_phase_matches_reference_loop(device, lr):
    """_run_phase reproduces rdsim._lyapunov._run_python: accumulators, blocks, history, status, x and Q.

    (With qr_every = 3 the runs diverge at steps 8 and 6, on and off the QR grid; _run_phase also
    stops at a non-finite loss, which the reference loop does not look at, so larger steps
    can make it stop one step earlier.)"""
    X, y = ls_data(n=20, p=4, seed=6)
    net = DLN([torch.full((4,), 0.9, dtype=DT), torch.full((4,), 0.8, dtype=DT)])
    system = rt.OptimizerMap(net, lambda out, t: 0.5 * ((out - t) ** 2).mean(), (X, y),
                             optim.momentum(lr, 0.5, batch_size=5), device=device)
    n_total, qr_every, n_blocks, record_every, k = 205, 3, 7, 12, 5
    outs = []
    for runner in (_run_python, lambda s, *a: s._run_phase(*a)):
        x = system.initial_state(None)
        Q = start_block(system.tangent_dim, k, np.random.default_rng(0))
        noise = NoiseStream(system, np.random.default_rng(1))
        state = dict(sums=np.zeros(k), block_sums=np.zeros((n_blocks, k)), block_steps=np.zeros(n_blocks),
                     hist=np.zeros((n_total // record_every + 2, k)), hist_steps=np.zeros(n_total // record_every + 2, dtype=np.int64))
        status, fail, hc = runner(system, x, Q, noise, n_total, qr_every, True, n_blocks, record_every, state, 0, None)
        outs.append((status, fail, hc, x, Q, state))
    (s1, f1, h1, x1, Q1, st1), (s2, f2, h2, x2, Q2, st2) = outs
    assert (s1, f1, h1) == (s2, f2, h2)
    if lr < 1:
        assert s2 == OK and f2 == -1
    else:
        assert s2 == STATE_NONFINITE and f2 == {3.0: 8, 4.0: 6}[lr]
    np.testing.assert_allclose(x2, x1, rtol=1e-12, atol=0)
    assert np.all(np.isfinite(x2))
    if s2 == OK:
        np.testing.assert_allclose(np.abs(Q2), np.abs(Q1), rtol=0, atol=1e-10)
    for key in ("sums", "block_sums", "block_steps", "hist", "hist_steps"):
        np.testing.assert_allclose(st2[key], st1[key], rtol=1e-12, atol=1e-14, err_msg=key)
    assert st1.get("n_qr") == st2.get("n_qr")


@pytest.mark.parametrize("device", DEVICES)
def test_divergence_is_a_result(device):
    net, X, y = mlp49()
    system = rt.OptimizerMap(net, mse2, (X, y), optim.gd(50.0), device=device)
    res = rdsim.lyapunov_spectrum(system, None, 500, k=3)
    assert res.status == "diverged"
    assert res.diverged_at is not None and 0 <= res.diverged_at < 500
    assert np.all(np.isnan(res.exponents))
    assert np.all(np.isfinite(res.x_final))
    # a diverging transient is reported with the step counted from the start of the transient
    res2 = rdsim.lyapunov_spectrum(system, None, 10, k=3, transient=500)
    assert res2.status == "diverged" and res2.diverged_at == res.diverged_at


# --------------------------------------------------------------------------------------------
# interface: x0, chunking, records, dtype


def test_initial_state_chunking_and_counters():
    net, X, y = mlp49()
    spec = optim.adam(0.01, batch_size=4)
    a = rt.OptimizerMap(net, mse2, (X, y), spec)
    b = rt.OptimizerMap(net, mse2, (X, y), spec, chunk_size=2)
    d = a.n_params
    assert a.dim == 3 * d and a.noise_dim == 5
    z0 = a.initial_state(None)
    assert np.all(z0[d:] == 0)
    np.testing.assert_array_equal(a.initial_state(z0[:d]), z0)
    np.testing.assert_array_equal(a.initial_state(torch.as_tensor(z0)), z0)
    with pytest.raises(ValueError, match="x0"):
        a.initial_state(np.zeros(d + 1))
    with pytest.raises(ValueError, match="x0"):
        a.initial_state(np.concatenate([z0[:2 * d], -np.ones(d)]))
    ra = rdsim.lyapunov_spectrum(a, None, 20, k=5)
    rb = rdsim.lyapunov_spectrum(b, z0[:d], 20, k=5)
    np.testing.assert_allclose(ra.exponents, rb.exponents, rtol=0, atol=1e-12)
    assert a.n_jvp == 20 * 5 and b.n_jvp == 20 * 5


def test_records():
    net, X, y = mlp49()
    seen = []
    system = rt.OptimizerMap(net, mse2, (X, y), optim.sgd(0.1, 4),
                             record={"loss": 5, "batch_loss": 10, "sharpness": (10, {"n_iter": 49}),
                                     "checkpoints": 10, "norm": (lambda s, z, sys_: seen.append(s) or float(z.norm()), 7)})
    rdsim.lyapunov_spectrum(system, None, 20, transient=10, k=2)
    rec = system.records
    assert rec["loss_steps"] == list(range(0, 31, 5))
    assert rec["batch_loss_steps"] == [0, 10, 20]
    assert rec["checkpoints_steps"] == [0, 10, 20, 30] and rec["sharpness_steps"] == [0, 10, 20, 30]
    assert rec["norm_steps"] == [0, 7, 14, 21, 28] and seen == rec["norm_steps"]
    ck = rec["checkpoints"]
    assert ck[0].shape == (system.n_params,)
    np.testing.assert_allclose(ck[0], system.x0)
    for s, x in zip(rec["checkpoints_steps"], ck):
        i = rec["loss_steps"].index(s)
        assert abs(rec["loss"][i] - system.loss(x)) < 1e-14
    # sharpness = lambda_max of the dense full-data Hessian
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def loss(x):
        params = {n: t.view(s) for n, t, s in zip(names, x.split(sizes), shapes)}
        return mse2(torch.func.functional_call(net, params, (X,)), y)

    for x, lam in zip(ck, rec["sharpness"]):
        H = torch.func.hessian(loss)(torch.as_tensor(x))
        assert abs(lam - torch.linalg.eigvalsh(H)[-1].item()) < 1e-8
    # a new run starts new records
    rdsim.lyapunov_spectrum(system, None, 3, k=1)
    assert system.records["loss_steps"] == [0]
    with pytest.raises(ValueError, match="record"):
        rt.OptimizerMap(net, mse2, (X, y), optim.sgd(0.1, 4), record={"nonsense": 3})


def test_float32_model_float64_accumulators():
    net, X, y = mlp49()
    net32 = models.MLP(4, 1, width=8, depth=2, activation="tanh", seed=3, dtype=torch.float32)
    s64 = rt.OptimizerMap(net, mse2, (X, y), optim.gd(0.2))
    s32 = rt.OptimizerMap(net32, mse2, (X.float(), y.float()), optim.gd(0.2))
    assert s32.dtype == torch.float32 and s32.inputs.dtype == torch.float32
    # or cast a float32 model to float64 with dtype=
    s64b = rt.OptimizerMap(net32, mse2, (X, y), optim.gd(0.2), dtype=torch.float64)
    r64 = rdsim.lyapunov_spectrum(s64, None, 100, k=3)
    r32 = rdsim.lyapunov_spectrum(s32, None, 100, k=3)
    r64b = rdsim.lyapunov_spectrum(s64b, None, 100, k=3)
    np.testing.assert_allclose(r32.exponents, r64.exponents, atol=1e-4)
    np.testing.assert_allclose(r64b.exponents, r64.exponents, atol=1e-5)
    assert r32.x_final.dtype == np.float64


# --------------------------------------------------------------------------------------------
# BatchNorm, dropout, bad inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_buffers_untouched(device, mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
    getattr(net, mode)()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(32, 3, generator=g, dtype=DT)
    y = torch.randn(32, 1, generator=g, dtype=DT)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    system = rt.OptimizerMap(net, mse2, (X, y), optim.momentum(0.05, 0.9, batch_size=8), device=device)
    assert system.batchnorm_train_mode == (["1"] if mode == "train" else [])
    res = rdsim.lyapunov_spectrum(system, None, 30, k=4)
    assert res.status == "ok"
    for key, val in net.state_dict().items():
        assert torch.equal(val, before[key]), key
    # the map is the training step of that mode: compare with torch.optim on a copy
    ref = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    ref.load_state_dict(net.state_dict())
    getattr(ref, mode)()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    xi = system.noise_sampler(np.random.default_rng(0))(1)[0]
    idx = torch.as_tensor(xi.astype(np.int64))
    opt.zero_grad()
    mse2(ref(X[idx]), y[idx]).backward()
    opt.step()
    z = system.step(system.initial_state(None), xi)
    x_ref = torch.cat([p.detach().reshape(-1) for p in ref.parameters()]).numpy()
    np.testing.assert_allclose(z[:system.n_params], x_ref, rtol=1e-12, atol=1e-14)


def test_dropout_refused_in_train_mode():
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 1)).to(DT)
    X, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"'2'.*Dropout"):
        rt.OptimizerMap(net, mse2, (X, y), optim.gd(0.1))
    net.eval()
    system = rt.OptimizerMap(net, mse2, (X, y), optim.gd(0.1))
    assert rdsim.lyapunov_spectrum(system, None, 5, k=2).status == "ok"
    net.train()  # the policy is fixed at construction: a later switch is refused, not followed
    with pytest.raises(RuntimeError, match="train/eval"):
        rdsim.lyapunov_spectrum(system, None, 5, k=2)

    class Functional(nn.Module):  # dropout the module scan cannot see
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1).to(DT)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, training=True)

    with pytest.raises(ValueError, match="deterministic"):
        rt.OptimizerMap(Functional(), mse2, (X, y), optim.gd(0.1))


def test_bad_inputs():
    X, y = ls_data(n=10, p=4)
    net = linear(4)
    with pytest.raises(ValueError, match="loss_fn"):
        rt.OptimizerMap(net, lambda out, t: (out.squeeze(-1) - t) ** 2, (X, y), optim.gd(0.1))
    with pytest.raises(ValueError, match="data"):
        rt.OptimizerMap(linear(3), mse, (X, y), optim.gd(0.1))
    with pytest.raises(ValueError, match="samples"):
        rt.OptimizerMap(net, mse, (X, y[:5]), optim.gd(0.1))
    with pytest.raises(ValueError, match="batch_size"):
        rt.OptimizerMap(net, mse, (X, y), optim.sgd(0.1, 11))
    with pytest.raises(ValueError, match="tangent"):
        rt.OptimizerMap(net, mse, (X, y), optim.sgd(0.1, 2), tangent="frozen")
    with pytest.raises(ValueError, match="chunk_size"):
        rt.OptimizerMap(net, mse, (X, y), optim.gd(0.1), chunk_size=0)
    with pytest.raises(TypeError, match="model"):
        rt.OptimizerMap(lambda x: x, mse, (X, y), optim.gd(0.1))
    with pytest.raises(TypeError, match="optimizer"):
        rt.OptimizerMap(net, mse, (X, y), torch.optim.SGD)
    with pytest.raises(TypeError, match="data"):
        rt.OptimizerMap(net, mse, X, optim.gd(0.1))
    # huber_loss_backward has no forward-AD formula: the map takes reverse-over-reverse HVPs
    hub = rt.OptimizerMap(net, lambda out, t: F.huber_loss(out.squeeze(-1), t), (X, y), optim.gd(0.1))
    assert hub.hvp_mode == "reverse"
    # F.mse_loss works (it fails under forward-over-reverse when the target has no tangent)
    s = rt.OptimizerMap(net, lambda out, t: 0.5 * F.mse_loss(out.squeeze(-1), t), (X, y), optim.sgd(0.1, 3))
    s2 = rt.OptimizerMap(net, mse, (X, y), optim.sgd(0.1, 3))
    xi = s.noise_sampler(np.random.default_rng(0))(1)[0]
    V = np.random.default_rng(1).standard_normal((4, 2))
    np.testing.assert_allclose(s.tangent(s.x0, xi, V), s2.tangent(s2.x0, xi, V), atol=1e-15)
    with pytest.raises(ValueError, match="xi"):
        s.step(s.x0, np.array([0.0, 1.0, 99.0]))


def test_import_does_not_load_torch_backend():
    # `import rdsim` loads neither PyTorch nor rdsim.torch (a fresh interpreter) ...
    code = "import sys, rdsim; assert 'rdsim.torch' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # ... and the subpackage never shadows PyTorch
    assert rdsim.torch is rt and rt is not torch and hasattr(torch, "func")
    assert rt.OptimizerMap.backend == "torch" and "OptimizerMap" in rt.__all__
    assert all(getattr(rt, name).__module__.startswith("rdsim.") for name in rt.__all__)


class _NoSecondDerivative(torch.autograd.Function):
    """x**2 with a first derivative only: neither a double backward nor a forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_hvp_schemes_agree_and_fall_back(monkeypatch):
    """Reverse-over-reverse (default) and forward-over-reverse HVPs are the same products; a model
    without a double backward falls back to forward-over-reverse; with neither, a named error."""
    from rdsim.torch._functional import FlatModel

    torch.manual_seed(0)
    net = models.MLP(3, 2, width=5, depth=2, activation="tanh", seed=0).to(DT)
    X, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    fm = FlatModel(net, F.cross_entropy)
    x, V = fm.flat(), torch.randn(4, fm.n_params, dtype=DT)
    g_r, hv_r, l_r = fm.grad_hvp(x, V, X, y, mode="reverse")
    g_f, hv_f, l_f = fm.grad_hvp(x, V, X, y, mode="forward")
    dense = torch.autograd.functional.hessian(lambda w: fm.loss(w, X, y), x)
    torch.testing.assert_close(hv_r, V @ dense, rtol=0, atol=1e-13)
    torch.testing.assert_close(hv_f, hv_r, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_f, g_r, rtol=0, atol=1e-15)
    assert float(l_r) == float(l_f) and fm.hvp_mode == "reverse"
    with pytest.raises(ValueError, match="mode"):
        fm.grad_hvp(x, V, X, y, mode="sideways")

    class Sq(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.lin, self.fn = nn.Linear(3, 1).to(DT), fn

        def forward(self, xb):
            return self.fn.apply(self.lin(xb))

    Xr, yr = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    with pytest.raises(ValueError, match="second derivatives.*reverse-over-reverse.*forward-over-reverse"):
        rt.OptimizerMap(Sq(_NoSecondDerivative), mse2, (Xr, yr), optim.gd(0.1))

    # an operation without a double backward (simulated): forward-over-reverse from then on, same tangents
    net2 = models.MLP(3, 1, width=4, depth=1, activation="tanh", seed=1).to(DT)
    # (hvp="reverse": net2 with mse2 is a fully connected chain, whose products would be written out)
    ref = rt.OptimizerMap(net2, mse2, (Xr, yr), optim.sgd(0.1, 5), hvp="reverse")
    import rdsim.torch._functional as fmod
    real = fmod.grad_hvp_rows

    def no_double_backward(loss, x, Vx, xb, yb, chunk_size=None, mode="reverse"):
        if mode == "reverse":
            raise RuntimeError("simulated: derivative for foo_backward is not implemented")
        return real(loss, x, Vx, xb, yb, chunk_size, mode)

    monkeypatch.setattr(fmod, "grad_hvp_rows", no_double_backward)
    fwd = rt.OptimizerMap(net2, mse2, (Xr, yr), optim.sgd(0.1, 5), hvp="reverse")
    assert fwd.hvp_mode == "forward" and ref.hvp_mode == "reverse"
    xi = fwd.noise_sampler(np.random.default_rng(0))(1)[0]
    Vt = np.random.default_rng(1).standard_normal((fwd.dim, 3))
    np.testing.assert_allclose(fwd.tangent(fwd.x0, xi, Vt), ref.tangent(ref.x0, xi, Vt), atol=1e-14)
