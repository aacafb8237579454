"""The written-out Hessian-vector products of fully connected chains (rdsim.torch._mlp).

Oracle: the dense Hessian of the same flat loss (torch.autograd.functional.hessian), float64.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import rdsim
import rdsim.torch as rt
from rdsim import optim
from rdsim.torch._functional import FlatModel

DT = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _dense_check(fm, X, y, k=3, seed=0):
    """The chain's (g, HV, loss) against the dense Hessian and torch.func's gradient."""
    g0 = torch.Generator().manual_seed(seed)
    x = fm.flat()
    V = torch.randn(k, fm.n_params, generator=g0, dtype=DT).to(x.device)
    g, hv, loss = fm.grad_hvp(x, V, X, y)
    H = torch.autograd.functional.hessian(lambda w: fm.loss(w, X, y), x)
    g_ref, _, l_ref = fm.grad_hvp(x, V, X, y, mode="reverse")
    scale = float(H.abs().max())
    assert float((hv - V @ H).abs().max()) <= 1e-13 * scale
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-15 * max(1.0, float(g_ref.abs().max())))
    assert abs(float(loss) - float(l_ref)) <= 1e-14 * max(1.0, abs(float(l_ref)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "silu", "gelu", "leaky_relu", "identity"])
def test_chain_matches_dense_hessian(activation, device):
    torch.manual_seed(0)
    net = models.MLP(6, 3, width=5, depth=3, activation=activation, seed=1).to(DT).to(device)
    X = torch.randn(9, 6, dtype=DT, device=device)
    y = torch.randint(0, 3, (9,), device=device)
    fm = FlatModel(net, F.cross_entropy)
    _dense_check(fm, X, y)
    assert fm.hvp_mode == "mlp" and fm.chain_reason == "chain"


@pytest.mark.parametrize("case", ["mse_nobias", "half_mse", "ignore_index", "flatten_sequential", "depth1"])
def test_chain_losses_and_layouts(case):
    torch.manual_seed(0)
    X = torch.randn(10, 6, dtype=DT)
    yc, yr = torch.randint(0, 3, (10,)), torch.randn(10, 3, dtype=DT)
    if case == "mse_nobias":
        net, loss, y = models.MLP(6, 3, width=4, depth=3, bias=False, activation="tanh").to(DT), F.mse_loss, yr
    elif case == "half_mse":
        net, loss, y = models.MLP(6, 3, width=4, depth=2, activation="gelu").to(DT), lambda o, t: 0.5 * F.mse_loss(o, t), yr
    elif case == "ignore_index":
        yc[:3] = 1
        net, loss, y = models.MLP(6, 3, width=4, depth=2).to(DT), lambda o, t: F.cross_entropy(o, t, ignore_index=1), yc
    elif case == "flatten_sequential":
        X = X.reshape(10, 2, 3)
        net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4, bias=False), nn.Linear(4, 3)).to(DT)
        loss, y = F.cross_entropy, yc
    else:
        net, loss, y = nn.Linear(6, 3).to(DT), F.cross_entropy, yc
    fm = FlatModel(net, loss)
    _dense_check(fm, X, y)
    assert fm.hvp_mode == "mlp"


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))[:, :3]


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return torch.tanh(h) if float(h.detach().mean()) > 0 else h


@pytest.mark.parametrize("case", ["softplus", "label_smoothing", "residual", "tied", "branch", "batchnorm",
                                  "frozen", "sum_mse"])
def test_non_chains_use_torch_func(case):
    torch.manual_seed(0)
    X, yc = torch.randn(10, 6, dtype=DT), torch.randint(0, 3, (10,))
    loss, y, params = F.cross_entropy, yc, None
    if case == "softplus":
        net = models.MLP(6, 3, width=4, depth=2, activation="softplus").to(DT)
    elif case == "label_smoothing":
        net, loss = models.MLP(6, 3, width=4, depth=2).to(DT), lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)
    elif case == "residual":
        net = _Residual().to(DT)
    elif case == "tied":
        net = _Tied().to(DT)
    elif case == "branch":
        net = _Branch().to(DT)
    elif case == "batchnorm":
        net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    elif case == "frozen":
        net = models.MLP(6, 3, width=4, depth=2).to(DT)
        params = [net.layers[1].weight]
    else:
        net = models.MLP(6, 1, width=4, depth=2).to(DT)
        loss, y = (lambda o, t: F.mse_loss(o.squeeze(-1), t, reduction="sum")), torch.randn(10, dtype=DT)
    fm = FlatModel(net, loss, params=params)
    x = fm.flat()
    V = torch.randn(2, fm.n_params, dtype=DT)
    g, hv, _ = fm.grad_hvp(x, V, X, y)
    assert fm.hvp_mode == "reverse" and fm.chain is False and fm.chain_reason
    H = torch.autograd.functional.hessian(lambda w: fm.loss(w, X, y), x)
    assert float((hv - V @ H).abs().max()) <= 1e-12 * float(H.abs().max())


def test_workspace_follows_batch_and_block_sizes():
    torch.manual_seed(0)
    net = models.MLP(5, 3, width=4, depth=3, activation="tanh").to(DT)
    fm = FlatModel(net, F.cross_entropy)
    x = fm.flat()
    for b, k in [(8, 3), (5, 3), (8, 1), (8, 3), (12, 6)]:
        X, y = torch.randn(b, 5, dtype=DT), torch.randint(0, 3, (b,))
        V = torch.randn(k, fm.n_params, dtype=DT)
        _, hv, _ = fm.grad_hvp(x, V, X, y)
        _, hv_ref, _ = fm.grad_hvp(x, V, X, y, mode="reverse")
        assert fm.hvp_mode == "mlp"
        torch.testing.assert_close(hv, hv_ref, rtol=0, atol=1e-14)
    # chunks give the same products
    _, hv_c, _ = fm.grad_hvp(x, V, X, y, chunk_size=4)
    torch.testing.assert_close(hv_c, hv, rtol=0, atol=1e-15)


def test_optimizer_map_hvp_option_and_exponents():
    torch.manual_seed(0)
    X, y = torch.randn(24, 5, dtype=DT), torch.randint(0, 3, (24,))
    net = models.MLP(5, 3, width=6, depth=3, activation="tanh", seed=2).to(DT)
    spec = optim.sgd(0.3, 6)
    fast = rt.OptimizerMap(net, F.cross_entropy, (X, y), spec)
    ref = rt.OptimizerMap(net, F.cross_entropy, (X, y), spec, hvp="reverse")
    fwd = rt.OptimizerMap(net, F.cross_entropy, (X, y), spec, hvp="forward")
    assert (fast.hvp_mode, ref.hvp_mode, fwd.hvp_mode) == ("mlp", "reverse", "forward")
    assert rt.OptimizerMap(net, F.cross_entropy, (X, y), spec, hvp="mlp").hvp_mode == "mlp"
    xi = fast.noise_sampler(np.random.default_rng(0))(1)[0]
    V = np.random.default_rng(1).standard_normal((fast.dim, 4))
    np.testing.assert_allclose(fast.tangent(fast.x0, xi, V), ref.tangent(ref.x0, xi, V), rtol=0, atol=1e-14)
    np.testing.assert_allclose(fwd.tangent(fwd.x0, xi, V), ref.tangent(ref.x0, xi, V), rtol=0, atol=1e-14)
    r_fast = rdsim.lyapunov_spectrum(fast, None, 60, k=5, seed=3)
    r_ref = rdsim.lyapunov_spectrum(ref, None, 60, k=5, seed=3)
    np.testing.assert_allclose(r_fast.exponents, r_ref.exponents, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="hvp"):
        rt.OptimizerMap(net, F.cross_entropy, (X, y), spec, hvp="fast")
    with pytest.raises(ValueError, match="hvp: 'mlp' needs a chain.*label|hvp: 'mlp' needs a chain"):
        rt.OptimizerMap(net, lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), (X, y), spec, hvp="mlp")


def test_monitor_uses_the_chain():
    torch.manual_seed(0)
    X, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 3, (16,))
    logs = {}
    for hvp in ("auto", "reverse"):
        net = models.MLP(5, 3, width=6, depth=3, activation="relu", seed=2).to(DT)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        mon = rt.TrainingMonitor(net, F.cross_entropy, opt, k=3, measures=(), hvp=hvp)
        for s in range(12):
            xb, yb = X[(s % 4) * 4:(s % 4) * 4 + 4], y[(s % 4) * 4:(s % 4) * 4 + 4]
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            mon.observe(xb, yb)
            opt.step()
        logs[hvp] = mon.lyapunov().exponents
        assert mon.hvp_mode == ("mlp" if hvp == "auto" else "reverse")
    np.testing.assert_allclose(logs["auto"], logs["reverse"], rtol=0, atol=1e-12)


def test_hessian_operator_uses_the_chain():
    torch.manual_seed(0)
    X, y = torch.randn(20, 5, dtype=DT), torch.randint(0, 3, (20,))
    net = models.MLP(5, 3, width=6, depth=3, activation="tanh", seed=2).to(DT)
    H = rt.HessianOperator(net, F.cross_entropy, [(X[:12], y[:12]), (X[12:], y[12:])], dtype=DT)
    ref = rt.HessianOperator(net, F.cross_entropy, [(X[:12], y[:12]), (X[12:], y[12:])], dtype=DT)
    ref.try_chain = False
    torch.testing.assert_close(H.dense(), ref.dense(), rtol=0, atol=1e-14)
    assert H.hvp_mode == "mlp" and ref.hvp_mode == "reverse"
    fresh = rt.HessianOperator(net, F.cross_entropy, (X, y), dtype=DT)
    sub = fresh.on_batch(X[:7], y[:7])  # the parent looks for the chain once; copies share it
    assert fresh.hvp_mode == sub.hvp_mode == "mlp" and sub.chain is fresh.chain
    torch.testing.assert_close(sub.dense(), ref.on_batch(X[:7], y[:7]).dense(), rtol=0, atol=1e-14)


def test_chain_structure_is_cached_per_model_and_rechecked():
    from rdsim.torch import _functional as fmod
    torch.manual_seed(0)
    X, y = torch.randn(12, 5, dtype=DT), torch.randint(0, 3, (12,))
    net = models.MLP(5, 3, width=6, depth=3, activation="tanh", seed=2).to(DT)
    first = rt.HessianOperator(net, F.cross_entropy, (X, y), dtype=DT)
    first @ torch.randn(first.n_params, 2, dtype=DT)
    assert first.hvp_mode == "mlp" and len(fmod._CHAINS[net]) == 1
    calls = []
    orig = fmod.detect_chain

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    fmod.detect_chain = counting
    try:
        again = rt.HessianOperator(net, F.cross_entropy, (X, y), dtype=DT)
        again @ torch.randn(again.n_params, 2, dtype=DT)
        assert again.hvp_mode == "mlp" and not calls and again.chain is not first.chain  # reused, own workspace
        # the same module changed in place: the cached structure fails its numerical re-check and is traced again
        net._act = torch.sigmoid
        changed = rt.HessianOperator(net, F.cross_entropy, (X, y), dtype=DT)
        H = changed.dense()
        assert calls and changed.hvp_mode == "mlp" and changed.chain.acts == (("sigmoid", None),) * 2
        ref = torch.autograd.functional.hessian(lambda w: changed.loss_at(w, X, y), changed.w)
        torch.testing.assert_close(H, ref, rtol=0, atol=1e-13)
    finally:
        fmod.detect_chain = orig


@pytest.mark.parametrize("form", ["pow_mean", "squeeze_half", "sum_rows_half", "square_mean"])
def test_written_out_squared_errors(form):
    torch.manual_seed(0)
    X = torch.randn(10, 6, dtype=DT)
    out_dim = 1 if form == "squeeze_half" else 3
    net = models.MLP(6, out_dim, width=4, depth=3, activation="tanh", seed=3).to(DT)
    if form == "pow_mean":
        loss, y = (lambda o, t: ((o - t) ** 2).mean()), torch.randn(10, 3, dtype=DT)
    elif form == "squeeze_half":
        loss, y = (lambda o, t: 0.5 * ((o.squeeze(-1) - t) ** 2).mean()), torch.randn(10, dtype=DT)
    elif form == "sum_rows_half":
        loss, y = (lambda o, t: 0.5 * ((o - t) ** 2).sum(-1).mean()), torch.randn(10, 3, dtype=DT)
    else:
        loss, y = (lambda o, t: (o - t).square().mean()), torch.randn(10, 3, dtype=DT)
    fm = FlatModel(net, loss)
    _dense_check(fm, X, y)
    assert fm.hvp_mode == "mlp", fm.chain_reason


def test_low_precision_is_not_written_out():
    net = models.MLP(5, 3, width=4, depth=2, seed=0).to(torch.bfloat16)
    fm = FlatModel(net, F.cross_entropy)
    X, y = torch.randn(6, 5, dtype=torch.bfloat16), torch.randint(0, 3, (6,))
    fm.grad_hvp(fm.flat(), torch.randn(2, fm.n_params, dtype=torch.bfloat16), X, y)
    assert fm.hvp_mode == "reverse" and "bfloat16" in fm.chain_reason


@pytest.mark.parametrize("case", ["tanh_ce", "ignore_index", "relu_mse_nobias", "squeeze_half", "sum_rows_half",
                                  "flatten_identity"])
def test_per_row_batches_match_dense_hessians(case):
    """Lockstep SLQ's products (row r times the Hessian on its own minibatch r) by the chain equal
    the dense Hessians of each minibatch, and torch.func's per-row products."""
    from rdsim.torch._functional import hvp_rows_per_batch

    torch.manual_seed(0)
    n, k, b = 30, 4, 7
    X, yc, yr = torch.randn(n, 6, dtype=DT), torch.randint(0, 3, (n,)), torch.randn(n, 3, dtype=DT)
    if case == "tanh_ce":
        net, loss, y = models.MLP(6, 3, width=5, depth=3, activation="tanh", seed=1).to(DT), F.cross_entropy, yc
    elif case == "ignore_index":
        yc[::3] = 1
        net, loss, y = models.MLP(6, 3, width=5, depth=2, seed=1).to(DT), (lambda o, t: F.cross_entropy(o, t, ignore_index=1)), yc
    elif case == "relu_mse_nobias":
        net, loss, y = models.MLP(6, 3, width=5, depth=3, bias=False, activation="relu", seed=1).to(DT), F.mse_loss, yr
    elif case == "squeeze_half":
        net = models.MLP(6, 1, width=5, depth=2, activation="silu", seed=1).to(DT)
        loss, y = (lambda o, t: 0.5 * ((o.squeeze(-1) - t) ** 2).mean()), yr[:, 0].contiguous()
    elif case == "sum_rows_half":
        net = models.MLP(6, 3, width=5, depth=2, activation="gelu", seed=1).to(DT)
        loss, y = (lambda o, t: 0.5 * ((o - t) ** 2).sum(-1).mean()), yr
    else:
        X = X.reshape(n, 2, 3)
        net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Linear(4, 3)).to(DT)
        loss, y = F.cross_entropy, yc
    op = rt.HessianOperator(net, loss, (X, y), dtype=DT)
    g0 = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=g0)[:b] for _ in range(k)])
    Xs, ys = X[idx], y[idx]
    V = torch.randn(k, op.w.numel(), generator=g0, dtype=DT)
    got = op._rows_multi(V, Xs, ys)
    assert op.hvp_mode == "mlp", op.chain_reason
    for r in range(k):
        H = torch.autograd.functional.hessian(lambda w: op.loss_at(w, Xs[r], ys[r]), op.w)
        assert float((got[r] - V[r] @ H).abs().max()) <= 1e-13 * float(H.abs().max())
    ref = hvp_rows_per_batch(op.loss_at, op.w, V, Xs, ys)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13 * float(ref.abs().max()))
    op.chunk_size = 3  # in chunks of rows, with their batches
    torch.testing.assert_close(op._rows_multi(V, Xs, ys), got, rtol=0, atol=1e-15 * float(ref.abs().max()))


