"""A lyapunov_spectrum run split in two (resume=) equals one run: bitwise for numba systems and the
torch backend on CPU; checkpoints saved to disk; resume arguments checked."""

import numpy as np
import pytest
import torch
from torch import nn

import rdsim
import rdsim.torch as rt
from rdsim import optim

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def _split_vs_whole(system, x0, n1, n2, **kw):
    whole = rdsim.lyapunov_spectrum(system, x0, n1 + n2, **kw)
    first = rdsim.lyapunov_spectrum(system, x0, n1, **kw)
    kw2 = {k: v for k, v in kw.items() if k not in ("transient",)}
    second = rdsim.lyapunov_spectrum(system, None, n2, resume=first, **kw2)
    return whole, first, second


def _noisy_least_squares_map(spec):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((24, 4))
    y = rng.standard_normal(24)
    return rdsim.optimizer_map(rdsim.losses.least_squares(X, y), spec)


@pytest.mark.parametrize("qr_every", [1, 5])
def test_numba_deterministic_split_is_bitwise(qr_every):
    s = rdsim.systems.henon()
    whole, first, second = _split_vs_whole(s, [0.1, 0.1], 20_000, 30_000, transient=100, qr_every=qr_every)
    assert whole.status == second.status == "ok"
    np.testing.assert_array_equal(second.exponents, whole.exponents)
    np.testing.assert_array_equal(second.x_final, whole.x_final)
    np.testing.assert_array_equal(second.Q_final, whole.Q_final)
    assert second.n_steps == 50_000 and second.n_qr == whole.n_qr
    assert second.history_steps[-1] == 50_000
    np.testing.assert_allclose(second.history[-1], whole.history[-1], rtol=0, atol=1e-15)
    assert np.all(np.diff(second.history_steps) > 0)
    assert second.block_means.shape[0] == 40 and np.all(np.isfinite(second.stderr))


@pytest.mark.parametrize("spec", [optim.sgd(0.05, 6), optim.momentum(0.05, 0.9, batch_size=6),
                                  optim.adam(0.01, batch_size=6)], ids=["sgd", "momentum", "adam"])
def test_numba_noisy_split_is_bitwise(spec):
    """Minibatch noise (and Adam's step counter) continue from the stream position."""
    m = _noisy_least_squares_map(spec)
    x0 = np.full(4, 0.2)
    whole, first, second = _split_vs_whole(m, x0, 1500, 2500, transient=50, seed=7)
    assert second.status == "ok"
    np.testing.assert_array_equal(second.exponents, whole.exponents)
    np.testing.assert_array_equal(second.x_final, whole.x_final)


