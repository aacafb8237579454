"""The structured exact route of rdsim.torch.sharpness_dimension (a first nn.Linear seen through the
batch's row space; issue 10 item 5): same eigenvalues and SD as the dense route, and fall-backs."""

import numpy as np
import pytest
import torch
from torch import nn

import rdsim.torch as rt
from models import MLP
from rdsim.torch._structured import structured_eigenvalues

F = nn.functional


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(48, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    return X, y


@pytest.mark.parametrize("bias", [False, True])
def test_structured_equals_dense_route(problem, bias):
    X, y = problem
    model = MLP(20, 3, width=6, depth=3, bias=bias, seed=1).double()
    kw = dict(lr=3.0, batch_size=8, n_batches=3, seed=0, baselines=False)
    dense = rt.sharpness_dimension(model, F.cross_entropy, (X, y), structured=False, **kw)
    fast = rt.sharpness_dimension(model, F.cross_entropy, (X, y), **kw)
    assert dense.options["route"] == "dense" and fast.options["route"] == "structured"
    # rank of [X_B] (+ a ones column with a bias) is the batch size here: 8 < 20 (21)
    assert fast.options["structured_rank"] == [8, 8, 8]
    scale = np.abs(dense.eigenvalues).max()
    np.testing.assert_allclose(fast.eigenvalues, dense.eigenvalues, rtol=0, atol=1e-10 * scale)
    assert float(fast.value) == pytest.approx(float(dense.value), abs=1e-9)
    np.testing.assert_allclose(fast.lambdas, dense.lambdas, atol=1e-10)
    # the null directions (N - reduced size per batch) are exactly zero, hence neutral
    n_red = 6 * 8 + 6 * 6 + 6 * 3 + (6 + 3 if bias else 0)  # W_1 U (6 x rank 8), W_2, W_3 (+ b_2, b_3)
    assert np.all((fast.eigenvalues == 0).sum(axis=1) >= fast.n_params - n_red)
    assert fast.n_neutral == pytest.approx(dense.n_neutral)
    assert fast.n_expanding + fast.n_neutral + fast.n_contracting == pytest.approx(fast.n_params)


def test_structured_through_flatten_and_frozen_bias(problem):
    X, y = problem
    Ximg = X.reshape(48, 4, 5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[1].bias.requires_grad_(False)  # a frozen bias is a constant: no ones column
    kw = dict(lr=2.0, batch_size=6, n_batches=2, seed=1, baselines=False)
    dense = rt.sharpness_dimension(model, F.cross_entropy, (Ximg, y), structured=False, **kw)
    fast = rt.sharpness_dimension(model, F.cross_entropy, (Ximg, y), **kw)
    assert fast.options["route"] == "structured" and fast.options["structured_rank"] == [6, 6]
    scale = np.abs(dense.eigenvalues).max()
    np.testing.assert_allclose(fast.eigenvalues, dense.eigenvalues, rtol=0, atol=1e-10 * scale)
    assert float(fast.value) == pytest.approx(float(dense.value), abs=1e-9)


def test_structured_with_rank_deficient_inputs_and_mse(problem):
    X, _ = problem
    Xr = X[:, :3] @ torch.randn(3, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # rank 3
    yr = torch.randn(48, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = nn.Sequential(nn.Linear(20, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    kw = dict(lr=1.0, batch_size=10, n_batches=2, seed=2, baselines=False)
    dense = rt.sharpness_dimension(model, F.mse_loss, (Xr, yr), structured=False, **kw)
    fast = rt.sharpness_dimension(model, F.mse_loss, (Xr, yr), **kw)
    assert fast.options["structured_rank"] == [4, 4]  # rank 3 plus the bias column
    scale = np.abs(dense.eigenvalues).max()
    np.testing.assert_allclose(fast.eigenvalues, dense.eigenvalues, rtol=0, atol=1e-10 * scale)
    assert float(fast.value) == pytest.approx(float(dense.value), abs=1e-9)


class _Scaled(nn.Module):
    """The first Linear is fed 2 x, not the raw input: the detection (input == flattened batch) refuses it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(2 * x)))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))  # the first layer used twice


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)),  # not the raw input
    lambda: _Scaled(),
    lambda: _Twice(),
    lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)),       # first module not Linear
])
def test_falls_back_where_the_structure_does_not_apply(make):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    model = make().double()
    if isinstance(model[0] if isinstance(model, nn.Sequential) else None, nn.Conv1d):
        X = X.reshape(20, 1, 6)
    kw = dict(lr=2.0, batch_size=4, n_batches=2, seed=0, baselines=False)
    res = rt.sharpness_dimension(model, F.cross_entropy, (X, y), **kw)
    assert res.options["route"] == "dense"
    ref = rt.sharpness_dimension(model, F.cross_entropy, (X, y), structured=False, **kw)
    np.testing.assert_array_equal(res.eigenvalues, ref.eigenvalues)
    op = rt.HessianOperator(model, F.cross_entropy, (X[:4], y[:4]), dtype=torch.float64)
    assert structured_eigenvalues(op) is None


def test_no_reduction_when_the_batch_spans_the_inputs():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (20,), generator=g)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    res = rt.sharpness_dimension(model, F.cross_entropy, (X, y), lr=1.0, batch_size=8, n_batches=1, baselines=False)
    assert res.options["route"] == "dense"  # rank [X_B 1] = 4 = in + 1: nothing to reduce


def test_structured_above_dense_max_matches_range_finder(problem):
    X, y = problem
    model = MLP(20, 3, width=6, depth=3, bias=False, seed=1).double()
    kw = dict(lr=3.0, batch_size=8, n_batches=2, seed=0, baselines=False, dense_max=8)
    rf = rt.sharpness_dimension(model, F.cross_entropy, (X, y), structured=False, **kw)
    fast = rt.sharpness_dimension(model, F.cross_entropy, (X, y), **kw)
    assert rf.options["route"] == "range finder" and fast.options["route"] == "structured"
    scale = np.abs(rf.eigenvalues).max()
    np.testing.assert_allclose(fast.eigenvalues, rf.eigenvalues, rtol=0, atol=1e-9 * scale)
    assert fast.n_hvp < rf.n_hvp