def test_minibatch_slq_sharpness_dimension_uses_the_chain(monkeypatch):
    """The SLQ sharpness dimension over minibatches (a batch per Lanczos run) is the same with the
    written-out products as with torch.func's."""
    from rdsim.torch import _functional, _hessian

    torch.manual_seed(0)
    X, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    net = models.MLP(5, 3, width=6, depth=2, activation="tanh", seed=2).to(DT)
    kw = dict(lr=2.0, batch_size=8, method="slq", n_batches=4, seed=0, baselines=False)
    calls = []
    real = _hessian.chain_products
    monkeypatch.setattr(_hessian, "chain_products", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = rt.sharpness_dimension(net, F.cross_entropy, (X, y), **kw)
    assert calls
    for mod in (_functional, _hessian):  # no chain: torch.func's products
        monkeypatch.setattr(mod, "ensure_chain", lambda *a, **k: None)
    calls.clear()
    slow = rt.sharpness_dimension(net, F.cross_entropy, (X, y), **kw)
    assert not calls
    assert abs(fast.value - slow.value) <= 1e-9 * max(1.0, abs(slow.value))
    a, b = fast.density.nodes, slow.density.nodes  # the Ritz values of every run
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * np.nanmax(np.abs(b)))
    np.testing.assert_allclose(fast.density.weights, slow.density.weights, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_sgd_tangent_written_by_the_chain_is_bitwise_the_unfused_one(dtype, chunk_size, device):
    """Plain SGD on a chain: the push writes V - lr H V as it forms H V; the values are bitwise
    those of H V followed by the update's tangent (torch.add(V, HV, alpha=-lr)), with and without
    biases, in chunks too; OptimizerMap's push is that one."""
    from rdsim.torch import _update as upd
    g0 = torch.Generator().manual_seed(3)
    X = torch.randn(40, 6, generator=g0, dtype=DT).to(dtype)
    y = torch.randint(0, 3, (40,), generator=g0)
    for bias in (True, False):
        net = models.MLP(6, 3, width=5, depth=3, activation="tanh", seed=1, bias=bias).to(dtype)
        m = rt.OptimizerMap(net, F.cross_entropy, (X, y), optim.sgd(0.1, 8), chunk_size=chunk_size, device=device)
        fm, h = m._fm, m._hyper
        assert m.hvp_mode == "mlp"
        z = m._state_tensor(m.x0)
        V = torch.randn(5, m.tangent_dim, generator=g0, dtype=DT).to(device=device, dtype=dtype)
        xb, yb = m.inputs[:8], m.targets[:8]
        g, TV, loss = fm.grad_tangent(h, z, V, xb, yb, chunk_size)
        g_r, HV, loss_r = fm.grad_hvp(z, V, xb, yb, chunk_size)
        for a, b in ((g, g_r), (TV, upd.tangent(h, z, g_r, V, HV)), (loss, loss_r)):
            assert torch.equal(a, b)
        z_new, TV2, _ = m._advance_eager(z, V, xb, yb, 1.0)
        assert torch.equal(TV2, TV) and torch.equal(z_new, upd.update(h, z, g_r))
