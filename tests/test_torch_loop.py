"""The lean device loop of rdsim.torch.OptimizerMap: QR choice and fallback, windows without host
synchronisation, divergence located inside a window, the compiled path and its fallback."""

import numpy as np
import pytest
import torch
from torch import nn

import models
import rdsim
import rdsim.torch as rt
from rdsim import optim
from rdsim.torch import _optimizer_map as om
from rdsim.torch._qr import cholqr_rows, householder_rows

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def mse(out, t):
    return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()


def least_squares(n=30, p=6, seed=0, spread=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    if spread is not None:  # columns scaled so that X^T X / n has eigenvalues ~ spread
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        X = U @ torch.diag(torch.as_tensor(spread, dtype=DT).sqrt() * n ** 0.5) @ Vh
    y = torch.randn(n, generator=g, dtype=DT)
    net = nn.Linear(p, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(0.3 * torch.randn(1, p, generator=g, dtype=DT))
    return net, X, y


def exact_gd(X, lr):
    alpha = np.linalg.eigvalsh((X.T @ X).numpy() / X.shape[0])
    return np.sort(np.log(np.abs(1 - lr * alpha)))[::-1]


@pytest.mark.parametrize("device", DEVICES)
def test_cholqr_matches_householder(device):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        V = torch.randn(8, 500, generator=g, dtype=DT).to(device)
        Q1, l1, ok = cholqr_rows(V.to(dtype))
        Q2, l2 = householder_rows(V, dtype)
        assert bool(ok) and l1.dtype == torch.float64 and Q1.dtype == dtype
        tol = 1e-13 if dtype == torch.float64 else 1e-6
        np.testing.assert_allclose(l1.cpu().numpy(), l2.cpu().numpy(), rtol=0, atol=tol)
        eye = np.eye(8)
        Q1n = Q1.to(DT).cpu().numpy()
        assert np.abs(Q1n @ Q1n.T - eye).max() < (1e-13 if dtype == torch.float64 else 1e-5)
    # an ill-conditioned block (kappa ~ 1e7) is flagged, a rank-deficient one too
    V = torch.randn(4, 300, generator=g, dtype=DT)
    V[3] = V[0] + 1e-7 * V[3]
    assert not bool(cholqr_rows(V)[2])
    V[3] = V[0]
    assert not bool(cholqr_rows(V)[2])
    # a float32 block has a float32 Gram: accepted up to kappa^2 ~ 1e-2 / u32 (kappa ~ 400)
    U = torch.linalg.qr(torch.randn(300, 4, generator=g, dtype=DT))[0].mT
    for kappa, accepted in ((30.0, True), (600.0, False)):  # 600: the float64 bound would accept it
        V = (torch.diag(torch.tensor([1.0, 0.7, 0.3, 1.0 / kappa], dtype=DT)) @ U).to(torch.float32)
        Q1, l1, ok = cholqr_rows(V)
        assert bool(ok) is accepted
        if accepted:
            np.testing.assert_allclose(l1.numpy(), householder_rows(V, torch.float32)[1].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned_block_falls_back_to_householder(device):
    """GD on least squares with 1 - lr alpha ~ 1e-5 in one direction: the block's condition number is
    ~1e5 every step, Cholesky QR is flagged, the window is redone with Householder and the rest of the
    run keeps it; the exponents are still exact (sorted log|1 - lr alpha_i|)."""
    spread = [1.8, 1.3, 1.0 - 1e-5, 0.6, 0.3, 0.1]
    net, X, y = least_squares(spread=spread)
    lr = 1.0
    system = rt.OptimizerMap(net, mse, (X, y), optim.gd(lr), device=device)
    res = rdsim.lyapunov_spectrum(system, None, 150, transient=400)
    assert system.qr_fallback
    np.testing.assert_allclose(res.exponents, exact_gd(X, lr), rtol=0, atol=1e-9)
    hh = rt.OptimizerMap(net, mse, (X, y), optim.gd(lr), device=device, qr="householder")
    res_h = rdsim.lyapunov_spectrum(hh, None, 150, transient=400)
    np.testing.assert_allclose(res.exponents, res_h.exponents, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_and_householder_agree_on_sgd(device):
    net, X, y = least_squares(n=40)
    spec = optim.momentum(0.1, 0.8, batch_size=8)
    r1 = rdsim.lyapunov_spectrum(rt.OptimizerMap(net, mse, (X, y), spec, device=device), None, 300, seed=2)
    s2 = rt.OptimizerMap(net, mse, (X, y), spec, device=device, qr="householder")
    r2 = rdsim.lyapunov_spectrum(s2, None, 300, seed=2)
    np.testing.assert_allclose(r1.exponents, r2.exponents, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r1.stderr, r2.stderr, rtol=1e-8, atol=1e-14)
    # the sum rule of momentum: log|det Df| = d log(beta) per step, exactly
    assert abs(r1.exponents.sum() - X.shape[1] * np.log(0.8)) < 1e-10


def test_one_host_sync_per_window(monkeypatch):
    """Inside a window the loop never converts a tensor to a Python value: one bool() per window."""
    net, X, y = least_squares(n=40)
    system = rt.OptimizerMap(net, mse, (X, y), optim.sgd(0.1, 8))
    rdsim.lyapunov_spectrum(system, None, 10, k=3)  # warm-up
    calls = {"bool": 0, "item": 0}
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self):
        calls["bool"] += 1
        return real_bool(self)

    def counting_item(self):
        calls["item"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    n_steps = 5 * om.SYNC_EVERY
    rdsim.lyapunov_spectrum(system, None, n_steps, k=3, transient=om.SYNC_EVERY)
    assert calls["item"] == 0
    assert calls["bool"] == 6  # 5 windows + 1 of the transient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_steps,qr_every", [(300, 1), (300, 4), (17, 1)])
def test_divergence_inside_a_window_is_located(device, n_steps, qr_every):
    """GD with lr above 2/lambda_max diverges; the step found by the replayed window equals the step
    at which the reference Python loop (rdsim._lyapunov._run_python) sees a non-finite state."""
    net, X, y = least_squares()
    system = rt.OptimizerMap(net, mse, (X, y), optim.gd(2.5), device=device)
    res = rdsim.lyapunov_spectrum(system, None, n_steps, k=2, qr_every=qr_every)
    # reference: iterate the step on the host until the state is non-finite
    x = system.initial_state(None)
    g = 0
    with np.errstate(all="ignore"):
        while g < n_steps:
            x_new = system.step(x)
            if not np.all(np.isfinite(x_new)):
                break
            x, g = x_new, g + 1
    if g == n_steps:
        assert res.status == "ok"
    else:
        assert res.status == "diverged" and res.diverged_at == g
        np.testing.assert_array_equal(res.x_final, x)


def test_compiled_matches_eager():
    """compile=True (torch.compile of the update and its tangent) gives the eager exponents."""
    net = models.MLP(5, 3, width=6, depth=2, activation="tanh", seed=1, dtype=DT)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=g)
    loss = torch.nn.functional.cross_entropy
    for spec in (optim.sgd(0.3, 8), optim.adam(0.01, batch_size=8)):
        eager = rdsim.lyapunov_spectrum(rt.OptimizerMap(net, loss, (X, y), spec), None, 40, k=4)
        system = rt.OptimizerMap(net, loss, (X, y), spec, compile=True)
        comp = rdsim.lyapunov_spectrum(system, None, 40, k=4)
        assert system.compile_error is None, system.compile_error
        np.testing.assert_allclose(comp.exponents, eager.exponents, rtol=0, atol=1e-10)


def test_compile_failure_falls_back_with_a_warning(monkeypatch):
    net, X, y = least_squares()

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    system = rt.OptimizerMap(net, mse, (X, y), optim.gd(0.3), compile=True)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        res = rdsim.lyapunov_spectrum(system, None, 50)
    assert "no compiler here" in system.compile_error
    eager = rdsim.lyapunov_spectrum(rt.OptimizerMap(net, mse, (X, y), optim.gd(0.3)), None, 50)
    np.testing.assert_array_equal(res.exponents, eager.exponents)
    with pytest.raises(TypeError, match="compile"):
        rt.OptimizerMap(net, mse, (X, y), optim.gd(0.3), compile="yes")
    with pytest.raises(ValueError, match="qr"):
        rt.OptimizerMap(net, mse, (X, y), optim.gd(0.3), qr="gram-schmidt")
