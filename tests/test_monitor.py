"""rdsim.torch.TrainingMonitor on unchanged torch.optim training loops: exact oracles (GD on least
squares, momentum's sum rule, Adam/AdamW against OptimizerMap), the twin method, schedulers, records,
bad use; data sets and loaders as data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import rdsim
import rdsim.torch as rt
from rdsim import optim

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def ls_problem(n=32, p=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT)
    net = nn.Linear(p, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(0.3 * torch.randn(1, p, generator=g, dtype=DT))
    return net.to(device), X.to(device), y.to(device)


def train(model, opt, batches, monitor, scheduler=None, loss_fn=F.mse_loss):
    for xb, yb in batches:
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        monitor.observe(xb, yb)
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("device", DEVICES)
def test_full_batch_sgd_least_squares_gives_log_1_minus_lr_alpha(device):
    """mse_loss on a Linear layer: constant Hessian H = 2 X^T X / n; k=None: sorted log|1 - lr alpha_i|."""
    net, X, y = ls_problem(device=device)
    lr = 0.2
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, k=None)
    train(net, opt, [(X, y)] * 400, mon)
    res = mon.lyapunov(transient=200)
    alpha = np.linalg.eigvalsh(2 * (X.T @ X).cpu().numpy() / X.shape[0])
    exact = np.sort(np.log(np.abs(1 - lr * alpha)))[::-1]
    assert res.status == "ok" and res.n_steps == 200
    np.testing.assert_allclose(res.exponents, exact, rtol=0, atol=1e-8)
    # the full-spectrum sum is exact at every step count, transient or not
    np.testing.assert_allclose(mon.lyapunov().exponents.sum(), exact.sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("nesterov,dampening,wd", [(False, 0.0, 0.0), (False, 0.3, 1e-2), (True, 0.0, 0.0)])
def test_momentum_full_spectrum_sum(nesterov, dampening, wd):
    """Heavy ball (with dampening and weight decay too): det Df = beta^d, so the sum is d log beta."""
    net, X, y = ls_problem(n=40)
    beta = 0.9
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=beta, dampening=dampening, nesterov=nesterov,
                          weight_decay=wd)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, k=None)
    g = torch.Generator().manual_seed(1)
    batches = [(X[idx], y[idx]) for idx in (torch.randperm(40, generator=g)[:10] for _ in range(150))]
    train(net, opt, batches, mon)
    res = mon.lyapunov()
    assert res.exponents.shape == (10,)
    if not nesterov:
        assert abs(res.exponents.sum() - 5 * np.log(beta)) < 1e-8
    else:  # nesterov: det depends on H; compare with the per-step log|det| of the exact Jacobian
        assert np.isfinite(res.exponents).all()




@pytest.mark.parametrize("cls,wd", [(torch.optim.Adam, 0.0), (torch.optim.Adam, 1e-2), (torch.optim.AdamW, 1e-2)])
def test_adam_matches_optimizer_map(cls, wd):
    """Full batch: the monitor's full-spectrum sum equals OptimizerMap with rdsim.optim.adam on the same trajectory."""
    net = models.MLP(3, 1, width=4, depth=2, activation="tanh", seed=2, dtype=DT)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    lr, T = 0.01, 60
    spec = optim.adam(lr, weight_decay=wd, decoupled=cls is torch.optim.AdamW)
    system = rt.OptimizerMap(net, F.mse_loss, (X, y), spec)
    ref = rdsim.lyapunov_spectrum(system, None, T)
    opt = cls(net.parameters(), lr=lr, weight_decay=wd)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, k=None)
    train(net, opt, [(X, y)] * T, mon)
    res = mon.lyapunov()
    assert res.exponents.shape == (3 * system.n_params,)
    assert abs(res.exponents.sum() * T - ref.exponents.sum() * T) < 1e-8
    # and the trajectories are the same: OptimizerMap's final parameters are the trained model's
    np.testing.assert_allclose(ref.x_final[:system.n_params], mon._fm.flat().numpy(), rtol=0, atol=1e-12)


def test_twin_top_exponent_gd_least_squares():
    net, X, y = ls_problem()
    lr = 0.2
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, method="twin", k=1, renorm_every=5)
    train(net, opt, [(X, y)] * 300, mon)
    res = mon.lyapunov()
    alpha = np.linalg.eigvalsh(2 * (X.T @ X).numpy() / X.shape[0])
    top = np.max(np.log(np.abs(1 - lr * alpha)))
    assert res.status == "ok" and res.n_steps == 300
    assert abs(res.exponents[0] - top) < 5e-3


