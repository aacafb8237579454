"""The QR path chosen by the block size (d, k) (rdsim._linalg.qr_path) and the BLAS tangent push
above SMALL_DIM_MAX: every path gives the exponents of a numpy reference loop to 1e-10 on a
linear map with known exponents.
"""

import numpy as np
import pytest

import rdsim
from rdsim import _config
from rdsim._linalg import _qr_lapack, make_orthonormalize, qr_path


@pytest.mark.parametrize("d, k, path", [
    (2, 2, "scalar"), (4, 4, "scalar"), (16, 1, "scalar"),
    (8, 8, "mgs"), (32, 16, "mgs"), (48, 16, "mgs"), (128, 8, "mgs"), (500, 1, "mgs"), (500, 4, "mgs"),
    (1000, 4, "mgs"),
    (24, 24, "mgs"), (26, 26, "lapack"), (40, 40, "lapack"), (256, 8, "lapack"), (500, 16, "lapack"), (500, 500, "lapack"),
    (520, 16, "lapack"), (1000, 8, "lapack"),
])
def test_qr_path_selection(d, k, path):
    assert qr_path(d, k) == path
    assert (d * k * k > _config.QR_MGS_MAX_WORK) == (path == "lapack")


def test_make_orthonormalize_follows_the_path():
    assert make_orthonormalize(500, 500) is _qr_lapack
    assert make_orthonormalize(500, 4) is not _qr_lapack


def _known_linear_map(d, seed):
    """A = U T U^T with T upper triangular, |T_ii| strictly decreasing; U orthogonal.

    span(U[:, :k]) is invariant, so from Q0 = U[:, :k] every step contributes log|T_ii| exactly
    (up to rounding): the exponents are known from the first step on.
    """
    rng = np.random.default_rng(seed)
    diag = np.exp(np.linspace(1.5, -1.5, d)) * np.where(np.arange(d) % 3 == 1, -1.0, 1.0)
    T = np.triu(rng.standard_normal((d, d)) / np.sqrt(d), 1) + np.diag(diag)
    U, r = np.linalg.qr(rng.standard_normal((d, d)))
    U = U * np.sign(np.diag(r))
    return U @ T @ U.T, U, np.log(np.abs(diag))


def _numpy_reference(A, Q, n):
    s = np.zeros(Q.shape[1])
    for _ in range(n):
        Q, R = np.linalg.qr(A @ Q)
        s += np.log(np.abs(np.diag(R)))
    return s / n


@pytest.mark.parametrize("d, k", [(4, 4), (8, 8), (30, 30), (60, 3), (64, 64), (120, 10)])
def test_paths_agree_with_numpy_reference(d, k):
    A, U, logs = _known_linear_map(d, seed=d + k)
    m = rdsim.systems.linear_map(A)
    n = 300
    res = rdsim.lyapunov_spectrum(m, None, n, k=k, Q0=U[:, :k])
    assert res.status == "ok"
    ref = _numpy_reference(A, U[:, :k], n)
    np.testing.assert_allclose(res.exponents, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.exponents, logs[:k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("d", [40, 60])
def test_blas_tangent_push_matches_dense_product(d):
    # above SMALL_DIM_MAX (48) the map's tangent push is dgemm; below, the summation loop
    A, _, _ = _known_linear_map(d, seed=1)
    m = rdsim.systems.linear_map(A)
    V = np.random.default_rng(2).standard_normal((d, 7))
    np.testing.assert_allclose(m.tangent(np.zeros(d), None, V), A @ V, rtol=1e-13, atol=1e-13)
