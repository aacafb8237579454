"""Hessian tools (MATH.md §6): the operator, Lanczos, SLQ and traces against dense references."""

import numpy as np
import pytest
import torch
from torch import nn

import rdsim.torch as rt
from models import MLP

F = nn.functional
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _problem(device="cpu", n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (n,), generator=g).to(device)
    model = MLP(6, 3, width=8, depth=2, seed=seed).double().to(device)
    return model, X, y


def _func_hessian(model, X, y, loss=F.cross_entropy):
    """An independent dense Hessian with torch.func.hessian over the flat parameter vector."""
    named = list(model.named_parameters())
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(w):
        ps = {n: t.view(s) for (n, _), t, s in zip(named, w.split(numels), shapes)}
        return loss(torch.func.functional_call(model, ps, (X,)), y)

    return torch.func.hessian(f)(flat).cpu().numpy()


@pytest.fixture(scope="module")
def mlp():
    model, X, y = _problem()
    H = _func_hessian(model, X, y)
    return model, X, y, H, np.linalg.eigvalsh(H)


@pytest.mark.parametrize("device", DEVICES)
def test_operator_products_match_dense(device):
    model, X, y = _problem(device)
    H = _func_hessian(model, X, y)
    op = rt.HessianOperator(model, F.cross_entropy, (X, y), chunk_size=5)
    n = op.n_params
    rng = np.random.default_rng(0)
    V = rng.standard_normal((n, 7))
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-12)
    np.testing.assert_allclose(op.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-12)
    Vt = torch.as_tensor(V, device=device)
    out = op @ Vt
    assert isinstance(out, torch.Tensor) and out.device.type == device
    np.testing.assert_allclose(out.cpu().numpy(), H @ V, atol=1e-12)
    np.testing.assert_allclose(op.dense().cpu().numpy(), H, atol=1e-12)
    assert op.n_hvp == 7 + 1 + 7 + n


def test_batches_are_weighted_by_sample_count(mlp):
    model, X, y, H, _ = mlp
    # uneven batches (10, 30, 24): the operator must equal the full-batch Hessian
    parts = [(X[:10], y[:10]), (X[10:40], y[10:40]), (X[40:], y[40:])]
    op = rt.HessianOperator(model, F.cross_entropy, parts)
    assert op.n_samples == 64 and len(op.batches) == 3
    np.testing.assert_allclose(op.dense().numpy(), H, atol=1e-12)


def test_float64_option_on_a_float32_model(mlp):
    model, X, y, H, _ = mlp
    m32 = MLP(6, 3, width=8, depth=2, seed=0)  # same init, float32 parameters
    op = rt.HessianOperator(m32, F.cross_entropy, (X.float(), y), dtype=torch.float64)
    assert op.dtype == torch.float64
    assert next(m32.parameters()).dtype == torch.float32  # the model is not modified
    H64 = op.dense().numpy()
    np.testing.assert_allclose(H64, H, atol=1e-6)  # float32 init rounded, float32 inputs rounded
    op32 = rt.HessianOperator(m32, F.cross_entropy, (X.float(), y))
    assert op32.dense().dtype == torch.float32


def test_scipy_export_and_eigsh(mlp):
    from scipy.sparse.linalg import eigsh

    model, X, y, H, ev = mlp
    op = rt.HessianOperator(model, F.cross_entropy, (X, y))
    L = op.to_scipy()
    assert L.shape == (op.n_params, op.n_params)
    vals = np.sort(eigsh(L, k=4, which="LA", tol=1e-12)[0])[::-1]
    np.testing.assert_allclose(vals, ev[::-1][:4], rtol=1e-9)


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_lanczos_top_k_matches_func_hessian(mlp, which):
    model, X, y, H, ev = mlp
    assert ev[0] < -1e-3  # the spectrum has negative eigenvalues
    k = 10
    res = rt.hessian_eigenvalues(model, F.cross_entropy, (X, y), k=k, which=which, tol=1e-8, return_details=True)
    assert res.all_converged and res.n_hvp == res.n_iter < op_dim(model)
    if which == "LA":
        ref = ev[::-1][:k]
    elif which == "SA":
        ref = ev[:k]
    else:
        ref = np.sort(np.r_[ev[-5:], ev[:5]])[::-1]
    got = res.eigenvalues
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert np.all(res.residuals <= 1e-8 * np.maximum(np.abs(got), 1e-10 * np.abs(ev).max()) + 1e-300)
    # the residuals are true residuals ||H y - theta y||
    res_v = rt.lanczos(H, k, which=which, tol=1e-8, return_vectors=True)
    Y = res_v.eigenvectors
    true = np.linalg.norm(H @ Y - Y * res_v.eigenvalues[None, :], axis=0)
    np.testing.assert_allclose(true, res_v.residuals, atol=1e-12)
    # the public default returns descending values
    plain = rt.hessian_eigenvalues(model, F.cross_entropy, (X, y), k=3, which="SA", tol=1e-8)
    np.testing.assert_allclose(plain, ev[:3][::-1], rtol=1e-6)