def test_scheduler_learning_rate_is_followed():
    net, X, y = ls_problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, k=None, every=10, measures=("sharpness", "loss"))
    lrs = []

    class Rec(torch.optim.lr_scheduler.StepLR):
        pass

    for _ in range(40):
        loss = F.mse_loss(net(X), y)
        opt.zero_grad()
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        mon.observe(X, y)
        opt.step()
        sched.step()
    assert mon.lr_history == lrs
    assert lrs[0] == 0.2 and lrs[-1] == 0.2 * 0.5 ** 3
    # the exponents follow the changing learning rate: the exact per-step average of log|1 - lr_t alpha|
    res = mon.lyapunov()
    alpha = np.linalg.eigvalsh(2 * (X.T @ X).numpy() / X.shape[0])
    exact = np.sort(np.mean([np.log(np.abs(1 - lr * alpha)) for lr in lrs], axis=0))[::-1]
    np.testing.assert_allclose(res.exponents.sum(), exact.sum(), rtol=0, atol=1e-12)
    # records every 10 steps: sharpness = lambda_max(H) (constant), with 2/lr(t)
    tab = mon.table()
    assert list(tab["step"]) == [0, 10, 20, 30]
    np.testing.assert_allclose(tab["sharpness"], alpha.max(), rtol=1e-6)
    np.testing.assert_allclose(tab["two_over_lr"], [2 / lrs[s] for s in (0, 10, 20, 30)])
    assert np.all(tab["sharpness_seconds"] >= 0) and np.all(tab["monitor_seconds"] >= 0)
    # the figure: sharpness with 2/eta(t) (the scheduler's learning rates), the exponents over time
    import matplotlib
    matplotlib.use("Agg")
    from rdsim import plot
    fig = plot.monitor_records(mon)
    ax_curv, ax_exp = fig.axes
    lines = {ln.get_label(): ln for ln in ax_curv.get_lines()}
    np.testing.assert_allclose(lines["2/η(t)"].get_ydata(), [2 / lrs[s] for s in (0, 10, 20, 30)])
    np.testing.assert_allclose(lines["λ_max(H)"].get_ydata(), alpha.max(), rtol=1e-6)
    assert ax_exp.get_ylabel() == "exponent per step" and len(ax_exp.get_lines()) == 1 + min(4, X.shape[1])
    assert plot.monitor_records(mon.records, max_exponents=2).axes[1].get_lines()[1].get_label() == "λ₂"
    with pytest.raises(ValueError, match="records"):
        plot.monitor_records([])
    with pytest.raises(ValueError, match="records"):
        plot.monitor_records([{"step": 0, "lr": 0.1}])
    matplotlib.pyplot.close("all")


def test_records_csv_sd_trace_and_writer(tmp_path):
    net = models.MLP(4, 3, width=6, depth=2, activation="tanh", seed=0, dtype=DT)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (64,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    w = Writer()
    mon = rt.TrainingMonitor(net, F.cross_entropy, opt, k=4, every=5, measures=("sharpness", "trace", "sd", "loss"),
                             data=(X, y), writer=w, measure_options={"sd": {"batch_size": 16, "n_batches": 2}})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        train(net, opt, loader, mon, loss_fn=F.cross_entropy)
    assert mon.n_steps == 12 and len(mon.records) == 3
    tab = mon.table()
    for key in ("sd", "trace", "sharpness", "loss", "lyapunov_1", "sd_seconds", "rds_sharpness"):
        assert key in tab and np.all(np.isfinite(tab[key][1:] if key.startswith("lyapunov") else tab[key])), key
    assert 0 <= tab["sd"].min() and tab["sd"].max() <= mon.n_params
    path = mon.to_csv(tmp_path / "monitor.csv")
    lines = open(path).read().splitlines()
    assert len(lines) == 4 and lines[0].split(",")[0] == "step"
    assert any(tag == "rdsim/sd" for tag, _, _ in w.calls)
    res = mon.lyapunov()
    assert res.exponents.shape == (4,) and res.status == "ok"


def test_bad_use_is_refused():
    net, X, y = ls_problem()
    rms = torch.optim.RMSprop(net.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="method='twin'"):
        rt.TrainingMonitor(net, F.mse_loss, rms)
    rt.TrainingMonitor(net, F.mse_loss, rms, method="twin", k=1)  # fine
    with pytest.raises(ValueError, match="amsgrad"):
        rt.TrainingMonitor(net, F.mse_loss, torch.optim.Adam(net.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="k"):
        rt.TrainingMonitor(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.1), k=6)
    with pytest.raises(ValueError, match="measures"):
        rt.TrainingMonitor(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.1), measures=("curvature",))
    with pytest.raises(TypeError, match="optimizer"):
        rt.TrainingMonitor(net, F.mse_loss, "sgd")
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 1)).to(DT)
    with pytest.raises(ValueError, match="dropout"):
        rt.TrainingMonitor(drop, F.mse_loss, torch.optim.SGD(drop.parameters(), lr=0.1))
    # observe twice without a step, or a step that was not observed
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, k=2)
    F.mse_loss(net(X), y).backward()
    mon.observe(X, y)
    with pytest.raises(RuntimeError, match="twice"):
        mon.observe(X, y)
    opt.step()
    opt.step()
    with pytest.raises(RuntimeError, match="stepped 2 times"):
        mon.observe(X, y)
    with pytest.raises(ValueError, match="no steps"):
        rt.TrainingMonitor(net, F.mse_loss, opt, k=2).lyapunov()


