"""Allocation-free dense kernels used inside the numba engine (private)."""

from __future__ import annotations

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS, SMALL_DIM_MAX


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


@nb.njit(**NUMBA_OPTIONS)
def orthonormalize(M, rdiag):
    """Thin QR of M (d, k) in place: M <- Q, rdiag <- |diag R|.

    Small blocks use modified Gram-Schmidt with one re-orthogonalisation pass (MGS2, orthogonal
    to machine precision for the well-conditioned blocks the engine keeps); large ones LAPACK.
    A column that collapses to zero is left as zeros with rdiag 0 (the caller reports it).
    """
    d, k = M.shape
    if d > SMALL_DIM_MAX:
        q, r = np.linalg.qr(np.ascontiguousarray(M))
        for j in range(k):
            rdiag[j] = abs(r[j, j])
        M[:, :] = q
        return
    for j in range(k):
        # modified Gram-Schmidt, repeated once when the column lost most of its norm
        # ("twice is enough", Kahan/Parlett): orthogonal to machine precision
        nrm0 = 0.0
        for p in range(d):
            nrm0 += M[p, j] * M[p, j]
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
            if j == 0 or nrm > 0.5 * nrm0:
                break
            nrm0 = nrm
        nrm = np.sqrt(nrm)
        rdiag[j] = nrm
        if nrm > 0.0:
            inv = 1.0 / nrm
            for p in range(d):
                M[p, j] *= inv
