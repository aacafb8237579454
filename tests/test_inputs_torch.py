"""Bad inputs to the torch entry points (OptimizerMap, HessianOperator, hessian_eigenvalues,
lanczos, slq, sharpness_dimension, TrainingMonitor): each gets an exception of the stated type whose
message names the argument (issue 12)."""

import numpy as np
import pytest
import torch
from torch import nn

import rdsim
import rdsim.torch as rt
from rdsim._validate import UserFunctionError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
_g = torch.Generator().manual_seed(0)
X = torch.randn(10, 3, generator=_g, dtype=DT)
Y = torch.randn(10, generator=_g, dtype=DT)
NAN_X = X.clone()
NAN_X[2, 1] = float("nan")


def net():
    torch.manual_seed(0)
    return nn.Linear(3, 1).to(DT)


def mse(out, t):
    return ((out.squeeze(-1) - t) ** 2).mean()


def boom(out, t):
    raise ZeroDivisionError("user loss failed")


def sd(**kw):
    return rt.sharpness_dimension(net(), mse, (X, Y), **{"lr": 0.1, "batch_size": 4, **kw})


def monitor(**kw):
    m = net()
    return rt.TrainingMonitor(m, kw.pop("loss_fn", mse), kw.pop("optimizer", None) or torch.optim.SGD(m.parameters(), lr=0.1),
                              **{"k": 2, **kw})


def op(**kw):
    return rt.HessianOperator(net(), mse, kw.pop("data", (X, Y)), **kw)


