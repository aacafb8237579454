"""rdsim.torch.batch_sharpness against the explicit least-squares minibatch Hessians."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rdsim.torch as rt  # noqa: E402
from rdsim._sharpness import _minibatches  # noqa: E402

DT = torch.float64


def _ls(n=20, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT)
    model = torch.nn.Linear(p, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, p, generator=g, dtype=DT))
    return model, X, y


def test_batch_sharpness_least_squares_oracle():
    model, X, y = _ls()
    w = model.weight.detach().reshape(-1).numpy()
    Xn, yn = X.numpy(), y.numpy().ravel()
    res = rt.batch_sharpness(model, torch.nn.functional.mse_loss, (X, y), batch_size=6, n_batches=7, seed=3)
    ref = []
    for idx in _minibatches(20, 6, 7, 3):  # the same minibatches
        Xb, yb = Xn[idx], yn[idx]
        H = 2 * Xb.T @ Xb / 6  # mean squared error
        gvec = H @ w - 2 * Xb.T @ yb / 6
        ref.append(gvec @ H @ gvec / (gvec @ gvec))
    np.testing.assert_allclose(res.values, ref, rtol=1e-12)
    assert res.value == pytest.approx(np.mean(ref), rel=1e-12)
    assert res.stderr == pytest.approx(np.std(ref, ddof=1) / np.sqrt(7), rel=1e-10)
    # bounded by the minibatch Hessians' top eigenvalues
    assert all(v <= np.linalg.eigvalsh(2 * Xn[i].T @ Xn[i] / 6)[-1] + 1e-12 for v, i in zip(res.values, _minibatches(20, 6, 7, 3)))
    full = rt.batch_sharpness(model, torch.nn.functional.mse_loss, (X, y), batch_size=20)
    assert full.values.size == 1 and np.isnan(full.stderr)
    assert "BatchSharpness(" in repr(res)


def test_batch_sharpness_bad_input():
    model, X, y = _ls()
    mse = torch.nn.functional.mse_loss
    with pytest.raises(ValueError, match="batch_size"):
        rt.batch_sharpness(model, mse, (X, y), batch_size=21)
    with pytest.raises(ValueError, match="n_batches"):
        rt.batch_sharpness(model, mse, (X, y), batch_size=4, n_batches=0)
    with pytest.raises(ValueError, match="seed"):
        rt.batch_sharpness(model, mse, (X, y), batch_size=4, seed=-1)
    with pytest.raises(ValueError, match="data"):
        rt.batch_sharpness(model, mse, (X, y[:5]), batch_size=4)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model"):
        rt.batch_sharpness(model, mse, (X, y), batch_size=4)
