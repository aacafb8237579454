"""Allocation-free dense kernels used inside the numba engine (private).

Small blocks (dimension <= ``SMALL_DIM_MAX``) get kernels specialised on their sizes: the sizes
are closure constants, so LLVM unrolls the short loops (a 2 x 2 Gram-Schmidt compiles to straight
scalar code). Larger blocks call BLAS/LAPACK through numpy.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS, QR_MGS_MAX_DIM, SMALL_DIM_MAX


@nb.njit(**NUMBA_OPTIONS)
def matmul_into(A, B, out):
    """out <- A @ B for A (d, n), B (n, k). Small sizes use loops; large ones BLAS."""
    d, n = A.shape
    k = B.shape[1]
    if d > SMALL_DIM_MAX or n > SMALL_DIM_MAX:
        out[:, :] = np.dot(np.ascontiguousarray(A), np.ascontiguousarray(B))
        return
    for i in range(d):
        for j in range(k):
            out[i, j] = 0.0
        for p in range(n):
            a = A[i, p]
            for j in range(k):
                out[i, j] += a * B[p, j]


@functools.lru_cache(maxsize=None)
def make_matmul(d: int):
    """out <- A @ B for a square (d, d) A and a (d, k) block B, with d a compile-time constant."""
    if d > SMALL_DIM_MAX:
        return matmul_into

    @nb.njit(**NUMBA_OPTIONS)
    def matmul_d(A, B, out):
        k = B.shape[1]
        for j in range(k):
            for i in range(d):
                s = 0.0
                for p in range(d):
                    s += A[i, p] * B[p, j]
                out[i, j] = s

    return matmul_d


@nb.njit(**NUMBA_OPTIONS)
def _qr_lapack(M, rdiag):
    k = M.shape[1]
    q, r = np.linalg.qr(np.ascontiguousarray(M))
    for j in range(k):
        rdiag[j] = abs(r[j, j])
    M[:, :] = q


def _mgs_source():
    # one implementation of the small QR, compiled either generic (sizes from M.shape) or with
    # constant sizes (see make_orthonormalize)
    def mgs(M, rdiag, d, k):
        for j in range(k):
            # modified Gram-Schmidt, repeated once when the column lost more than half of its
            # squared norm ("twice is enough", Kahan/Parlett): orthogonal to machine precision
            nrm0 = 0.0
            for p in range(d):
                nrm0 += M[p, j] * M[p, j]
            nrm = nrm0
            if j > 0:
                for sweep in range(2):
                    for i in range(j):
                        dot = 0.0
                        for p in range(d):
                            dot += M[p, i] * M[p, j]
                        for p in range(d):
                            M[p, j] -= dot * M[p, i]
                    nrm = 0.0
                    for p in range(d):
                        nrm += M[p, j] * M[p, j]
                    if nrm > 1e-2 * nrm0:
                        break
                    nrm0 = nrm
            nrm = np.sqrt(nrm)
            rdiag[j] = nrm
            if nrm > 0.0:
                inv = 1.0 / nrm
                for p in range(d):
                    M[p, j] *= inv

    return mgs


_mgs = nb.njit(**NUMBA_OPTIONS)(_mgs_source())
_mgs_inline = nb.njit(inline="always", **NUMBA_OPTIONS)(_mgs_source())


@nb.njit(**NUMBA_OPTIONS)
def orthonormalize(M, rdiag):
    """Thin QR of M (d, k) in place: M <- Q, rdiag <- |diag R|.

    Blocks with d <= QR_MGS_MAX_DIM use modified Gram-Schmidt with conditional
    re-orthogonalisation; larger ones LAPACK. A column that collapses to zero is left as zeros with rdiag 0 (the caller reports it).
    """
    d, k = M.shape
    if d > QR_MGS_MAX_DIM:
        _qr_lapack(M, rdiag)
    else:
        _mgs(M, rdiag, d, k)


@functools.lru_cache(maxsize=None)
def make_orthonormalize(d: int, k: int):
    """:func:`orthonormalize` specialised on the block size (d, k) (sizes are constants)."""
    if d > SMALL_DIM_MAX:
        return orthonormalize
    mgs = _mgs_inline

    @nb.njit(**NUMBA_OPTIONS)
    def ortho(M, rdiag):
        mgs(M, rdiag, d, k)

    return ortho