CASES = [
    # OptimizerMap
    ("OM model", lambda: rt.OptimizerMap(3, mse, (X, Y), rdsim.optim.gd(0.1)), TypeError, "model"),
    ("OM targets", lambda: rt.OptimizerMap(net(), mse, (X, Y[:5]), rdsim.optim.gd(0.1)), ValueError, "data"),
    ("OM cuda", lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.gd(0.1), device="cuda"), ValueError, "device"),
    ("OM spec", lambda: rt.OptimizerMap(net(), mse, (X, Y), {"lr": 0.1}), TypeError, "optimizer"),
    ("OM lr nan", lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.gd(float("nan"))), ValueError, "lr"),
    ("OM dtype", lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.gd(0.1), dtype=torch.int32), ValueError, "dtype"),
    ("OM empty", lambda: rt.OptimizerMap(net(), mse, (X[:0], Y[:0]), rdsim.optim.gd(0.1)), ValueError, "data"),
    ("OM batch > n", lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.sgd(0.1, 20)), ValueError, "batch_size"),
    ("OM compile", lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.gd(0.1), compile="yes"), TypeError, "compile"),
    ("OM qr", lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.gd(0.1), qr="magic"), ValueError, "qr"),
    # HessianOperator and its methods
    ("HO cuda", lambda: op(device="cuda"), ValueError, "device"),
    ("HO bogus device", lambda: op(device="tpu9"), ValueError, "device"),
    ("HO device type", lambda: op(device=3.5), TypeError, "device"),
    ("HO pair", lambda: op(data=(X,)), TypeError, "data"),
    ("HO empty", lambda: op(data=(X[:0], Y[:0])), ValueError, "data"),
    ("HO nan data", lambda: op(data=(NAN_X, Y)), ValueError, "data"),
    ("HO nan params", lambda: op(params=np.full(4, np.nan)), ValueError, "params"),
    ("HO params size", lambda: op(params=np.zeros(5)), ValueError, "params"),
    ("HO model", lambda: rt.HessianOperator("net", mse, (X, Y)), TypeError, "model"),
    ("HO loss", lambda: rt.HessianOperator(net(), 3, (X, Y)), TypeError, "loss_fn"),
    ("HO matmul", lambda: op() @ torch.zeros(7, dtype=DT), ValueError, "V"),
    ("HO trace probes", lambda: op().trace(0), ValueError, "n_probes"),
    # hessian_eigenvalues / lanczos / slq
    ("heig k=0", lambda: rt.hessian_eigenvalues(net(), mse, (X, Y), k=0), ValueError, "k"),
    ("heig tol", lambda: rt.hessian_eigenvalues(net(), mse, (X, Y), k=1, tol=-1), ValueError, "tol"),
    ("heig nan data", lambda: rt.hessian_eigenvalues(net(), mse, (NAN_X, Y), k=1), ValueError, "data"),
    ("lanczos op", lambda: rt.lanczos(3, k=2), TypeError, "op"),
    ("lanczos k > n", lambda: rt.lanczos(torch.eye(3, dtype=DT), k=5), ValueError, "k"),
    ("lanczos n_iter < k", lambda: rt.lanczos(torch.eye(3, dtype=DT), k=3, n_iter=2), ValueError, "n_iter"),
    ("lanczos non-symmetric", lambda: rt.lanczos(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=DT), k=1),
     ValueError, "symmetric"),
    ("slq n_iter", lambda: rt.slq(op(), n_iter=0), ValueError, "n_iter"),
    ("slq n_runs", lambda: rt.slq(op(), n_runs=0), ValueError, "n_runs"),
    ("slq basis_device", lambda: rt.slq(op(), n_iter=3, basis_device="cuda"), ValueError, "basis_device"),
    # sharpness_dimension
    ("SD lr < 0", lambda: sd(lr=-1), ValueError, "lr"),
    ("SD lr str", lambda: sd(lr="0.1"), ValueError, "lr"),
    ("SD lr nan", lambda: sd(lr=float("nan")), ValueError, "lr"),
    ("SD seed", lambda: sd(seed=-1), ValueError, "seed"),
    ("SD method", lambda: sd(method="magic"), ValueError, "method"),
    ("SD n_batches", lambda: sd(n_batches=0), ValueError, "n_batches"),
    ("SD batch 0", lambda: sd(batch_size=0), ValueError, "batch_size"),
    ("SD batch > n", lambda: sd(batch_size=100), ValueError, "batch_size"),
    ("SD eps < 0", lambda: sd(eps=-1.0), ValueError, "eps"),
    ("SD bins", lambda: sd(method="slq", bins=0), ValueError, "bins"),
    ("SD bin_value", lambda: sd(method="slq", bin_value="median"), ValueError, "bin_value"),
    ("SD rank_tol", lambda: sd(rank_tol=-1), ValueError, "rank_tol"),
    ("SD unknown option", lambda: sd(device="cuda"), TypeError, "device"),
    ("SD empty", lambda: rt.sharpness_dimension(net(), mse, (X[:0], Y[:0]), lr=0.1, batch_size=4), ValueError, "data"),
    ("SD nan data", lambda: rt.sharpness_dimension(net(), mse, (NAN_X, Y), lr=0.1, batch_size=10, n_batches=1),
     ValueError, "non-finite"),
    # TrainingMonitor
    ("TM k=0", lambda: monitor(k=0), ValueError, "k"),
    ("TM k > dim", lambda: monitor(k=8), ValueError, "k"),
    ("TM every", lambda: monitor(every=0), ValueError, "every"),
    ("TM measures", lambda: monitor(measures=("foo",)), ValueError, "measures"),
    ("TM seed", lambda: monitor(seed="a"), ValueError, "seed"),
    ("TM method", lambda: monitor(method="x"), ValueError, "method"),
    ("TM optimizer", lambda: monitor(optimizer=3), TypeError, "optimizer"),
    ("TM unsupported", lambda: monitor(optimizer=torch.optim.RMSprop(net().parameters())), ValueError, "optimizer"),
    ("TM no steps", lambda: monitor().lyapunov(), ValueError, "lyapunov"),
    ("TM transient", lambda: monitor().lyapunov(transient=-1), ValueError, "transient"),
    ("TM bad batch", lambda: monitor().observe(X[:, :2], Y), UserFunctionError, "model/loss_fn"),
    ("TM loss raises", lambda: monitor(loss_fn=boom).observe(X, Y), UserFunctionError, "model/loss_fn"),
    ("TM state", lambda: monitor().load_state_dict({"n_steps": 1}), ValueError, "state"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_named(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), str(info.value)


def test_user_loss_error_is_chained_with_step():
    m = monitor(loss_fn=boom)
    with pytest.raises(UserFunctionError) as info:
        m.observe(X, Y)
    assert isinstance(info.value.__cause__, ZeroDivisionError) and info.value.step == 0
    assert m.n_steps == 0 and m.lr_history == []  # the failed step is not counted


def test_finite_but_unusual_inputs_give_results():
    """Not errors: a single sample, an integer-valued float target, float32 data for a float64 model."""
    res = rt.sharpness_dimension(net(), mse, (X[:1], Y[:1]), lr=0.1, batch_size=1, n_batches=2)
    assert np.isfinite(res.value)
    e = rt.hessian_eigenvalues(net(), mse, (X.float(), torch.round(Y)), k=2)
    assert np.all(np.isfinite(np.asarray(e)))


@pytest.mark.parametrize("call, error, name", [
    (lambda: rt.OptimizerMap(net(), mse, (X, Y), rdsim.optim.gd(0.1), device="tpu9"), ValueError, "device"),
    (lambda: rt.OptimizerMap(net(), mse, (NAN_X, Y), rdsim.optim.gd(0.1)), ValueError, "data"),
    (lambda: rt.OptimizerMap(net(), boom, (X, Y), rdsim.optim.gd(0.1)), ValueError, "loss_fn"),
    (lambda: rt.OptimizerMap(net(), mse, (X[:, :2], Y), rdsim.optim.gd(0.1)), ValueError, "data"),
], ids=["bogus device", "NaN data", "loss raises", "wrong width"])
def test_optimizer_map_construction_named(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value) and info.value.__cause__ is not None or name in ("device", "data")


def test_torch_loop_reports_rank_loss():
    """The device loop records the block's conditioning like the numba loop: a QR every 12 steps of
    least squares with |1 - eta alpha| = 0.01 and 1 (a log gap of ~4.6 per step, ~55 per QR) is
    status "rank_lost"; a QR every step is fine and exact."""
    import warnings

    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(40, 2, generator=g, dtype=DT))
    Xs = U @ torch.diag(torch.tensor([1.0, 1e-3], dtype=DT).sqrt() * 40 ** 0.5)  # X^T X / n = diag(1, 1e-3)
    ys = torch.randn(40, generator=g, dtype=DT)
    model = nn.Linear(2, 1, bias=False).to(DT)

    def half_mse(out, t):
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    m = rt.OptimizerMap(model, half_mse, (Xs, ys), rdsim.optim.gd(0.99))
    ok = rdsim.lyapunov_spectrum(m, None, 60, qr_every=1)
    assert ok.status == "ok"
    # the sum rule is exact at any length (the individual exponents carry a ~1/T start-block bias)
    assert abs(ok.exponents.sum() - (np.log(1 - 0.99e-3) + np.log(0.01))) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lost = rdsim.lyapunov_spectrum(m, None, 60, qr_every=12)
    assert lost.status == "rank_lost" and "qr_every" in lost.message