def op_dim(model):
    return sum(p.numel() for p in model.parameters())


def test_lanczos_invariant_subspace_and_nonconvergence_flag():
    A = np.diag([5.0, 5.0, 1.0, 1.0, 0.0, 0.0])  # 3 distinct eigenvalues: Krylov space of dim 3
    res = rt.lanczos(A, 3, tol=1e-10)
    # the breakdown after 3 steps restarts from a vector orthogonal to the basis, which finds the
    # second copies: the top 3 with multiplicity, as a dense solver gives them
    assert res.n_iter == 6 and res.n_restarts == 1 and res.all_converged
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 1.0], atol=1e-12)
    rng = np.random.default_rng(0)
    B = np.diag(np.linspace(1.0, 1.001, 200)) + 0 * rng.standard_normal((200, 200))
    with pytest.warns(RuntimeWarning, match="did not reach"):
        r2 = rt.hessian_eigenvalues(nn.Linear(200, 1, bias=False).double(), F.mse_loss,
                                    (torch.as_tensor(np.sqrt(200 / 2) * np.sqrt(B)), torch.zeros(200, 1, dtype=torch.float64)),
                                    k=5, tol=1e-14, max_iter=12, return_details=True)
    assert not r2.all_converged


def test_hutchinson_and_hutchpp(mlp):
    model, X, y, H, ev = mlp
    op = rt.HessianOperator(model, F.cross_entropy, (X, y))
    tr = float(np.trace(H))
    # Hutch++ is exact when rank <= probes / 3
    rng = np.random.default_rng(1)
    U = np.linalg.qr(rng.standard_normal((50, 4)))[0]
    low = U @ np.diag([3.0, -1.0, 2.0, 0.5]) @ U.T
    assert abs(rt.hutchpp_trace(low, 15) - 4.5) < 1e-10
    # unbiased estimates: the error over several seeds shrinks like 1/sqrt(probes)
    errs = [rt.hutchinson_trace(op, 300, seed=s) - tr for s in range(4)]
    assert abs(np.mean(errs)) < 0.1 * abs(tr)
    assert abs(rt.hutchpp_trace(op, 300, seed=0) - tr) < 0.03 * abs(tr)
    assert op.trace(90) == rt.hutchpp_trace(op, 90)


def test_slq_density_mass_trace_and_exactness_with_full_krylov(mlp):
    model, X, y, H, ev = mlp
    op = rt.HessianOperator(model, F.cross_entropy, (X, y))
    n = op.n_params
    dens = rt.slq(op, n_runs=8, n_iter=n, seed=0)
    vals, mass = dens.pooled()
    assert abs(mass.sum() - n) < 1e-9  # the density integrates to the parameter count
    grid = np.linspace(ev[0] - 1, ev[-1] + 1, 20001)
    assert abs(np.trapezoid(dens.density(grid), grid) - n) < 1e-6 * n
    # with m = n every run's Ritz values are the eigenvalues (each distinct one once)
    for r in range(dens.n_runs):
        row = dens.nodes[r][dens.weights[r] > 1e-14]
        assert np.all(np.min(np.abs(row[:, None] - ev[None, :]), axis=1) < 1e-8)
    # repeated eigenvalues (e.g. the zeros of dead units) end a run early at an invariant subspace
    lengths = (~np.isnan(dens.nodes)).sum(axis=1)
    assert dens.n_hvp == lengths.sum() <= 8 * n
    # the trace estimate of SLQ is Hutchinson's: close to tr(H)
    assert abs(dens.trace() - np.trace(H)) < 0.15 * abs(np.trace(H))


def test_lockstep_equals_single_runs(mlp):
    model, X, y, H, ev = mlp
    dens = rt.slq(H, n_runs=3, n_iter=20, seed=5)
    seeds = np.random.SeedSequence(5).generate_state(3)
    for r, sd in enumerate(seeds):
        one = rt.lanczos(H, 1, n_iter=20, seed=int(sd))
        np.testing.assert_allclose(dens.nodes[r], one.ritz_values, atol=1e-10)
        np.testing.assert_allclose(dens.weights[r], one.ritz_weights / one.ritz_weights.sum(), atol=1e-10)