def test_three_way_split_and_saved_checkpoint(tmp_path):
    s = rdsim.systems.henon()
    whole = rdsim.lyapunov_spectrum(s, [0.1, 0.1], 30_000, seed=4)
    a = rdsim.lyapunov_spectrum(s, [0.1, 0.1], 10_000, seed=4)
    path = tmp_path / "ck.npz"
    a.checkpoint.save(path)
    loaded = rdsim.LyapunovCheckpoint.load(path)
    assert loaded.n_steps == 10_000 and loaded.seed == 4 and loaded.system_name == "henon"
    b = rdsim.lyapunov_spectrum(s, None, 10_000, resume=str(path))
    c = rdsim.lyapunov_spectrum(s, None, 10_000, resume=b.checkpoint)
    np.testing.assert_array_equal(c.exponents, whole.exponents)
    assert c.n_steps == 30_000 and c.checkpoint.noise_steps == 30_000


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [optim.sgd(0.1, 8), optim.adam(0.01, batch_size=8)], ids=["sgd", "adam"])
def test_torch_split_matches_whole(device, spec):
    """The torch backend on its device loop: a split run equals one run (to 1e-12; bitwise on CPU)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)

    def mse(out, t):
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    def make():
        return rt.OptimizerMap(net, mse, (X, y), spec, device=device)

    whole = rdsim.lyapunov_spectrum(make(), None, 120, k=5, transient=10, qr_every=2, seed=1)
    first = rdsim.lyapunov_spectrum(make(), None, 50, k=5, transient=10, qr_every=2, seed=1)
    second = rdsim.lyapunov_spectrum(make(), None, 70, resume=first)
    assert whole.status == second.status == "ok"
    np.testing.assert_allclose(second.exponents, whole.exponents, rtol=0, atol=1e-12)
    np.testing.assert_allclose(second.x_final, whole.x_final, rtol=0, atol=1e-12)
    if device == "cpu":
        np.testing.assert_array_equal(second.exponents, whole.exponents)


def test_resume_argument_errors(tmp_path):
    s = rdsim.systems.henon()
    a = rdsim.lyapunov_spectrum(s, [0.1, 0.1], 1000, qr_every=2, seed=3)
    cases = [
        (dict(x0=[0.1, 0.1]), ValueError, "x0"),
        (dict(transient=5), ValueError, "transient"),
        (dict(k=1), ValueError, "k"),
        (dict(qr_every=3), ValueError, "qr_every"),
        (dict(seed=5), ValueError, "seed"),
        (dict(Q0=np.eye(2)), ValueError, "Q0"),
    ]
    for kw, exc, name in cases:
        kw = {"x0": None, **kw}
        with pytest.raises(exc, match=name):
            rdsim.lyapunov_spectrum(s, kw.pop("x0"), 100, resume=a, **kw)
    with pytest.raises(TypeError, match="resume"):
        rdsim.lyapunov_spectrum(s, None, 100, resume=42)
    with pytest.raises(ValueError, match="resume: the checkpoint is of system 'henon'"):
        rdsim.lyapunov_spectrum(rdsim.systems.standard_map() if hasattr(rdsim.systems, "standard_map")
                                else rdsim.systems.lozi(), None, 100, resume=a)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="resume: cannot read"):
        rdsim.lyapunov_spectrum(s, None, 100, resume=bad)
    # a diverged run has no checkpoint
    div = rdsim.lyapunov_spectrum(rdsim.systems.logistic(r=5.0), [0.3], 100)
    assert div.status == "diverged" and div.checkpoint is None
    with pytest.raises(ValueError, match="resume: the run ended with status 'diverged'"):
        rdsim.lyapunov_spectrum(rdsim.systems.logistic(r=5.0), None, 100, resume=div)
    # resuming keeps qr_every and seed when not given
    b = rdsim.lyapunov_spectrum(s, None, 1000, resume=a)
    assert b.seed == 3 and b.checkpoint.qr_every == 2


def _train(model, opt, monitor, X, y, steps, start):
    g = torch.Generator().manual_seed(11)
    order = [torch.randint(0, X.shape[0], (8,), generator=g) for _ in range(start + steps)]
    for idx in order[start:]:
        xb, yb = X[idx], y[idx]
        monitor.observe(xb, yb)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()


@pytest.mark.parametrize("method", ["tangent", "twin"])
def test_monitor_state_dict_continues_a_run(method, tmp_path):
    """Training stopped, saved (model, optimizer, monitor), continued in fresh objects = one run."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)

    def build():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
        kw = dict(k=4, qr_every=3, every=10, measures=("loss",)) if method == "tangent" else \
            dict(method="twin", k=1, renorm_every=4, every=10, measures=("loss",))
        return model, opt, rt.TrainingMonitor(model, torch.nn.functional.cross_entropy, opt, **kw)

    model, opt, mon = build()
    _train(model, opt, mon, X, y, 40, 0)
    whole = mon.lyapunov()

    model, opt, mon = build()
    _train(model, opt, mon, X, y, 22, 0)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict()}, path)
    model, opt, mon = build()
    ck = torch.load(path, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    mon.load_state_dict(ck["monitor"])
    _train(model, opt, mon, X, y, 18, 22)
    split = mon.lyapunov()
    assert split.status == whole.status == "ok"
    np.testing.assert_array_equal(split.exponents, whole.exponents)
    assert [r["step"] for r in mon.records] == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="already observed"):
        mon.load_state_dict(ck["monitor"])
    _, _, other = build()
    bad = dict(ck["monitor"], seed=5)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"n_steps": 3})