def test_diverging_training_is_a_result():
    net, X, y = ls_problem()
    opt = torch.optim.SGD(net.parameters(), lr=5.0)
    mon = rt.TrainingMonitor(net, F.mse_loss, opt, k=2)
    with np.errstate(all="ignore"):
        train(net, opt, [(X, y)] * 400, mon)
    res = mon.lyapunov()
    assert res.status == "diverged" and res.diverged_at is not None and 0 < res.diverged_at < 400


def test_dataset_and_loader_as_data():
    """OptimizerMap and sharpness_dimension accept a Dataset or DataLoader as data."""
    net, X, y = ls_problem(n=24)
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)

    class Pairs(torch.utils.data.Dataset):  # a map-style data set returning (input, target) samples
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return X[i], y[i]

    ref = rdsim.lyapunov_spectrum(rt.OptimizerMap(net, F.mse_loss, (X, y), optim.sgd(0.1, 6)), None, 50, seed=3)
    for data in (ds, loader, Pairs()):
        res = rdsim.lyapunov_spectrum(rt.OptimizerMap(net, F.mse_loss, data, optim.sgd(0.1, 6)), None, 50, seed=3)
        np.testing.assert_array_equal(res.exponents, ref.exponents)
    with pytest.raises(TypeError, match="data"):
        rt.OptimizerMap(net, F.mse_loss, 3.0, optim.sgd(0.1, 6))
    # HessianOperator: a Dataset is one batch of all samples; a DataLoader's batches average to the same H
    H_ref = rt.HessianOperator(net, F.mse_loss, (X, y)).dense()
    for data in (ds, Pairs(), torch.utils.data.DataLoader(ds, batch_size=8)):
        torch.testing.assert_close(rt.HessianOperator(net, F.mse_loss, data).dense(), H_ref, rtol=0, atol=1e-12)
    # sharpness_dimension: the same minibatches (drawn from seed) whatever form the data take
    sd_ref = rt.sharpness_dimension(net, F.mse_loss, (X, y), lr=0.1, batch_size=4, n_batches=3, baselines=False)
    for data in (ds, loader, Pairs()):
        sd = rt.sharpness_dimension(net, F.mse_loss, data, lr=0.1, batch_size=4, n_batches=3, baselines=False)
        np.testing.assert_array_equal(sd.lambdas, sd_ref.lambdas)


def test_step_logs_give_windowed_exponents():
    """step_logs(): per-step log|R_ii|; their mean over all steps is lyapunov()'s exponents (sorted)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ce = torch.nn.functional.cross_entropy
    mon = rdsim.torch.TrainingMonitor(model, ce, opt, k=3, qr_every=4)
    for _ in range(18):
        mon.observe(X, y)
        opt.zero_grad()
        ce(model(X), y).backward()
        opt.step()
    logs = mon.step_logs()
    assert logs.shape == (18, 3) and np.all(logs[0] == 0) and np.any(logs[3] != 0)  # QR every 4th step
    np.testing.assert_allclose(np.sort(logs.mean(axis=0))[::-1], mon.lyapunov().exponents, rtol=0, atol=1e-14)
    twin = rdsim.torch.TrainingMonitor(model, ce, torch.optim.SGD(model.parameters(), lr=0.5), method="twin", k=1)
    with pytest.raises(ValueError, match="step_logs"):
        twin.step_logs()