def test_batchnorm_policy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    with pytest.raises(ValueError, match="BatchNorm in train mode.*model.eval"):
        rt.HessianOperator(model, F.cross_entropy, (X, y))
    with torch.no_grad():
        model(X)  # give the running statistics non-trivial values
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = rt.HessianOperator(model, F.cross_entropy, (X, y))
    H = op.dense().numpy()
    assert np.allclose(H, H.T)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched
    drop = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="dropout"):
        rt.HessianOperator(drop, F.cross_entropy, (X.float(), y))


def test_bad_inputs(mlp):
    model, X, y, H, ev = mlp
    with pytest.raises(TypeError, match="model"):
        rt.HessianOperator(lambda x: x, F.cross_entropy, (X, y))
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        rt.HessianOperator(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (X, y))
    with pytest.raises(ValueError, match="data"):
        rt.HessianOperator(model, F.cross_entropy, (X, y[:5]))
    with pytest.raises(TypeError, match="data"):
        rt.HessianOperator(model, F.cross_entropy, 3)
    op = rt.HessianOperator(model, F.cross_entropy, (X, y))
    with pytest.raises(ValueError, match="k: asked for"):
        rt.lanczos(op, op.n_params + 1)
    with pytest.raises(ValueError, match="which"):
        rt.lanczos(op, 2, which="LM")
    with pytest.raises(ValueError, match="V: expected shape"):
        op.matvec(np.ones(3))
    with pytest.raises(ValueError, match="n: the dimension"):
        rt.lanczos(lambda V: V, 2)
    with pytest.raises(ValueError, match="n_probes"):
        rt.hutchpp_trace(op, 2)


def _rank_deficient():
    """Least squares with 43 weights and 37 samples: a rank-37 Hessian (2/37) X^T X."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(37, 43, generator=g, dtype=torch.float64)
    y = torch.randn(37, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(43, 1, bias=False).double()
    H = (2.0 / 37) * (X.T @ X).numpy()
    return model, X, y, H


def test_lanczos_breakdown_restarts_and_returns_all_eigenvalues():
    model, X, y, H = _rank_deficient()
    ref = np.linalg.eigvalsh(H)[::-1]
    op = rt.HessianOperator(model, F.mse_loss, (X, y))
    res = rt.lanczos(op, k=43, tol=1e-8)
    assert np.all(np.isfinite(res.eigenvalues)) and res.n_restarts >= 1
    np.testing.assert_allclose(np.sort(res.eigenvalues)[::-1], ref, atol=1e-10 * ref[0])
    ev = rt.hessian_eigenvalues(model, F.mse_loss, (X, y), k=40, tol=1e-8)
    assert np.all(np.isfinite(ev)) and ev[0] == pytest.approx(ref[0], rel=1e-10)
    np.testing.assert_allclose(ev, ref[:40], atol=1e-10 * ref[0])
    with pytest.raises(ValueError, match="n_iter"):
        rt.lanczos(op, k=3, n_iter=2)


def test_lanczos_refuses_a_non_symmetric_matrix():
    A = np.triu(np.random.default_rng(0).standard_normal((20, 20)))
    with pytest.raises(ValueError, match="not symmetric"):
        rt.lanczos(A, k=2)
    with pytest.raises(ValueError, match="not symmetric"):
        rt.slq(A, n_runs=2, n_iter=5)
    rt.lanczos(A + A.T, k=2)  # symmetric: fine


def test_float32_basis_and_no_reorth(mlp):
    model, X, y, H, ev = mlp
    op = rt.HessianOperator(model, F.cross_entropy, (X, y))
    r64 = rt.lanczos(op, k=3, tol=1e-10)
    r32 = rt.lanczos(op, k=3, tol=1e-6, basis_dtype=torch.float32)
    np.testing.assert_allclose(r32.eigenvalues, r64.eigenvalues, atol=1e-6 * abs(ev).max())
    np.testing.assert_allclose(r64.eigenvalues, ev[::-1][:3], atol=1e-9 * abs(ev).max())
    with pytest.raises(ValueError, match="ghost"):
        rt.lanczos(op, k=3, reorth="none")
    with pytest.raises(ValueError, match="basis_dtype"):
        rt.lanczos(op, k=3, basis_dtype=torch.int32)
    full = rt.slq(op, n_runs=4, n_iter=30, seed=1)
    none = rt.slq(op, n_runs=4, n_iter=30, seed=1, reorth="none")
    cpu = rt.slq(op, n_runs=4, n_iter=30, seed=1, basis_dtype="float32", basis_device="cpu")
    # the trace estimate is the same Rademacher quadratic forms in every mode (exact in exact arithmetic)
    for d in (full, none, cpu):
        assert d.trace() == pytest.approx(full.trace(), rel=1e-6)
    assert "SpectralDensity(" in repr(full) and "LanczosResult(" in repr(r64)
